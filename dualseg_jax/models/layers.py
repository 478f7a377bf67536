"""Building blocks of the dual-task network: weight-standardised 3D convolution and the
pre-activation residual block (GroupNorm-ReLU-conv twice, plus the input). NDHWC layout."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STANDARDIZE_EPS = 1e-12


def standardize_kernel(kernel: jax.Array, eps: float = STANDARDIZE_EPS) -> jax.Array:
  """Standardises each output filter of a (kd, kh, kw, in, out) kernel to mean 0, variance 1.

  Statistics run over every axis but the last (the output filter), in float32.
  """
  kernel = kernel.astype(jnp.float32)
  reduce_axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axis=reduce_axes, keepdims=True)
  variance = jnp.var(kernel, axis=reduce_axes, keepdims=True)
  return (kernel - mean) / jnp.sqrt(variance + eps)


class StdConv3D(nn.Module):
  """A bias-free 3D convolution whose kernel is weight-standardised on every call.

  Padding is symmetric, dilation * (kernel_size - 1) / 2 per side, so a stride-2 conv of an even
  size gives exactly half the size and samples the same voxels as a strided 1x1 conv.
  `subsample_stride`: compute a strided conv as a stride-1 conv read at every `stride`-th voxel,
  the same numbers; XLA's CPU backend differentiates that ~10x faster than a strided conv.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  subsample_stride: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    shape = (self.kernel_size,) * 3 + (in_features, self.features)
    kernel = self.param('kernel', nn.initializers.he_normal(), shape, jnp.float32)
    kernel = standardize_kernel(kernel).astype(self.dtype)
    pad = self.dilation * (self.kernel_size - 1) // 2
    x = x.astype(self.dtype)
    stride = self.stride
    if stride > 1 and self.kernel_size == 1:
      x, stride = x[:, ::stride, ::stride, ::stride], 1  # a strided 1x1 conv only reads these voxels
    subsample = stride > 1 and self.subsample_stride
    y = jax.lax.conv_general_dilated(
        x, kernel,
        window_strides=(1 if subsample else stride,) * 3,
        padding=((pad, pad),) * 3,
        rhs_dilation=(self.dilation,) * 3,
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    return y[:, ::stride, ::stride, ::stride] if subsample else y


def group_norm(num_groups: int, dtype: Any, name: str | None = None) -> nn.GroupNorm:
  # Flax computes GroupNorm statistics in at least float32 whatever the activation dtype.
  return nn.GroupNorm(num_groups=num_groups, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResidualBlock(nn.Module):
  """Pre-activation residual block: GN-ReLU-conv3(stride, dilation)-GN-ReLU-conv3(dilation) + x.

  When the width or the stride changes, the input reaches the sum through its own GN-ReLU and a
  strided 1x1 weight-standardised conv.
  """

  features: int
  stride: int = 1
  dilation: int = 1
  num_groups: int = 8
  dtype: Any = jnp.float32
  subsample_stride: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = nn.relu(group_norm(self.num_groups, self.dtype, name='norm1')(x))
    y = StdConv3D(self.features, 3, self.stride, self.dilation, self.dtype,
                  self.subsample_stride, name='conv1')(y)
    y = nn.relu(group_norm(self.num_groups, self.dtype, name='norm2')(y))
    y = StdConv3D(self.features, 3, 1, self.dilation, self.dtype, name='conv2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      residual = nn.relu(group_norm(self.num_groups, self.dtype, name='shortcut_norm')(x))
      residual = StdConv3D(self.features, 1, self.stride, 1, self.dtype, name='shortcut_conv')(residual)
    return y + residual.astype(y.dtype)
