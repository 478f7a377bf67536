"""Spacing-aware segmentation metrics per case and structure: overlap (Dice, IoU, precision,
recall), volume difference, and surface distances (HD95, ASSD, normalised surface Dice).

Structures: 'pancreas' is labels 1+2 (the gland including its tumour), 'tumour' is label 2.
Surface: the mask voxels with at least one face neighbour (6-connectivity) outside the mask; the
image border counts as outside. Distances are between voxel centres in mm, from each surface voxel
of one mask to the nearest surface voxel of the other (a Euclidean distance transform with the
voxel spacing), giving the directed sets d(P->G) and d(G->P).
- HD95 = max(95th percentile of d(P->G), 95th percentile of d(G->P)), percentiles with linear
  interpolation: the symmetric "robust Hausdorff" of DeepMind's surface-distance package and
  MONAI.
- ASSD = (sum d(P->G) + sum d(G->P)) / (|surface P| + |surface G|).
- NSD at tolerance t = (#{d(P->G) <= t} + #{d(G->P) <= t}) / (|surface P| + |surface G|).
Empty masks: each case and structure has one OUTCOMES entry, and
- 'missed' (the reference has the structure, the prediction is empty) and 'false positive' (the
  prediction has it, the reference is empty): Dice = IoU = NSD = 0, precision or recall 0, and
  HD95 = ASSD = a penalty, the image diagonal sqrt(sum((voxels * spacing_mm)^2)) (BraTS penalises
  a missed or spurious region likewise, with the 374 mm diagonal of its 240 x 240 x 155 mm
  field): no distance on the grid is larger, so a miss counts as the worst score in every mean
  instead of being left out of it.
- 'absent' (both empty): there is nothing to overlap or measure, so Dice, IoU, precision, recall,
  NSD, HD95, ASSD and the relative volume difference are NaN (volume differences in ml are 0).
  Summaries leave NaN (and the infinite relative volume difference of a false positive) out of
  mean/std/median and count them in `n_excluded`: a tumour-free case neither rewards nor punishes
  the tumour scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.ndimage as ndimage

from dualseg_jax import structures

HD_PERCENTILE = 95.0
STRUCTURES = structures.MASKS  # name -> its mask in a 0/1/2 label map
STRUCTURE_LABELS = {'pancreas': 'labels 1+2', 'tumour': 'label 2'}
# Whether the reference and the prediction hold the structure -> the case's outcome.
OUTCOMES = {(True, True): 'found', (True, False): 'missed', (False, True): 'false positive',
            (False, False): 'absent'}
PENALISED_OUTCOMES = ('missed', 'false positive')
METRIC_NAMES = ('dice', 'iou', 'precision', 'recall', 'volume_pred_ml', 'volume_gt_ml',
                'volume_difference_ml', 'volume_difference_relative', 'hd95_mm', 'assd_mm', 'nsd')
_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def display_name(structure: str) -> str:
  """'pancreas' -> 'pancreas (labels 1+2)': the name with the label values it covers."""
  return f'{structure} ({STRUCTURE_LABELS[structure]})'


def outcome(metrics: dict[str, float]) -> str:
  """The OUTCOMES entry of one structure's metrics (from its reference and predicted volumes)."""
  return OUTCOMES[metrics['volume_gt_ml'] > 0, metrics['volume_pred_ml'] > 0]


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
  """Length of the field of view's diagonal: the surface-distance penalty of a missed structure."""
  return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * np.asarray(spacing_mm)) ** 2)))


def surface_voxels(mask: np.ndarray) -> np.ndarray:
  """Mask voxels with a face neighbour outside the mask or outside the image."""
  mask = np.asarray(mask, dtype=bool)
  interior = ndimage.binary_erosion(mask, structure=_FACE_CONNECTIVITY, border_value=0)
  return mask & ~interior


