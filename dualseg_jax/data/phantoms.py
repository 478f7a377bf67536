"""Synthetic three-center abdominal CT with pancreas and tumour labels: the default data set.

A procedural abdomen in Hounsfield units is rendered through each center's scanner protocol
(voxel spacing, slice thickness, blur, noise, contrast phase, calibration), written as MSD Task07.
"""

from __future__ import annotations

import dataclasses
import enum
import gzip
import json
import math
import os
import pathlib
import textwrap
import time
import zlib

from absl import logging
import numpy as np
from scipy import interpolate
from scipy import ndimage
from scipy import spatial

from dualseg_jax import files
from dualseg_jax.data import preprocess
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.errors import ConfigError, DataError

# Bump when the generator changes what it draws: a new version is a new folder (dataset_folder_name).
GENERATOR_VERSION = 2
PARAMETERS_FILE = 'phantoms.json'
LABEL_NAMES = {'0': 'background', '1': 'pancreas', '2': 'cancer'}
AIR_HU = -1000.0
_HU_RANGE = (-1024, 3071)  # what a 12-bit CT reconstruction stores


# --- Scanner protocols -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ContrastPhase:
  """Attenuation of the enhancing tissues at one time after contrast injection (HU)."""

  name: str
  pancreas_hu: float
  liver_hu: float
  spleen_hu: float
  kidney_cortex_hu: float
  kidney_medulla_hu: float
  aorta_hu: float
  portal_vein_hu: float
  caval_vein_hu: float
  bowel_wall_hu: float
  muscle_hu: float


# Pancreas ~100-130 HU in the pancreatic phase and ~80-100 HU in the portal-venous phase at a
# standard iodine dose (multiphase pancreatic CT protocols); a low dose enhances less.
PANCREATIC_PHASE = ContrastPhase(
    name='pancreatic (late arterial, ~40 s)', pancreas_hu=125.0, liver_hu=75.0, spleen_hu=130.0,
    kidney_cortex_hu=200.0, kidney_medulla_hu=95.0, aorta_hu=270.0, portal_vein_hu=170.0,
    caval_vein_hu=110.0, bowel_wall_hu=110.0, muscle_hu=55.0)
PORTAL_VENOUS_PHASE = ContrastPhase(
    name='portal venous (~70 s)', pancreas_hu=90.0, liver_hu=110.0, spleen_hu=115.0,
    kidney_cortex_hu=170.0, kidney_medulla_hu=155.0, aorta_hu=165.0, portal_vein_hu=180.0,
    caval_vein_hu=150.0, bowel_wall_hu=95.0, muscle_hu=58.0)
LOW_DOSE_VENOUS_PHASE = ContrastPhase(
    name='portal venous, low iodine dose (~80 s)', pancreas_hu=78.0, liver_hu=100.0,
    spleen_hu=105.0, kidney_cortex_hu=150.0, kidney_medulla_hu=140.0, aorta_hu=150.0,
    portal_vein_hu=160.0, caval_vein_hu=140.0, bowel_wall_hu=85.0, muscle_hu=56.0)


@dataclasses.dataclass(frozen=True)
class CenterProtocol:
  """How one center's scanner and protocol turn an abdomen into a stored CT volume.

  The real ranges each field stands for are tabulated in docs/design.md, "Synthetic centers".
  """

  name: str
  scanner: str  # a few words for captions
  shape_zyx: tuple[int, int, int]
  # (z, y, x). Clinical in-plane pixels are 0.6-0.9 mm; the phantoms use 2.7-3.5 mm so that a CPU
  # can train on them, at or near the 3 mm the quick preset resamples to.
  spacing_mm: tuple[float, float, float]
  slice_thickness_mm: float  # clinical reconstructions: 0.6-1.5 mm thin, 2-3 mm, 5 mm thick
  # Slices are rendered this many times finer in z and averaged, so thick slices carry the
  # partial-volume mixing of a real slice profile.
  z_supersampling: int
  # Reconstruction kernel point-spread, Gaussian sigma in-plane and in z. Real kernels are
  # narrower (FWHM ~0.6-1.5 mm, sharp to smooth); here it stands for the kernel and the coarse
  # pixels together, ordered sharp < standard < smooth.
  blur_sigma_mm: float
  # Pixel noise of routine abdominal CT: ~10-20 HU at standard dose and 2-3 mm; low dose ~20-30
  # HU at thin slices, less after smooth kernels and 5 mm slices (noise ~ 1/sqrt(dose x thickness)).
  noise_sigma_hu: float
  noise_correlation_mm: float  # Gaussian sigma that colours the noise: the kernel's noise texture
  phase: ContrastPhase
  # Pancreas minus tumour, drawn per case. Pancreatic ductal adenocarcinoma is hypo-attenuating
  # by ~20-60 HU in the pancreatic phase and ~15-40 HU in the portal-venous phase (multiphase CT
  # studies); about a tenth are iso-attenuating, which the phantoms leave out.
  tumour_contrast_hu: tuple[float, float]
  hu_offset: float  # calibration error added to every voxel; scanners agree within ~+-20 HU
  orientation: str  # how arrays are stored on disk: 'RAS' or 'LPS' (DICOM-derived)
  tumour_probability: float = 0.8

  @property
  def field_of_view_mm(self) -> tuple[float, float, float]:
    return tuple(n * s for n, s in zip(self.shape_zyx, self.spacing_mm))

  def description(self) -> str:
    fov = self.field_of_view_mm
    return (
        f'{self.name}: {self.scanner}\n'
        f'voxels {self.spacing_mm[2]:.1f}x{self.spacing_mm[1]:.1f} mm in-plane, '
        f'{self.slice_thickness_mm:.1f} mm slices, FOV {fov[2]:.0f} mm, '
        f'{self.shape_zyx[0]} slices\n'
        f'blur sigma {self.blur_sigma_mm:.1f} mm, noise {self.noise_sigma_hu:.0f} HU '
        f'(corr. {self.noise_correlation_mm:.1f} mm), offset {self.hu_offset:+.0f} HU\n'
        f'phase: {self.phase.name}, pancreas ~{self.phase.pancreas_hu:.0f} HU, '
        f'stored {self.orientation}')

  def as_json(self) -> dict:
    record = dataclasses.asdict(self)
    record['field_of_view_mm'] = list(self.field_of_view_mm)
    record['description'] = self.description()
    return record


