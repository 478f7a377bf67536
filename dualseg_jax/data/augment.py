"""Device-side spatial and intensity augmentation of a training batch: pure, jittable, one random
transform per sample applied to the image and to every target that lives on the voxel grid.

The spatial transform is a sampling map from each output voxel p to a source voxel
    source(p) = centre + matrix @ (p - centre) + displacement(p),
where `matrix` combines flips, a rotation about each axis (in millimetres when `spacing_mm` is
given, else in voxels) and an isotropic zoom, and `displacement` is an elastic field: random
offsets on a coarse control grid (spacing `elastic_sigma_vox`, standard deviation
`elastic_magnitude_vox`) interpolated trilinearly, switched on with probability `elastic_prob`.
Each sample flips each axis with probability `flip_prob`, and draws the rotation, the zoom, the
gamma and the noise each with its own probability (`rotation_prob`, `scale_prob`, `gamma_prob`,
`noise_prob`; 0.5 in the reference); a transform not drawn is the identity for that sample.
The image and the SDF are resampled trilinearly and the label by nearest neighbour; outside the
patch the image and label read 0 (air after windowing, background) and the SDF repeats its nearest
edge value with the background's sign. The masks are not warped on their own: each channel's mask
is the sign of its warped SDF (mask == sdf < 0), and the SDF is then normalised again per patch
(the zoom changes its largest values), so the targets the Dice, BCE, L1 and SDF->mask terms read
describe one shape after any warp (docs/design.md, "Signed distances").

Contrastive positions are carried, not resampled: each position's full-resolution cell centre is
mapped forward (the inverse of the sampling map: the affine part exactly, the elastic part by a
few Newton steps), rounded to its new 1/8 cell, and kept valid only when that cell lies
inside the patch and the warped structure there is consistent with its kind: a positive
(skeleton) cell must still hold structure, a negative (ring) cell must hold no structure voxel.
So identity parameters return the positions unchanged, and every valid position sits where the
warped label agrees with it. `sdf_valid` and `slice_label` are recomputed from the warped masks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dualseg_jax.structures import EMBEDDING_STRIDE

# Newton steps that invert the elastic part of the sampling map for the positions.
_INVERSE_ELASTIC_STEPS = 4
# Guards the per-patch SDF normalisation of a patch without inside (or outside) voxels.
_TINY = 1e-6

_SPATIAL_KEYS = ('image', 'label', 'mask', 'sdf')
_TARGET_KEYS = ('sdf_scale_mm', 'sdf_valid', 'positive_positions', 'positive_valid',
                'negative_positions',                'negative_valid', 'slice_label')


def elastic_grid_shape(shape: Sequence[int], control_spacing_vox: float) -> tuple[int, int, int]:
  """Control points per axis so that the grid, spaced `control_spacing_vox`, covers the patch."""
  return tuple(int(math.ceil((size - 1) / control_spacing_vox)) + 1 for size in shape)


def identity_transform(shape: Sequence[int], augment_config: ml_collections.ConfigDict
                       ) -> dict[str, jax.Array]:
  """Parameters under which `apply_transform` returns its input unchanged."""
  grid_shape = elastic_grid_shape(shape, augment_config.elastic_sigma_vox)
  return {
      'matrix': jnp.eye(3, dtype=jnp.float32),
      'elastic_grid': jnp.zeros(grid_shape + (3,), jnp.float32),
      'gamma': jnp.float32(1.0),
      'noise_std': jnp.float32(0.0),
      'noise_key': jax.random.key(0),
  }


def _rotation_matrix(angles_rad: jax.Array) -> jax.Array:
  """Rotation about the z, y and x axes in turn, in (z, y, x) coordinates."""
  def about(axis, angle):
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    first, second = [a for a in range(3) if a != axis]
    matrix = jnp.eye(3, dtype=jnp.float32)
    matrix = matrix.at[first, first].set(cos).at[second, second].set(cos)
    return matrix.at[first, second].set(-sin).at[second, first].set(sin)
  return about(0, angles_rad[0]) @ about(1, angles_rad[1]) @ about(2, angles_rad[2])


def sample_transform(key: jax.Array, shape: Sequence[int], augment_config: ml_collections.ConfigDict,
                     spacing_mm: Sequence[float] | None = None) -> dict[str, jax.Array]:
  """Random parameters of one sample's transform for a patch of `shape` (D, H, W)."""
  config = augment_config
  # The on/off keys come last: with JAX's default (partitionable) threefry a split key does not
  # depend on how many are split, so with every *_prob at 1 the draws are those of runs made
  # before these probabilities existed.
  (flip_key, angle_key, scale_key, elastic_on_key, elastic_key, gamma_key, noise_std_key,
   noise_key, rotation_on_key, scale_on_key, gamma_on_key,
   noise_on_key) = jax.random.split(key, 12)
  params = identity_transform(shape, config)
  if config.spatial:
    flips = jax.random.bernoulli(flip_key, config.flip_prob, (3,))
    flip_matrix = jnp.diag(jnp.where(flips, -1.0, 1.0).astype(jnp.float32))
    max_angle = math.radians(config.rotation_deg)
    angles = jax.random.uniform(angle_key, (3,), minval=-max_angle, maxval=max_angle)
    zoom = jax.random.uniform(scale_key, (), minval=config.scale[0], maxval=config.scale[1])
    zoom = jnp.where(jax.random.bernoulli(scale_on_key, config.scale_prob), zoom, 1.0)
    voxel_mm = jnp.asarray(spacing_mm if spacing_mm is not None else (1.0, 1.0, 1.0), jnp.float32)
    # Rotate in millimetres: voxels -> mm, rotate back (the sampling map is the inverse of the
    # visible rotation), mm -> voxels. A zoom > 1 enlarges the anatomy, so sources shrink by it.
    rotation = jnp.diag(1.0 / voxel_mm) @ _rotation_matrix(angles).T @ jnp.diag(voxel_mm)
    # The identity itself, not a rotation by 0: (1 / spacing) * spacing need not round to 1.
    rotation = jnp.where(jax.random.bernoulli(rotation_on_key, config.rotation_prob), rotation,
                         jnp.eye(3, dtype=jnp.float32))
    params['matrix'] = (rotation / zoom) @ flip_matrix
    elastic_on = jax.random.bernoulli(elastic_on_key, config.elastic_prob)
    offsets = config.elastic_magnitude_vox * jax.random.normal(
        elastic_key, params['elastic_grid'].shape, jnp.float32)
    params['elastic_grid'] = jnp.where(elastic_on, offsets, 0.0)
  gamma = jax.random.uniform(gamma_key, (), minval=config.gamma[0], maxval=config.gamma[1])
  params['gamma'] = jnp.where(jax.random.bernoulli(gamma_on_key, config.gamma_prob), gamma, 1.0)
  noise_std = jax.random.uniform(noise_std_key, (), minval=config.noise_std[0],
                                 maxval=config.noise_std[1])
  params['noise_std'] = jnp.where(jax.random.bernoulli(noise_on_key, config.noise_prob),
                                  noise_std, 0.0)
  params['noise_key'] = noise_key
  return params


