"""Post-processing rules on planted components: thresholds, component filters, tumour inside the
(dilated) pancreas, and the joint channels combined into 0/1/2."""

import ml_collections
import numpy as np
import pytest

from dualseg_jax import config_base
from dualseg_jax.errors import ConfigError
from dualseg_jax.inference import postprocess

SHAPE = (20, 30, 30)


def _inference_config(**overrides) -> ml_collections.ConfigDict:
  config = config_base.base_config().inference
  for key, value in overrides.items():
    config[key] = value
  return config


def _box(mask, start, size):
  mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
  return mask


def _planted_components():
  """Three components of 1000, 600 and 300 voxels, plus two voxels touching only at a corner."""
  mask = np.zeros(SHAPE, bool)
  _box(mask, (1, 1, 1), (10, 10, 10))  # 1000
  _box(mask, (1, 15, 15), (6, 10, 10))  # 600
  _box(mask, (14, 1, 1), (3, 10, 10))  # 300
  mask[18, 20, 20] = mask[19, 21, 21] = True  # one 26-connected component of 2 voxels
  return mask


def test_component_rules():
  mask = _planted_components()
  assert postprocess.keep_components(mask, 'none').sum() == mask.sum()
  largest = postprocess.keep_components(mask, 'largest')
  assert largest.sum() == 1000 and largest[5, 5, 5]
  kept = postprocess.keep_components(mask, 'fraction', 0.5)  # > 500 voxels survive
  assert kept.sum() == 1600 and kept[3, 20, 20] and not kept[15, 5, 5]
  kept = postprocess.keep_components(mask, 'fraction', 0.25)  # > 250
  assert kept.sum() == 1900 and not kept[18, 20, 20]
  # The corner-touching pair is one component under 26-connectivity.
  assert postprocess.keep_components(mask, 'fraction', 0.0).sum() == 1902
  assert not postprocess.keep_components(np.zeros(SHAPE, bool), 'largest').any()
  with pytest.raises(ConfigError, match='inference.postprocess'):
    postprocess.keep_components(mask, 'biggest')


def test_dilation_is_a_voxel_ball():
  mask = np.zeros(SHAPE, bool)
  mask[10, 15, 15] = True
  dilated = postprocess.dilate_voxels(mask, 3)
  grid = np.indices(SHAPE)
  distance = np.sqrt((grid[0] - 10) ** 2 + (grid[1] - 15) ** 2 + (grid[2] - 15) ** 2)
  np.testing.assert_array_equal(dilated, distance <= 3)


def _joint_probabilities(pancreas, tumour):
  return np.stack([np.where(pancreas, 0.9, 0.1), np.where(tumour, 0.8, 0.2)], -1).astype(np.float32)


def test_joint_label_tumour_wins_and_stays_near_the_pancreas():
  pancreas = _box(np.zeros(SHAPE, bool), (5, 5, 5), (10, 10, 10))
  pancreas_fragment = _box(np.zeros(SHAPE, bool), (1, 25, 25), (2, 2, 2))
  tumour_inside = _box(np.zeros(SHAPE, bool), (8, 8, 8), (3, 3, 3))
  tumour_at_margin = _box(np.zeros(SHAPE, bool), (5, 16, 5), (2, 2, 3))  # 1-2 voxels outside
  tumour_far = _box(np.zeros(SHAPE, bool), (17, 25, 1), (3, 3, 3))
  probabilities = _joint_probabilities(pancreas | pancreas_fragment,
                                       tumour_inside | tumour_at_margin | tumour_far)
  config = _inference_config(postprocess='none', pancreas_dilation_vox=3)
  label = postprocess.probabilities_to_label(probabilities, 'joint', config)
  assert label.dtype == np.uint8
  expected = np.zeros(SHAPE, np.uint8)
  expected[pancreas | pancreas_fragment] = 1
  expected[tumour_inside | tumour_at_margin] = 2  # the far one is outside the 3-voxel margin
  np.testing.assert_array_equal(label, expected)

  config = _inference_config(postprocess='fraction', component_fraction=0.5)
  label = postprocess.probabilities_to_label(probabilities, 'joint', config)
  expected[pancreas_fragment] = 0  # 8 voxels < half of 1000
  expected[tumour_at_margin] = 0  # 12 voxels < half of the 27-voxel tumour
  np.testing.assert_array_equal(label, expected)

  config = _inference_config(postprocess='none', tumour_inside_pancreas=False)
  label = postprocess.probabilities_to_label(probabilities, 'joint', config)
  assert np.all(label[tumour_far] == 2)


def test_threshold_and_empty_pancreas_removes_tumour():
  probabilities = np.zeros(SHAPE + (2,), np.float32)
  probabilities[2:6, 2:6, 2:6, 1] = 0.7
  config = _inference_config(threshold=0.5)
  assert not postprocess.probabilities_to_label(probabilities, 'joint', config).any()
  label = postprocess.probabilities_to_label(probabilities, 'joint', _inference_config(
      threshold=0.5, tumour_inside_pancreas=False))
  assert (label == 2).sum() == 64
  label = postprocess.probabilities_to_label(probabilities, 'joint', _inference_config(
      threshold=0.75, tumour_inside_pancreas=False))
  assert not label.any()