CENTER_PROTOCOLS = {
    'center_a': CenterProtocol(
        name='center_a', scanner='thin-slice pancreatic-phase protocol, sharp kernel',
        shape_zyx=(80, 128, 128), spacing_mm=(2.0, 2.7, 2.7), slice_thickness_mm=2.0,
        z_supersampling=1, blur_sigma_mm=1.0, noise_sigma_hu=8.0, noise_correlation_mm=0.6,
        phase=PANCREATIC_PHASE, tumour_contrast_hu=(30.0, 50.0), hu_offset=0.0,
        orientation='RAS'),
    'center_b': CenterProtocol(
        name='center_b', scanner='routine portal-venous protocol, standard kernel',
        shape_zyx=(64, 128, 128), spacing_mm=(2.5, 3.0, 3.0), slice_thickness_mm=2.5,
        z_supersampling=1, blur_sigma_mm=1.8, noise_sigma_hu=15.0, noise_correlation_mm=1.5,
        phase=PORTAL_VENOUS_PHASE, tumour_contrast_hu=(20.0, 40.0), hu_offset=15.0,
        orientation='LPS'),
    'center_c': CenterProtocol(
        name='center_c', scanner='thick-slice low-dose protocol, smooth kernel',
        shape_zyx=(48, 112, 112), spacing_mm=(5.0, 3.5, 3.5), slice_thickness_mm=5.0,
        z_supersampling=2, blur_sigma_mm=2.0, noise_sigma_hu=20.0, noise_correlation_mm=2.5,
        phase=LOW_DOSE_VENOUS_PHASE, tumour_contrast_hu=(15.0, 30.0), hu_offset=-20.0,
        orientation='LPS'),
}


# --- Tissues -----------------------------------------------------------------------------------

class Tissue(enum.IntEnum):
  AIR = 0
  TABLE = 1
  FAT = 2
  MUSCLE = 3
  BONE_CORTEX = 4
  BONE_MARROW = 5
  DISC = 6
  SPINAL_CANAL = 7
  LIVER = 8
  SPLEEN = 9
  KIDNEY_CORTEX = 10
  KIDNEY_MEDULLA = 11
  RENAL_SINUS = 12
  GALLBLADDER = 13
  BOWEL_WALL = 14
  BOWEL_FLUID = 15
  BOWEL_GAS = 16
  STOOL = 17
  AORTA = 18  # and the arteries leaving it
  PORTAL_VEIN = 19  # with the superior mesenteric and splenic veins
  CAVAL_VEIN = 20  # with the renal veins
  PANCREAS = 21
  PANCREATIC_DUCT = 22
  TUMOUR = 23


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


# --- Geometry helpers (all in patient millimetres: z superior, y anterior, x patient's right) ----

@dataclasses.dataclass(frozen=True)
class _Grid:
  """Voxel centres of a (z, y, x) array in patient millimetres."""

  origin_mm: tuple[float, float, float]  # centre of voxel (0, 0, 0)
  spacing_mm: tuple[float, float, float]
  shape: tuple[int, int, int]

  def box(self, lower_mm, upper_mm) -> tuple[slice, slice, slice] | None:
    """Index slices of the voxels whose centres lie within [lower, upper]; None when empty."""
    slices = []
    for origin, spacing, size, low, high in zip(
        self.origin_mm, self.spacing_mm, self.shape, lower_mm, upper_mm):
      start = max(0, math.ceil((low - origin) / spacing))
      stop = min(size, math.floor((high - origin) / spacing) + 1)
      if stop <= start:
        return None
      slices.append(slice(start, stop))
    return tuple(slices)

  def coordinates(self, box=None):
    """Open (broadcastable) z, y, x coordinate arrays of a box, float32."""
    box = box or tuple(slice(0, n) for n in self.shape)
    axes = []
    for axis, (origin, spacing, index) in enumerate(zip(self.origin_mm, self.spacing_mm, box)):
      values = (origin + spacing * np.arange(index.start, index.stop)).astype(np.float32)
      shape = [1, 1, 1]
      shape[axis] = values.size
      axes.append(values.reshape(shape))
    return axes


@dataclasses.dataclass(frozen=True)
class _CosineField:
  """A smooth random field: a sum of plane waves, defined everywhere in patient space."""

  wave_vectors: np.ndarray  # (count, 3) radians per mm, (z, y, x)
  phases: np.ndarray

  @classmethod
  def draw(cls, rng, wavelength_mm: tuple[float, float], count: int = 6) -> '_CosineField':
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=(count, 1))
    return cls(2 * np.pi * directions / wavelengths, rng.uniform(0, 2 * np.pi, size=count))

  def __call__(self, z, y, x) -> np.ndarray:
    total = 0.0
    for (kz, ky, kx), phase in zip(self.wave_vectors, self.phases):
      total = total + np.cos(kz * z + ky * y + kx * x + phase)
    # Unit variance: each cosine has variance 1/2.
    return (total * math.sqrt(2.0 / len(self.phases))).astype(np.float32)


def _rotation_about_z(angle_rad: float) -> np.ndarray:
  """3x3 rotation in (z, y, x) components, turning the axial plane."""
  cos, sin = math.cos(angle_rad), math.sin(angle_rad)
  return np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])


def _rotation_about_y(angle_rad: float) -> np.ndarray:
  """3x3 rotation in (z, y, x) components, tilting within the coronal plane."""
  cos, sin = math.cos(angle_rad), math.sin(angle_rad)
  return np.array([[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]])


def _ellipsoid_radius(grid: _Grid, center_zyx, semi_axes_zyx, rotation=None, roughness=None,
                      roughness_amplitude=0.0):
  """(box, normalised radius) of a rotated ellipsoid whose surface is perturbed by a smooth
  field: the organ is radius < 1, a shell of it radius in [1 - t, 1)."""
  center = np.asarray(center_zyx, float)
  semi = np.asarray(semi_axes_zyx, float)
  # A unit-variance _CosineField of n waves never exceeds sqrt(2 n).
  reach = semi.max() * (1.0 + roughness_amplitude * (
      math.sqrt(2 * len(roughness.phases)) if roughness is not None else 0.0))
  box = grid.box(center - reach, center + reach)
  if box is None:
    return None, None
  z, y, x = grid.coordinates(box)
  offsets = (z - center[0], y - center[1], x - center[2])
  if rotation is not None:
    # Local coordinates: R^T (p - c).
    offsets = tuple(sum(rotation[row, axis] * offsets[row] for row in range(3))
                    for axis in range(3))
  radius_sq = sum((offset / s) ** 2 for offset, s in zip(offsets, semi))
  radius = np.sqrt(np.broadcast_to(radius_sq, tuple(s.stop - s.start for s in box)))
  if roughness is not None and roughness_amplitude > 0:
    radius = radius + roughness_amplitude * roughness(z, y, x)
  return box, radius


