"""Host-side targets against analytic shapes and slow loop re-implementations."""


import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from dualseg_jax.data import targets
from dualseg_jax.errors import ConfigError


def slow_signed_distance_mm(mask, spacing_mm):
  """Brute force: each voxel centre's distance to the nearest voxel centre of the other kind."""
  spacing_mm = np.asarray(spacing_mm, np.float64)
  inside_points = np.argwhere(mask) * spacing_mm
  outside_points = np.argwhere(~mask) * spacing_mm
  distance = np.zeros(mask.shape)
  for index in np.ndindex(mask.shape):
    point = np.asarray(index) * spacing_mm
    others = outside_points if mask[index] else inside_points
    nearest = np.sqrt(((others - point) ** 2).sum(axis=1)).min()
    distance[index] = -nearest if mask[index] else nearest
  return distance


def test_signed_distance_matches_brute_force_distances_to_the_other_kind():
  rng = np.random.default_rng(0)
  mask = ndimage.binary_opening(rng.random((7, 9, 11)) < 0.6)
  spacing = (2.5, 1.0, 1.5)
  signed_distance, valid = targets.signed_distance_mm(mask, spacing)
  assert valid and signed_distance.dtype == np.float32
  np.testing.assert_allclose(signed_distance, slow_signed_distance_mm(mask, spacing), atol=1e-5)
  expected = slow_signed_distance_mm(mask, spacing)
  expected = np.where(mask, expected / -expected.min(), expected / expected.max())
  sdf, valid = targets.normalized_sdf(mask, spacing)
  assert valid
  np.testing.assert_allclose(sdf, expected, atol=1e-6)


def test_sign_of_the_sdf_is_the_mask_and_no_voxel_sits_on_the_zero_level():
  rng = np.random.default_rng(1)
  mask = ndimage.binary_opening(rng.random((10, 12, 14)) < 0.55)
  sdf, valid = targets.normalized_sdf(mask, (3.0, 1.5, 1.5))
  assert valid
  np.testing.assert_array_equal(sdf < 0, mask)
  assert np.all(sdf != 0)
  assert sdf.min() == -1.0 and sdf.max() == 1.0


def test_zero_level_lies_halfway_between_inside_and_outside_neighbours():
  """Along a line through a slab, neighbours across the surface hold -s and +s: linear
  interpolation crosses zero halfway between their centres, on the slab's face."""
  mask = np.zeros((10, 6, 6), bool)
  mask[3:7] = True  # slices 3..6 inside
  signed_distance, valid = targets.signed_distance_mm(mask, (2.0, 1.0, 1.0))
  assert valid
  np.testing.assert_allclose(signed_distance[:, 2, 2], [6, 4, 2, -2, -4, -4, -2, 2, 4, 6])


def test_sdf_of_an_anisotropic_box_is_the_analytic_distance():
  shape, spacing = (12, 20, 16), (3.0, 1.0, 2.0)
  low, high = np.array([3, 5, 4]), np.array([9, 16, 12])  # voxels low..high-1 are inside
  mask = np.zeros(shape, bool)
  mask[3:9, 5:16, 4:12] = True
  signed_distance, valid = targets.signed_distance_mm(mask, spacing)
  assert valid
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), axis=-1)
  spacing = np.asarray(spacing)
  # Outside: Euclidean distance to the box of voxel centres [low, high - 1].
  excess = np.maximum(low - grid, 0) + np.maximum(grid - (high - 1), 0)
  outside_distance = np.sqrt(((excess * spacing) ** 2).sum(axis=-1))
  # Inside: distance to the nearest outside voxel, one step beyond the nearest face.
  inside_distance = (np.minimum(grid - low, high - 1 - grid) + 1) * spacing
  inside_distance = inside_distance.min(axis=-1)
  np.testing.assert_allclose(signed_distance, np.where(mask, -inside_distance, outside_distance),
                             atol=1e-5)


def test_sdf_of_an_anisotropic_sphere_follows_the_surface_distance():
  shape, spacing, radius = (20, 40, 40), np.array([2.0, 1.0, 1.0]), 12.0
  centre = (np.array(shape) - 1) / 2 * spacing
  points = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1) * spacing
  radial = np.sqrt(((points - centre) ** 2).sum(-1))
  mask = radial <= radius
  signed_distance, valid = targets.signed_distance_mm(mask, spacing)
  assert valid
  # Distances are taken between voxel centres: off by at most about one (largest) voxel.
  tolerance_mm = spacing.max()
  assert np.abs(signed_distance - (radial - radius)).max() <= tolerance_mm
  assert np.all(signed_distance[mask] < 0) and np.all(signed_distance[~mask] > 0)


