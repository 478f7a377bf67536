"""Sliding-window inference over a whole volume: Gaussian-weighted overlapping windows, batched
for one compiled shape, optional test-time flips, accumulated on the device or on the host.

`predict_fn(windows)` maps float32 windows (n, d, h, w, 1) to a dict with `logits` and `sdf`
(n, d, h, w, C); it is called as given, so pass a jitted function. Outputs are per-channel
probabilities (sigmoid of the logits) and the SDF, both float32 (D, H, W, C), averaged over the
flips and blended across windows with the Gaussian importance map.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dualseg_jax.errors import ConfigError

PredictFn = Callable[[jax.Array], dict]
ProgressFn = Callable[[int, int], None]  # (windows done, windows in total)

# Spatial axes of a (D, H, W) volume flipped by each test-time augmentation, in the order
# `tta_flips = N` takes them: no flip first, then single axes, pairs, and all three.
FLIP_COMBINATIONS: tuple[tuple[int, ...], ...] = (
    (), (2,), (1,), (0,), (1, 2), (0, 2), (0, 1), (0, 1, 2))

# Fraction of the window size used as the Gaussian's standard deviation (nnU-Net's choice).
GAUSSIAN_SIGMA_FRACTION = 1.0 / 8.0


def check_settings(overlap: float, windows_per_batch: int) -> None:
  """Window settings no prediction can run with fail here, named by their config keys."""
  if not 0.0 <= overlap < 1.0:
    raise ConfigError(f'inference.overlap = {overlap}: choose a fraction in [0, 1)')
  if windows_per_batch < 1:
    raise ConfigError(f'inference.windows_per_batch = {windows_per_batch}: must be at least 1')


def flip_combinations(num_flips: int) -> tuple[tuple[int, ...], ...]:
  """The first `num_flips` entries of FLIP_COMBINATIONS (1 = no test-time flips)."""
  if not 1 <= num_flips <= len(FLIP_COMBINATIONS):
    raise ConfigError(f'inference.tta_flips = {num_flips}: choose a number of flip combinations '
                      f'from 1 (no flips) to {len(FLIP_COMBINATIONS)} (all flips over D, H, W)')
  return FLIP_COMBINATIONS[:num_flips]


def gaussian_importance_map(window_size: Sequence[int]) -> np.ndarray:
  """Separable Gaussian over a window, peak 1 at the centre, strictly positive everywhere.

  Centre predictions are trusted more than border ones, whose receptive field is cut off.
  """
  profiles = []
  for size in window_size:
    sigma = max(size * GAUSSIAN_SIGMA_FRACTION, 1e-3)
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    profiles.append(np.exp(-0.5 * (offsets / sigma) ** 2))
  weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
  weights /= weights.max()
  # A zero weight where only one window covers a voxel would make the blend 0/0.
  smallest_positive = weights[weights > 0].min()
  return np.maximum(weights, smallest_positive).astype(np.float32)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start indices of windows covering [0, size) with at least `overlap` shared between neighbours.

  `size` must be >= `window` (smaller volumes are padded first). The first window starts at 0,
  the last ends at `size`, and the rest are spread evenly in between.
  """
  if size < window:
    raise ValueError(f'axis of size {size} is smaller than the window {window}; pad it first')
  step = max(window * (1.0 - overlap), 1.0)
  num_windows = int(math.ceil((size - window) / step)) + 1
  if num_windows == 1:
    return [0]
  spacing = (size - window) / (num_windows - 1)
  return [int(round(index * spacing)) for index in range(num_windows)]


def window_positions(shape: Sequence[int], window_size: Sequence[int],
                     overlap: float) -> list[tuple[int, int, int]]:
  """Every window start (d, h, w) over a volume of `shape` (already padded to >= the window)."""
  per_axis = [window_starts(size, window, overlap) for size, window in zip(shape, window_size)]
  return list(itertools.product(*per_axis))