def _ellipsoid(grid: _Grid, center_zyx, semi_axes_zyx, rotation=None, roughness=None,
               roughness_amplitude=0.0):
  """(box, mask) of a rotated ellipsoid whose surface is perturbed by a smooth field."""
  box, radius = _ellipsoid_radius(grid, center_zyx, semi_axes_zyx, rotation, roughness,
                                  roughness_amplitude)
  return (None, None) if box is None else (box, radius < 1.0)


@dataclasses.dataclass(frozen=True)
class _Curve:
  """A smooth 3D centreline sampled densely, with a radius at every sample."""

  points_mm: np.ndarray  # (n, 3) in (z, y, x)
  radii_mm: np.ndarray  # (n,)
  arc_mm: np.ndarray  # (n,) cumulative length

  @classmethod
  def through(cls, control_points_zyx, control_radii_mm, step_mm: float = 0.7) -> '_Curve':
    control = np.asarray(control_points_zyx, float)
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(control, axis=0), axis=1))])
    spline = interpolate.make_interp_spline(chord, control, k=min(3, len(control) - 1))
    samples = np.linspace(0.0, chord[-1], max(2, int(chord[-1] / step_mm) + 1))
    points = spline(samples)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    radii = np.interp(samples, chord, np.asarray(control_radii_mm, float))
    return cls(points, radii, arc)

  def tube(self, grid: _Grid, margin_mm: float = 0.0):
    """(box, distance to the centreline, radius of the nearest sample, index of that sample)."""
    reach = self.radii_mm.max() + margin_mm + 1.0
    box = grid.box(self.points_mm.min(0) - reach, self.points_mm.max(0) + reach)
    if box is None:
      return None, None, None, None
    z, y, x = grid.coordinates(box)
    shape = tuple(s.stop - s.start for s in box)
    query = np.stack([np.broadcast_to(c, shape).ravel() for c in (z, y, x)], axis=1)
    distance, nearest = spatial.cKDTree(self.points_mm).query(query, distance_upper_bound=reach)
    outside = ~np.isfinite(distance)
    nearest = np.where(outside, 0, nearest)
    distance = np.where(outside, np.inf, distance)
    return (box, distance.reshape(shape), self.radii_mm[nearest].reshape(shape),
            nearest.reshape(shape))

  def point_at(self, fraction: float) -> tuple[np.ndarray, float]:
    index = int(np.clip(fraction, 0, 1) * (len(self.arc_mm) - 1))
    return self.points_mm[index], float(self.radii_mm[index])


def _paint(tissue: np.ndarray, box, mask, value) -> None:
  if box is not None:
    region = tissue[box]
    region[mask] = value


def _jitter(rng, points, amount_mm: float) -> np.ndarray:
  points = np.asarray(points, float)
  return points + rng.uniform(-amount_mm, amount_mm, size=points.shape)


# --- The abdomen ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Body:
  """Outline of the trunk and its layers, in the axial plane."""

  semi_x_mm: float
  semi_y_anterior_mm: float
  semi_y_posterior_mm: float
  outline_harmonics: np.ndarray  # (k, 3): order, amplitude, phase
  fat_mm: float
  wall_mm: float
  widening_per_mm: float  # the trunk widens inferiorly

  def radius_mm(self, angle):
    """Distance from the body axis to the skin along an axial direction (angle from +x)."""
    cos, sin = np.abs(np.cos(angle)), np.sin(angle)
    anterior = sin >= 0
    semi_y = np.where(anterior, self.semi_y_anterior_mm, self.semi_y_posterior_mm)
    # The back rests on the table: a flatter, squarer posterior outline.
    power = np.where(anterior, 2.0, 2.8)
    radius = (cos / self.semi_x_mm) ** power + (np.abs(sin) / semi_y) ** power
    radius = radius ** (-1.0 / power)
    modulation = 1.0
    for order, amplitude, phase in self.outline_harmonics:
      modulation = modulation + amplitude * np.cos(order * angle + phase)
    return radius * modulation

  def fat_thickness_mm(self, angle):
    # Subcutaneous fat collects anteriorly and on the flanks.
    return self.fat_mm * (1.0 + 0.3 * np.sin(angle) + 0.1 * np.cos(2 * angle))

  def depth_mm(self, z, y, x):
    """Depth below the skin (negative outside the body)."""
    angle = np.arctan2(y, x)
    scale = 1.0 + self.widening_per_mm * np.clip(-z, -60.0, 200.0)
    return self.radius_mm(angle) * scale - np.sqrt(x * x + y * y)


def _draw_body(rng) -> _Body:
  harmonics = np.stack([np.arange(2, 6), rng.uniform(0.0, 0.03, 4) / np.arange(1, 5) ** 0.5,
                        rng.uniform(0, 2 * np.pi, 4)], axis=1)
  return _Body(semi_x_mm=rng.uniform(135, 165), semi_y_anterior_mm=rng.uniform(105, 135),
               semi_y_posterior_mm=rng.uniform(95, 115), outline_harmonics=harmonics,
               fat_mm=rng.uniform(8, 35), wall_mm=rng.uniform(8, 12),
               widening_per_mm=rng.uniform(0.0, 0.0008))


def _paint_trunk(tissue, grid, rng, body: _Body) -> tuple[float, np.ndarray]:
  """Table, skin, fat, abdominal wall, spine, back muscles and ribs; returns the spine's y and
  the abdominal cavity (inside the wall) that organs are clipped to."""
  z, y, x = grid.coordinates()
  table_y = -body.semi_y_posterior_mm - 4.0 + 0.0012 * x * x
  table = (y < table_y) & (y > table_y - 6.0) & (np.abs(x) < 230)
  tissue[np.broadcast_to(table, tissue.shape)] = Tissue.TABLE

  depth = body.depth_mm(z, y, x)
  angle = np.arctan2(y, x)
  fat = body.fat_thickness_mm(angle)
  tissue[depth >= 0] = Tissue.FAT
  in_wall = (depth >= fat) & (depth < fat + body.wall_mm)
  tissue[in_wall] = Tissue.MUSCLE
  # Intraperitoneal and retroperitoneal fat fill the cavity until organs are painted.
  cavity = depth >= fat + body.wall_mm

  # Ribs run inside the wall and descend towards the front; below the costal margin, which
  # rises from the back to the front, there are none.
  angle_from_back = np.abs(np.angle(np.exp(1j * (angle + np.pi / 2))))
  along_rib = z + 0.4 * angle_from_back * body.semi_x_mm
  rib_phase = rng.uniform(0, 36.0)
  lowest_rib_mm = rng.uniform(-25.0, 0.0)  # height of the costal margin beside the spine
  ribs = ((np.abs(depth - fat - 0.5 * body.wall_mm) < 4.0)
          & (np.mod(along_rib + rib_phase, 36.0) < 8.0)
          & (z > lowest_rib_mm + 40.0 * (angle_from_back - 0.45))
          & (angle_from_back > 0.45) & (angle_from_back < 2.5))
  tissue[ribs] = Tissue.BONE_CORTEX

  posterior_fat = float(body.fat_thickness_mm(-np.pi / 2))
  spine_y = -body.semi_y_posterior_mm + posterior_fat + rng.uniform(62, 72)
  _paint_spine(tissue, grid, rng, spine_y)

  # Erector spinae beside the spinous processes, psoas beside the vertebral bodies.
  for side in (-1.0, 1.0):
    box, mask = _ellipsoid(grid, (0.0, spine_y - 52.0, side * 36.0), (400.0, 24.0, 30.0))
    _paint(tissue, box, mask, Tissue.MUSCLE)
    psoas_box = grid.box((-400, spine_y - 40, side * 34 - 40), (60, spine_y + 25, side * 34 + 40))
    if psoas_box is not None:
      pz, py, px = grid.coordinates(psoas_box)
      radius = np.clip(6.0 + 0.14 * (25.0 - pz), 3.0, 24.0)
      mask = ((py - spine_y - 2.0) ** 2 + (px - side * (32.0 + 0.3 * radius)) ** 2 < radius ** 2)
      _paint(tissue, psoas_box, mask & (pz < 25.0), Tissue.MUSCLE)
  return spine_y, cavity


