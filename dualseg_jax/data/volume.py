"""A CT volume in the project's canonical layout, carrying the geometry it was read with.

Canonical layout: the array is reoriented to the closest RAS+ orientation and stored as
(depth, height, width) = (z, y, x), so axial slices are `array[k]` and the network's D axis is
the patient's superior-inferior axis. The source file's affine and shape travel with the array,
so a prediction made on the canonical array is written back in the input's exact geometry.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import nibabel.orientations as orientations
import numpy as np

# nibabel arrays are (x, y, z); canonical arrays are (z, y, x).
_XYZ_TO_ZYX = (2, 1, 0)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Voxel-to-world mapping of a volume as stored in its source file (nibabel's RAS+ mm)."""

  affine: np.ndarray  # 4x4, voxel (i, j, k) of the source array -> world mm
  shape: tuple[int, int, int]  # shape of the source array, (i, j, k)

  def __post_init__(self):
    object.__setattr__(self, 'affine', np.asarray(self.affine, dtype=np.float64))
    object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))

  @property
  def spacing_mm(self) -> tuple[float, float, float]:
    """Voxel size along the source axes (i, j, k)."""
    return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

  def same_as(self, other: 'Geometry', atol_mm: float = 1e-3) -> bool:
    return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol_mm)


@dataclasses.dataclass
class Volume:
  """A voxel array in canonical (z, y, x) layout plus everything needed to write it back."""

  array: np.ndarray  # (D, H, W)
  spacing_mm: tuple[float, float, float]  # (z, y, x) voxel size of `array`
  geometry: Geometry  # of the source file
  source: str = ''  # where it came from, for error messages

  @property
  def canonical_affine(self) -> np.ndarray:
    """Voxel (z, y, x) index of `array` -> world mm."""
    return canonical_affine(self.geometry)


def _to_canonical_transform(geometry: Geometry) -> np.ndarray:
  source_orientation = orientations.io_orientation(geometry.affine)
  return orientations.ornt_transform(source_orientation, orientations.axcodes2ornt('RAS'))


def canonical_affine(geometry: Geometry) -> np.ndarray:
  """Affine of the canonical (z, y, x) array derived from a source geometry."""
  transform = _to_canonical_transform(geometry)
  ras_affine = geometry.affine @ orientations.inv_ornt_aff(transform, geometry.shape)
  # Reorder the voxel axes (x, y, z) -> (z, y, x).
  permutation = np.zeros((4, 4))
  for new_axis, old_axis in enumerate(_XYZ_TO_ZYX):
    permutation[old_axis, new_axis] = 1.0
  permutation[3, 3] = 1.0
  return ras_affine @ permutation


def to_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Source-oriented (i, j, k) array -> canonical (z, y, x) array (a view where possible)."""
  if array.shape[:3] != geometry.shape:
    raise ValueError(f'array shape {array.shape} does not match geometry shape {geometry.shape}')
  ras = orientations.apply_orientation(array, _to_canonical_transform(geometry))
  return np.transpose(ras, _XYZ_TO_ZYX + tuple(range(3, array.ndim)))


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Canonical (z, y, x[, ...]) array -> the source file's (i, j, k[, ...]) orientation."""
  ras = np.transpose(array, _XYZ_TO_ZYX + tuple(range(3, array.ndim)))
  back = orientations.ornt_transform(
      orientations.axcodes2ornt('RAS'), orientations.io_orientation(geometry.affine))
  source = orientations.apply_orientation(ras, back)
  if source.shape[:3] != geometry.shape:
    raise ValueError(
        f'canonical array of shape {array.shape} cannot be written back into a source of '
        f'shape {geometry.shape}')
  return source


def volume_from_source(array: np.ndarray, affine: np.ndarray, source: str = '') -> Volume:
  """Build a canonical Volume from a source-oriented array and its affine."""
  geometry = Geometry(affine=affine, shape=array.shape[:3])
  canonical = np.ascontiguousarray(to_canonical(array, geometry))
  affine_zyx = canonical_affine(geometry)
  spacing = tuple(float(s) for s in np.sqrt((affine_zyx[:3, :3] ** 2).sum(axis=0)))
  return Volume(array=canonical, spacing_mm=spacing, geometry=geometry, source=source)


def to_nifti(array: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
  """A canonical array as a NIfTI image in the source's original geometry and orientation."""
  image = nib.Nifti1Image(np.asarray(from_canonical(array, geometry)), geometry.affine)
  image.set_qform(geometry.affine, code=1)
  image.set_sform(geometry.affine, code=1)
  return image