def _displacement(elastic_grid: jax.Array, points: jax.Array, control_spacing_vox: float
                  ) -> jax.Array:
  """Elastic offsets (..., 3) at voxel coordinates `points` (..., 3), trilinear between controls."""
  grid_coordinates = [points[..., axis] / control_spacing_vox for axis in range(3)]
  return jnp.stack([
      jax.scipy.ndimage.map_coordinates(elastic_grid[..., axis], grid_coordinates, order=1,
                                        mode='nearest')
      for axis in range(3)], axis=-1)


def _source_points(params: dict[str, jax.Array], points: jax.Array, shape: Sequence[int],
                   control_spacing_vox: float) -> jax.Array:
  centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
  affine = (points - centre) @ params['matrix'].T + centre
  return affine + _displacement(params['elastic_grid'], points, control_spacing_vox)


def _forward_points(params: dict[str, jax.Array], source: jax.Array, shape: Sequence[int],
                    control_spacing_vox: float) -> jax.Array:
  """Output coordinates (N, 3) whose sampling-map image is `source` (N, 3): exact for the affine
  part, then Newton steps for the elastic part (exact where the warp does not fold)."""
  centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
  points = (source - centre) @ jnp.linalg.inv(params['matrix']).T + centre
  sampling_map = lambda point: _source_points(params, point, shape, control_spacing_vox)
  jacobians = jax.vmap(jax.jacfwd(sampling_map))
  for _ in range(_INVERSE_ELASTIC_STEPS):
    residual = sampling_map(points) - source
    points = points - jnp.linalg.solve(jacobians(points), residual[..., None])[..., 0]
  return points


