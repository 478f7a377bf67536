"""RandConv on the device: views of a CT batch through random 3D convolutions, drawn afresh per
sample and per view, so the network sees one anatomy under several random intensity mappings.

One view of one sample: a kernel size k drawn from `kernel_sizes`, a k^3 Kaiming-normal kernel
(std gain / sqrt(k^3), one input channel; gain 1 as the method's reference draws it, sqrt(2) is
the ReLU gain this project used before: its views keep less of the pancreas's contrast,
docs/results.md), a bias ~ U(-1/sqrt(k^3), 1/sqrt(k^3)) (torch's default
conv bias range), a mix a ~ U(0, 1); view = clamp(a * conv(x) + (1 - a) * x, 0, 1), then min-max
normalised per sample. Every kernel is held in a (K, K, K) array, K = max(kernel_sizes), zero
outside its centred k^3 window, so the drawn size never decides control flow under jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dualseg_jax.errors import ConfigError
from dualseg_jax.models import layers

DEFAULT_KERNEL_SIZES = (3, 5, 7)
DEFAULT_GAIN = 1.0
# Images whose range is below this stay as they are instead of being divided by ~0.
CONSTANT_RANGE = 1e-6


def _check_kernel_sizes(kernel_sizes: tuple[int, ...]) -> None:
  if not kernel_sizes or any(size < 1 or size % 2 == 0 for size in kernel_sizes):
    raise ConfigError(f'augment.randconv_kernel_sizes={kernel_sizes}: need odd sizes >= 1, e.g. (3, 5, 7)')


def _check_gain(gain: float) -> None:
  if not gain > 0:
    raise ConfigError(f'augment.randconv_gain={gain}: need a positive kernel gain, e.g. 1.0 (std 1/sqrt(k^3))')


@functools.partial(jax.jit, static_argnames=('batch_size', 'num_views', 'kernel_sizes', 'gain'))
def draw_parameters(key: jax.Array, batch_size: int, num_views: int,
                    kernel_sizes: tuple[int, ...] = DEFAULT_KERNEL_SIZES,
                    gain: float = DEFAULT_GAIN) -> dict[str, jax.Array]:
  """Random convolutions for `num_views` views of `batch_size` samples, kernels of std
  gain / sqrt(k^3).

  Returns `kernel` (V, B, K, K, K), `bias`, `mix` and `kernel_size` (V, B).
  """
  _check_kernel_sizes(kernel_sizes)
  _check_gain(gain)
  largest = max(kernel_sizes)
  size_key, kernel_key, bias_key, mix_key = jax.random.split(key, 4)
  shape = (num_views, batch_size)
  kernel_size = jax.random.choice(size_key, jnp.asarray(kernel_sizes, jnp.int32), shape)
  fan_in = (kernel_size ** 3).astype(jnp.float32)
  offsets = jnp.abs(jnp.arange(largest) - largest // 2)
  distance = jnp.maximum(jnp.maximum(offsets[:, None, None], offsets[None, :, None]), offsets[None, None, :])
  inside = distance[None, None] <= (kernel_size // 2)[..., None, None, None]
  std = (gain / jnp.sqrt(fan_in))[..., None, None, None]
  kernel = jax.random.normal(kernel_key, shape + (largest,) * 3) * std * inside
  bias_bound = 1.0 / jnp.sqrt(fan_in)
  bias = jax.random.uniform(bias_key, shape, minval=-1.0, maxval=1.0) * bias_bound
  mix = jax.random.uniform(mix_key, shape)
  return {'kernel': kernel, 'bias': bias, 'mix': mix, 'kernel_size': kernel_size}


def apply_parameters(images: jax.Array, parameters: dict[str, jax.Array], conv_impl: str = 'auto'
                     ) -> jax.Array:
  """Views (V, B, D, H, W, 1) of `images` (B, D, H, W, 1) under drawn random convolutions.

  `conv_impl` as `model.conv_impl` (`layers.conv3d`): the same numbers either way.
  """
  kernel = parameters['kernel']
  num_views, batch_size, largest = kernel.shape[:3]
  images = images.astype(jnp.float32)
  # One grouped conv for everything: channel b of the input is sample b; group b has V outputs.
  lhs = jnp.transpose(images[..., 0], (1, 2, 3, 0))[None]  # (1, D, H, W, B)
  rhs = jnp.transpose(kernel, (2, 3, 4, 1, 0)).reshape((largest,) * 3 + (1, batch_size * num_views))
  convolved = layers.conv3d(lhs, rhs, impl=conv_impl, feature_group_count=batch_size,
                            precision=jax.lax.Precision.HIGHEST)[0]  # (D, H, W, B * V)
  convolved = convolved.reshape(convolved.shape[:3] + (batch_size, num_views))
  convolved = jnp.transpose(convolved, (4, 3, 0, 1, 2))[..., None]  # (V, B, D, H, W, 1)

  def per_sample(values):
    return values[:, :, None, None, None, None]

  mix = per_sample(parameters['mix'])
  views = mix * (convolved + per_sample(parameters['bias'])) + (1.0 - mix) * images[None]
  views = jnp.clip(views, 0.0, 1.0)
  low = jnp.min(views, axis=(2, 3, 4, 5), keepdims=True)
  high = jnp.max(views, axis=(2, 3, 4, 5), keepdims=True)
  value_range = high - low
  is_constant = value_range < CONSTANT_RANGE
  normalised = (views - low) / jnp.where(is_constant, 1.0, value_range)
  return jnp.where(is_constant, views, normalised)


@functools.partial(jax.jit, static_argnames=('num_views', 'kernel_sizes', 'conv_impl', 'gain'))
def random_views_with_parameters(key: jax.Array, images: jax.Array, num_views: int = 2,
                                 kernel_sizes: tuple[int, ...] = DEFAULT_KERNEL_SIZES,
                                 conv_impl: str = 'auto', gain: float = DEFAULT_GAIN
                                 ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """`random_views` plus the drawn parameters (kernel, bias, mix, kernel_size per view and sample)."""
  kernel_sizes = tuple(kernel_sizes)
  parameters = draw_parameters(key, images.shape[0], num_views, kernel_sizes, float(gain))
  views = apply_parameters(images, parameters, conv_impl)
  return [views[index] for index in range(num_views)], parameters


def random_views(key: jax.Array, images: jax.Array, num_views: int = 2,
                 kernel_sizes: tuple[int, ...] = DEFAULT_KERNEL_SIZES, conv_impl: str = 'auto',
                 gain: float = DEFAULT_GAIN) -> list[jax.Array]:
  """`num_views` RandConv views of `images` (B, D, H, W, 1), each (B, D, H, W, 1) in [0, 1]."""
  views, _ = random_views_with_parameters(key, images, num_views, tuple(kernel_sizes), conv_impl,
                                          float(gain))
  return views


def two_views(key: jax.Array, images: jax.Array) -> list[jax.Array]:
  """Two RandConv views of `images` with the paper's kernel sizes (3, 5, 7)."""
  return random_views(key, images, 2, DEFAULT_KERNEL_SIZES)
