"""Imaging a synthetic patient through a center's protocol: tissue attenuation and texture, the
reconstruction blur, the slice profile, coloured noise and calibration, giving the stored HU
image and its label."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from scipy import ndimage

from dualseg_jax.data.phantoms import anatomy
from dualseg_jax.data.phantoms import shapes
from dualseg_jax.data.phantoms.anatomy import Tissue
from dualseg_jax.data.phantoms.protocols import CenterProtocol, ContrastPhase

AIR_HU = -1000.0
_HU_RANGE = (-1024, 3071)  # what a 12-bit CT reconstruction stores

# Marks a voxel whose thick slice mixes several tissues (see PhantomCase.tissue).
MIXED_TISSUE = 255

# Attenuation before contrast; enhancement is drawn per case as a scale of (phase - unenhanced).
_UNENHANCED_HU = {
    Tissue.PANCREAS: 40.0, Tissue.LIVER: 55.0, Tissue.SPLEEN: 45.0, Tissue.KIDNEY_CORTEX: 30.0,
    Tissue.KIDNEY_MEDULLA: 30.0, Tissue.AORTA: 40.0, Tissue.PORTAL_VEIN: 40.0,
    Tissue.CAVAL_VEIN: 40.0, Tissue.BOWEL_WALL: 40.0, Tissue.MUSCLE: 50.0,
}
_FIXED_HU = {
    Tissue.AIR: AIR_HU, Tissue.TABLE: 150.0, Tissue.FAT: -100.0, Tissue.BONE_CORTEX: 900.0,
    Tissue.BONE_MARROW: 230.0, Tissue.DISC: 85.0, Tissue.SPINAL_CANAL: 15.0,
    Tissue.RENAL_SINUS: -80.0, Tissue.GALLBLADDER: 8.0, Tissue.BOWEL_FLUID: 12.0,
    Tissue.BOWEL_GAS: -950.0, Tissue.STOOL: 35.0, Tissue.PANCREATIC_DUCT: 12.0,
}
# Amplitude of the smooth texture each tissue shows (HU, one standard deviation).
_TEXTURE_HU = {
    Tissue.FAT: 10.0, Tissue.MUSCLE: 6.0, Tissue.BONE_MARROW: 45.0, Tissue.BONE_CORTEX: 60.0,
    Tissue.LIVER: 4.0, Tissue.SPLEEN: 5.0, Tissue.KIDNEY_CORTEX: 8.0, Tissue.KIDNEY_MEDULLA: 8.0,
    Tissue.PANCREAS: 9.0, Tissue.TUMOUR: 10.0, Tissue.BOWEL_FLUID: 6.0, Tissue.STOOL: 50.0,
    Tissue.BOWEL_GAS: 20.0, Tissue.AORTA: 3.0, Tissue.PORTAL_VEIN: 4.0, Tissue.CAVAL_VEIN: 8.0,
    Tissue.GALLBLADDER: 2.0, Tissue.BOWEL_WALL: 6.0,
}
_PHASE_FIELDS = {
    Tissue.PANCREAS: 'pancreas_hu', Tissue.LIVER: 'liver_hu', Tissue.SPLEEN: 'spleen_hu',
    Tissue.KIDNEY_CORTEX: 'kidney_cortex_hu', Tissue.KIDNEY_MEDULLA: 'kidney_medulla_hu',
    Tissue.AORTA: 'aorta_hu', Tissue.PORTAL_VEIN: 'portal_vein_hu',
    Tissue.CAVAL_VEIN: 'caval_vein_hu', Tissue.BOWEL_WALL: 'bowel_wall_hu',
    Tissue.MUSCLE: 'muscle_hu',
}


def tissue_hu_table(phase: ContrastPhase, enhancement_scale: float,
                    tumour_contrast_hu: float) -> np.ndarray:
  """Mean HU of every tissue id for one case (index with a tissue map)."""
  table = np.zeros(len(Tissue), np.float32)
  for tissue, hu in _FIXED_HU.items():
    table[tissue] = hu
  for tissue, field in _PHASE_FIELDS.items():
    unenhanced = _UNENHANCED_HU[tissue]
    table[tissue] = unenhanced + enhancement_scale * (getattr(phase, field) - unenhanced)
  table[Tissue.TUMOUR] = table[Tissue.PANCREAS] - tumour_contrast_hu
  return table


def _texture_table() -> np.ndarray:
  table = np.zeros(len(Tissue), np.float32)
  for tissue, amplitude in _TEXTURE_HU.items():
    table[tissue] = amplitude
  return table


@dataclasses.dataclass
class PhantomCase:
  """One rendered case in canonical (z, y, x) layout, with what the tests and summaries measure."""

  image_hu: np.ndarray  # int16
  label: np.ndarray  # uint8: 0 background, 1 pancreas, 2 tumour
  spacing_mm: tuple[float, float, float]
  origin_mm: tuple[float, float, float]  # world (RAS, mm) of voxel (0, 0, 0), in (z, y, x)
  # Tissue of every voxel that holds a single tissue; MIXED_TISSUE where a thick slice mixes.
  tissue: np.ndarray
  organ_volumes_ml: dict
  pancreas_hu: float  # the case's ideal (noise-free) attenuation, calibration offset included
  tumour_contrast_hu: float  # ideal pancreas minus tumour; 0 without a tumour

  @property
  def has_tumour(self) -> bool:
    return bool((self.label == 2).any())


def _coloured_noise(rng, shape, spacing_mm, sigma_hu: float, correlation_mm: float) -> np.ndarray:
  white = rng.standard_normal(shape, dtype=np.float32)
  sigma_vox = [correlation_mm / s for s in spacing_mm]
  coloured = ndimage.gaussian_filter(white, sigma_vox, mode='wrap')
  return coloured * (sigma_hu / max(float(coloured.std()), 1e-6))


def render_case(protocol: CenterProtocol, rng: np.random.Generator,
                with_tumour: bool | None = None) -> PhantomCase:
  """Draw one patient and image it with a center's protocol; `with_tumour=None` draws it."""
  if with_tumour is None:
    with_tumour = bool(rng.uniform() < protocol.tumour_probability)
  body = anatomy.draw_body(rng)
  depth, height, width = protocol.shape_zyx
  spacing = np.asarray(protocol.spacing_mm, float)
  factor = protocol.z_supersampling
  # The scan is centred a little above the pancreas, the patient a little off the table centre.
  body_middle_y = 0.5 * (body.semi_y_anterior_mm - body.semi_y_posterior_mm)
  center_zyx = np.array((rng.uniform(0.0, 20.0), body_middle_y + rng.uniform(-12.0, 4.0),
                         rng.uniform(-12, 12)))
  origin = center_zyx - spacing * (np.array(protocol.shape_zyx) - 1) / 2.0
  render_spacing = (spacing[0] / factor, spacing[1], spacing[2])
  render_origin = (origin[0] - spacing[0] / 2.0 + render_spacing[0] / 2.0, origin[1], origin[2])
  grid = shapes.Grid(tuple(float(o) for o in render_origin), render_spacing,
                     (depth * factor, height, width))

  texture = _coloured_noise(rng, grid.shape, render_spacing, 1.0, 2.5)
  tissue = np.full(grid.shape, Tissue.AIR, np.uint8)
  spine_y, cavity = anatomy.paint_trunk(tissue, grid, rng, body)
  anatomy.paint_organs(tissue, grid, rng, body, spine_y, cavity, texture, with_tumour)
  anatomy.keep_tumour_touching_gland(tissue)

  voxel_ml = float(np.prod(render_spacing)) / 1000.0
  counts = np.bincount(tissue.ravel(), minlength=len(Tissue))
  organ_volumes_ml = {
      'liver': counts[Tissue.LIVER] * voxel_ml, 'spleen': counts[Tissue.SPLEEN] * voxel_ml,
      'kidneys': (counts[Tissue.KIDNEY_CORTEX] + counts[Tissue.KIDNEY_MEDULLA]
                  + counts[Tissue.RENAL_SINUS]) * voxel_ml,
      'pancreas': (counts[Tissue.PANCREAS] + counts[Tissue.PANCREATIC_DUCT]
                   + counts[Tissue.TUMOUR]) * voxel_ml,
      'tumour': counts[Tissue.TUMOUR] * voxel_ml,
  }

  enhancement_scale = rng.uniform(0.85, 1.15)
  tumour_contrast = rng.uniform(*protocol.tumour_contrast_hu) if with_tumour else 0.0
  hu_table = tissue_hu_table(protocol.phase, enhancement_scale, tumour_contrast)
  ideal = hu_table[tissue] + _texture_table()[tissue] * texture
  blur_vox = [protocol.blur_sigma_mm / s for s in render_spacing]
  ideal = ndimage.gaussian_filter(ideal, blur_vox, mode='nearest')

  final_shape = protocol.shape_zyx
  sub = (depth, factor, height, width)
  image = ideal.reshape(sub).mean(axis=1)  # the slice profile: a box over the slice thickness
  image += _coloured_noise(rng, final_shape, spacing, protocol.noise_sigma_hu,
                           protocol.noise_correlation_mm)
  image += protocol.hu_offset
  image_hu = np.clip(np.rint(image), *_HU_RANGE).astype(np.int16)

  gland_fraction = np.isin(tissue, (Tissue.PANCREAS, Tissue.PANCREATIC_DUCT, Tissue.TUMOUR))
  gland_fraction = gland_fraction.reshape(sub).mean(axis=1)
  tumour_fraction = (tissue == Tissue.TUMOUR).reshape(sub).mean(axis=1)
  label = np.zeros(final_shape, np.uint8)
  label[gland_fraction >= 0.5] = 1
  label[tumour_fraction >= 0.5] = 2
  _relabel_orphan_tumour(label)

  tissue_blocks = tissue.reshape(sub)
  pure_tissue = np.where((tissue_blocks == tissue_blocks[:, :1]).all(axis=1), tissue_blocks[:, 0],
                         MIXED_TISSUE).astype(np.uint8)
  world_origin = origin + _TABLE_POSITION_MM
  return PhantomCase(
      image_hu=image_hu, label=label, spacing_mm=tuple(float(s) for s in spacing),
      origin_mm=tuple(float(o) for o in world_origin), tissue=pure_tissue,
      organ_volumes_ml=organ_volumes_ml,
      pancreas_hu=float(hu_table[Tissue.PANCREAS] + protocol.hu_offset),
      tumour_contrast_hu=float(tumour_contrast) if (label == 2).any() else 0.0)


# Patient millimetres -> scanner (world) millimetres: where the table put the patient.
_TABLE_POSITION_MM = np.array((-420.0, 0.0, 0.0))


def _relabel_orphan_tumour(label: np.ndarray) -> None:
  """Tumour components of the resampled label that lost contact with the gland become gland."""
  tumour = label == 2
  if not tumour.any():
    return
  components, _ = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
  touching = np.unique(components[ndimage.binary_dilation(label == 1, np.ones((3, 3, 3)))])
  label[tumour & ~np.isin(components, touching[touching > 0])] = 1


def generate_case(protocol: CenterProtocol, rng: np.random.Generator):
  """One case: (image_hu int16 (z, y, x), label uint8 (z, y, x), spacing_mm (z, y, x))."""
  case = render_case(protocol, rng)
  return case.image_hu, case.label, case.spacing_mm


def case_rng(seed: int, center: str, index: int) -> np.random.Generator:
  """The generator of one case: independent of which other centers or cases are generated."""
  return np.random.default_rng([int(seed), zlib.crc32(center.encode()), int(index)])

