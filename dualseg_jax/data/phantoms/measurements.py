"""What a physicist would measure on the synthetic images, stored or resampled as training sees
them: noise, edge sharpness, tumour and gland contrasts, the tumour's contrast-to-noise ratio."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dualseg_jax.data import resampling
from dualseg_jax.data.phantoms import rendering
from dualseg_jax.data.phantoms.anatomy import Tissue
from dualseg_jax.data.phantoms.protocols import CenterProtocol
from dualseg_jax.data.phantoms.rendering import PhantomCase


def _interior(mask: np.ndarray, erosion_vox: int) -> np.ndarray:
  if erosion_vox <= 0 or not mask.any():
    return mask
  eroded = ndimage.binary_erosion(mask, iterations=erosion_vox)
  return eroded if eroded.any() else mask


def noise_sigma_hu(image_hu: np.ndarray, region: np.ndarray) -> float:
  """Noise in a homogeneous region: std of the image minus its local mean (1.5-voxel Gaussian)."""
  image = image_hu.astype(np.float32)
  residual = image - ndimage.gaussian_filter(image, 1.5)
  # Away from the region's edge, so the local mean sees no other tissue.
  interior = _interior(region, 5)
  return float(residual[interior].std())


def edge_width_mm(image_hu: np.ndarray, spacing_mm, low_hu: float = -1000.0,
                  high_hu: float = -100.0) -> float:
  """Median 10-90 % rise distance of the air-to-skin edge along x, on rows crossing the body
  near its widest point (where the skin is nearly perpendicular to x)."""
  ten = low_hu + 0.1 * (high_hu - low_hu)
  ninety = low_hu + 0.9 * (high_hu - low_hu)
  widths = []
  image = image_hu.astype(np.float32)
  for axial in image:
    body_rows = np.nonzero((axial > ninety).sum(axis=1) > 0)[0]
    if body_rows.size < 5:
      continue
    extents = [(axial[row] > ninety).sum() for row in body_rows]
    widest = body_rows[int(np.argmax(extents))]
    for row in range(max(0, widest - 2), min(axial.shape[0], widest + 3)):
      profile = axial[row]
      for direction in (profile, profile[::-1]):
        width = _rise_distance(direction, ten, ninety)
        if width is not None:
          widths.append(width * spacing_mm[2])
  return float(np.median(widths)) if widths else float('nan')


def _rise_distance(profile: np.ndarray, ten: float, ninety: float) -> float | None:
  above_ninety = np.nonzero(profile > ninety)[0]
  if above_ninety.size == 0 or above_ninety[0] == 0:
    return None
  end = above_ninety[0]
  before = np.nonzero(profile[:end] < ten)[0]
  if before.size == 0:
    return None
  start = before[-1]

  def crossing(index, level):  # linear interpolation between samples index and index + 1
    low, high = profile[index], profile[index + 1]
    return index + (level - low) / (high - low) if high != low else index + 0.5

  upper = crossing(end - 1, ninety)
  lower = crossing(start, ten)
  return float(upper - lower)


def _interior_mm(mask: np.ndarray, spacing_mm, margin_mm: float) -> np.ndarray:
  """Voxels of `mask` farther than `margin_mm` from its edge (the mask itself if none are)."""
  if not mask.any():
    return mask
  inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm) > margin_mm
  return inside if inside.any() else mask


# A lesion whose mean differs from its surroundings by less than one noise standard deviation per
# voxel is one a reader misses: the Rose model asks contrast-to-noise x sqrt(lesion area in
# pixels) >= ~3-5, i.e. per-voxel CNR >= ~1 for the 5-15 mm lesions the phantoms draw at 3 mm.
VISIBILITY_CNR_FLOOR = 1.0


def _resampled(case: PhantomCase, spacing_mm):
  """(image_hu float32, label, tissue, spacing_mm) on a grid of about `spacing_mm`, linear for
  the image and nearest for the maps, as the preprocessing cache resamples a case."""
  new_shape = resampling.resampled_shape(case.image_hu.shape, case.spacing_mm, spacing_mm)
  spacing = tuple(float(size * s / new) for size, s, new in
                  zip(case.image_hu.shape, case.spacing_mm, new_shape))
  return (resampling.resample(case.image_hu, new_shape, 'linear'),
          resampling.resample(case.label, new_shape, 'nearest'),
          resampling.resample(case.tissue, new_shape, 'nearest'), spacing)


def measure_case(case: PhantomCase, protocol: CenterProtocol,
                 resampled_spacing_mm=None) -> dict:
  """What a physicist would measure on this case's stored image, or on it resampled to
  `resampled_spacing_mm` (z, y, x) as training sees it.

  Contrasts are differences of image means over the interiors of labelled tissues; `roi_std_hu`
  is the standard deviation inside the liver 10 mm from its edge (noise plus the organ's own
  texture), the denominator of the tumour's contrast-to-noise ratio.
  """
  if resampled_spacing_mm is None:
    image, label, tissue = case.image_hu.astype(np.float32), case.label, case.tissue
    spacing_mm = case.spacing_mm
  else:
    image, label, tissue, spacing_mm = _resampled(case, resampled_spacing_mm)
  liver = tissue == Tissue.LIVER
  # Regions of interest as a reader places them: on parenchyma and on the mass, off the duct and
  # the vessels that cross them and off slices that mix tissues; the gland's one voxel in from its
  # edge with fat, the mass's whole (eroded, an irregular mass keeps too few voxels to average).
  pancreas = _interior((label == 1) & (tissue == Tissue.PANCREAS), 1)
  tumour = (label == 2) & (tissue == Tissue.TUMOUR)

  def mean_hu(region):
    return float(image[region].mean()) if region.any() else float('nan')

  # Peripancreatic fat and the neighbouring bowel (duodenum, jejunum, colon), 3-20 mm from the
  # gland, one voxel in from their own edges.
  gland = label >= 1
  distance_mm = ndimage.distance_transform_edt(~gland, sampling=spacing_mm)
  near_gland = (distance_mm > 3.0) & (distance_mm <= 20.0)
  fat = _interior(tissue == Tissue.FAT, 1) & near_gland
  bowel = _interior(np.isin(tissue, (Tissue.BOWEL_WALL, Tissue.BOWEL_FLUID)), 1) & near_gland
  roi_std_hu = float(image[_interior_mm(liver, spacing_mm, 10.0)].std()) if liver.any() else (
      float('nan'))
  pancreas_hu, tumour_hu = mean_hu(pancreas), mean_hu(tumour)
  tumour_voxels = int(np.count_nonzero(label == 2))
  tumour_ml = tumour_voxels * float(np.prod(spacing_mm)) / 1000.0
  return dict(
      spacing_mm=tuple(float(s) for s in spacing_mm),
      noise_sigma_hu=noise_sigma_hu(image, liver),
      roi_std_hu=roi_std_hu,
      pancreas_hu=pancreas_hu, tumour_hu=tumour_hu, tumour_contrast_hu=pancreas_hu - tumour_hu,
      tumour_cnr=(pancreas_hu - tumour_hu) / roi_std_hu,
      pancreas_fat_contrast_hu=pancreas_hu - mean_hu(fat),
      pancreas_bowel_contrast_hu=pancreas_hu - mean_hu(bowel),
      tumour_voxels=tumour_voxels,
      # Diameter of the sphere of the same volume.
      tumour_diameter_mm=(6.0 * tumour_ml * 1000.0 / math.pi) ** (1.0 / 3.0) if tumour_voxels
      else float('nan'),
      edge_width_mm=edge_width_mm(image, spacing_mm,
                                  low_hu=rendering.AIR_HU + protocol.hu_offset,
                                  high_hu=-100.0 + protocol.hu_offset),
      has_tumour=bool(tumour_voxels))


_TUMOUR_KEYS = ('tumour_hu', 'tumour_contrast_hu', 'tumour_cnr', 'tumour_voxels',
                'tumour_diameter_mm')


def measure_center(cases: list[PhantomCase], protocol: CenterProtocol,
                   resampled_spacing_mm=None) -> dict:
  """Means over a center's cases (tumour numbers over the cases that have one), measured on the
  stored images or resampled to `resampled_spacing_mm`; `tumour_cnr_min` is the least visible
  lesion."""
  measured = [measure_case(case, protocol, resampled_spacing_mm) for case in cases]

  def finite(key, rows):
    return [row[key] for row in rows if np.isfinite(row[key])]

  def mean(key, rows):
    values = finite(key, rows)
    return float(np.mean(values)) if values else float('nan')

  with_tumour = [row for row in measured if row['has_tumour']]
  summary = dict(
      cases=len(cases), tumour_cases=len(with_tumour),
      spacing_mm=list(measured[0]['spacing_mm'] if resampled_spacing_mm else protocol.spacing_mm),
      slice_thickness_mm=protocol.slice_thickness_mm)
  for key in measured[0]:
    if key not in ('spacing_mm', 'has_tumour'):
      summary[key] = mean(key, with_tumour if key in _TUMOUR_KEYS else measured)
  cnr = finite('tumour_cnr', with_tumour)
  summary['tumour_cnr_min'] = float(min(cnr)) if cnr else float('nan')
  return summary


MEASUREMENT_COLUMNS = (  # (key, heading, format)
    ('slice_thickness_mm', 'slice mm', '.1f'), ('roi_std_hu', 'noise HU', '.1f'),
    ('pancreas_hu', 'panc HU', '.0f'), ('tumour_contrast_hu', 'tum contr', '.1f'),
    ('tumour_cnr', 'CNR', '.2f'), ('tumour_cnr_min', 'CNR min', '.2f'),
    ('pancreas_fat_contrast_hu', 'panc-fat', '.0f'),
    ('pancreas_bowel_contrast_hu', 'panc-bowel', '.0f'), ('tumour_voxels', 'tum vox', '.0f'),
    ('tumour_diameter_mm', 'tum diam mm', '.1f'))


def measurement_table(summaries: dict) -> str:
  """Plain-text table of measure_center results, one row per center, keyed by center name."""
  widths = [max(len(heading), 7) for _, heading, _ in MEASUREMENT_COLUMNS]
  lines = [f'{"center":9} {"spacing z,y,x mm":>17} {"cases":>5} {"tumour":>6} ' + ' '.join(
      f'{heading:>{width}}' for (_, heading, _), width in zip(MEASUREMENT_COLUMNS, widths))]
  for center, row in summaries.items():
    spacing = ','.join(f'{s:.3g}' for s in row['spacing_mm'])
    lines.append(f'{center:9} {spacing:>17} {row["cases"]:5d} {row["tumour_cases"]:6d} ' + ' '.join(
        f'{row[key]:>{width}{fmt}}' for (key, _, fmt), width in zip(MEASUREMENT_COLUMNS, widths)))
  return '\n'.join(lines)