def _paint_spine(tissue, grid, rng, spine_y: float) -> None:
  box = grid.box((-1000, spine_y - 80, -60), (1000, spine_y + 25, 60))
  if box is None:
    return
  z, y, x = grid.coordinates(box)
  region = tissue[box]
  body_radius = ((x / 21.0) ** 2 + ((y - spine_y) / 17.0) ** 2)
  period_mm, disc_mm = 34.0, 8.0
  level = np.mod(z + rng.uniform(0, period_mm), period_mm)
  disc = np.broadcast_to(level < disc_mm, region.shape)
  vertebral_body = np.broadcast_to(body_radius < 1.0, region.shape)
  marrow = np.broadcast_to(body_radius < 0.78, region.shape)
  region[vertebral_body] = Tissue.BONE_CORTEX
  region[marrow & ~disc] = Tissue.BONE_MARROW
  region[vertebral_body & disc] = Tissue.DISC

  canal_y = spine_y - 29.0
  canal_radius = np.sqrt(x ** 2 + (y - canal_y) ** 2)
  bony_level = ~disc
  arch = (canal_radius < 16.0) & (canal_radius >= 9.0) & (y < spine_y - 14.0)
  spinous = (np.abs(x) < 4.5) & (y < canal_y - 10.0) & (y > canal_y - 45.0) & (level > 12.0)
  transverse = (np.abs(x) < 36.0) & (np.abs(y - canal_y - 4.0) < 4.0) & (level > 16.0) & (
      level < 24.0)
  region[np.broadcast_to(arch, region.shape) & bony_level] = Tissue.BONE_CORTEX
  region[np.broadcast_to(spinous | transverse, region.shape)] = Tissue.BONE_CORTEX
  region[np.broadcast_to(canal_radius < 9.0, region.shape)] = Tissue.SPINAL_CANAL


def _paint_tube(tissue, grid, curve: _Curve, inside: Tissue, wall: Tissue | None = None,
                wall_mm: float = 2.5, cavity=None, gas_above_y=None, texture=None,
                gas_texture_level=None) -> None:
  """A hollow organ or vessel along a curve; optional gas above a level or in mottled pockets."""
  box, distance, radius, _ = curve.tube(grid)
  if box is None:
    return
  outer = distance <= radius
  if cavity is not None:
    outer &= cavity[box]
  region = tissue[box]
  if wall is None:
    region[outer] = inside
    return
  lumen = outer & (distance <= radius - wall_mm)
  region[outer] = wall
  region[lumen] = inside
  if gas_above_y is not None:
    _, y, _ = grid.coordinates(box)
    region[lumen & np.broadcast_to(y > gas_above_y, lumen.shape)] = Tissue.BOWEL_GAS
  if gas_texture_level is not None:
    region[lumen & (texture[box] > gas_texture_level)] = Tissue.BOWEL_GAS


def _draw_pancreas(rng, spine_y: float, side_x: float) -> _Curve:
  """Centreline from the uncinate process through head, neck and body to the tail at the spleen;
  `side_x` is the distance from the midline to the inner lateral wall."""
  relative = np.array([  # (z, y above the spine, x) in mm
      (-30.0, 38.0, 20.0),  # uncinate process, behind the superior mesenteric vein
      (-16.0, 50.0, 36.0),  # head, in the duodenal C-loop
      (-2.0, 60.0, 30.0),
      (2.0, 68.0, 8.0),  # neck, in front of the portal confluence
      (8.0, 64.0, -25.0),  # body, across the aorta
      (16.0, 50.0, -58.0),
      (24.0, 30.0, -82.0),  # tail, towards the splenic hilum
      (30.0, 16.0, -96.0),
  ])
  relative = _jitter(rng, relative, 4.0)
  # A narrow abdomen brings the tail (and the spleen) towards the midline.
  left = relative[:, 2] < 0
  relative[left, 2] *= np.clip((side_x - 15.0) / 105.0, 0.75, 1.1)
  relative[:, 1] += spine_y
  relative[:, 1] += rng.uniform(-4, 6)
  radii = np.array([10.0, 15.0, 14.0, 9.0, 10.0, 9.5, 8.5, 6.0])
  radii = radii * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, size=radii.shape)
  return _Curve.through(relative, radii)


def _draw_tumour(rng, pancreas: _Curve) -> dict:
  # Most pancreatic adenocarcinomas arise in the head.
  region = rng.choice(3, p=(0.6, 0.25, 0.15))
  fraction = rng.uniform(*((0.05, 0.33), (0.33, 0.7), (0.7, 0.93))[region])
  center, local_radius = pancreas.point_at(fraction)
  center = center + rng.normal(size=3) * 0.35 * local_radius
  radius = float(np.exp(rng.uniform(np.log(5.0), np.log(20.0))))
  return dict(center=center, radius_mm=radius,
              semi_axes=radius * rng.uniform(0.75, 1.25, size=3),
              rotation=_rotation_about_z(rng.uniform(0, np.pi)) @ _rotation_about_y(
                  rng.uniform(-0.5, 0.5)),
              roughness=_CosineField.draw(rng, (0.8 * radius, 2.5 * radius)),
              fraction=fraction, duct_dilated=bool(rng.uniform() < 0.5 and fraction < 0.7))


