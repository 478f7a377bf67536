"""The dual-task 3D residual U-Net: segmentation logits, a signed-distance head, a contrastive
embedding at the bottleneck and an optional per-slice tumour classifier. NDHWC layout.

Layout (paper widths (32, 64, 128, 256), blocks (1, 2, 2, 2)):
- stem: 3x3x3 conv 1 -> widths[0]; level 0: blocks[0] residual blocks at widths[0] (skip 0).
- levels 1..3, `downsample`:
  'separate' (the method's): a downsampling unit, GN-ReLU-3x3x3 conv with stride 2 from
  widths[i - 1] to widths[i], then blocks[i] identity residual blocks at widths[i];
  'strided_block': blocks[i] residual blocks at widths[i], the first with stride 2 (its 3x3x3
  conv and its GN-ReLU-1x1 shortcut are strided), with the parameter names of checkpoints
  trained in this layout. The level's output is skip i (1/2, 1/4, 1/8 size).
- bottom: dilated_blocks more blocks at widths[-1] with dilation `dilation` -> bottleneck.
- embedding: 1x1 conv widths[-1] -> embedding_dim + ReLU.
- fusion: GN-ReLU-channel dropout-3x3x3 weight-standardised conv widths[-1] -> fusion_width.
  Its fan-in sets how much of the decoder the bottleneck drives against the un-normalised skips
  added after it: with a 1x1 conv the Dice gradient reaching the bottleneck at initialisation
  was ~4x smaller (docs/design.md, "Short schedules").
- decoder stage j (j = 0, 1, 2): nearest x2 upsampling, add skip 2 - j, one residual block to
  decoder_widths[j]. The channels must line up: fusion_width == widths[2],
  decoder_widths[0] == widths[1], decoder_widths[1] == widths[0].
- heads: with `head_norm` (this project's default; the method has none) a GN on the decoder
  output, followed by a ReLU when head_activation == 'relu' (not the default: see
  docs/design.md, "Heads"), then 1x1 convs with bias from decoder_widths[-1] to num_classes logits and to
  num_classes SDF values read through tanh. Weight-standardised convs return sums of fan-in
  unit-variance terms, so without the norm the paper network's logits start with a standard
  deviation of 18-19 (torch_default; 44-46 with he_normal) and the SDF head's tanh starts
  saturated (|sdf| > 0.9 on 92-98% of voxels: no gradient); with it 0.4 (1.0) and under 15%.
  Measured on 16x32x32 inputs, 'separate', 2 initialisations each. The logits' bias starts at
  logit(foreground_prior).
- slice head: GN-ReLU on the bottleneck, mean over each bottleneck slice's (H, W), MLP
  widths[-1] -> slice_hidden -> 1; full-resolution slice z reads bottleneck slice z // 8.
Every conv and dense kernel starts from `kernel_init` (layers.kernel_initializer), their biases
from the matching layers.bias_initializer, except the logits' prior bias.
Parameters are float32; activations use `dtype`; every output is cast to float32.
"""

from __future__ import annotations

import math

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dualseg_jax.errors import ConfigError
from dualseg_jax.models.layers import (KERNEL_INITS, DownsamplingUnit, ResidualBlock, StdConv3D,
                                      bias_initializer, group_norm, kernel_initializer,
                                      resolve_conv_impl)

NUM_LEVELS = 4
DOWNSAMPLE_FACTOR = 2 ** (NUM_LEVELS - 1)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DOWNSAMPLE_MODES = ('separate', 'strided_block')
HEAD_ACTIVATIONS = ('relu', 'none')


