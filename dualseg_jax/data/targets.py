"""Training targets made from a label on the host: channel masks, normalised SDFs, slice labels and
fixed-size contrastive positions (skeleton positives, ring negatives) on the 1/8 embedding grid."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import morphology

from dualseg_jax import structures
from dualseg_jax.errors import ConfigError
from dualseg_jax.structures import EMBEDDING_STRIDE

CONTRASTIVE_SAMPLINGS = ('per_slice', 'uniform')
# Per-slice sampling: a 1/8 slice gives a positive only when it holds at least this many cells of
# the structure (relaxed towards 1 when no slice of the patch does).
MIN_SLICE_STRUCTURE_CELLS = 5

# Guards the per-crop normalisation of a crop without inside (or outside) voxels.
_TINY_MM = 1e-6


def stage_channel_masks(label: np.ndarray, stage: str) -> np.ndarray:
  """(D, H, W) label with 0/1/2 -> (D, H, W, C) float32 binary targets of the stage's channels.

  `joint` -> (pancreas incl. tumour, tumour); `pancreas_*` -> (pancreas incl. tumour,);
  `tumour_*` -> (tumour,). The last channel is the contrastive structure.
  """
  label = np.asarray(label)
  channels = [structures.MASKS[name](label) for name in structures.stage_structures(stage)]
  return np.stack(channels, axis=-1).astype(np.float32)


def signed_distance_mm(mask: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
                       ) -> tuple[np.ndarray, bool]:
  """Signed distance in mm from each voxel centre to the nearest voxel centre of the other kind:
  negative inside the mask, positive outside, never 0; and whether the mask has a surface.

  Neighbouring inside and outside voxels hold -s and +s (s the spacing between them), so the
  zero level lies halfway between their centres: on the mask's surface, not on its boundary
  voxels. The sign alone gives the mask back (mask == (sdf < 0)), and the same holds for a
  trilinear resampling of the map, whose zero level moves continuously with the warp
  (docs/design.md, "Signed distances"). Inside voxels of a structure cut by the array's edge
  measure to the nearest background voxel in the array: beyond the edge counts as unknown, not
  as surface.

  An empty or full mask has no surface: zeros and valid=False (no SDF loss).
  """
  mask = np.asarray(mask, dtype=bool)
  if mask.ndim != 3:
    raise ValueError(f'signed_distance_mm expects a 3D mask, got shape {mask.shape}')
  if not mask.any() or mask.all():
    return np.zeros(mask.shape, np.float32), False
  sampling = tuple(float(s) for s in spacing_mm)
  outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
  inside = ndimage.distance_transform_edt(mask, sampling=sampling)
  return (outside - inside).astype(np.float32), True


def signed_distance_scales(signed_distance: np.ndarray) -> np.ndarray:
  """float32 (2,): the largest inside magnitude and the largest outside value of one crop's
  signed distances (each at least a tiny positive number): what `normalize_signed_distance`
  divides by, and what the augmentation multiplies back before it warps."""
  signed_distance = np.asarray(signed_distance, np.float32)
  return np.array([max(float(-signed_distance.min(initial=0.0)), _TINY_MM),
                   max(float(signed_distance.max(initial=0.0)), _TINY_MM)], np.float32)


def normalize_signed_distance(signed_distance: np.ndarray) -> np.ndarray:
  """Signed distances (negative inside) of one crop -> [-1, 1]: the outside part divided by its
  largest value in the crop, the inside part by its largest magnitude (the per-crop normalisation
  of the method; `signed_distance_scales`). The sign, and so the mask it encodes, is unchanged;
  `augment.normalize_signed_distance` is the same on the device."""
  signed_distance = np.asarray(signed_distance, np.float32)
  largest_inside, largest_outside = signed_distance_scales(signed_distance)
  return np.where(signed_distance > 0, signed_distance / largest_outside,
                  signed_distance / largest_inside).astype(np.float32)


def normalized_sdf(mask: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, bool]:
  """The SDF target of a crop's mask: `signed_distance_mm` of the crop, normalised per crop
  (`normalize_signed_distance`): in [-1, 1], negative inside, -1 and 1 at the deepest inside and
  farthest outside voxels, and nonzero everywhere. Empty or full mask: zeros, valid=False."""
  signed_distance, valid = signed_distance_mm(mask, spacing_mm)
  if not valid:
    return signed_distance, False
  return normalize_signed_distance(signed_distance), True


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


def ring(mask: np.ndarray, rng: np.random.Generator, min_side: int = 10, max_side: int = 20,
         mask_cells: np.ndarray | None = None) -> np.ndarray:
  """Ring of negatives on the 1/8 grid: dilate by a cube of side ~ U{min_side..max_side}, remove
  the mask, downsample, then drop every cell that holds a mask voxel, so that no cell is both a
  negative and a (skeleton) positive. Empty mask -> empty ring. `mask_cells`, the mask already
  downsampled, saves downsampling it again."""
  side = int(rng.integers(min_side, max_side + 1))
  if mask_cells is None:
    mask_cells = downsample_positions(mask)
  return downsample_positions(ring_voxels(mask, side)) & ~mask_cells


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


def sample_slice_positives(skeleton_cells: np.ndarray, structure_cells: np.ndarray,
                           rng: np.random.Generator,
                           min_structure_cells: int = MIN_SLICE_STRUCTURE_CELLS
                           ) -> tuple[np.ndarray, np.ndarray]:
  """One random skeleton cell per slice of the 1/8 grid -> (int32 (d, 3), bool (d,)).

  Row z holds a cell (z, h, w) of `skeleton_cells` that lies inside `structure_cells` (the
  structure max-pooled to the grid), valid when slice z holds at least `min_structure_cells`
  structure cells and such a skeleton cell. When no slice qualifies the threshold drops one cell
  at a time down to 1, so a small structure still gives positives. Invalid rows are zeros.
  """
  skeleton_cells = np.asarray(skeleton_cells, dtype=bool)
  structure_cells = np.asarray(structure_cells, dtype=bool)
  depth = skeleton_cells.shape[0]
  positions, valid = np.zeros((depth, 3), np.int32), np.zeros((depth,), bool)
  candidates = skeleton_cells & structure_cells
  has_candidate = candidates.any(axis=(1, 2))
  structure_counts = structure_cells.sum(axis=(1, 2))
  for threshold in range(max(min_structure_cells, 1), 0, -1):
    eligible = has_candidate & (structure_counts >= threshold)
    if eligible.any():
      break
  for z in np.flatnonzero(eligible):
    cells = np.argwhere(candidates[z])
    positions[z] = (z, *cells[rng.integers(len(cells))])
    valid[z] = True
  return positions, valid


def sample_slice_negatives(ring_cells: np.ndarray, rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray]:
  """One random cell per slice of the 1/8 grid from the 2D skeleton of that slice's ring cells
  (mid-ring, away from the structure's edge; any ring cell of the slice when the skeleton comes
  out empty) -> (int32 (d, 3), bool (d,)); a slice without ring cells gives an invalid row."""
  ring_cells = np.asarray(ring_cells, dtype=bool)
  depth = ring_cells.shape[0]
  positions, valid = np.zeros((depth, 3), np.int32), np.zeros((depth,), bool)
  for z in np.flatnonzero(ring_cells.any(axis=(1, 2))):
    thinned = morphology.skeletonize(ring_cells[z])
    cells = np.argwhere(thinned if thinned.any() else ring_cells[z])
    positions[z] = (z, *cells[rng.integers(len(cells))])
    valid[z] = True
  return positions, valid


def contrastive_positions(structure: np.ndarray, skeleton_cells: np.ndarray,
                          rng: np.random.Generator, sampling: str = 'per_slice',
                          num_positions: int = 64, ring_sides: tuple[int, int] = (10, 20)
                          ) -> dict[str, np.ndarray]:
  """Positive (skeleton) and negative (ring) positions of one sample on the 1/8 grid.

  `structure` is the full-resolution (D, H, W) mask, `skeleton_cells` its skeleton on the grid.
  Negatives come from `ring` (a cube side drawn from `ring_sides`), so no negative cell holds a
  structure voxel. 'per_slice' gives D/8 rows (`sample_slice_positives`,
  `sample_slice_negatives`); 'uniform' gives `num_positions` rows drawn with replacement from
  the skeleton cells and from the ring cells (`sample_positions`).
  Returns positive_positions, negative_positions (rows, 3) int32 and their (rows,) validities.
  """
  if sampling not in CONTRASTIVE_SAMPLINGS:
    raise ConfigError(f'config.data.contrastive_sampling={sampling!r}: choose one of '
                      f'{CONTRASTIVE_SAMPLINGS}')
  structure = np.asarray(structure, dtype=bool)
  structure_cells = downsample_positions(structure)
  negative_cells = ring(structure, rng, *ring_sides, mask_cells=structure_cells)
  if sampling == 'per_slice':
    positives = sample_slice_positives(skeleton_cells, structure_cells, rng)
    negatives = sample_slice_negatives(negative_cells, rng)
  else:
    positives = sample_positions(skeleton_cells, num_positions, rng)
    negatives = sample_positions(negative_cells, num_positions, rng)
  return {'positive_positions': positives[0], 'positive_valid': positives[1],
          'negative_positions': negatives[0], 'negative_valid': negatives[1]}


def slice_labels(structure_mask: np.ndarray, min_voxels: int) -> np.ndarray:
  """(D, H, W) mask -> float32 (D,): 1 where an axial slice holds more than `min_voxels` voxels."""
  counts = np.asarray(structure_mask, dtype=bool).sum(axis=(1, 2))
  return (counts > min_voxels).astype(np.float32)


def make_targets(label: np.ndarray, stage: str, spacing_mm: Sequence[float],
                 rng: np.random.Generator, num_positions: int, slice_min_voxels: int,
                 ring_sides: tuple[int, int] = (10, 20), contrastive_sampling: str = 'per_slice'
                 ) -> dict[str, np.ndarray]:
  """Every target batch key of one sample (docs/design.md) from its (D, H, W) label.

  Returns mask and sdf (D, H, W, C) float32, sdf_valid (C,) bool, positive_positions and
  negative_positions (rows, 3) int32 with their (rows,) bool validities (`contrastive_positions`:
  one row per 1/8 slice, or `num_positions` rows with 'uniform' sampling), and slice_label (D,)
  float32. Positives and negatives come from the last channel.
  """
  masks = stage_channel_masks(label, stage)
  signed_distances, sdf_scales, sdf_valid = [], [], []
  for channel in range(masks.shape[-1]):
    signed_distance, valid = signed_distance_mm(masks[..., channel] > 0, spacing_mm)
    signed_distances.append(normalize_signed_distance(signed_distance))
    sdf_scales.append(signed_distance_scales(signed_distance))
    sdf_valid.append(valid)
  structure = masks[..., -1] > 0
  positions = contrastive_positions(structure, downsample_positions(skeleton(structure)), rng,
                                    contrastive_sampling, num_positions, ring_sides)
  return {
      'mask': masks,
      'sdf': np.stack(signed_distances, axis=-1),
      'sdf_scale_mm': np.stack(sdf_scales),
      'sdf_valid': np.asarray(sdf_valid, bool),
      **positions,
      'slice_label': slice_labels(structure, slice_min_voxels),
  }


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive-exclusive (low, high) corners of the set voxels, grown by `margin`, clipped."""
  occupied = np.argwhere(mask)
  low = np.maximum(occupied.min(axis=0) - margin, 0)
  high = np.minimum(occupied.max(axis=0) + 1 + margin, mask.shape)
  return low, high