def _warp_channels(volume: jax.Array, coordinates: list[jax.Array], order: int, mode: str
                   ) -> jax.Array:
  """Resample every channel of (D, H, W, C) at shared coordinates."""
  resample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, coordinates, order=order,
                                                               mode=mode)
  return jax.vmap(resample, in_axes=-1, out_axes=-1)(volume)


def normalize_signed_distance(signed_distance: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(D, H, W, C) signed distances in mm of one patch -> ([-1, 1] per channel, (C, 2) scales):
  the positive part divided by its largest value, the negative part by its largest magnitude
  (as `targets.normalize_signed_distance` on the host); the sign is kept."""
  spatial = tuple(range(signed_distance.ndim - 1))
  largest_outside = jnp.maximum(jnp.max(signed_distance, axis=spatial), _TINY)
  largest_inside = jnp.maximum(-jnp.min(signed_distance, axis=spatial), _TINY)
  normalized = jnp.where(signed_distance > 0, signed_distance / largest_outside,
                         signed_distance / largest_inside)
  return normalized, jnp.stack([largest_inside, largest_outside], axis=-1)


def _cells_holding(structure: jax.Array) -> jax.Array:
  """(D, H, W) bool -> per 1/8 cell: whether any of its voxels is set."""
  depth, height, width = structure.shape
  stride = EMBEDDING_STRIDE
  blocks = structure.reshape(depth // stride, stride, height // stride, stride,
                             width // stride, stride)
  return blocks.any(axis=(1, 3, 5))


def _carry_positions(params, positions, valid, consistent_cells, shape, control_spacing_vox):
  """Map 1/8-grid positions through the transform and keep those landing on consistent cells."""
  stride = EMBEDDING_STRIDE
  centres = positions.astype(jnp.float32) * stride + (stride - 1) / 2.0
  moved = _forward_points(params, centres, shape, control_spacing_vox)
  cells = jnp.floor(moved / stride).astype(jnp.int32)
  grid_shape = jnp.asarray(consistent_cells.shape, jnp.int32)
  inside = jnp.all((cells >= 0) & (cells < grid_shape), axis=-1)
  clipped = jnp.clip(cells, 0, grid_shape - 1)
  consistent = consistent_cells[clipped[:, 0], clipped[:, 1], clipped[:, 2]]
  new_valid = valid & inside & consistent
  return jnp.where(new_valid[:, None], clipped, 0), new_valid


def apply_transform(params: dict[str, jax.Array], sample: dict[str, jax.Array],
                    augment_config: ml_collections.ConfigDict, slice_min_voxels: int = 10
                    ) -> dict[str, jax.Array]:
  """Apply one sample's transform (no batch axis) to its image and targets; other keys pass."""
  shape = sample['image'].shape[:3]
  for size in shape:
    if size % EMBEDDING_STRIDE:
      raise ValueError(f'patch shape {shape} must be a multiple of {EMBEDDING_STRIDE} per axis')
  control_spacing = augment_config.elastic_sigma_vox
  out = dict(sample)

  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(size, dtype=jnp.float32) for size in shape],
                                indexing='ij'), axis=-1)
  source = _source_points(params, grid, shape, control_spacing)
  coordinates = [source[..., axis] for axis in range(3)]

  image = _warp_channels(sample['image'], coordinates, order=1, mode='constant')
  out['label'] = jax.scipy.ndimage.map_coordinates(sample['label'], coordinates, order=0,
                                                   mode='constant')
  # The masks are the sign of the warped SDF, so the two targets describe one shape; beyond the
  # patch (where the image reads air) the sign is forced to background.
  # Warped in mm: the normalised map's inside and outside scales differ (a few mm against tens),
  # so interpolating it would move the zero level towards the outside voxels.
  if 'sdf_scale_mm' not in sample:
    raise ValueError("the batch needs 'sdf_scale_mm' (C, 2) beside 'sdf' to warp it "
                     '(targets.signed_distance_scales; docs/design.md batch keys)')
  inside_scale, outside_scale = sample['sdf_scale_mm'][:, 0], sample['sdf_scale_mm'][:, 1]
  signed_distance = jnp.where(sample['sdf'] > 0, sample['sdf'] * outside_scale,
                              sample['sdf'] * inside_scale)
  signed_distance = _warp_channels(signed_distance, coordinates, order=1, mode='nearest')
  beyond_patch = jnp.zeros(shape, bool)
  for axis, size in enumerate(shape):
    beyond_patch |= (coordinates[axis] < -0.5) | (coordinates[axis] > size - 0.5)
  signed_distance = jnp.where(beyond_patch[..., None], jnp.abs(signed_distance), signed_distance)
  mask = (signed_distance < 0).astype(sample['mask'].dtype)
  out['mask'] = mask
  out['sdf'], out['sdf_scale_mm'] = normalize_signed_distance(signed_distance)

  channel_set = mask.reshape(-1, mask.shape[-1]) > 0.5
  out['sdf_valid'] = sample['sdf_valid'] & channel_set.any(axis=0) & ~channel_set.all(axis=0)
  structure = mask[..., -1] > 0.5
  out['slice_label'] = (structure.sum(axis=(1, 2)) > slice_min_voxels).astype(jnp.float32)

  holds_structure = _cells_holding(structure)
  out['positive_positions'], out['positive_valid'] = _carry_positions(
      params, sample['positive_positions'], sample['positive_valid'], holds_structure, shape,
      control_spacing)
  out['negative_positions'], out['negative_valid'] = _carry_positions(
      params, sample['negative_positions'], sample['negative_valid'], ~holds_structure, shape,
      control_spacing)

  # Intensity: gamma on the [0, 1] image, then additive Gaussian noise, back into [0, 1].
  image = jnp.clip(image, 0.0, 1.0) ** params['gamma']
  noise = jax.random.normal(params['noise_key'], image.shape, image.dtype)
  out['image'] = jnp.clip(image + params['noise_std'] * noise, 0.0, 1.0)
  return out