def _upsample_nearest(x: jax.Array) -> jax.Array:
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class DualTaskUNet(nn.Module):
  """See the module docstring for the layout; `__call__` returns the dict of docs/design.md."""

  widths: tuple[int, ...] = (32, 64, 128, 256)
  blocks: tuple[int, ...] = (1, 2, 2, 2)
  dilated_blocks: int = 2
  dilation: int = 2
  fusion_width: int = 128
  embedding_dim: int = 32
  decoder_widths: tuple[int, ...] = (64, 32, 32)
  dropout: float = 0.1
  num_groups: int = 8
  num_classes: int = 2
  foreground_prior: float = 0.02
  slice_head: bool = False
  slice_hidden: int = 128
  dtype: Any = jnp.float32
  remat: bool = False
  subsample_stride: bool = False
  conv_impl: str = 'conv3d'
  downsample: str = 'separate'
  head_norm: bool = True
  head_activation: str = 'none'
  kernel_init: str = 'torch_default'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if any(size % DOWNSAMPLE_FACTOR for size in images.shape[1:4]):
      raise ValueError(f'input spatial shape {images.shape[1:4]} must be a multiple of {DOWNSAMPLE_FACTOR}')
    # Rematerialising the blocks trades a second forward pass for activation memory.
    block_class = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    downsampling_class = nn.remat(DownsamplingUnit) if self.remat else DownsamplingUnit

    # Settings every block and downsampling unit shares, by name: the two classes order their
    # fields differently.
    layer_settings = dict(num_groups=self.num_groups, dtype=self.dtype,
                          subsample_stride=self.subsample_stride, conv_impl=self.conv_impl,
                          kernel_init=self.kernel_init)

    def block(features, stride, dilation, name):
      return block_class(features, stride=stride, dilation=dilation, name=name, **layer_settings)

    def conv1x1(features, fan_in, name, bias_init=None):
      return nn.Conv(features, (1, 1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=kernel_initializer(self.kernel_init),
                     bias_init=bias_init or bias_initializer(self.kernel_init, fan_in), name=name)

    x = StdConv3D(self.widths[0], 3, dtype=self.dtype, conv_impl=self.conv_impl,
                  kernel_init=self.kernel_init, name='stem')(images)
    skips = []
    for level, (width, num_blocks) in enumerate(zip(self.widths, self.blocks)):
      strided_block = level > 0 and self.downsample == 'strided_block'
      if level > 0 and self.downsample == 'separate':
        x = downsampling_class(width, name=f'encoder{level}_downsample', **layer_settings)(x)
      for index in range(num_blocks):
        stride = 2 if strided_block and index == 0 else 1
        x = block(width, stride, 1, f'encoder{level}_block{index}')(x)
      skips.append(x)
    for index in range(self.dilated_blocks):
      x = block(self.widths[-1], 1, self.dilation, f'dilated_block{index}')(x)
    bottleneck = x

    embedding = nn.relu(conv1x1(self.embedding_dim, self.widths[-1], 'projection')(bottleneck))

    x = nn.relu(group_norm(self.num_groups, self.dtype, name='fusion_norm')(bottleneck))
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
    x = StdConv3D(self.fusion_width, 3, dtype=self.dtype, conv_impl=self.conv_impl,
                  kernel_init=self.kernel_init, name='fusion_conv')(x)
    for stage, width in enumerate(self.decoder_widths):
      x = _upsample_nearest(x) + skips[NUM_LEVELS - 2 - stage]
      x = block(width, 1, 1, f'decoder{stage}_block')(x)

    if self.head_norm:
      x = group_norm(self.num_groups, self.dtype, name='head_norm')(x)
      if self.head_activation == 'relu':
        x = nn.relu(x)
    # The bias starts at the logit of the expected foreground share: at 0 (p = 0.5 everywhere)
    # Adam needs thousands of steps to move it to the background's -4.
    prior_logit = math.log(self.foreground_prior / (1.0 - self.foreground_prior))
    logits = conv1x1(self.num_classes, x.shape[-1], 'segmentation_head',
                     bias_init=nn.initializers.constant(prior_logit))(x)
    sdf = conv1x1(self.num_classes, x.shape[-1], 'sdf_head')(x)
    outputs = {
        'logits': logits.astype(jnp.float32),
        'sdf': jnp.tanh(sdf.astype(jnp.float32)),
        'embedding': embedding.astype(jnp.float32),
    }
    if self.slice_head:
      outputs['slice_logits'] = self._slice_logits(bottleneck, images.shape[1])
    return outputs

  def _slice_logits(self, bottleneck: jax.Array, depth: int) -> jax.Array:
    x = nn.relu(group_norm(self.num_groups, self.dtype, name='slice_norm')(bottleneck))
    # The slice mean runs in float32: it sums H/8 * W/8 values.
    x = jnp.mean(x.astype(jnp.float32), axis=(2, 3))  # (B, D/8, C)

    def dense(features, fan_in, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=kernel_initializer(self.kernel_init),
                      bias_init=bias_initializer(self.kernel_init, fan_in), name=name)

    x = nn.relu(dense(self.slice_hidden, x.shape[-1], 'slice_hidden')(x))
    x = dense(1, self.slice_hidden, 'slice_output')(x)
    x = x[..., 0].astype(jnp.float32)  # (B, D/8)
    return jnp.repeat(x, depth // x.shape[1], axis=1)  # (B, D)


def _check_widths(model_config: ml_collections.ConfigDict) -> None:
  widths, blocks = tuple(model_config.widths), tuple(model_config.blocks)
  decoder_widths = tuple(model_config.decoder_widths)
  if len(widths) != NUM_LEVELS or len(blocks) != NUM_LEVELS:
    raise ConfigError(f'model.widths {widths} and model.blocks {blocks} need {NUM_LEVELS} entries each')
  if model_config.downsample not in DOWNSAMPLE_MODES:
    raise ConfigError(f'model.downsample={model_config.downsample!r}; '
                      f'choose one of {DOWNSAMPLE_MODES}')
  if any(count < 0 for count in blocks):
    raise ConfigError(f'model.blocks {blocks}: block counts cannot be negative')
  # With 'separate' the downsampling unit alone can carry a level; 'strided_block' needs its block.
  if model_config.downsample == 'strided_block' and any(count < 1 for count in blocks[1:]):
    raise ConfigError(f'model.blocks {blocks} with model.downsample=\'strided_block\': levels 1-3 '
                      'need at least one (strided) block each')
  if len(decoder_widths) != NUM_LEVELS - 1:
    raise ConfigError(f'model.decoder_widths {decoder_widths} needs {NUM_LEVELS - 1} entries')
  # Each decoder stage adds an encoder skip to the previous stage's output, so widths must match.
  expected = (widths[2], widths[1], widths[0])
  got = (model_config.fusion_width, decoder_widths[0], decoder_widths[1])
  if got != expected:
    raise ConfigError(
        f'(model.fusion_width, model.decoder_widths[0], model.decoder_widths[1]) = {got} must equal '
        f'(widths[2], widths[1], widths[0]) = {expected}: each feeds a sum with that encoder skip')
  channels = widths + decoder_widths + (model_config.fusion_width,)
  if any(width % model_config.num_groups for width in channels):
    raise ConfigError(f'every width in model.widths, model.decoder_widths and model.fusion_width '
                      f'must be divisible by model.num_groups={model_config.num_groups}')
  if model_config.dtype not in _DTYPES:
    raise ConfigError(f'model.dtype={model_config.dtype!r}; choose one of {tuple(_DTYPES)}')
  if model_config.head_activation not in HEAD_ACTIVATIONS:
    raise ConfigError(f'model.head_activation={model_config.head_activation!r}; '
                      f'choose one of {HEAD_ACTIVATIONS}')
  if model_config.kernel_init not in KERNEL_INITS:
    raise ConfigError(f'model.kernel_init={model_config.kernel_init!r}; '
                      f'choose one of {KERNEL_INITS}')


def build_model(model_config: ml_collections.ConfigDict) -> DualTaskUNet:
  """The network described by `config.model`; raises ConfigError when the widths cannot line up."""
  _check_widths(model_config)
  if not 0.0 < model_config.foreground_prior < 1.0:
    raise ConfigError(f'model.foreground_prior={model_config.foreground_prior}: the initial '
                      'foreground probability must lie strictly between 0 and 1, e.g. 0.02')
  return DualTaskUNet(
      widths=tuple(model_config.widths),
      blocks=tuple(model_config.blocks),
      dilated_blocks=model_config.dilated_blocks,
      dilation=model_config.dilation,
      fusion_width=model_config.fusion_width,
      embedding_dim=model_config.embedding_dim,
      decoder_widths=tuple(model_config.decoder_widths),
      dropout=model_config.dropout,
      num_groups=model_config.num_groups,
      num_classes=model_config.num_classes,
      foreground_prior=model_config.foreground_prior,
      slice_head=model_config.slice_head,
      slice_hidden=model_config.slice_hidden,
      dtype=_DTYPES[model_config.dtype],
      remat=model_config.remat,
      subsample_stride=model_config.subsample_stride,
      conv_impl=resolve_conv_impl(model_config.conv_impl),
      downsample=model_config.downsample,
      head_norm=model_config.head_norm,
      head_activation=model_config.head_activation,
      kernel_init=model_config.kernel_init)


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Initial variables for inputs of `input_shape` (B, D, H, W, 1); float32 parameters.

  `rng` is a raw or typed key of any implementation; the same key gives the same variables.
  """
  images = jnp.zeros(input_shape, jnp.float32)

  def init(key):
    # XLA on CPU takes seconds per distinct shape to compile the default (threefry) sampler, a
    # minute for the whole network; initialising from an 'rbg' key derived from `rng` takes ~2 s.
    init_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl='rbg')
    return model.init(init_key, images, train=False)

  return jax.jit(init)(rng)
