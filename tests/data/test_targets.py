"""Host-side targets against analytic shapes and slow loop re-implementations."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from dualseg_jax.data import targets
from dualseg_jax.errors import ConfigError


def slow_inner_boundary(mask):
  """Mask voxels with a face neighbour inside the array that is background."""
  boundary = np.zeros_like(mask)
  for index in np.argwhere(mask):
    for axis, step in itertools.product(range(3), (-1, 1)):
      neighbour = index.copy()
      neighbour[axis] += step
      if 0 <= neighbour[axis] < mask.shape[axis] and not mask[tuple(neighbour)]:
        boundary[tuple(index)] = True
  return boundary


def slow_normalized_sdf(mask, spacing_mm):
  boundary_points = np.argwhere(slow_inner_boundary(mask)) * np.asarray(spacing_mm)
  distance = np.zeros(mask.shape)
  for index in np.ndindex(mask.shape):
    point = np.asarray(index) * np.asarray(spacing_mm)
    distance[index] = np.sqrt(((boundary_points - point) ** 2).sum(axis=1)).min()
  sdf = np.where(mask, -distance / distance[mask].max(), distance / distance[~mask].max())
  return sdf


def test_sdf_matches_brute_force_distances_to_the_inner_boundary():
  rng = np.random.default_rng(0)
  mask = ndimage.binary_opening(rng.random((7, 9, 11)) < 0.6)
  spacing = (2.5, 1.0, 1.5)
  sdf, valid = targets.normalized_sdf(mask, spacing)
  assert valid and sdf.dtype == np.float32
  np.testing.assert_allclose(sdf, slow_normalized_sdf(mask, spacing), atol=1e-6)


def test_sdf_of_an_anisotropic_box_is_the_analytic_distance():
  shape, spacing = (12, 20, 16), (3.0, 1.0, 2.0)
  low, high = np.array([3, 5, 4]), np.array([9, 16, 12])  # voxels low..high-1 are inside
  mask = np.zeros(shape, bool)
  mask[3:9, 5:16, 4:12] = True
  sdf, valid = targets.normalized_sdf(mask, spacing)
  assert valid
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), axis=-1)
  spacing = np.asarray(spacing)
  # Outside: Euclidean distance to the box of voxel centres [low, high - 1].
  excess = np.maximum(low - grid, 0) + np.maximum(grid - (high - 1), 0)
  outside_distance = np.sqrt(((excess * spacing) ** 2).sum(axis=-1))
  # Inside: distance to the nearest face layer, straight along one axis.
  inside_distance = np.minimum(grid - low, high - 1 - grid) * spacing
  inside_distance = inside_distance.min(axis=-1)
  expected = np.where(mask, -inside_distance / inside_distance[mask].max(),
                      outside_distance / outside_distance[~mask].max())
  np.testing.assert_allclose(sdf, expected, atol=1e-6)


def test_sdf_of_an_anisotropic_sphere_follows_the_surface_distance():
  shape, spacing, radius = (20, 40, 40), np.array([2.0, 1.0, 1.0]), 12.0
  centre = (np.array(shape) - 1) / 2 * spacing
  points = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1) * spacing
  radial = np.sqrt(((points - centre) ** 2).sum(-1))
  mask = radial <= radius
  sdf, valid = targets.normalized_sdf(mask, spacing)
  assert valid
  surface_distance = np.abs(radial - radius)
  # Distances are taken between voxel centres: off by at most about one (largest) voxel.
  tolerance_mm = spacing.max()
  outside = ~mask
  outside_max, inside_max = surface_distance[outside].max(), surface_distance[mask].max()
  assert np.abs(sdf[outside] * outside_max - surface_distance[outside]).max() <= tolerance_mm
  assert np.abs(-sdf[mask] * inside_max - surface_distance[mask]).max() <= tolerance_mm
  # Sign, zeros on the boundary, range.
  boundary = slow_inner_boundary(mask)
  assert np.all(sdf[boundary] == 0)
  assert np.all(sdf[mask & ~boundary] < 0) and np.all(sdf[~mask] > 0)
  assert sdf.min() == -1.0 and sdf.max() == 1.0


def test_sdf_of_a_structure_cut_by_the_patch_edge_has_no_boundary_on_the_edge():
  mask = np.zeros((10, 6, 6), bool)
  mask[:4] = True  # slices 0..3 inside; the array's own faces are not the structure's surface
  sdf, valid = targets.normalized_sdf(mask, (1.0, 1.0, 1.0))
  assert valid
  np.testing.assert_allclose(sdf[:, 2, 2], [-1, -2 / 3, -1 / 3, 0, 1 / 6, 2 / 6, 3 / 6, 4 / 6,
                                            5 / 6, 1], atol=1e-6)


@pytest.mark.parametrize('fill', [False, True])
def test_empty_or_full_mask_has_no_sdf(fill):
  sdf, valid = targets.normalized_sdf(np.full((4, 5, 6), fill), (1.0, 2.0, 3.0))
  assert not valid and sdf.shape == (4, 5, 6) and not sdf.any()


def test_skeleton_of_a_cylinder_lies_on_its_axis():
  z, y, x = np.mgrid[:30, :24, :28]
  axis_y, axis_x, radius = 11.0, 15.0, 6.0
  cylinder = ((y - axis_y) ** 2 + (x - axis_x) ** 2 <= radius ** 2) & (z >= 4) & (z < 26)
  skeleton = targets.skeleton(cylinder)
  points = np.argwhere(skeleton)
  assert len(points) >= 10
  assert np.all(np.hypot(points[:, 1] - axis_y, points[:, 2] - axis_x) <= 1.0)
  assert np.all(cylinder[skeleton])
  assert points[:, 0].max() - points[:, 0].min() >= 10  # runs along the axis, not a point
  assert not targets.skeleton(np.zeros((5, 5, 5), bool)).any()


def slow_downsample(mask, factor):
  low = np.zeros([-(-s // factor) for s in mask.shape], bool)
  for d, h, w in np.argwhere(mask):
    low[d // factor, h // factor, w // factor] = True
  return low


def test_downsample_positions_maps_each_voxel_to_its_cell():
  mask = np.random.default_rng(1).random((19, 24, 13)) < 0.01
  low = targets.downsample_positions(mask)
  assert low.shape == (3, 3, 2)
  np.testing.assert_array_equal(low, slow_downsample(mask, 8))


@pytest.mark.parametrize('side', [1, 3, 5, 11])
def test_cube_dilation_matches_scipy_for_odd_sides(side):
  mask = np.random.default_rng(side).random((14, 18, 22)) < 0.01
  expected = ndimage.binary_dilation(mask, structure=np.ones((side,) * 3, bool))
  np.testing.assert_array_equal(targets.cube_dilation(mask, side), expected)


@pytest.mark.parametrize('side', [2, 10])
def test_cube_dilation_for_even_sides_lies_between_the_odd_ones(side):
  mask = np.random.default_rng(side).random((14, 18, 22)) < 0.01
  dilated = targets.cube_dilation(mask, side)
  smaller = ndimage.binary_dilation(mask, structure=np.ones((side - 1,) * 3, bool))
  larger = ndimage.binary_dilation(mask, structure=np.ones((side + 1,) * 3, bool))
  assert np.all(dilated[smaller]) and not np.any(dilated[~larger])
  # Voxel count of one isolated voxel's dilation is the cube's volume.
  single = np.zeros((30, 30, 30), bool)
  single[15, 15, 15] = True
  assert targets.cube_dilation(single, side).sum() == side ** 3


def test_ring_excludes_the_mask_and_lies_within_the_cube_dilation():
  mask = np.zeros((24, 48, 40), bool)
  mask[8:14, 20:30, 30:38] = True
  ring_full = targets.ring_voxels(mask, 11)
  assert not np.any(ring_full & mask)
  np.testing.assert_array_equal(
      ring_full, ndimage.binary_dilation(mask, structure=np.ones((11,) * 3, bool)) & ~mask)
  # The 1/8 ring is the downsampled full ring for the side the generator draws.
  side = int(np.random.default_rng(5).integers(10, 21))
  ring_low = targets.ring(mask, np.random.default_rng(5))
  np.testing.assert_array_equal(ring_low, slow_downsample(targets.ring_voxels(mask, side), 8))
  assert ring_low.shape == (3, 6, 5)
  largest = slow_downsample(ndimage.binary_dilation(mask, np.ones((21,) * 3, bool)), 8)
  assert ring_low.any() and not np.any(ring_low & ~largest)
  assert not targets.ring(np.zeros((8, 8, 8), bool), np.random.default_rng(0)).any()


def test_sample_positions_are_bounded_per_axis_on_a_non_cubic_grid():
  # Depth 2 but width 9: a width index bounded by the depth size would never reach column 8.
  low = np.zeros((2, 4, 9), bool)
  low[1, 3, 8] = low[0, 0, 7] = low[1, 2, 3] = True
  positions, valid = targets.sample_positions(low, 200, np.random.default_rng(0))
  assert positions.dtype == np.int32 and positions.shape == (200, 3) and valid.all()
  assert np.all(positions >= 0) and np.all(positions < np.array(low.shape))
  assert np.all(low[tuple(positions.T)])
  assert {tuple(p) for p in positions} == {(1, 3, 8), (0, 0, 7), (1, 2, 3)}


def test_sample_positions_of_an_empty_mask_are_all_invalid():
  positions, valid = targets.sample_positions(np.zeros((2, 3, 4), bool), 5,
                                              np.random.default_rng(0))
  assert positions.shape == (5, 3) and not positions.any() and valid.shape == (5,)
  assert not valid.any()


def test_stage_channel_masks():
  label = np.array([0, 1, 2, 2]).reshape(1, 1, 4)
  np.testing.assert_array_equal(targets.stage_channel_masks(label, 'joint')[0, 0],
                                [[0, 0], [1, 0], [1, 1], [1, 1]])
  np.testing.assert_array_equal(targets.stage_channel_masks(label, 'pancreas_fine')[0, 0, :, 0],
                                [0, 1, 1, 1])
  np.testing.assert_array_equal(targets.stage_channel_masks(label, 'tumour_coarse')[0, 0, :, 0],
                                [0, 0, 1, 1])
  assert targets.stage_channel_masks(label, 'joint').dtype == np.float32
  with pytest.raises(ConfigError, match='stage'):
    targets.stage_channel_masks(label, 'liver')


def test_make_targets_on_a_non_cubic_label():
  label = np.zeros((16, 24, 72), np.int32)
  label[4:12, 6:18, 30:70] = 1
  label[6:10, 9:15, 55:68] = 2  # tumour near the far end of the wide axis
  num = 32
  result = targets.make_targets(label, 'joint', (2.0, 1.0, 1.0), np.random.default_rng(0), num,
                                slice_min_voxels=10)
  assert result['mask'].shape == result['sdf'].shape == (16, 24, 72, 2)
  assert result['sdf'].dtype == result['mask'].dtype == np.float32
  assert result['sdf_valid'].tolist() == [True, True]
  np.testing.assert_allclose(result['sdf'][..., 1],
                             targets.normalized_sdf(label == 2, (2.0, 1.0, 1.0))[0])
  grid = np.array([2, 3, 9])
  for kind in ('positive', 'negative'):
    positions, valid = result[f'{kind}_positions'], result[f'{kind}_valid']
    assert positions.shape == (num, 3) and positions.dtype == np.int32 and valid.all()
    assert np.all(positions >= 0) and np.all(positions < grid)
  # Positives sit on the tumour's cells; the tumour spans width cells 6..8 only.
  assert np.all(positions[:, 2] >= 5)
  assert set(result['positive_positions'][:, 2]) <= {6, 7, 8}
  expected_slices = ((label == 2).sum(axis=(1, 2)) > 10).astype(np.float32)
  np.testing.assert_array_equal(result['slice_label'], expected_slices)
  assert result['slice_label'].tolist()[6:10] == [1, 1, 1, 1]


def test_make_targets_without_tumour_marks_no_sdf_and_no_positions():
  label = np.zeros((16, 16, 16), np.int32)
  label[4:12, 4:12, 4:12] = 1
  result = targets.make_targets(label, 'joint', (1.0, 1.0, 1.0), np.random.default_rng(0), 4, 10)
  assert result['sdf_valid'].tolist() == [True, False]
  assert not result['sdf'][..., 1].any()
  assert not result['positive_valid'].any() and not result['negative_valid'].any()
  assert not result['slice_label'].any()


def test_skeleton_of_a_structure_thinning_erases_is_its_deepest_voxels():
  box = np.zeros((16, 24, 32), bool)
  box[6:10, 9:15, 15:28] = True  # Lee's thinning leaves nothing of this box
  points = np.argwhere(targets.skeleton(box))
  assert len(points) > 0 and np.all(box[tuple(points.T)])
  # Deepest voxels: two voxels from the background along depth, the box's thinnest axis.
  assert set(points[:, 0]) <= {7, 8}
