"""The scanner side of the synthetic centers: contrast phases and each center's protocol (voxel
spacing, slice thickness, blur, noise, calibration, stored orientation), with the real-world
ranges each parameter stands for."""

from __future__ import annotations

import dataclasses


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
