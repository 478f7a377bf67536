"""Training targets made from a label on the host: channel masks, normalised SDFs, slice labels and
fixed-size contrastive positions (skeleton positives, ring negatives) on the 1/8 embedding grid."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import morphology

from dualseg_jax.errors import ConfigError

# The embedding comes out of three stride-2 convolutions.
EMBEDDING_STRIDE = 8

# Face neighbours only: a mask voxel is on the boundary when one of its 6 face neighbours is
# background (the same voxels skimage's find_boundaries(mode='inner', connectivity=1) marks).
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def stage_channel_masks(label: np.ndarray, stage: str) -> np.ndarray:
  """(D, H, W) label with 0/1/2 -> (D, H, W, C) float32 binary targets of the stage's channels.

  `joint` -> (pancreas incl. tumour, tumour); `pancreas_*` -> (pancreas incl. tumour,);
  `tumour_*` -> (tumour,). The last channel is the contrastive structure.
  """
  label = np.asarray(label)
  if stage == 'joint':
    channels = [label >= 1, label == 2]
  elif stage.startswith('pancreas_'):
    channels = [label >= 1]
  elif stage.startswith('tumour_'):
    channels = [label == 2]
  else:
    raise ConfigError(f'stage={stage!r} has no channel definition; use joint, pancreas_coarse, '
                      'pancreas_fine, tumour_coarse or tumour_fine')
  return np.stack(channels, axis=-1).astype(np.float32)


def inner_boundary(mask: np.ndarray) -> np.ndarray:
  """Mask voxels with a background face neighbour (6-connectivity).

  Beyond the array edge counts as foreground: a structure cut by the patch border has no
  boundary there, since its true surface lies outside the patch.
  """
  mask = np.asarray(mask, dtype=bool)
  interior = ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=1)
  return mask & ~interior


def normalized_sdf(mask: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, bool]:
  """Normalised signed distance to the inner boundary of a 3D mask, and whether it is defined.

  With B = `inner_boundary(mask)` and d_B(x) the Euclidean distance in mm (with `spacing_mm`)
  from voxel centre x to the nearest voxel centre of B:
    sdf(x) = d_B(x) / max_{outside} d_B     for x outside the mask (in (0, 1], 1 at the farthest),
    sdf(x) = -d_B(x) / max_{inside} d_B     for x inside the mask  (in [-1, 0)),
    sdf(x) = 0                              on B.
  Outside the mask d_B equals the distance to the nearest mask voxel (the nearest mask voxel of
  an outside point always has a background face neighbour), so the outside part is the usual
  background distance transform. Inside, measuring to B rather than to the nearest background
  voxel keeps the map continuous across the zero level. When the mask is a single shell (all of
  it boundary) the inside is all 0.

  An empty or full mask has no surface: it returns zeros and valid=False (no SDF loss).
  """
  mask = np.asarray(mask, dtype=bool)
  if mask.ndim != 3:
    raise ValueError(f'normalized_sdf expects a 3D mask, got shape {mask.shape}')
  boundary = inner_boundary(mask)
  if not mask.any() or not boundary.any() or mask.all():
    return np.zeros(mask.shape, np.float32), False
  distance_to_boundary = ndimage.distance_transform_edt(
      ~boundary, sampling=tuple(float(s) for s in spacing_mm))
  outside = ~mask
  largest_outside = distance_to_boundary[outside].max()
  largest_inside = distance_to_boundary[mask].max()
  signed_distance = np.zeros(mask.shape, np.float32)
  signed_distance[outside] = distance_to_boundary[outside] / largest_outside
  if largest_inside > 0:
    signed_distance[mask] = -distance_to_boundary[mask] / largest_inside
  return signed_distance, True


def skeleton(mask: np.ndarray) -> np.ndarray:
  """3D skeleton (Lee's thinning) of a binary mask, as a bool array of the mask's shape.

  Thinning can erase a small structure completely (a 4x6x13 box, for one); a non-empty mask
  whose skeleton comes out empty gets its deepest voxels instead (largest distance to the
  background), so a tumour always yields positives.
  """
  mask = np.asarray(mask, dtype=bool)
  result = np.zeros(mask.shape, bool)
  if not mask.any():
    return result
  # Thinning only needs the structure plus a one-voxel margin: crop so its cost follows the
  # structure's size, not the patch's.
  low, high = _bounding_box(mask, margin=1)
  window = tuple(slice(lo, hi) for lo, hi in zip(low, high))
  thinned = morphology.skeletonize(mask[window])
  if not thinned.any():
    depth = ndimage.distance_transform_edt(mask[window])
    thinned = depth == depth.max()
  result[window] = thinned
  return result


def downsample_positions(position_mask: np.ndarray, factor: int = EMBEDDING_STRIDE) -> np.ndarray:
  """Full-resolution position mask -> bool mask on the 1/factor grid.

  Voxel (d, h, w) maps to cell (d // factor, h // factor, w // factor); a cell is set when any of
  its voxels is. The grid has ceil(size / factor) cells per axis, matching stride-2 'SAME' convs.
  """
  position_mask = np.asarray(position_mask, dtype=bool)
  padded_shape = [-(-size // factor) * factor for size in position_mask.shape]
  padded = np.zeros(padded_shape, bool)
  padded[tuple(slice(0, size) for size in position_mask.shape)] = position_mask
  low_shape = [size // factor for size in padded_shape]
  blocks = padded.reshape(low_shape[0], factor, low_shape[1], factor, low_shape[2], factor)
  return blocks.any(axis=(1, 3, 5))


def cube_dilation(mask: np.ndarray, side: int) -> np.ndarray:
  """Binary dilation by a `side`^3 cube, as three 1D running maxima (a cube is separable).

  For an even side the cube reaches one voxel further towards higher indices (scipy's centring).
  """
  mask = np.asarray(mask, dtype=bool)
  dilated = np.zeros(mask.shape, bool)
  if not mask.any():
    return dilated
  # Only the structure's bounding box grown by the cube's reach can change.
  reach = side // 2 + 1
  low, high = _bounding_box(mask, margin=reach)
  window = tuple(slice(lo, hi) for lo, hi in zip(low, high))
  values = mask[window].view(np.uint8)
  for axis in range(3):
    values = ndimage.maximum_filter1d(values, size=side, axis=axis, mode='constant', cval=0)
  dilated[window] = values.astype(bool)
  return dilated


def ring_voxels(mask: np.ndarray, side: int) -> np.ndarray:
  """Full-resolution ring: the cube dilation of the mask minus the mask."""
  mask = np.asarray(mask, dtype=bool)
  return cube_dilation(mask, side) & ~mask


def ring(mask: np.ndarray, rng: np.random.Generator, min_side: int = 10, max_side: int = 20
         ) -> np.ndarray:
  """Ring of negatives on the 1/8 grid: dilate by a cube of side ~ U{min_side..max_side}, remove
  the mask, downsample. Empty mask -> empty ring."""
  side = int(rng.integers(min_side, max_side + 1))
  return downsample_positions(ring_voxels(mask, side))


def sample_positions(position_mask_lowres: np.ndarray, num: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`num` positions drawn with replacement from the set cells -> (int32 (num, 3), bool (num,)).

  Each position is a (d, h, w) index into the grid, bounded per axis by that axis's size. An
  empty mask gives zeros and an all-False validity, so the device always sees `num` rows.
  """
  candidates = np.argwhere(np.asarray(position_mask_lowres, dtype=bool))
  if len(candidates) == 0:
    return np.zeros((num, 3), np.int32), np.zeros((num,), bool)
  chosen = rng.integers(0, len(candidates), size=num)
  return candidates[chosen].astype(np.int32), np.ones((num,), bool)


def slice_labels(structure_mask: np.ndarray, min_voxels: int) -> np.ndarray:
  """(D, H, W) mask -> float32 (D,): 1 where an axial slice holds more than `min_voxels` voxels."""
  counts = np.asarray(structure_mask, dtype=bool).sum(axis=(1, 2))
  return (counts > min_voxels).astype(np.float32)


def make_targets(label: np.ndarray, stage: str, spacing_mm: Sequence[float],
                 rng: np.random.Generator, num_positions: int, slice_min_voxels: int,
                 ring_sides: tuple[int, int] = (10, 20)) -> dict[str, np.ndarray]:
  """Every target batch key of one sample (docs/design.md) from its (D, H, W) label.

  Returns mask and sdf (D, H, W, C) float32, sdf_valid (C,) bool, positive_positions and
  negative_positions (num_positions, 3) int32 with their (num_positions,) bool validities, and
  slice_label (D,) float32. Positives and negatives come from the last channel.
  """
  masks = stage_channel_masks(label, stage)
  signed_distances, sdf_valid = [], []
  for channel in range(masks.shape[-1]):
    signed_distance, valid = normalized_sdf(masks[..., channel] > 0, spacing_mm)
    signed_distances.append(signed_distance)
    sdf_valid.append(valid)
  structure = masks[..., -1] > 0
  positive_positions, positive_valid = sample_positions(
      downsample_positions(skeleton(structure)), num_positions, rng)
  negative_positions, negative_valid = sample_positions(
      ring(structure, rng, *ring_sides), num_positions, rng)
  return {
      'mask': masks,
      'sdf': np.stack(signed_distances, axis=-1),
      'sdf_valid': np.asarray(sdf_valid, bool),
      'positive_positions': positive_positions,
      'positive_valid': positive_valid,
      'negative_positions': negative_positions,
      'negative_valid': negative_valid,
      'slice_label': slice_labels(structure, slice_min_voxels),
  }


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive-exclusive (low, high) corners of the set voxels, grown by `margin`, clipped."""
  occupied = np.argwhere(mask)
  low = np.maximum(occupied.min(axis=0) - margin, 0)
  high = np.minimum(occupied.max(axis=0) + 1 + margin, mask.shape)
  return low, high
