"""Reading CT volumes and label maps (NIfTI, NRRD, DICOM series) into canonical Volumes, and
writing canonical arrays back in their source geometry; every bad input becomes a DataError."""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import logging
import math
import os
import pathlib
import secrets
import struct
import zlib
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from dualseg_jax import files
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.structures import LABEL_VALUES

NIFTI_SUFFIXES = ('.nii', '.nii.gz')
NRRD_SUFFIXES = ('.nrrd', '.nhdr')
METAIMAGE_SUFFIXES = ('.mha', '.mhd')  # read through SimpleITK, an optional dependency
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES + METAIMAGE_SUFFIXES
# nnU-Net names the first (here, only) input channel of case X `X_0000`.
CHANNEL_SUFFIX = '_0000'
MAX_SPACING_MM = 50.0
# Below this a voxel axis is degenerate (a zero column in the affine), not merely fine.
MIN_SPACING_MM = 1e-4
# Far beyond any CT (a 1024x1024x2000 scan is 2^31 voxels); a header claiming more is corrupt.
MAX_VOXELS = 2 ** 32
# Deflate cannot expand data more than 1032-fold, so a .gz file of N bytes holds at most this
# many times N bytes: a header claiming more is corrupt, refused before anything is allocated.
_MAX_GZIP_EXPANSION = 1040

# What the readers raise on a damaged file; each becomes a DataError naming the file.
_CORRUPT_FILE_ERRORS = (
    OSError, EOFError, zlib.error, gzip.BadGzipFile, struct.error, ValueError, TypeError,
    KeyError, IndexError, AttributeError, OverflowError, nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError)
# pydicom also raises these on damaged files: an unknown VR, a length field claiming gigabytes.
_DICOM_FILE_ERRORS = (RuntimeError, NotImplementedError, MemoryError, *_CORRUPT_FILE_ERRORS)

