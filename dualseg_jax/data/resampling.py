"""Resampling (D, H, W) arrays between grids that span the same physical extent: the cache, the
predictor and the synthetic centers' measurements all use these, so they live below all three."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def resampled_shape(shape: Sequence[int], spacing_mm: Sequence[float],
                    target_spacing_mm: Sequence[float]) -> tuple[int, int, int]:
  """Voxels per axis that cover the same physical extent at (about) the target spacing."""
  return tuple(max(1, int(round(size * spacing / target)))
               for size, spacing, target in zip(shape, spacing_mm, target_spacing_mm))


def _source_coordinates(old_size: int, new_size: int) -> np.ndarray:
  """Source voxel coordinates of the new voxel centres when both grids span the same extent."""
  return (np.arange(new_size) + 0.5) * (old_size / new_size) - 0.5


def resample(array: np.ndarray, new_shape: Sequence[int], interpolation: str) -> np.ndarray:
  """Resample a (D, H, W) array onto `new_shape` voxels spanning the same physical extent.

  Both grids share their outer edges, so the new spacing is old_extent / new_size exactly.
  'nearest' (labels) and 'linear' run one axis at a time (cheap and separable); 'cubic' uses
  scipy's spline zoom. Values beyond the edge repeat the edge voxel.
  """
  if interpolation == 'cubic':
    factors = [new / old for new, old in zip(new_shape, array.shape)]
    return ndimage.zoom(array.astype(np.float32), factors, order=3, mode='nearest',
                        grid_mode=True, prefilter=True).astype(np.float32)
  result = array
  for axis, (old_size, new_size) in enumerate(zip(array.shape, new_shape)):
    if old_size == new_size:
      continue
    coordinates = np.clip(_source_coordinates(old_size, new_size), 0, old_size - 1)
    if interpolation == 'nearest':
      # Round half up, consistently, so the result does not depend on float noise at .5.
      result = np.take(result, np.floor(coordinates + 0.5).astype(np.int64), axis=axis)
    elif interpolation == 'linear':
      lower = np.floor(coordinates).astype(np.int64)
      upper = np.minimum(lower + 1, old_size - 1)
      weight_shape = [1] * result.ndim
      weight_shape[axis] = new_size
      upper_weight = (coordinates - lower).astype(np.float32).reshape(weight_shape)
      result = (np.take(result, lower, axis=axis).astype(np.float32) * (1 - upper_weight)
                + np.take(result, upper, axis=axis).astype(np.float32) * upper_weight)
    else:
      raise ValueError(f'unknown interpolation {interpolation!r}')
  if interpolation == 'linear':
    result = np.asarray(result, np.float32)
  return np.ascontiguousarray(result)