def _padding_for(shape: Sequence[int], window_size: Sequence[int]) -> list[tuple[int, int]]:
  """Symmetric padding that grows each axis to at least the window size."""
  padding = []
  for size, window in zip(shape, window_size):
    missing = max(window - size, 0)
    padding.append((missing // 2, missing - missing // 2))
  return padding


@functools.partial(jax.jit, static_argnames=('axes',))
def _flip_windows(windows: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  # Window arrays are (n, d, h, w, c): spatial axis a is array axis a + 1.
  return jnp.flip(windows, axis=tuple(axis + 1 for axis in axes)) if axes else windows


@functools.partial(jax.jit, static_argnames=('axes',))
def _add_flipped_back(total: jax.Array, logits: jax.Array, sdf: jax.Array,
                      axes: tuple[int, ...]) -> jax.Array:
  outputs = jnp.concatenate([jax.nn.sigmoid(logits.astype(jnp.float32)),
                             sdf.astype(jnp.float32)], axis=-1)
  return total + _flip_windows(outputs, axes)


@jax.jit
def _weigh_windows(total: jax.Array, num_flips: jax.Array, importance: jax.Array,
                   valid: jax.Array) -> jax.Array:
  """Flip-averaged outputs times the importance map; windows that only pad the batch get 0."""
  weights = importance[None] * valid[:, None, None, None].astype(jnp.float32)
  return total / num_flips * weights[..., None]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate_on_device(values: jax.Array, weights: jax.Array, weighted_windows: jax.Array,
                          starts: jax.Array, valid: jax.Array, importance: jax.Array):
  """Adds a batch of weighted window outputs and their weights into the device buffers."""
  window_shape = importance.shape
  num_values = weighted_windows.shape[-1]

  def add_window(index, buffers):
    values, weights = buffers
    start = starts[index]
    value_start = (start[0], start[1], start[2], 0)
    current_values = jax.lax.dynamic_slice(values, value_start, window_shape + (num_values,))
    values = jax.lax.dynamic_update_slice(
        values, current_values + weighted_windows[index], value_start)
    current_weights = jax.lax.dynamic_slice(weights, tuple(start), window_shape)
    window_weight = importance * valid[index].astype(jnp.float32)
    weights = jax.lax.dynamic_update_slice(weights, current_weights + window_weight, tuple(start))
    return values, weights

  # Sequential, because neighbouring windows of one batch overlap.
  return jax.lax.fori_loop(0, weighted_windows.shape[0], add_window, (values, weights))


def sliding_window_inference(
    image: np.ndarray,
    predict_fn: PredictFn,
    window_size: Sequence[int],
    *,
    overlap: float = 0.5,
    windows_per_batch: int = 4,
    flips: Sequence[tuple[int, ...]] = ((),),
    device_buffer_max_voxels: int = 256 * 512 * 512,
    region: tuple[slice, slice, slice] | None = None,
    pad_value: float = 0.0,
    outside_sdf: float = 1.0,
    return_weights: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, np.ndarray]:
  """Predicts a whole (D, H, W) float32 image window by window.

  Args:
    image: preprocessed image (D, H, W).
    predict_fn: jitted windows (n, d, h, w, 1) -> dict(logits, sdf), each (n, d, h, w, C).
    window_size: (d, h, w), the stage's patch size.
    overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
    windows_per_batch: windows per call; the last batch is padded so one shape is compiled.
    flips: spatial axes flipped per test-time augmentation; `()` is the plain prediction.
    device_buffer_max_voxels: blend on the device when the predicted region has at most this
      many voxels, else in host memory.
    region: only this box of the image is predicted (the region of interest); elsewhere the
      probabilities are 0 and the SDF is `outside_sdf`. None: the whole image.
    pad_value: image value used where the region is smaller than the window.
    return_weights: also return the accumulated importance weight per voxel of the region.
    progress: called after each batch with (windows done, windows in total).

  Returns:
    dict with `probabilities` and `sdf`, float32 (D, H, W, C); `weights` (D, H, W) when asked
    (0 outside the region).
  """
  check_settings(overlap, windows_per_batch)
  if not flips:
    raise ConfigError('inference.tta_flips: at least the plain (unflipped) prediction is needed')
  image = np.asarray(image, dtype=np.float32)
  window_size = tuple(int(size) for size in window_size)
  if region is None:
    region = tuple(slice(0, size) for size in image.shape)
  region_image = image[region]
  padding = _padding_for(region_image.shape, window_size)
  padded = np.pad(region_image, padding, mode='constant', constant_values=pad_value)
  positions = window_positions(padded.shape, window_size, overlap)
  importance_host = gaussian_importance_map(window_size)
  importance = jnp.asarray(importance_host)

  on_device = int(np.prod(padded.shape)) <= device_buffer_max_voxels
  padded_on_device = jnp.asarray(padded) if on_device else None
  values = weights = None
  for batch_begin in range(0, len(positions), windows_per_batch):
    batch_positions = positions[batch_begin:batch_begin + windows_per_batch]
    num_valid = len(batch_positions)
    # Pad the last batch with repeats of window 0 (weight 0) to keep the compiled shape.
    batch_positions = batch_positions + [positions[0]] * (windows_per_batch - num_valid)
    valid = jnp.asarray(np.arange(windows_per_batch) < num_valid)
    if on_device:
      starts = jnp.asarray(np.array(batch_positions, dtype=np.int32))
      windows = _extract_windows(padded_on_device, starts, window_size)
    else:
      windows = jnp.asarray(np.stack([
          padded[d:d + window_size[0], h:h + window_size[1], w:w + window_size[2]]
          for d, h, w in batch_positions])[..., None])
    total = None
    for axes in flips:
      outputs = predict_fn(_flip_windows(windows, axes))
      if total is None:
        total = jnp.zeros(outputs['logits'].shape[:-1]
                          + (outputs['logits'].shape[-1] + outputs['sdf'].shape[-1],), jnp.float32)
      total = _add_flipped_back(total, outputs['logits'], outputs['sdf'], axes)
    weighted = _weigh_windows(total, jnp.float32(len(flips)), importance, valid)
    if values is None:
      num_values = weighted.shape[-1]
      if on_device:
        values = jnp.zeros(padded.shape + (num_values,), jnp.float32)
        weights = jnp.zeros(padded.shape, jnp.float32)
      else:
        values = np.zeros(padded.shape + (num_values,), np.float32)
        weights = np.zeros(padded.shape, np.float32)
    if on_device:
      values, weights = _accumulate_on_device(values, weights, weighted, starts, valid, importance)
    else:
      weighted = np.asarray(weighted)
      for index, (d, h, w) in enumerate(batch_positions[:num_valid]):
        box = (slice(d, d + window_size[0]), slice(h, h + window_size[1]),
               slice(w, w + window_size[2]))
        values[box] += weighted[index]
        weights[box] += importance_host
    if progress is not None:
      progress(batch_begin + num_valid, len(positions))

  values = np.asarray(values)
  weights = np.asarray(weights)
  blended = values / weights[..., None]
  unpad = tuple(slice(before, size - after) for (before, after), size in zip(padding, padded.shape))
  blended = blended[unpad]
  num_channels = blended.shape[-1] // 2
  probabilities = np.zeros(image.shape + (num_channels,), np.float32)
  sdf = np.full(image.shape + (num_channels,), outside_sdf, np.float32)
  probabilities[region] = blended[..., :num_channels]
  sdf[region] = blended[..., num_channels:]
  result = {'probabilities': probabilities, 'sdf': sdf}
  if return_weights:
    full_weights = np.zeros(image.shape, np.float32)
    full_weights[region] = weights[unpad]
    result['weights'] = full_weights
  return result


@functools.partial(jax.jit, static_argnames=('window_size',))
def _extract_windows(image: jax.Array, starts: jax.Array,
                     window_size: tuple[int, int, int]) -> jax.Array:
  windows = jax.vmap(lambda start: jax.lax.dynamic_slice(image, tuple(start), window_size))(starts)
  return windows[..., None]


def count_windows(shape: Sequence[int], window_size: Sequence[int], overlap: float) -> int:
  """How many windows `sliding_window_inference` runs over a region of `shape` (before flips)."""
  padded = [max(size, window) for size, window in zip(shape, window_size)]
  return len(window_positions(padded, window_size, overlap))