def _paint_organs(tissue, grid, rng, body: _Body, spine_y: float, cavity: np.ndarray,
                  texture: np.ndarray, with_tumour: bool) -> None:
  """Solid organs, bowel, vessels, pancreas and tumour, in an order where later ones win."""

  def organ(center, semi, value, rotation=None, wavelength=(40.0, 90.0), amplitude=0.08):
    field = _CosineField.draw(rng, wavelength)
    box, mask = _ellipsoid(grid, center, semi, rotation, field, amplitude)
    if box is not None:
      _paint(tissue, box, mask & cavity[box], value)

  front_y = (body.semi_y_anterior_mm - float(body.fat_thickness_mm(np.pi / 2))
             - body.wall_mm)  # inner surface of the anterior wall
  side_x = body.semi_x_mm - float(body.fat_thickness_mm(0.0)) - body.wall_mm
  # Liver: right lobe under the ribs, left lobe across the midline in front of the stomach.
  liver_scale = rng.uniform(0.9, 1.1)
  organ(_jitter(rng, (62.0, spine_y + 55.0, 70.0), 6.0),
        np.array((78.0, 85.0, 72.0)) * liver_scale, Tissue.LIVER,
        _rotation_about_z(rng.uniform(-0.2, 0.2)))
  organ(_jitter(rng, (62.0, front_y - 28.0, -5.0), 6.0),
        np.array((38.0, 26.0, 55.0)) * liver_scale, Tissue.LIVER)
  # Caudate lobe, wrapping the vena cava.
  organ(_jitter(rng, (40.0, spine_y + 45.0, 22.0), 4.0), np.array((30.0, 22.0, 24.0)),
        Tissue.LIVER)
  organ(_jitter(rng, (8.0, front_y - 22.0, 68.0), 5.0), (30.0, 13.0, 13.0), Tissue.GALLBLADDER,
        _rotation_about_y(rng.uniform(-0.5, -0.2)), amplitude=0.04)

  # Spleen: posterior left, its hilum facing the pancreatic tail.
  organ(_jitter(rng, (40.0, spine_y + 2.0, -(side_x - 26.0)), 5.0),
        np.array((50.0, 44.0, 24.0)) * rng.uniform(0.85, 1.15), Tissue.SPLEEN,
        _rotation_about_z(rng.uniform(0.3, 0.7)))

  # Kidneys: the right one lower, under the liver; cortex, medulla and a fatty sinus at the hilum.
  for side, height in ((-1.0, rng.uniform(-15, -5)), (1.0, rng.uniform(-32, -20))):
    center = _jitter(rng, (height, spine_y - 5.0, side * 70.0), 4.0)
    semi = np.array((52.0, 22.0, 26.0)) * rng.uniform(0.88, 1.12)
    rotation = _rotation_about_z(side * rng.uniform(0.4, 0.7)) @ _rotation_about_y(side * 0.15)
    organ(center, semi, Tissue.KIDNEY_CORTEX, rotation, amplitude=0.03)
    organ(center, semi * 0.7, Tissue.KIDNEY_MEDULLA, rotation, amplitude=0.05)
    sinus_center = center + np.array((0.0, 6.0, -side * 13.0))
    organ(sinus_center, semi * np.array((0.4, 0.4, 0.45)), Tissue.RENAL_SINUS, rotation,
          amplitude=0.1)

  # Stomach: left upper quadrant, gas rising to the front above a fluid level.
  stomach_center = _jitter(rng, (48.0, front_y - 32.0, -50.0), 6.0)
  stomach_semi = np.array((50.0, 28.0, 42.0)) * rng.uniform(0.8, 1.15)
  gas_level = stomach_center[1] + stomach_semi[1] * rng.uniform(0.2, 0.9)
  antrum = _Curve.through(
      [stomach_center + (-10, 0, 10), (22.0, front_y - 22.0, -5.0), (24.0, spine_y + 90.0, 28.0)],
      [26.0, 18.0, 12.0])
  field = _CosineField.draw(rng, (40.0, 90.0))
  box, radius = _ellipsoid_radius(grid, stomach_center, stomach_semi, None, field, 0.05)
  if box is not None:
    outer = (radius < 1.0) & cavity[box]
    inner = radius < 1.0 - 4.0 / stomach_semi.min()
    region = tissue[box]
    _, y, _ = grid.coordinates(box)
    region[outer] = Tissue.BOWEL_WALL
    region[inner & outer] = Tissue.BOWEL_FLUID
    region[inner & outer & np.broadcast_to(y > gas_level, inner.shape)] = Tissue.BOWEL_GAS
  _paint_tube(tissue, grid, antrum, Tissue.BOWEL_FLUID, Tissue.BOWEL_WALL, 3.0, cavity,
              gas_above_y=gas_level)

  # Colon (frame of the abdomen, gas and stool) and small bowel loops (fluid, lower abdomen).
  colon = _Curve.through(_jitter(rng, [
      (-140.0, spine_y + 40.0, 95.0), (-40.0, spine_y + 48.0, 92.0),
      (-20.0, front_y - 22.0, 45.0), (-10.0, front_y - 18.0, -40.0),
      (15.0, spine_y + 60.0, -100.0), (-40.0, spine_y + 35.0, -100.0),
      (-140.0, spine_y + 40.0, -98.0)], 6.0), rng.uniform(14, 22, size=7))
  _paint_tube(tissue, grid, colon, Tissue.STOOL, Tissue.BOWEL_WALL, 2.0, cavity,
              texture=texture, gas_texture_level=rng.uniform(-0.6, 0.4))
  for _ in range(int(rng.integers(3, 6))):
    loop = np.column_stack([rng.uniform(-140, -40, 5), spine_y + rng.uniform(50, 115, 5),
                            rng.uniform(-70, 70, 5)])
    _paint_tube(tissue, grid, _Curve.through(loop, rng.uniform(9, 13, 5)), Tissue.BOWEL_FLUID,
                Tissue.BOWEL_WALL, 2.5, cavity, texture=texture, gas_texture_level=1.8)

  pancreas = _draw_pancreas(rng, spine_y, side_x)
  neck_zyx, neck_radius = pancreas.point_at(0.38)
  head_zyx = pancreas.points_mm[int(0.12 * len(pancreas.points_mm))]

  # Duodenum: the C-loop around the head, water-filled as in pancreas protocols.
  duodenum = _Curve.through(_jitter(rng, [
      (24.0, neck_zyx[1] + 20.0, 28.0), (22.0, spine_y + 66.0, 60.0),
      (0.0, spine_y + 52.0, head_zyx[2] + 30.0), (-28.0, spine_y + 46.0, head_zyx[2] + 26.0),
      (-48.0, spine_y + 44.0, 30.0), (-52.0, spine_y + 52.0, -5.0),
      (-40.0, spine_y + 54.0, -35.0), (-22.0, spine_y + 60.0, -45.0)], 3.0),
      rng.uniform(10, 13, size=8))
  _paint_tube(tissue, grid, duodenum, Tissue.BOWEL_FLUID, Tissue.BOWEL_WALL, 2.5, cavity)

  # Pancreas with a lobulated outline.
  box, distance, radius, nearest = pancreas.tube(grid, margin_mm=8.0)
  lobulation = None
  if box is not None:
    z, y, x = grid.coordinates(box)
    lobulation = _CosineField.draw(rng, (12.0, 30.0))(z, y, x)
    gland = distance <= radius * (1.0 + 0.12 * lobulation)
    _paint(tissue, box, gland & cavity[box], Tissue.PANCREAS)
  else:
    _CosineField.draw(rng, (12.0, 30.0))

  tumour = _draw_tumour(rng, pancreas) if with_tumour else None
  if tumour is not None and box is not None:
    tumour_box, blob = _ellipsoid(grid, tumour['center'], tumour['semi_axes'],
                                  tumour['rotation'], tumour['roughness'], 0.3)
    if tumour_box is not None:
      # Confine the mass to the gland, which it may bulge by a few millimetres.
      bulge_mm = 0.25 * tumour['radius_mm'] + 2.0
      near_gland = np.zeros(tissue.shape, bool)
      near_gland[box] = distance <= radius * (1.0 + 0.12 * lobulation) + bulge_mm
      _paint(tissue, tumour_box, blob & near_gland[tumour_box] & cavity[tumour_box],
             Tissue.TUMOUR)
    if tumour['duct_dilated']:
      # An obstructing mass dilates the main duct towards the tail.
      start = np.searchsorted(pancreas.arc_mm,
                              pancreas.arc_mm[-1] * tumour['fraction']) + int(
                                  tumour['radius_mm'] / 0.7)
      if start < len(pancreas.arc_mm) - 5:
        duct = _Curve(pancreas.points_mm[start:], np.full(len(pancreas.arc_mm) - start,
                                                          rng.uniform(2.0, 3.5)),
                      pancreas.arc_mm[start:])
        duct_box, duct_distance, duct_radius, _ = duct.tube(grid)
        if duct_box is not None:
          region = tissue[duct_box]
          region[(duct_distance <= duct_radius) & (region == Tissue.PANCREAS)] = (
              Tissue.PANCREATIC_DUCT)

  # Vessels last: they cut through whatever they cross, including the gland and the tumour.
  aorta_x = rng.uniform(-20, -10)
  caval_x = rng.uniform(18, 28)
  for side, height in ((-1.0, -8.0), (1.0, -24.0)):
    renal_vein = _Curve.through(
        [(height, spine_y + 2.0, side * 52.0),
         (height + 2.0, spine_y + (44.0 if side < 0 else 20.0),
          aorta_x if side < 0 else 0.5 * (caval_x + 52.0)),
         (height + 4.0, spine_y + 28.0, caval_x)], [5.0, 4.0, 5.0])
    _paint_tube(tissue, grid, renal_vein, Tissue.CAVAL_VEIN)

  aorta = _Curve.through([(-400, spine_y + 27.0, aorta_x), (0.0, spine_y + 30.0, aorta_x),
                          (400, spine_y + 24.0, aorta_x + 8.0)], [rng.uniform(9.5, 13.0)] * 3)
  _paint_tube(tissue, grid, aorta, Tissue.AORTA)
  sma_top = 12.0 + rng.uniform(-4, 4)
  sma = _Curve.through([(sma_top, spine_y + 38.0, aorta_x), (sma_top - 6.0, spine_y + 50.0,
                                                              aorta_x + 3.0),
                        (-40.0, spine_y + 56.0, aorta_x + 6.0),
                        (-300.0, spine_y + 62.0, aorta_x + 8.0)], [4.0, 4.0, 3.8, 3.5])
  _paint_tube(tissue, grid, sma, Tissue.AORTA)
  caval = _Curve.through([(-400, spine_y + 26.0, caval_x), (0.0, spine_y + 28.0, caval_x),
                          (400, spine_y + 45.0, caval_x + 8.0)], [rng.uniform(9.0, 12.0)] * 3)
  _paint_tube(tissue, grid, caval, Tissue.CAVAL_VEIN)
  # Portal system: the splenic vein along the back of the gland joins the superior mesenteric
  # vein behind the neck; the portal vein rises to the liver.
  confluence = neck_zyx + np.array((0.0, -(neck_radius + 5.0), -3.0))
  vein_radius = rng.uniform(6.0, 8.0)
  _paint_tube(tissue, grid, _Curve.through(
      [confluence, confluence + (22.0, -4.0, 18.0), (48.0, spine_y + 58.0, 48.0)],
      [vein_radius] * 3), Tissue.PORTAL_VEIN)
  _paint_tube(tissue, grid, _Curve.through(
      [confluence, confluence + (-30.0, 4.0, 4.0), (-300.0, confluence[1] + 10.0, 12.0)],
      [vein_radius * 0.85] * 3), Tissue.PORTAL_VEIN)
  tail_start = np.searchsorted(pancreas.arc_mm, pancreas.arc_mm[-1] * 0.42)
  behind = pancreas.points_mm[tail_start::8].copy()
  behind[:, 1] -= pancreas.radii_mm[tail_start::8] * 0.8 + 3.5
  behind[:, 0] += 2.0
  splenic = np.concatenate([[confluence], behind, [behind[-1] + (8.0, 0.0, -12.0)]])
  _paint_tube(tissue, grid, _Curve.through(splenic, [4.5] * len(splenic)), Tissue.PORTAL_VEIN)