# NRRD world spaces -> the sign flips that take them to nibabel's RAS+ world.
_NRRD_SPACE_TO_RAS = {
    'right-anterior-superior': (1.0, 1.0, 1.0), 'ras': (1.0, 1.0, 1.0),
    'left-anterior-superior': (-1.0, 1.0, 1.0), 'las': (-1.0, 1.0, 1.0),
    'left-posterior-superior': (-1.0, -1.0, 1.0), 'lps': (-1.0, -1.0, 1.0),
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_REEXPORT = 're-export it'


def _suffix(path: pathlib.Path) -> str:
  name = path.name.lower()
  return '.nii.gz' if name.endswith('.nii.gz') else path.suffix.lower()


def volume_suffix(path: str | os.PathLike) -> str:
  """The volume suffix of a file name as it is written (`.nii.gz`, `.NRRD`); '' for others."""
  name = pathlib.PurePath(path).name
  for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
    if name.lower().endswith(suffix):
      return name[len(name) - len(suffix):]
  return ''


def case_id_from_path(path: str | os.PathLike) -> str:
  """The case a volume file holds: its name without the volume suffix and without nnU-Net's
  channel suffix, so `X.nii.gz`, `X_0000.nii.gz` and `X.mha` are all case `X`. Other names (a
  DICOM series folder) are returned as they are."""
  name = pathlib.PurePath(path).name
  suffix = volume_suffix(name)
  if not suffix:
    return name
  stem = name[:-len(suffix)]
  if stem.endswith(CHANNEL_SUFFIX) and stem != CHANNEL_SUFFIX:
    return stem[:-len(CHANNEL_SUFFIX)]
  return stem


def read_volume(path: str | os.PathLike) -> volume_lib.Volume:
  """Reads a NIfTI file, an NRRD file or a DICOM series folder into a canonical Volume.

  The array keeps an integer dtype where the stored values and their scaling allow it, and is
  float32 otherwise. Raises DataError, naming the file, for anything that cannot be used as a 3D
  volume (missing, corrupt, 2D, multi-channel, bad spacing, non-finite voxels).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f'{path} does not exist: check the path (and data.root / the manifest)')
  if path.is_dir():
    array, affine, source = _read_dicom_series(path)
  elif _suffix(path) in NIFTI_SUFFIXES:
    array, affine = _read_nifti(path)
    source = str(path)
  elif _suffix(path) in NRRD_SUFFIXES:
    array, affine = _read_nrrd(path)
    source = str(path)
  elif _suffix(path) in METAIMAGE_SUFFIXES:
    array, affine = _read_metaimage(path)
    source = str(path)
  else:
    raise DataError(
        f'{path}: unsupported file type; give a NIfTI file ({", ".join(NIFTI_SUFFIXES)}), an '
        f'NRRD file ({", ".join(NRRD_SUFFIXES)}), a MetaImage file '
        f'({", ".join(METAIMAGE_SUFFIXES)}, with SimpleITK installed) or a folder holding one '
        'DICOM series')
  array = _as_single_3d_volume(array, source)
  _check_affine(affine, source)
  _check_finite(array, source)
  return volume_lib.volume_from_source(array, affine, source=source)


def _as_single_3d_volume(array: np.ndarray, source: str) -> np.ndarray:
  """Drops singleton trailing axes; refuses 2D images and multi-channel or 4D series."""
  while array.ndim > 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim > 3:
    raise DataError(
        f'{source} holds {int(np.prod(array.shape[3:]))} volumes or channels (shape '
        f'{array.shape}); a single 3D CT volume is needed: split it and give one volume')
  if array.ndim < 3 or min(array.shape) < 2:
    raise DataError(
        f'{source} is a 2D image (shape {array.shape}); a 3D volume with at least 2 voxels '
        'along each axis is needed')
  return array


def _check_affine(affine: np.ndarray, source: str) -> None:
  if not np.all(np.isfinite(affine)):
    raise DataError(f'{source} has a non-finite voxel-to-world affine:\n{affine}\n{_REEXPORT}')
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
    raise DataError(
        f'{source} has voxel spacing {np.round(spacing, 6).tolist()} mm along its axes; each must '
        f'lie in ({MIN_SPACING_MM}, {MAX_SPACING_MM}] mm: fix the header and {_REEXPORT}')
  directions = affine[:3, :3] / spacing
  if abs(np.linalg.det(directions)) < 1e-3:
    raise DataError(
        f'{source} has voxel axes that do not span 3D space (affine\n{affine}); {_REEXPORT}')


def _check_finite(array: np.ndarray, source: str) -> None:
  if not np.issubdtype(array.dtype, np.floating):
    return
  bad = int(array.size - np.count_nonzero(np.isfinite(array)))
  if bad:
    raise DataError(
        f'{source} has {bad} NaN or infinite voxels; fix or {_REEXPORT} without them')


def _check_declared_spacing(spacing, source: str, what: str) -> None:
  values = np.asarray(spacing, dtype=np.float64)
  if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values > MAX_SPACING_MM):
    raise DataError(
        f'{source} declares {what} {values.tolist()}; spacing must be positive, finite and at '
        f'most {MAX_SPACING_MM} mm: fix the header and {_REEXPORT}')


def _describe(error: BaseException) -> str:
  detail = str(error)
  if isinstance(error, MemoryError) and not detail:
    detail = 'a length field claims more bytes than fit in memory'
  return f'{type(error).__name__}: {detail}'


def _corrupt(path, error: BaseException) -> DataError:
  return DataError(f'{path} is truncated or corrupt ({_describe(error)}): {_REEXPORT}')


# --- NIfTI -------------------------------------------------------------------------------------

def _read_nifti(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  try:
    image = nib.load(path)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise DataError(f'{path} is not a NIfTI-1/2 image ({type(image).__name__}): {_REEXPORT}')
    # nibabel silently takes abs() of negative pixdims on load; the raw header still shows them.
    with nib.openers.ImageOpener(path) as opener:
      raw_header = type(image).header_class.from_fileobj(opener, check=False)
    num_spatial = min(3, int(raw_header['dim'][0]))
    _check_declared_spacing(
        raw_header['pixdim'][1:1 + num_spatial], str(path), 'pixdim (voxel size)')
    affine = np.asarray(image.affine, dtype=np.float64)
    proxy = image.dataobj
    _check_claimed_nifti_size(path, proxy)
    raw = np.asarray(proxy.get_unscaled())
    array = _apply_scaling(raw, float(proxy.slope), float(proxy.inter))
  except DataError:
    raise
  except _CORRUPT_FILE_ERRORS as error:
    raise _corrupt(path, error) from error
  return array, affine


def _check_claimed_nifti_size(path: pathlib.Path, proxy) -> None:
  """Refuses a header whose shape and data type need more bytes than the file can hold."""
  num_voxels = math.prod(int(n) for n in proxy.shape)
  claimed_bytes = num_voxels * np.dtype(proxy.dtype).itemsize
  file_bytes = path.stat().st_size
  if _suffix(path) == '.nii.gz':
    available_bytes = file_bytes * _MAX_GZIP_EXPANSION
  else:
    available_bytes = file_bytes - int(proxy.offset)
  if num_voxels > MAX_VOXELS or claimed_bytes > available_bytes:
    raise DataError(
        f'{path} is truncated or corrupt: its header claims shape {tuple(proxy.shape)} of '
        f'{np.dtype(proxy.dtype).name} ({claimed_bytes} bytes of voxels), more than the '
        f'{file_bytes}-byte file can hold: {_REEXPORT}')


def _apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
  """raw * slope + inter as nibabel scales it, keeping integers where that is exact."""
  integral = float(slope).is_integer() and float(inter).is_integer()
  if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
    if slope == 1.0 and inter == 0.0:
      return raw
    if integral and raw.size and max(abs(slope), abs(inter)) < 2.0 ** 62:
      lowest, highest = int(raw.min()), int(raw.max())
      # The dtype must hold the slope and intercept too: they are cast to it.
      ends = (lowest * int(slope) + int(inter), highest * int(slope) + int(inter), int(slope),
              int(inter))
      if min(ends) >= np.iinfo(np.int64).min and max(ends) <= np.iinfo(np.int64).max:
        dtype = _smallest_signed_int(min(ends), max(ends))
        return (raw.astype(dtype) * dtype.type(slope) + dtype.type(inter)).astype(dtype)
  if slope == 1.0 and inter == 0.0 and raw.dtype == np.float32:
    return raw
  # float32 is ample for HU; values beyond its range become inf and are reported as such.
  with np.errstate(over='ignore'):
    return raw.astype(np.float32) * np.float32(slope) + np.float32(inter)


def _smallest_signed_int(lowest: int, highest: int) -> np.dtype:
  for dtype in (np.int16, np.int32, np.int64):
    info = np.iinfo(dtype)
    if info.min <= lowest and highest <= info.max:
      return np.dtype(dtype)
  return np.dtype(np.int64)


# --- NRRD --------------------------------------------------------------------------------------

def _read_nrrd(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  import nrrd  # deferred: only NRRD inputs need it

  try:
    with open(path, 'rb') as file:
      header = nrrd.read_header(file)
      _check_nrrd_data_file(path, header)
      data = nrrd.read_data(header, file, str(path), index_order='F')
  except DataError:
    raise
  # StopIteration: pynrrd's header parser on an empty file.
  except (nrrd.NRRDError, StopIteration, *_CORRUPT_FILE_ERRORS) as error:
    raise _corrupt(path, error) from error
  if 'space directions' not in header:
    raise DataError(
        f"{path} has no 'space directions' (voxel axes in world space), so its orientation is "
        f'unknown: {_REEXPORT} with its geometry (e.g. from 3D Slicer or SimpleITK)')
  # Without a named space the coordinates are ITK's, which are LPS.
  space = str(header.get('space', 'left-posterior-superior')).lower()
  if space not in _NRRD_SPACE_TO_RAS:
    raise DataError(
        f"{path}: NRRD space {space!r} is not supported; {_REEXPORT} in one of "
        "'right-anterior-superior', 'left-anterior-superior', 'left-posterior-superior'")
  # pynrrd gives non-spatial axes as NaN rows, or as None in its 'double vector list' mode.
  directions = np.asarray(
      [np.full(3, np.nan) if row is None else row for row in header['space directions']],
      dtype=np.float64)
  if directions.ndim != 2 or directions.shape[1] != 3 or directions.shape[0] != data.ndim:
    raise DataError(
        f"{path}: 'space directions' {directions.tolist()} do not describe {data.ndim} axes in "
        f'a 3D space: {_REEXPORT}')
  spatial = [axis for axis in range(data.ndim) if np.all(np.isfinite(directions[axis]))]
  other = [axis for axis in range(data.ndim) if axis not in spatial]
  if len(spatial) != 3:
    raise DataError(
        f'{path} has {len(spatial)} spatial axes (shape {data.shape}); a 3D volume is needed')
  # Spatial axes first, in file order; non-spatial (channel, time) axes after them.
  data = np.transpose(data, spatial + other)
  try:
    origin = np.asarray(header.get('space origin', np.zeros(3)), dtype=np.float64)
  except (TypeError, ValueError):
    origin = np.zeros((0,))
  if origin.shape != (3,):
    raise DataError(f"{path}: 'space origin' {origin.tolist()} is not a 3D point: {_REEXPORT}")
  affine = np.eye(4)
  affine[:3, :3] = directions[spatial].T
  affine[:3, 3] = origin
  flips = np.diag(list(_NRRD_SPACE_TO_RAS[space]) + [1.0])
  return np.ascontiguousarray(_apply_scaling(data, 1.0, 0.0)), flips @ affine


def _check_nrrd_data_file(path: pathlib.Path, header: dict) -> None:
  """Refuses what would make reading the data hang or exhaust memory: a data file that is not a
  regular file (a device such as /dev/zero never ends) and more lines to skip than it holds."""
  data_file = header.get('datafile', header.get('data file'))
  data_path = path if data_file is None else path.parent / str(data_file)
  if not data_path.is_file():
    raise DataError(
        f"{path} names data file {str(data_file)!r}, which is not a regular file ({data_path}): "
        f'fix the header or give the file beside it')
  line_skip = int(header.get('lineskip', header.get('line skip', 0)))
  if line_skip > data_path.stat().st_size:
    raise DataError(
        f"{path} is corrupt: its header skips {line_skip} lines of {data_path}, which holds "
        f'only {data_path.stat().st_size} bytes: {_REEXPORT}')


def _read_metaimage(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """A MetaImage (.mha, .mhd) through SimpleITK. It is optional: NIfTI and NRRD keep their own
  readers, whose refusals (truncated files, impossible headers) a second reader must not undo."""
  try:
    import SimpleITK as sitk  # deferred and optional: only MetaImage inputs need it
  except ImportError as error:
    raise DataError(
        f'{path}: MetaImage files ({", ".join(METAIMAGE_SUFFIXES)}) are read through SimpleITK, '
        'which is not installed: pip install SimpleITK, or convert the file to NIfTI') from error
  try:
    image = sitk.ReadImage(str(path))
    data = sitk.GetArrayFromImage(image)
  except (RuntimeError, *_CORRUPT_FILE_ERRORS) as error:
    raise _corrupt(path, error) from error
  if image.GetDimension() != 3:
    raise DataError(
        f'{path} has {image.GetDimension()} dimensions (size {image.GetSize()}); a 3D volume is '
        'needed')
  # SimpleITK's array runs (z, y, x[, component]); the affine indexes (x, y, z) in LPS.
  data = np.transpose(data, (2, 1, 0) + tuple(range(3, data.ndim)))
  affine = np.eye(4)
  affine[:3, :3] = (np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
                    * np.asarray(image.GetSpacing(), np.float64))
  affine[:3, 3] = image.GetOrigin()
  return np.ascontiguousarray(_apply_scaling(data, 1.0, 0.0)), _LPS_TO_RAS @ affine


# --- DICOM -------------------------------------------------------------------------------------

def _read_dicom_series(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray, str]:
  """Reads the largest image series in `folder` (searched recursively) in LPS, returns RAS."""
  import pydicom  # deferred: only DICOM inputs need it
  from pydicom.errors import InvalidDicomError

  series = collections.defaultdict(list)
  descriptions = {}
  for file in sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.')):
    try:
      header = pydicom.dcmread(file, stop_before_pixels=True)
    except InvalidDicomError:
      continue  # not DICOM (a README, a DICOMDIR-less listing): not part of any series
    except _dicom_file_errors() as error:
      raise _corrupt(file, error) from error
    found = _dicom_slice_geometry(file, header)
    if found is None:
      continue  # structure sets, reports, scouts without geometry
    key, geometry = found
    series[key].append((file, geometry))
    descriptions[key] = str(getattr(header, 'SeriesDescription', '') or '').strip()
  if not series:
    raise DataError(
        f'{folder} holds no DICOM image slices with position and orientation; give a folder '
        'with one CT series, or a NIfTI/NRRD file')
  key = max(series, key=lambda k: (len(series[k]), k))
  slices = series[key]
  source = str(folder)
  if len(series) > 1:
    others = ', '.join(f'{k[0]} ({len(v)} slices)' for k, v in series.items() if k != key)
    source = (f'{folder} [series {key[0]} {descriptions[key]!r}, {len(slices)} slices; ignored '
              f'the smaller series {others}]')
    logging.warning('%s holds %d series; reading the largest: %s', folder, len(series), source)

  first = slices[0][1]
  orientation = first.orientation
  row_direction, column_direction = orientation[:3], orientation[3:]
  normal = np.cross(row_direction, column_direction)
  if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
    raise DataError(
        f'{slices[0][0]}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal '
        f'unit vectors: {_REEXPORT}')
  positions = np.asarray([s[1].position for s in slices], dtype=np.float64)
  heights = positions @ normal
  order = np.argsort(heights, kind='stable')
  slices = [slices[i] for i in order]
  positions, heights = positions[order], heights[order]
  if len(slices) < 2:
    raise DataError(f'{source} is a 2D image (one slice); a 3D series is needed')
  gaps = np.diff(heights)
  if np.any(gaps < 1e-3):
    duplicates = [str(slices[i][0].name) for i in np.nonzero(gaps < 1e-3)[0][:5]]
    raise DataError(
        f'{source} has slices at the same position (e.g. {duplicates}): it mixes acquisitions or '
        'duplicates files; keep one series per folder')
  median_gap = float(np.median(gaps))
  if np.max(np.abs(gaps - median_gap)) > 0.01 * median_gap + 1e-3:
    raise DataError(
        f'{source} has uneven slice spacing (gaps {np.round(gaps.min(), 4)} to '
        f'{np.round(gaps.max(), 4)} mm): slices are missing or the series is irregular; '
        'export the complete series or resample it')

  row_spacing, column_spacing = first.pixel_spacing
  _check_declared_spacing((row_spacing, column_spacing), str(slices[0][0]), 'PixelSpacing')
  affine_lps = np.eye(4)
  # Array axis i runs along a row (across columns), j down the rows, k through the slices.
  affine_lps[:3, 0] = row_direction * column_spacing
  affine_lps[:3, 1] = column_direction * row_spacing
  affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
  affine_lps[:3, 3] = positions[0]

  planes, slopes, intercepts = [], [], []
  for file, _ in slices:
    try:
      dataset = pydicom.dcmread(file)
      pixels = dataset.pixel_array
    except (InvalidDicomError, *_dicom_file_errors()) as error:
      raise DataError(
          f'{file}: its pixel data cannot be decoded ({_describe(error)}); the '
          f'slice is truncated or corrupt, or compressed with a codec not installed: {_REEXPORT} '
          'uncompressed') from error
    if pixels.shape != (int(dataset.Rows), int(dataset.Columns)):
      raise DataError(
          f'{file}: pixel data of shape {pixels.shape} is not one grey-level slice of '
          f'{dataset.Rows}x{dataset.Columns} (multi-frame or colour); {_REEXPORT} as a CT series')
    slope, intercept = _dicom_rescale(file, dataset)
    planes.append(pixels)
    slopes.append(slope)
    intercepts.append(intercept)
  stacked = np.stack(planes)  # (slice, row, column)
  if len(set(slopes)) == 1 and len(set(intercepts)) == 1:
    stacked = _apply_scaling(stacked, slopes[0], intercepts[0])
  else:
    with np.errstate(over='ignore'):  # beyond float32: inf, reported as non-finite voxels
      stacked = (stacked.astype(np.float32) * np.float32(slopes)[:, None, None]
                 + np.float32(intercepts)[:, None, None])
  array = np.ascontiguousarray(np.transpose(stacked, (2, 1, 0)))  # (column, row, slice) = (i, j, k)
  return array, _LPS_TO_RAS @ affine_lps, source


@dataclasses.dataclass(frozen=True)
class _DicomSliceGeometry:
  orientation: np.ndarray  # row direction then column direction, LPS
  position: np.ndarray  # of the first pixel, LPS mm
  pixel_spacing: tuple[float, float]  # (between rows, between columns) mm


def _dicom_file_errors() -> tuple[type[BaseException], ...]:
  from pydicom.errors import BytesLengthException  # deferred with pydicom itself

  return (BytesLengthException, *_DICOM_FILE_ERRORS)


def _dicom_slice_geometry(file: pathlib.Path, header) -> tuple[tuple, _DicomSliceGeometry] | None:
  """(series key, geometry) of an image slice, None for a file without image geometry.

  pydicom decodes element values when they are first used, so a damaged value surfaces here, as
  a DataError naming the file.
  """
  try:
    required = ('ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing', 'Rows')
    if not all(hasattr(header, key) for key in required):
      return None
    geometry = _DicomSliceGeometry(
        orientation=_dicom_numbers(header, 'ImageOrientationPatient', 6),
        position=_dicom_numbers(header, 'ImagePositionPatient', 3),
        pixel_spacing=tuple(_dicom_numbers(header, 'PixelSpacing', 2).tolist()))
    key = (str(getattr(header, 'SeriesInstanceUID', '')),
           tuple(np.round(geometry.orientation, 4)), int(header.Rows), int(header.Columns))
  except DataError as error:
    raise DataError(f'{file}: {error}; fix the header and {_REEXPORT}') from error
  except _dicom_file_errors() as error:
    raise _corrupt(file, error) from error
  return key, geometry


def _dicom_numbers(dataset, keyword: str, count: int, default=None) -> np.ndarray:
  """The `count` values of a numeric element (`default` when absent or empty)."""
  value = getattr(dataset, keyword, None)
  if default is not None and (value is None or value == ''):
    return np.asarray(default, dtype=np.float64)
  is_list = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
  items = list(value) if is_list else [value]
  try:
    numbers = np.array([float(item) for item in items], dtype=np.float64)
  except (TypeError, ValueError, OverflowError):
    numbers = None
  if numbers is None or numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
    raise DataError(f'{keyword} {items!r:.120} is not {count} finite number{"s" * (count > 1)}')
  return numbers


def _dicom_rescale(file: pathlib.Path, dataset) -> tuple[float, float]:
  """(RescaleSlope, RescaleIntercept); an absent, empty or zero slope means 1."""
  try:
    slope = float(_dicom_numbers(dataset, 'RescaleSlope', 1, default=[1.0])[0])
    intercept = float(_dicom_numbers(dataset, 'RescaleIntercept', 1, default=[0.0])[0])
  except DataError as error:
    raise DataError(f'{file}: {error}; fix the header and {_REEXPORT}') from error
  except _dicom_file_errors() as error:
    raise _corrupt(file, error) from error
  return slope or 1.0, intercept


# --- Writing -----------------------------------------------------------------------------------

def write_nifti(array_canonical: np.ndarray, geometry: volume_lib.Geometry,
                path: str | os.PathLike, dtype=None) -> pathlib.Path:
  """Writes a canonical (z, y, x) array as NIfTI in `geometry`, the source's own orientation.

  `dtype` converts the array first (floats are rounded when written as integers). Parent folders
  are created; the file appears complete or not at all: it is written to a hidden sibling whose
  name ends in .partial, which no reader lists, and renamed when complete.
  """
  path = pathlib.Path(path)
  if _suffix(path) not in NIFTI_SUFFIXES:
    raise DataError(f'{path}: write predictions as NIfTI, a name ending in .nii or .nii.gz')
  array = _writable_array(np.asarray(array_canonical), dtype, path)
  image = volume_lib.to_nifti(array, geometry)
  image.set_data_dtype(array.dtype)
  # One sibling per writer, as files.write_bytes names them: two writers of one path never
  # rename each other's half-written file into place.
  partial = path.with_name(f'.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The partial name does not end in .nii.gz, so the compression is chosen here, with
    # nibabel's own gzip settings (level 1, no time stamp): the bytes equal nib.save's.
    if _suffix(path) == '.nii.gz':
      stream = nib.openers.gzip_open(str(partial), 'wb',
                                     compresslevel=nib.openers.Opener.default_compresslevel)
    else:
      stream = open(partial, 'wb')  # noqa: SIM115 (closed below)
    with stream:
      image.to_stream(stream)
    os.replace(partial, path)
  except OSError as error:
    files.discard(partial)
    refused = files.refused_write(error, path.name, path)
    if refused is not None:
      raise refused from error
    raise DataError(f'cannot write {path} ({error}): check the folder is writable') from error
  except BaseException:
    # Ctrl-C or a stop request mid-write: the half-written file goes with it.
    files.discard(partial)
    raise
  return path


def partial_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """The half-written siblings of `path` that writers killed mid-write left behind."""
  path = pathlib.Path(path)
  if not path.parent.is_dir():
    return []
  return sorted(path.parent.glob(f'.{glob.escape(path.name)}.*.partial'))


def write_volume(volume: volume_lib.Volume, path: str | os.PathLike, dtype=None) -> pathlib.Path:
  """Writes a Volume's canonical array back in the geometry it was read with."""
  return write_nifti(volume.array, volume.geometry, path, dtype=dtype)


def _writable_array(array: np.ndarray, dtype, path: pathlib.Path) -> np.ndarray:
  if dtype is None:
    if array.dtype == np.bool_:
      dtype = np.uint8
    elif array.dtype == np.int64 or array.dtype == np.uint64:
      dtype = np.int32  # NIfTI readers commonly refuse 64-bit integers
    elif array.dtype == np.float16 or str(array.dtype) == 'bfloat16':
      dtype = np.float32
    else:
      return array
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    if np.issubdtype(array.dtype, np.floating):
      array = np.rint(array)
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
      raise ValueError(
          f'writing {path}: values {array.min()}..{array.max()} do not fit in {dtype.name}')
  return array.astype(dtype, copy=False)


# --- Cases: an image and its label -------------------------------------------------------------

def parse_label_map(label_map) -> dict[int, int] | None:
  """'7:1,8:2' or {7: 1} -> {7: 1, 8: 2}; '' or None -> None (labels are already 0/1/2)."""
  if label_map is None or (isinstance(label_map, str) and not label_map.strip()):
    return None
  pairs = []
  try:
    if isinstance(label_map, str):
      for item in label_map.split(','):
        if item.strip():
          source_value, target_value = item.split(':')
          pairs.append((int(source_value), int(target_value)))
    elif isinstance(label_map, Mapping) or hasattr(label_map, 'items'):
      pairs = [(int(key), int(value)) for key, value in label_map.items()]
    else:
      raise TypeError(type(label_map).__name__)
  except (TypeError, ValueError) as error:
    raise ConfigError(
        f'data.label_map {label_map!r} cannot be read ({error}); write it as '
        "'SOURCE:TARGET[,SOURCE:TARGET...]', e.g. '7:1' (TotalSegmentator pancreas) or "
        "'1:1,2:2'") from error
  mapping = dict(pairs)
  bad_targets = sorted({t for t in mapping.values() if t not in LABEL_VALUES})
  if bad_targets or not mapping:
    raise ConfigError(
        f'data.label_map {label_map!r} maps to {bad_targets or "nothing"}; targets must be '
        f'among {LABEL_VALUES} (0 background, 1 pancreas, 2 tumour)')
  return mapping


def present_values(array: np.ndarray) -> np.ndarray:
  """Sorted distinct values of an array; a counting pass for small integer ranges."""
  if array.size == 0:
    return np.zeros((0,), array.dtype)
  if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
    lowest, highest = int(array.min()), int(array.max())
    if highest - lowest < 1 << 20:
      counts = np.bincount((array.ravel().astype(np.int64) - lowest))
      return np.nonzero(counts)[0] + lowest
  return np.unique(array)


def map_labels(array: np.ndarray, label_map, source: str) -> np.ndarray:
  """Source label values -> uint8 {0, 1, 2}, through `label_map` when one is given."""
  mapping = parse_label_map(label_map)
  values = present_values(array)
  if np.issubdtype(values.dtype, np.floating):
    fractional = values[values != np.round(values)]
    if fractional.size:
      raise DataError(
          f'{source} has non-integer label values (e.g. {fractional[:5].tolist()}): it looks '
          'like an image or an interpolated label; give the integer label map')
  if mapping is None:
    unexpected = [v for v in values.tolist() if v not in LABEL_VALUES]
    if unexpected:
      raise DataError(
          f'{source} has label values {_summarise(unexpected)} outside {LABEL_VALUES} (0 '
          'background, 1 pancreas, 2 tumour); set data.label_map to map them, e.g. '
          "data.label_map='7:1' for TotalSegmentator's pancreas")
    return array.astype(np.uint8)
  mapped = np.zeros(array.shape, np.uint8)
  for source_value, target_value in mapping.items():
    if target_value:
      mapped[array == source_value] = target_value
  return mapped


def _summarise(values: list) -> str:
  shown = [int(v) if float(v).is_integer() else v for v in values[:20]]
  return f'{shown}' + (f' and {len(values) - 20} more' if len(values) > 20 else '')


def same_canonical_grid(first: volume_lib.Volume, second: volume_lib.Volume,
                        atol_mm: float = 1e-3) -> bool:
  """Whether two volumes' canonical voxels sit at the same world positions (corners within atol)."""
  if first.array.shape != second.array.shape:
    return False
  corners = np.array(np.meshgrid(*[(0, n - 1) for n in first.array.shape], indexing='ij'))
  corners = np.concatenate([corners.reshape(3, -1), np.ones((1, 8))])
  difference = (first.canonical_affine - second.canonical_affine) @ corners
  return bool(np.max(np.abs(difference[:3])) <= atol_mm)


def _check_not_constant(image: volume_lib.Volume, source: str) -> None:
  # A CT holds air, tissue and bone; a single value everywhere is a failed export or conversion.
  lowest, highest = image.array.min(), image.array.max()
  if lowest == highest:
    raise DataError(
        f'{source} holds the single value {lowest.item()} in all {image.array.size} voxels: it is '
        f'not a CT image (a failed export or conversion); {_REEXPORT}')


def read_case(image_path: str | os.PathLike, label_path: str | os.PathLike, label_map=None,
              source_desc: str = '', atol_mm: float = 1e-3
              ) -> tuple[volume_lib.Volume, volume_lib.Volume]:
  """Reads an image (float32 HU) and its label (uint8 in {0, 1, 2}) on the same voxel grid.

  Grids are compared in canonical layout, so an image and a label stored in different axis
  orders (e.g. a DICOM series and a NIfTI label) still pair up when their voxels coincide.
  """
  prefix = f'{source_desc}: ' if source_desc else ''
  try:
    image = read_volume(image_path)
    _check_not_constant(image, f'image {image_path}')
    label = read_volume(label_path)
    if not same_canonical_grid(image, label, atol_mm):
      raise DataError(
          f'label {label_path} (shape {label.geometry.shape}, affine '
          f'{np.round(label.geometry.affine[:3], 4).tolist()}) is not on the voxel grid of image '
          f'{image_path} (shape {image.geometry.shape}, affine '
          f'{np.round(image.geometry.affine[:3], 4).tolist()}) within {atol_mm} mm: resample the '
          'label onto the image (nearest neighbour)')
    label.array = map_labels(label.array, label_map, f'label {label_path}')
  except DataError as error:
    if not prefix:
      raise
    raise DataError(prefix + str(error)) from error
  image.array = image.array.astype(np.float32, copy=False)
  return image, label