def test_sdf_of_a_structure_cut_by_the_patch_edge_has_no_surface_on_the_edge():
  mask = np.zeros((10, 6, 6), bool)
  mask[:4] = True  # slices 0..3 inside; the array's own faces are not the structure's surface
  sdf, valid = targets.normalized_sdf(mask, (1.0, 1.0, 1.0))
  assert valid
  np.testing.assert_allclose(sdf[:, 2, 2], [-1, -3 / 4, -2 / 4, -1 / 4, 1 / 6, 2 / 6, 3 / 6,
                                            4 / 6, 5 / 6, 1], atol=1e-6)


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
  # The 1/8 ring is the downsampled full ring for the side the generator draws, less every cell
  # that holds a mask voxel (a negative never shares a cell with a positive).
  side = int(np.random.default_rng(5).integers(10, 21))
  ring_low = targets.ring(mask, np.random.default_rng(5))
  np.testing.assert_array_equal(ring_low, slow_downsample(targets.ring_voxels(mask, side), 8)
                                & ~slow_downsample(mask, 8))
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


def _box_cells(shape, boxes):
  grid = np.zeros(shape, bool)
  for box in boxes:
    grid[box] = True
  return grid


def test_per_slice_positives_skip_slices_with_fewer_than_five_structure_cells():
  # Slice 0: 6 structure cells; slice 1: 3; slice 2: exactly 5; slice 3: none.
  structure = _box_cells((4, 6, 6), [np.s_[0, 0:2, 0:3], np.s_[1, 2, 0:3], np.s_[2, 1, 0:5]])
  skeleton_cells = _box_cells((4, 6, 6), [np.s_[0, 1, 0:3], np.s_[1, 2, 1], np.s_[2, 1, 1:4],
                                          np.s_[0, 5, 5], np.s_[3, 0, 0]])  # two outside
  for seed in range(10):
    positions, valid = targets.sample_slice_positives(skeleton_cells, structure,
                                                      np.random.default_rng(seed))
    assert positions.shape == (4, 3) and positions.dtype == np.int32 and valid.dtype == bool
    assert valid.tolist() == [True, False, True, False]
    assert not positions[~valid].any()
    for z in np.flatnonzero(valid):
      assert positions[z, 0] == z
      assert skeleton_cells[tuple(positions[z])] and structure[tuple(positions[z])]


def test_per_slice_positives_relax_the_threshold_for_a_tiny_structure():
  # No slice reaches 5 cells: the threshold drops until one qualifies (2 cells in slice 1),
  # and slice 2's single cell stays below it.
  structure = _box_cells((3, 4, 4), [np.s_[1, 0, 0:2], np.s_[2, 3, 3]])
  positions, valid = targets.sample_slice_positives(structure, structure, np.random.default_rng(0))
  assert valid.tolist() == [False, True, False]
  assert tuple(positions[1]) in {(1, 0, 0), (1, 0, 1)}
  # A structure of one cell still gives its positive.
  single = _box_cells((3, 4, 4), [np.s_[2, 3, 3]])
  positions, valid = targets.sample_slice_positives(single, single, np.random.default_rng(0))
  assert valid.tolist() == [False, False, True] and positions[2].tolist() == [2, 3, 3]


def test_per_slice_negatives_sit_mid_ring():
  # A square ring of cells at Chebyshev distance 2..4 from the centre: its 2D skeleton is the
  # middle loop, distance 3.
  y, x = np.mgrid[:11, :11]
  distance = np.maximum(np.abs(y - 5), np.abs(x - 5))
  ring_cells = np.zeros((3, 11, 11), bool)
  ring_cells[0] = (distance >= 2) & (distance <= 4)
  ring_cells[2, 4, 4] = True  # a single cell is its own skeleton
  chosen = set()
  for seed in range(20):
    positions, valid = targets.sample_slice_negatives(ring_cells, np.random.default_rng(seed))
    assert valid.tolist() == [True, False, True]
    assert positions[0, 0] == 0 and distance[positions[0, 1], positions[0, 2]] == 3
    assert positions[2].tolist() == [2, 4, 4] and not positions[1].any()
    chosen.add(tuple(positions[0]))
  assert len(chosen) > 5  # drawn at random along the loop


def _tumour_label(shape=(32, 48, 48)):
  """A tumour spanning three 1/8 slices in the middle and thin in the last ones."""
  z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
  tumour = (((z - 13.5) / 11) ** 2 + ((y - 23.5) / 14) ** 2 + ((x - 22.5) / 12) ** 2) <= 1
  tumour |= (z >= 24) & (z < 30) & (y >= 20) & (y < 24) & (x >= 20) & (x < 24)
  return tumour