def _keep_tumour_touching_gland(tissue: np.ndarray) -> None:
  """Repaint as gland any tumour fragment that vessels cut off from the pancreas."""
  tumour = tissue == Tissue.TUMOUR
  if not tumour.any():
    return
  components, count = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
  gland = (tissue == Tissue.PANCREAS) | (tissue == Tissue.PANCREATIC_DUCT)
  touching = np.unique(components[ndimage.binary_dilation(gland, np.ones((3, 3, 3)))])
  orphan = tumour & ~np.isin(components, touching[touching > 0])
  tissue[orphan] = Tissue.PANCREAS


# --- Rendering ---------------------------------------------------------------------------------

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
  body = _draw_body(rng)
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
  grid = _Grid(tuple(float(o) for o in render_origin), render_spacing,
               (depth * factor, height, width))

  texture = _coloured_noise(rng, grid.shape, render_spacing, 1.0, 2.5)
  tissue = np.full(grid.shape, Tissue.AIR, np.uint8)
  spine_y, cavity = _paint_trunk(tissue, grid, rng, body)
  _paint_organs(tissue, grid, rng, body, spine_y, cavity, texture, with_tumour)
  _keep_tumour_touching_gland(tissue)

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


# --- Measurements ------------------------------------------------------------------------------

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
  new_shape = preprocess.resampled_shape(case.image_hu.shape, case.spacing_mm, spacing_mm)
  spacing = tuple(float(size * s / new) for size, s, new in
                  zip(case.image_hu.shape, case.spacing_mm, new_shape))
  return (preprocess.resample(case.image_hu, new_shape, 'linear'),
          preprocess.resample(case.label, new_shape, 'nearest'),
          preprocess.resample(case.tissue, new_shape, 'nearest'), spacing)


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
      edge_width_mm=edge_width_mm(image, spacing_mm, low_hu=AIR_HU + protocol.hu_offset,
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


# --- Writing -----------------------------------------------------------------------------------

def _geometry(case: PhantomCase, orientation: str) -> volume_lib.Geometry:
  """Source-file geometry; 'LPS' stores x and y reversed, as DICOM-derived NIfTI often is."""
  spacing_z, spacing_y, spacing_x = case.spacing_mm
  origin_z, origin_y, origin_x = case.origin_mm
  depth, height, width = case.image_hu.shape
  affine = np.diag([spacing_x, spacing_y, spacing_z, 1.0])
  affine[:3, 3] = (origin_x, origin_y, origin_z)
  if orientation == 'LPS':
    affine[0, 0], affine[1, 1] = -spacing_x, -spacing_y
    affine[0, 3] = origin_x + spacing_x * (width - 1)
    affine[1, 3] = origin_y + spacing_y * (height - 1)
  elif orientation != 'RAS':
    raise ConfigError(f'CenterProtocol.orientation {orientation!r}: use "RAS" or "LPS"')
  return volume_lib.Geometry(affine=affine, shape=(width, height, depth))


def _write_nifti(path: pathlib.Path, array: np.ndarray, geometry: volume_lib.Geometry) -> None:
  image = volume_lib.to_nifti(array, geometry)
  image.header.set_xyzt_units('mm', 'sec')
  # gzip with a fixed mtime and no file name, so the same seed gives the same bytes.
  files.write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def _dataset_json(protocol: CenterProtocol, case_ids: list[str]) -> dict:
  return {
      'name': f'Synthetic pancreas CT, {protocol.name}',
      'description': 'Procedural abdominal CT with pancreas and pancreatic tumour labels.',
      'reference': 'dualseg_jax.data.phantoms',
      'licence': 'CC0',
      'tensorImageSize': '3D',
      'modality': {'0': 'CT'},
      'labels': dict(LABEL_NAMES),
      'numTraining': len(case_ids),
      'numTest': 0,
      'training': [{'image': f'./imagesTr/{case_id}.nii.gz',
                    'label': f'./labelsTr/{case_id}.nii.gz'} for case_id in case_ids],
      'test': [],
      'protocol': protocol.as_json(),
  }


def _check_centers(centers) -> tuple[str, ...]:
  centers = tuple(centers)
  unknown = [center for center in centers if center not in CENTER_PROTOCOLS]
  if unknown:
    raise ConfigError(
        f'data.centers holds {unknown}, which the synthetic generator does not know; '
        f'choose from {sorted(CENTER_PROTOCOLS)} or set data.source to "msd"/"folders"')
  return centers


def write_dataset(out_dir, cases_per_center: int, seed: int,
                  centers=tuple(CENTER_PROTOCOLS), preview_path=None,
                  measure_spacings_mm=(), keep_centers=()) -> dict:
  """Generate and write every center in MSD layout; returns per-center measurements and timing,
  with `resampled`: {spacing (z, y, x): measure_center there} for each of `measure_spacings_mm`.

  `keep_centers`: centers a finished generation with the same parameters already wrote there;
  their files stay untouched and the folder's record lists them with the new ones.
  """
  centers = _check_centers(centers)
  if cases_per_center < 1:
    raise ConfigError(f'cases_per_center is {cases_per_center}; it must be at least 1')
  out_dir = pathlib.Path(out_dir)
  previous = read_parameters(out_dir)
  keep_centers = [center for center in keep_centers if center not in centers]
  kept_files = [relative for relative in (previous or {}).get('files', [])
                if relative.split('/')[0] in keep_centers]
  # Until the new set is complete, nothing may claim that the folder holds a finished set.
  (out_dir / PARAMETERS_FILE).unlink(missing_ok=True)
  for center in centers:
    (out_dir / center / 'dataset.json').unlink(missing_ok=True)
  summary, written, preview_cases = {}, [], {}
  for center in centers:
    protocol = CENTER_PROTOCOLS[center]
    center_dir = out_dir / center
    (center_dir / 'imagesTr').mkdir(parents=True, exist_ok=True)
    (center_dir / 'labelsTr').mkdir(parents=True, exist_ok=True)
    cases, case_ids, seconds = [], [], 0.0
    for index in range(cases_per_center):
      case_id = f'{center}_{index:03d}'
      started = time.perf_counter()
      case = render_case(protocol, case_rng(seed, center, index))
      seconds += time.perf_counter() - started
      geometry = _geometry(case, protocol.orientation)
      _write_nifti(center_dir / 'imagesTr' / f'{case_id}.nii.gz', case.image_hu, geometry)
      _write_nifti(center_dir / 'labelsTr' / f'{case_id}.nii.gz', case.label, geometry)
      written += [f'{center}/imagesTr/{case_id}.nii.gz', f'{center}/labelsTr/{case_id}.nii.gz']
      if center not in preview_cases or (case.has_tumour and not preview_cases[center].has_tumour):
        preview_cases[center] = case
      cases.append(case)
      case_ids.append(case_id)
    files.write_bytes(center_dir / 'dataset.json',
                      (json.dumps(_dataset_json(protocol, case_ids), indent=2) + '\n').encode())
    summary[center] = measure_center(cases, protocol)
    summary[center]['seconds_per_case'] = seconds / cases_per_center
    summary[center]['resampled'] = {
        tuple(spacing): measure_center(cases, protocol, resampled_spacing_mm=tuple(spacing))
        for spacing in measure_spacings_mm}
  written = kept_files + written
  _remove_stale_files(out_dir, previous, written)
  parameters = dict(generator_version=GENERATOR_VERSION, seed=int(seed),
                    cases_per_center=int(cases_per_center),
                    centers=list(keep_centers) + list(centers), files=written)
  files.write_bytes(out_dir / PARAMETERS_FILE, (json.dumps(parameters, indent=2) + '\n').encode())
  if preview_path:
    write_preview(preview_path, preview_cases)
  return summary


def read_parameters(out_dir: pathlib.Path) -> dict | None:
  """The parameters a finished generation recorded in `out_dir`, or None."""
  path = out_dir / PARAMETERS_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(
        f'{path} is unreadable ({error}); delete it to regenerate the phantoms') from error


def _remove_stale_files(out_dir: pathlib.Path, previous: dict | None, written: list[str]) -> None:
  """Cases an earlier, larger generation wrote and this one did not; only files it listed."""
  if not previous:
    return
  for relative in set(previous.get('files', [])) - set(written):
    path = out_dir / relative
    if path.is_file() and path.resolve().is_relative_to(out_dir.resolve()):
      path.unlink()


def refuse_finished_set(out_dir) -> None:
  """Raises a DataError when `out_dir` holds a finished generation: runs may depend on it."""
  parameters = read_parameters(pathlib.Path(out_dir))
  if parameters is not None:
    made_with = {key: value for key, value in parameters.items() if key != 'files'}
    raise DataError(f'{out_dir} already holds synthetic phantoms ({made_with}); runs that read '
                    'them would change under them: choose another --out, or pass --overwrite')


def dataset_folder_name(data_config) -> str:
  """The folder name of one parameter set: runs that differ in generator version, seed or size
  each get their own folder, so no run regenerates the data another run reads."""
  return (f'v{GENERATOR_VERSION}-seed{int(data_config.synthetic_seed)}-'
          f'{int(data_config.synthetic_cases_per_center)}cases')


def default_root(data_config) -> pathlib.Path:
  """Where a synthetic run without data.root keeps its phantoms: data/synthetic/<parameters>."""
  return pathlib.Path('data') / 'synthetic' / dataset_folder_name(data_config)


def ensure_synthetic_data(data_config) -> pathlib.Path:
  """The phantom folder for `data_config`, generated when missing.

  A finished set is never replaced: a folder generated with other parameters is refused, since
  runs that trained or were evaluated on it would silently change. Two processes asking for the
  same missing set at once generate it once (the second waits, then finds it).
  """
  from dualseg_jax import locks  # deferred: only generation needs the lock
  root = pathlib.Path(data_config.root) if data_config.root else default_root(data_config)
  centers = _check_centers(data_config.centers)
  wanted = dict(generator_version=GENERATOR_VERSION, seed=int(data_config.synthetic_seed),
                cases_per_center=int(data_config.synthetic_cases_per_center))
  if _usable(root, centers, wanted):
    return root
  with locks.hold(root, 'generating synthetic phantoms', wait=True):
    if _usable(root, centers, wanted):  # another process generated it while this one waited
      return root
    logging.info('Generating synthetic phantoms in %s: %d cases per center, seed %d', root,
                 wanted['cases_per_center'], wanted['seed'])
    finished = _finished_centers(root, wanted)
    write_dataset(root, wanted['cases_per_center'], wanted['seed'],
                  [center for center in centers if center not in finished], keep_centers=finished)
  return root


def _usable(root: pathlib.Path, centers: tuple[str, ...], wanted: dict) -> bool:
  """Whether `root` holds a finished set with the `wanted` parameters for every center; raises
  when it holds a finished set made with other parameters."""
  previous = read_parameters(root)
  have_all = all((root / center / 'dataset.json').is_file() for center in centers)
  if previous is None:
    if have_all:
      logging.info('%s holds dataset.json for %s but no %s: using it as it is', root, centers,
                   PARAMETERS_FILE)
    return have_all  # otherwise an unfinished generation (or nothing): generate
  made_with = {key: previous.get(key) for key in wanted}
  if made_with != wanted:
    raise DataError(
        f'{root} holds synthetic phantoms generated with {made_with}; this config asks for '
        f'{wanted}. Runs that used that folder depend on it, so it is not regenerated: leave '
        'data.root empty (each parameter set gets its own folder under data/synthetic/) or set '
        '--config.data.root to a new folder')
  return have_all and set(centers) <= set(previous.get('centers', []))


def _finished_centers(root: pathlib.Path, wanted: dict) -> list[str]:
  """Centers a finished generation with the `wanted` parameters wrote in `root` (each center's
  cases depend only on the seed, so a generation adds the missing centers beside them)."""
  previous = read_parameters(root)
  if previous is None or any(previous.get(key) != value for key, value in wanted.items()):
    return []
  return list(previous.get('centers', []))


# --- Preview -----------------------------------------------------------------------------------

SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)  # level 40, width 400