def test_single_structure_stages():
  mask = _box(np.zeros(SHAPE, bool), (2, 2, 2), (4, 4, 4))
  probabilities = np.where(mask, 0.9, 0.0)[..., None].astype(np.float32)
  config = _inference_config()
  assert set(np.unique(postprocess.probabilities_to_label(probabilities, 'pancreas_fine',
                                                           config))) == {0, 1}
  assert set(np.unique(postprocess.probabilities_to_label(probabilities, 'tumour_coarse',
                                                           config))) == {0, 2}
  far_pancreas = _box(np.zeros(SHAPE, bool), (12, 20, 20), (5, 5, 5))
  restricted = postprocess.probabilities_to_label(probabilities, 'tumour_fine', config,
                                                  pancreas_mask=far_pancreas)
  assert not restricted.any()
  with pytest.raises(ConfigError, match='num_classes'):
    postprocess.probabilities_to_label(probabilities, 'joint', config)


def _true_pancreas_beside_a_false_blob():
  """A confident 300-voxel pancreas, a borderline 800-voxel false blob (more than twice its
  size), a 2-voxel speck; voxels of 2 x 1.5 x 1.5 mm = 4.5 mm^3."""
  pancreas = _box(np.zeros(SHAPE, bool), (2, 2, 2), (3, 10, 10))
  blob = _box(np.zeros(SHAPE, bool), (8, 10, 10), (8, 10, 10))
  speck = _box(np.zeros(SHAPE, bool), (18, 27, 27), (1, 1, 2))
  probabilities = np.where(pancreas | speck, 0.95, np.where(blob, 0.6, 0.05)).astype(np.float32)
  return pancreas, blob, speck, probabilities, (2.0, 1.5, 1.5)


def test_min_volume_and_probability_mass_keep_a_small_true_pancreas_beside_a_big_blob():
  pancreas, blob, speck, probabilities, spacing_mm = _true_pancreas_beside_a_false_blob()
  mask = pancreas | blob | speck
  np.testing.assert_array_equal(postprocess.keep_components(mask, 'largest'), blob)
  np.testing.assert_array_equal(postprocess.keep_components(mask, 'fraction', 0.5), blob)
  # 300 voxels = 1350 mm^3 and 800 = 3600 mm^3 stay; the speck's 9 mm^3 goes.
  kept = postprocess.keep_components(mask, 'min_volume', spacing_mm=spacing_mm,
                                     min_volume_mm3=500.0)
  np.testing.assert_array_equal(kept, pancreas | blob)
  # Masses 285 (pancreas) and 480 (blob): 285 > 0.5 x 480; the speck's 1.9 is not.
  kept = postprocess.keep_components(mask, 'largest_probability_mass', 0.5,
                                     probabilities=probabilities)
  np.testing.assert_array_equal(kept, pancreas | blob)
  kept = postprocess.keep_components(mask, 'largest_probability_mass', 0.7,
                                     probabilities=probabilities)
  np.testing.assert_array_equal(kept, blob)
  confident = np.where(pancreas, 0.99, np.where(blob, 0.3, 0.0))
  kept = postprocess.keep_components(pancreas | blob, 'largest_probability_mass', 1.0,
                                     probabilities=confident)  # 297 against 240
  np.testing.assert_array_equal(kept, pancreas)


def test_min_volume_counts_whole_voxels_of_the_given_spacing():
  mask = np.zeros(SHAPE, bool)
  mask.reshape(-1)[:112] = True  # a run of voxels along x: one component of 112 x 4.5 = 504 mm^3
  assert postprocess.keep_components(mask, 'min_volume', spacing_mm=(2.0, 1.5, 1.5),
                                     min_volume_mm3=504.0).sum() == 112
  assert not postprocess.keep_components(mask, 'min_volume', spacing_mm=(2.0, 1.5, 1.5),
                                         min_volume_mm3=504.5).any()
  assert postprocess.keep_components(mask, 'min_volume', spacing_mm=(3.0, 1.5, 1.5),
                                     min_volume_mm3=504.5).sum() == 112
  with pytest.raises(ValueError, match='spacing_mm'):
    postprocess.keep_components(mask, 'min_volume')
  with pytest.raises(ValueError, match='probabilities'):
    postprocess.keep_components(mask, 'largest_probability_mass')


def test_label_maps_with_the_new_rules_need_the_spacing_and_use_each_channel():
  pancreas, blob, speck, probabilities, spacing_mm = _true_pancreas_beside_a_false_blob()
  tumour = _box(np.zeros(SHAPE, bool), (3, 4, 4), (1, 3, 3))  # 9 voxels = 40.5 mm^3
  joint = np.stack([probabilities, np.where(tumour, 0.9, 0.0)], -1).astype(np.float32)
  config = _inference_config(postprocess='min_volume', min_component_mm3=500.0)
  with pytest.raises(ConfigError, match='spacing'):
    postprocess.probabilities_to_label(joint, 'joint', config)
  label = postprocess.probabilities_to_label(joint, 'joint', config, spacing_mm=spacing_mm)
  np.testing.assert_array_equal(label >= 1, pancreas | blob)
  assert not (label == 2).any()  # the tumour is smaller than 500 mm^3
  config = _inference_config(postprocess='min_volume', min_component_mm3=40.0)
  label = postprocess.probabilities_to_label(joint, 'joint', config, spacing_mm=spacing_mm)
  np.testing.assert_array_equal(label == 2, tumour)
  config = _inference_config(postprocess='largest_probability_mass', component_fraction=0.5)
  label = postprocess.probabilities_to_label(joint, 'joint', config)
  np.testing.assert_array_equal(label >= 1, pancreas | blob)
  np.testing.assert_array_equal(label == 2, tumour)