def test_per_slice_sampling_against_independent_references():
  tumour = _tumour_label()
  skeleton_cells = slow_downsample(targets.skeleton(tumour), 8)
  structure_cells = slow_downsample(tumour, 8)
  side = 11  # odd: scipy's cube dilation is centred the same way
  ring_cells = slow_downsample(
      ndimage.binary_dilation(tumour, structure=np.ones((side,) * 3, bool)) & ~tumour, 8)
  ring_cells &= ~structure_cells
  counts = structure_cells.sum(axis=(1, 2))
  has_skeleton = (skeleton_cells & structure_cells).any(axis=(1, 2))
  assert counts.max() >= 5 and (counts < 5).any()  # some slices are skipped, some are not
  for seed in range(8):
    result = targets.contrastive_positions(tumour, skeleton_cells, np.random.default_rng(seed),
                                           'per_slice', ring_sides=(side, side))
    positives, negatives = result['positive_positions'], result['negative_positions']
    positive_valid, negative_valid = result['positive_valid'], result['negative_valid']
    assert positives.shape == negatives.shape == (4, 3)
    assert positive_valid.shape == negative_valid.shape == (4,)
    np.testing.assert_array_equal(positive_valid, has_skeleton & (counts >= 5))
    np.testing.assert_array_equal(negative_valid, ring_cells.any(axis=(1, 2)))
    np.testing.assert_array_equal(positives[positive_valid, 0], np.flatnonzero(positive_valid))
    np.testing.assert_array_equal(negatives[negative_valid, 0], np.flatnonzero(negative_valid))
    for cell in positives[positive_valid]:
      assert skeleton_cells[tuple(cell)] and structure_cells[tuple(cell)]
    for cell in negatives[negative_valid]:
      assert ring_cells[tuple(cell)] and not structure_cells[tuple(cell)]
      blocks = tumour[cell[0] * 8:(cell[0] + 1) * 8, cell[1] * 8:(cell[1] + 1) * 8,
                      cell[2] * 8:(cell[2] + 1) * 8]
      assert not blocks.any()  # the cell holds no structure voxel
      slice_skeleton = morphology.skeletonize(ring_cells[cell[0]])
      assert slice_skeleton[cell[1], cell[2]]
    assert not {tuple(c) for c in positives[positive_valid]} & {
        tuple(c) for c in negatives[negative_valid]}


def test_uniform_sampling_keeps_num_positions_rows_and_disjoint_cells():
  tumour = _tumour_label()
  skeleton_cells = slow_downsample(targets.skeleton(tumour), 8)
  result = targets.contrastive_positions(tumour, skeleton_cells, np.random.default_rng(0),
                                         'uniform', num_positions=40)
  assert result['positive_positions'].shape == result['negative_positions'].shape == (40, 3)
  assert result['positive_valid'].all() and result['negative_valid'].all()
  structure_cells = slow_downsample(tumour, 8)
  assert all(skeleton_cells[tuple(c)] for c in result['positive_positions'])
  assert not any(structure_cells[tuple(c)] for c in result['negative_positions'])


@pytest.mark.parametrize('sampling, rows', [('per_slice', 2), ('uniform', 5)])
def test_empty_structure_gives_only_invalid_positions(sampling, rows):
  empty = np.zeros((16, 16, 16), bool)
  result = targets.contrastive_positions(empty, np.zeros((2, 2, 2), bool),
                                         np.random.default_rng(0), sampling, num_positions=5)
  for kind in ('positive', 'negative'):
    assert result[f'{kind}_positions'].shape == (rows, 3)
    assert not result[f'{kind}_valid'].any() and not result[f'{kind}_positions'].any()


def test_unknown_contrastive_sampling_names_the_key():
  with pytest.raises(ConfigError, match='data.contrastive_sampling'):
    targets.contrastive_positions(np.zeros((8, 8, 8), bool), np.zeros((1, 1, 1), bool),
                                  np.random.default_rng(0), 'everywhere')


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


@pytest.mark.parametrize('sampling, rows', [('uniform', 32), ('per_slice', 2)])
def test_make_targets_on_a_non_cubic_label(sampling, rows):
  label = np.zeros((16, 24, 72), np.int32)
  label[4:12, 6:18, 30:70] = 1
  label[6:10, 9:15, 55:68] = 2  # tumour near the far end of the wide axis
  num = 32
  result = targets.make_targets(label, 'joint', (2.0, 1.0, 1.0), np.random.default_rng(0), num,
                                slice_min_voxels=10, contrastive_sampling=sampling)
  assert result['mask'].shape == result['sdf'].shape == (16, 24, 72, 2)
  assert result['sdf'].dtype == result['mask'].dtype == np.float32
  assert result['sdf_valid'].tolist() == [True, True]
  np.testing.assert_allclose(result['sdf'][..., 1],
                             targets.normalized_sdf(label == 2, (2.0, 1.0, 1.0))[0])
  grid = np.array([2, 3, 9])
  for kind in ('positive', 'negative'):
    positions, valid = result[f'{kind}_positions'], result[f'{kind}_valid']
    assert positions.shape == (rows, 3) and positions.dtype == np.int32 and valid.all()
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