def directed_surface_distances(prediction: np.ndarray, reference: np.ndarray,
                               spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(d(P->G), d(G->P)) in mm for two non-empty boolean masks of one grid."""
  union = prediction | reference
  # Every surface voxel lies in the union's bounding box; a one-voxel frame of background keeps
  # the image-border rule and the distance transforms identical to the full grid's.
  box = tuple(slice(int(indices.min()), int(indices.max()) + 1) for indices in np.nonzero(union))
  prediction = np.pad(prediction[box], 1)
  reference = np.pad(reference[box], 1)
  prediction_surface = surface_voxels(prediction)
  reference_surface = surface_voxels(reference)
  to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing_mm)
  to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing_mm)
  return to_reference[prediction_surface], to_prediction[reference_surface]


def dice(prediction: np.ndarray, reference: np.ndarray, both_empty: float = np.nan) -> float:
  """Dice of two boolean masks of one grid, 2 |P & G| / (|P| + |G|); `both_empty` when neither
  holds a voxel (by default NaN, as for an 'absent' structure: there is nothing to overlap)."""
  prediction = np.asarray(prediction, dtype=bool)
  reference = np.asarray(reference, dtype=bool)
  total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
  if total == 0:
    return float(both_empty)
  return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float],
                   nsd_tolerance_mm: float = 2.0) -> dict[str, float]:
  """Every metric of METRIC_NAMES for one structure (boolean masks on one grid)."""
  prediction = np.asarray(prediction, dtype=bool)
  reference = np.asarray(reference, dtype=bool)
  if prediction.shape != reference.shape:
    raise ValueError(
        f'prediction {prediction.shape} and reference {reference.shape} differ in shape')
  voxel_ml = float(np.prod(spacing_mm)) / 1000.0
  predicted_voxels = int(prediction.sum())
  reference_voxels = int(reference.sum())
  overlap = int(np.count_nonzero(prediction & reference))
  union = predicted_voxels + reference_voxels - overlap
  metrics = {
      'volume_pred_ml': predicted_voxels * voxel_ml,
      'volume_gt_ml': reference_voxels * voxel_ml,
      'volume_difference_ml': (predicted_voxels - reference_voxels) * voxel_ml,
  }
  if predicted_voxels == 0 and reference_voxels == 0:
    metrics.update(dice=np.nan, iou=np.nan, precision=np.nan, recall=np.nan,
                   volume_difference_relative=np.nan, hd95_mm=np.nan, assd_mm=np.nan, nsd=np.nan)
    return _in_order(metrics)
  metrics['dice'] = dice(prediction, reference)
  metrics['iou'] = overlap / union
  metrics['precision'] = overlap / predicted_voxels if predicted_voxels else 0.0
  metrics['recall'] = overlap / reference_voxels if reference_voxels else 0.0
  metrics['volume_difference_relative'] = (
      (predicted_voxels - reference_voxels) / reference_voxels if reference_voxels else np.inf)
  if predicted_voxels == 0 or reference_voxels == 0:
    penalty_mm = image_diagonal_mm(prediction.shape, spacing_mm)
    metrics.update(hd95_mm=penalty_mm, assd_mm=penalty_mm, nsd=0.0)
    return _in_order(metrics)
  to_reference, to_prediction = directed_surface_distances(prediction, reference, spacing_mm)
  num_surface = to_reference.size + to_prediction.size
  metrics['hd95_mm'] = float(max(np.percentile(to_reference, HD_PERCENTILE),
                                 np.percentile(to_prediction, HD_PERCENTILE)))
  metrics['assd_mm'] = float((to_reference.sum() + to_prediction.sum()) / num_surface)
  within = np.count_nonzero(to_reference <= nsd_tolerance_mm) + np.count_nonzero(
      to_prediction <= nsd_tolerance_mm)
  metrics['nsd'] = within / num_surface
  return _in_order(metrics)


def _in_order(metrics: dict) -> dict[str, float]:
  return {name: float(metrics[name]) for name in METRIC_NAMES}


def case_metrics(prediction_label: np.ndarray, reference_label: np.ndarray,
                 spacing_mm: Sequence[float], nsd_tolerance_mm: float = 2.0
                 ) -> dict[str, dict[str, float]]:
  """Metrics per structure ('pancreas': labels 1+2, 'tumour': label 2) for two 0/1/2 maps."""
  return {name: binary_metrics(select(prediction_label), select(reference_label), spacing_mm,
                               nsd_tolerance_mm)
          for name, select in STRUCTURES.items()}


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
  """Mean, std, median over the finite values; `n_excluded` counts infinite or NaN ones."""
  values = np.asarray(list(values), dtype=np.float64)
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    return {'mean': None, 'std': None, 'median': None, 'n': 0, 'n_excluded': int(values.size)}
  return {'mean': float(finite.mean()), 'std': float(finite.std()),
          'median': float(np.median(finite)), 'n': int(finite.size),
          'n_excluded': int(values.size - finite.size)}
