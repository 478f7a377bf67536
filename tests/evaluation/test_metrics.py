"""Metrics against closed forms (shifted boxes with anisotropic spacing, a cube against itself),
a brute-force surface-distance reference, and the documented empty-mask conventions (a miss at
the hand-computed image diagonal)."""

import math

import numpy as np
import pytest
from scipy.spatial import distance

from dualseg_jax.evaluation import metrics

SHAPE = (24, 26, 28)
SPACING = (2.5, 0.8, 1.2)
# The penalty of a miss: the diagonal of the 60 x 20.8 x 33.6 mm field of view.
DIAGONAL_MM = math.sqrt((24 * 2.5) ** 2 + (26 * 0.8) ** 2 + (28 * 1.2) ** 2)
BOX_START = (4, 5, 6)
BOX_SIZE = (10, 12, 12)


def _box(shift=(0, 0, 0), start=BOX_START, size=BOX_SIZE, shape=SHAPE):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(s + d, s + d + n) for s, d, n in zip(start, shift, size))] = True
  return mask


def _brute_force_surface(mask):
  """Voxels with a face neighbour outside the mask, by explicit neighbour comparisons."""
  padded = np.pad(mask, 1)
  surface = np.zeros_like(mask)
  core = (slice(1, -1),) * 3
  for axis in range(3):
    for step in (-1, 1):
      neighbour = np.roll(padded, step, axis=axis)[core]
      surface |= mask & ~neighbour
  return surface


def _brute_force_distances(prediction, reference, spacing):
  points_prediction = np.argwhere(_brute_force_surface(prediction)) * np.asarray(spacing)
  points_reference = np.argwhere(_brute_force_surface(reference)) * np.asarray(spacing)
  pairwise = distance.cdist(points_prediction, points_reference)
  return pairwise.min(axis=1), pairwise.min(axis=0)


@pytest.mark.parametrize('axis, shift_voxels', [(0, 2), (2, 3), (1, 1)])
def test_shifted_boxes_closed_form(axis, shift_voxels):
  shift = [0, 0, 0]
  shift[axis] = shift_voxels
  prediction, reference = _box(shift), _box()
  result = metrics.binary_metrics(prediction, reference, SPACING, nsd_tolerance_mm=1.0)
  length = BOX_SIZE[axis]
  assert result['dice'] == pytest.approx((length - shift_voxels) / length)
  assert result['iou'] == pytest.approx((length - shift_voxels) / (length + shift_voxels))
  assert result['precision'] == result['recall'] == pytest.approx((length - shift_voxels) / length)
  # The face that leaves the other box (over 5% of the surface) lies exactly shift * spacing away,
  # and no surface voxel lies farther.
  assert result['hd95_mm'] == pytest.approx(shift_voxels * SPACING[axis])
  assert result['volume_difference_ml'] == 0.0
  assert result['volume_gt_ml'] == pytest.approx(np.prod(BOX_SIZE) * np.prod(SPACING) / 1000)


@pytest.mark.parametrize('tolerance_mm', [0.5, 1.0, 2.6])
def test_surface_metrics_match_brute_force(tolerance_mm):
  prediction = _box((2, 1, -1))
  prediction[8:12, 2:6, 10:14] = True  # a bump, so the two surfaces differ in shape
  reference = _box()
  to_reference, to_prediction = _brute_force_distances(prediction, reference, SPACING)
  result = metrics.binary_metrics(prediction, reference, SPACING, nsd_tolerance_mm=tolerance_mm)
  every = np.concatenate([to_reference, to_prediction])
  assert result['assd_mm'] == pytest.approx(every.mean(), rel=1e-6)
  assert result['nsd'] == pytest.approx((every <= tolerance_mm).mean(), rel=1e-6)
  assert result['hd95_mm'] == pytest.approx(
      max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95)), rel=1e-6)


def test_masks_touching_the_image_border():
  reference = _box(start=(0, 0, 0), size=(6, 8, 8))
  prediction = _box(start=(0, 0, 1), size=(6, 8, 8))
  result = metrics.binary_metrics(prediction, reference, SPACING)
  to_reference, to_prediction = _brute_force_distances(prediction, reference, SPACING)
  assert result['assd_mm'] == pytest.approx(np.concatenate([to_reference, to_prediction]).mean())


def test_cube_against_itself():
  cube = _box()
  result = metrics.binary_metrics(cube, cube, SPACING, nsd_tolerance_mm=0.1)
  assert result['dice'] == result['iou'] == result['nsd'] == 1.0
  assert result['hd95_mm'] == 0.0 and result['assd_mm'] == 0.0
  assert result['volume_difference_relative'] == 0.0


def test_empty_conventions():
  empty, cube = np.zeros(SHAPE, bool), _box()
  both_empty = metrics.binary_metrics(empty, empty, SPACING)
  for name in ('dice', 'iou', 'precision', 'recall', 'nsd', 'hd95_mm', 'assd_mm',
               'volume_difference_relative'):
    assert math.isnan(both_empty[name]), name
  assert both_empty['volume_difference_ml'] == 0.0
  assert metrics.outcome(both_empty) == 'absent'
  missed = metrics.binary_metrics(empty, cube, SPACING)
  assert missed['dice'] == missed['nsd'] == missed['recall'] == missed['precision'] == 0.0
  assert missed['hd95_mm'] == missed['assd_mm'] == pytest.approx(DIAGONAL_MM)
  assert DIAGONAL_MM == pytest.approx(71.8443, abs=1e-4)
  assert missed['volume_difference_relative'] == -1.0
  assert metrics.outcome(missed) == 'missed'
  false_alarm = metrics.binary_metrics(cube, empty, SPACING)
  assert false_alarm['dice'] == 0.0 and false_alarm['hd95_mm'] == pytest.approx(DIAGONAL_MM)
  assert math.isinf(false_alarm['volume_difference_relative'])
  assert metrics.outcome(false_alarm) == 'false positive'
  # No surface distance on the grid exceeds the penalty: the farthest pair of voxels.
  corners = metrics.binary_metrics(_box(start=(0, 0, 0), size=(1, 1, 1)),
                                   _box(start=(23, 25, 27), size=(1, 1, 1)), SPACING)
  assert corners['hd95_mm'] < DIAGONAL_MM


def test_case_metrics_structures_and_summaries():
  reference = np.zeros(SHAPE, np.uint8)
  reference[_box()] = 1
  reference[8:10, 8:10, 8:10] = 2
  prediction = reference.copy()
  prediction[8:10, 8:10, 8:10] = 1  # tumour missed, pancreas (label >= 1) unchanged
  result = metrics.case_metrics(prediction, reference, SPACING)
  assert result['pancreas']['dice'] == 1.0
  assert result['tumour']['dice'] == 0.0
  assert result['tumour']['hd95_mm'] == pytest.approx(DIAGONAL_MM)
  assert metrics.display_name('pancreas') == 'pancreas (labels 1+2)'
  assert metrics.display_name('tumour') == 'tumour (label 2)'
  summary = metrics.summarise([1.0, 3.0, math.inf, 2.0, math.nan])
  assert summary == {'mean': 2.0, 'std': pytest.approx(np.std([1, 3, 2])), 'median': 2.0,
                     'n': 3, 'n_excluded': 2}
  assert metrics.summarise([math.nan])['mean'] is None