def _radiological(axial: np.ndarray) -> np.ndarray:
  """Canonical (y anterior, x right) slice -> display: anterior up, patient's right on the left."""
  return axial[::-1, ::-1]


def write_preview(path, cases: dict) -> None:
  """PNG montage: per center an axial slice through the tumour (else the pancreas) and a coronal
  reformat, soft-tissue window, pancreas contour in yellow and tumour in red."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(4.6 * len(cases), 9.6))
  FigureCanvasAgg(figure)
  for column, (center, case) in enumerate(cases.items()):
    protocol = CENTER_PROTOCOLS[center]
    target = case.label == 2 if case.has_tumour else case.label >= 1
    slice_index = int(np.argmax(target.sum(axis=(1, 2))))
    axial = figure.add_subplot(2, len(cases), column + 1)
    _show(axial, _radiological(case.image_hu[slice_index]),
          _radiological(case.label[slice_index]), aspect=1.0)
    axial.set_title(f'{center}, slice {slice_index}' +
                    (' (tumour)' if case.has_tumour else ' (no tumour)'), fontsize=10)
    row_index = int(np.argmax(target.sum(axis=(0, 2))))
    coronal = figure.add_subplot(2, len(cases), len(cases) + column + 1)
    _show(coronal, case.image_hu[::-1, row_index, ::-1], case.label[::-1, row_index, ::-1],
          aspect=case.spacing_mm[0] / case.spacing_mm[2])
    coronal.set_xlabel('\n'.join(textwrap.wrap(protocol.description().replace('\n', '; '), 52)),
                       fontsize=7.5)
  figure.suptitle('Synthetic abdominal CT (W400 L40); yellow: pancreas, red: tumour', fontsize=12)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=90)


def _show(axes, image, label, aspect: float) -> None:
  axes.imshow(image, cmap='gray', vmin=SOFT_TISSUE_WINDOW_HU[0], vmax=SOFT_TISSUE_WINDOW_HU[1],
              aspect=aspect, interpolation='nearest')
  if (label >= 1).any():
    axes.contour(label >= 1, levels=[0.5], colors='yellow', linewidths=0.8)
  if (label == 2).any():
    axes.contour(label == 2, levels=[0.5], colors='red', linewidths=0.8)
  axes.set_xticks([])
  axes.set_yticks([])