def augment_batch(key: jax.Array, batch: dict[str, Any], augment_config: ml_collections.ConfigDict,
                  spacing_mm: Sequence[float] | None = None, slice_min_voxels: int = 10
                  ) -> dict[str, jax.Array]:
  """One random transform per sample of a batch (docs/design.md keys), applied jointly.

  `spacing_mm` (z, y, x) of the patch grid makes rotations physical; `slice_min_voxels` should
  be `config.loss.slice_min_voxels` so the recomputed `slice_label` matches the loader's.
  """
  batch_size = batch['image'].shape[0]
  shape = batch['image'].shape[1:4]
  keys = jax.random.split(key, batch_size)
  params = jax.vmap(lambda k: sample_transform(k, shape, augment_config, spacing_mm))(keys)
  return augment_with_params(params, batch, augment_config, slice_min_voxels)


def augment_with_params(params: dict[str, jax.Array], batch: dict[str, Any],
                        augment_config: ml_collections.ConfigDict, slice_min_voxels: int = 10
                        ) -> dict[str, jax.Array]:
  """`apply_transform` over a batch with per-sample parameters (leading batch axis)."""
  per_sample = {name: value for name, value in batch.items()
                if name in _SPATIAL_KEYS or name in _TARGET_KEYS}
  augmented = jax.vmap(lambda p, s: apply_transform(p, s, augment_config, slice_min_voxels))(
      params, per_sample)
  return {**batch, **augmented}

