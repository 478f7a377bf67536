"""Fuzzing the volume readers: damaged NIfTI, NRRD and DICOM inputs made from small valid seeds,
and a runner that checks every read ends in a sane Volume or a DataError naming the file.

Each case is a pure function of (format, seed, case index), so any failure can be replayed with
`make_case`. The runner reads cases in a child process with a memory limit, so a hang, a crash
of the interpreter or an allocation sized by a corrupt header is caught and reported, not fatal.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import io as bytes_io
import logging
import math
import multiprocessing
import os
import pathlib
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np

FORMATS = ('nifti', 'nifti_gz', 'nrrd', 'dicom')
FILE_NAMES = {'nifti': 'case.nii', 'nifti_gz': 'case.nii.gz', 'nrrd': 'case.nrrd'}
DICOM_FOLDER = 'series'
SEED_SHAPE = (6, 7, 5)  # (i, j, k): tiny, so each case reads in milliseconds
CASE_TIME_LIMIT_S = 5.0
# A reader must refuse a header claiming a huge volume before allocating it; this limit on the
# child's address space turns such an allocation into a reported MemoryError.
MEMORY_LIMIT_BYTES = 3 * 1024 ** 3
_FAILURES_KEPT = 50

ACCEPTED = 'accepted'
DATA_ERROR = 'DataError'

# Values that break parsers: zero, signs, type limits, huge, tiny, non-finite.
_INTERESTING_INTEGERS = (0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 255, 256, 32767, -32768, 65535, 100000,
                         2 ** 31 - 1, -2 ** 31, 2 ** 40, 10 ** 12)
_INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 100.0, 1e-6, 1e-30, 1e30, 3.4e38, -3.4e38,
                       1e300, float('nan'), float('inf'), float('-inf'))
_INTERESTING_TEXT = (b'', b'0', b'-1', b'1e308', b'-1e308', b'nan', b'inf', b'-inf', b'abc',
                     b'\xff\xfe', b'1\\2', b'1\\0\\0\\1\\0\\0', b'0\\0\\0\\0\\0\\0',
                     b'1\\2\\3\\4\\5\\6\\7', b'99999999999999999999', b'1e-300', b'  ')


@dataclasses.dataclass(frozen=True)
class FuzzCase:
  """Files to write (relative path -> bytes), the path to read, and how they were made."""

  files: dict
  read_path: str
  description: str


# --- Byte-level mutations ----------------------------------------------------------------

def truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Cuts the data short, often inside the header, where parsers are most fragile."""
  limit = min(len(data), 400) if rng.random() < 0.5 else len(data)
  keep = int(rng.integers(0, max(limit, 1)))
  return data[:keep], f'truncate to {keep} of {len(data)} bytes'


def flip_bits(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  if not data:
    return data, 'flip no bits of empty data'
  mutated = bytearray(data)
  count = int(rng.integers(1, 9))
  for _ in range(count):
    position = int(rng.integers(0, len(mutated)))
    mutated[position] ^= 1 << int(rng.integers(0, 8))
  return bytes(mutated), f'flip {count} bits'


def overwrite_range(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Replaces a random span with random bytes (a damaged sector, a bad copy)."""
  if not data:
    return data, 'overwrite nothing in empty data'
  start = int(rng.integers(0, len(data)))
  length = int(rng.integers(1, min(64, len(data) - start) + 1))
  mutated = data[:start] + rng.bytes(length) + data[start + length:]
  return mutated, f'overwrite bytes {start}..{start + length}'


def random_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Noise of about the original length (sometimes empty or a few bytes)."""
  length = int(rng.choice([0, 1, 4, 64, 347, 348, 352, len(data), 2 * len(data)]))
  return rng.bytes(length), f'{length} random bytes'


BYTE_MUTATIONS = (truncate, flip_bits, overwrite_range, random_bytes)


def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  mutation = BYTE_MUTATIONS[int(rng.integers(0, len(BYTE_MUTATIONS)))]
  return mutation(data, rng)


def _interesting_value(dtype: np.dtype, rng: np.random.Generator):
  if np.issubdtype(dtype, np.integer):
    return int(rng.choice(_INTERESTING_INTEGERS)) if rng.random() < 0.8 else int(
        rng.integers(-2 ** 31, 2 ** 31))
  return float(rng.choice(_INTERESTING_FLOATS)) if rng.random() < 0.8 else float(
      rng.normal(0, 1e3))


def _encode(value, dtype: np.dtype) -> bytes:
  """A value in a little-endian field of `dtype`, wrapping or overflowing as a bad writer would."""
  with np.errstate(all='ignore'):
    if np.issubdtype(dtype, np.integer):
      wrapped = np.array([value & 0xFFFFFFFFFFFFFFFF], np.uint64)
      return wrapped.astype(dtype.newbyteorder('<')).tobytes()
    return np.array([value], np.float64).astype(dtype.newbyteorder('<')).tobytes()


# --- NIfTI -------------------------------------------------------------------------------

# (name, byte offset, dtype, count) of the header fields the readers interpret.
_NIFTI1_FIELDS = (
    ('sizeof_hdr', 0, 'i4', 1), ('dim', 40, 'i2', 8), ('intent_code', 68, 'i2', 1),
    ('datatype', 70, 'i2', 1), ('bitpix', 72, 'i2', 1), ('pixdim', 76, 'f4', 8),
    ('vox_offset', 108, 'f4', 1), ('scl_slope', 112, 'f4', 1), ('scl_inter', 116, 'f4', 1),
    ('qform_code', 252, 'i2', 1), ('sform_code', 254, 'i2', 1), ('quatern', 256, 'f4', 6),
    ('srow', 280, 'f4', 12))
_NIFTI2_FIELDS = (
    ('sizeof_hdr', 0, 'i4', 1), ('datatype', 12, 'i2', 1), ('bitpix', 14, 'i2', 1),
    ('dim', 16, 'i8', 8), ('pixdim', 104, 'f8', 8), ('vox_offset', 168, 'i8', 1),
    ('scl_slope', 176, 'f8', 1), ('scl_inter', 184, 'f8', 1), ('qform_code', 344, 'i4', 1),
    ('sform_code', 348, 'i4', 1), ('quatern', 352, 'f8', 6), ('srow', 400, 'f8', 12),
    ('intent_code', 504, 'i4', 1))


def _nifti_fields(payload: bytes) -> tuple:
  return _NIFTI2_FIELDS if payload[:4] == _encode(540, np.dtype('i4')) else _NIFTI1_FIELDS


def set_nifti_field(payload: bytes, name: str, values, first_index: int = 0) -> bytes:
  """Writes `values` into header field `name` (e.g. 'dim', 'scl_slope') of a little-endian
  NIfTI-1 or NIfTI-2 payload from element `first_index` on, as a broken exporter would."""
  fields = {field[0]: field[1:] for field in _nifti_fields(payload)}
  offset, dtype, count = fields[name]
  dtype = np.dtype(dtype)
  values = [values] if np.isscalar(values) else list(values)
  if first_index + len(values) > count:
    raise ValueError(f'NIfTI field {name} holds {count} values')
  encoded = b''.join(_encode(value, dtype) for value in values)
  start = offset + first_index * dtype.itemsize
  return payload[:start] + encoded + payload[start + len(encoded):]


def corrupt_nifti_header(payload: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Writes an odd value into one header field, or claims a huge volume in `dim`."""
  fields = _nifti_fields(payload)
  name, _, dtype, count = fields[int(rng.integers(0, len(fields)))]
  if name == 'dim' and rng.random() < 0.4:
    # A volume of 10^9 to 10^13 voxels in a file of a few hundred bytes.
    extent = int(rng.choice([1000, 10000, 32767]))
    return (set_nifti_field(payload, 'dim', [3, extent, extent, extent, 1, 1, 1, 1]),
            f'dim claims {extent}^3 voxels')
  index = int(rng.integers(0, count))
  value = _interesting_value(np.dtype(dtype), rng)
  return set_nifti_field(payload, name, [value], index), f'{name}[{index}] = {value!r}'


def mutate_nifti(payload: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  if rng.random() < 0.4:
    return corrupt_nifti_header(payload, rng)
  return mutate_bytes(payload, rng)


def mutate_nifti_gz(payload: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Half the cases damage the compressed stream, half the payload before compressing it."""
  if rng.random() < 0.5:
    mutated, description = mutate_nifti(payload, rng)
    return gzip.compress(mutated, mtime=0), f'payload: {description}'
  mutated, description = mutate_bytes(gzip.compress(payload, mtime=0), rng)
  return mutated, f'compressed: {description}'


# --- NRRD --------------------------------------------------------------------------------

_NRRD_FIELD_VALUES = {
    'sizes': ('100000 100000 100000', '0 7 5', '-6 7 5', '6 7', '6 7 5 1', '6 7 5 3', 'a b c',
              '99999999999999999999 2 2', '4294967296 4294967296 2'),
    'dimension': ('0', '1', '2', '4', '17', '-1', 'three'),
    'type': ('block', 'double', 'int64', 'uchar', 'float16', 'signed char', 'foo'),
    'encoding': ('raw', 'gzip', 'bzip2', 'ascii', 'hex', 'zstd'),
    'endian': ('big', 'little', 'middle'),
    'space': ('scanner-xyz', 'right-anterior-superior', '3D-right-handed',
              'left-posterior-superior', 'nonsense'),
    'space directions': ('none (1,0,0) (0,1,0)', '(0,0,0) (0,1,0) (0,0,1)',
                         '(nan,0,0) (0,1,0) (0,0,1)', '(1,0) (0,1) (0,0)',
                         '(1e308,0,0) (0,1,0) (0,0,1)', '(100,0,0) (0,100,0) (0,0,100)',
                         '(1,0,0) (1,0,0) (0,0,1)', 'garbage'),
    'space origin': ('(nan,0,0)', '(1,2)', '(inf,inf,inf)', 'origin'),
    'space dimension': ('2', '4', '0'),
    'kinds': ('vector domain domain', 'domain domain domain domain', 'RGB-color domain domain'),
    'line skip': ('1000000000', '-5', '3'),
    'byte skip': ('-1', '-7', '999999999', '17'),
    'data file': ('missing.raw', '/dev/zero', '.', 'case.nrrd'),
}


def corrupt_nrrd_header(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Deletes, repeats, garbles or rewrites one header line, or adds a field with an odd value."""
  end = data.find(b'\n\n')
  if end < 0:
    return mutate_bytes(data, rng)
  lines, rest = data[:end].split(b'\n'), data[end:]
  line_index = int(rng.integers(1, len(lines)))  # line 0 is the magic; damaged by byte mutations
  choice = int(rng.integers(0, 4))
  if choice == 0:
    description = f'delete header line {lines[line_index]!r}'
    del lines[line_index]
  elif choice == 1:
    description = f'repeat header line {lines[line_index]!r}'
    lines.insert(line_index, lines[line_index])
  elif choice == 2:
    garbled, _ = overwrite_range(lines[line_index], rng)
    description = f'garble header line {lines[line_index]!r}'
    lines[line_index] = garbled.replace(b'\n', b'?')
  else:
    field = sorted(_NRRD_FIELD_VALUES)[int(rng.integers(0, len(_NRRD_FIELD_VALUES)))]
    value = _NRRD_FIELD_VALUES[field][int(rng.integers(0, len(_NRRD_FIELD_VALUES[field])))]
    return set_nrrd_field(data, field, value), f'set {field}: {value}'
  return b'\n'.join(lines) + rest, description


def set_nrrd_field(data: bytes, field: str, value: str) -> bytes:
  """Replaces the header line of `field` (or adds one after the magic line) with `value`."""
  end = data.find(b'\n\n')
  lines, rest = data[:end].split(b'\n'), data[end:]
  new_line = f'{field}: {value}'.encode()
  existing = [i for i, line in enumerate(lines) if line.startswith(field.encode() + b':')]
  if existing:
    lines[existing[0]] = new_line
  else:
    lines.insert(1, new_line)
  return b'\n'.join(lines) + rest


def mutate_nrrd(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Header lines, raw bytes, or (gzip encoding) the payload before or after compression."""
  header_end = data.find(b'\n\n') + 2
  header, body = data[:header_end], data[header_end:]
  gzip_encoded = b'encoding: gzip' in header
  draw = rng.random()
  if draw < 0.45:
    return corrupt_nrrd_header(data, rng)
  if gzip_encoded and draw < 0.7:
    if rng.random() < 0.5:
      mutated, description = mutate_bytes(gzip.decompress(body), rng)
      return header + gzip.compress(mutated, mtime=0), f'payload: {description}'
    mutated, description = mutate_bytes(body, rng)
    return header + mutated, f'compressed payload: {description}'
  return mutate_bytes(data, rng)


# --- DICOM -------------------------------------------------------------------------------

# (group, element) -> (keyword, VR) of the elements the reader interprets.
_DICOM_ELEMENTS = {
    (0x0002, 0x0001): ('FileMetaInformationVersion', 'OB'),
    (0x0002, 0x0010): ('TransferSyntaxUID', 'UI'), (0x0020, 0x000E): ('SeriesInstanceUID', 'UI'),
    (0x0020, 0x0032): ('ImagePositionPatient', 'DS'),
    (0x0020, 0x0037): ('ImageOrientationPatient', 'DS'),
    (0x0028, 0x0002): ('SamplesPerPixel', 'US'),
    (0x0028, 0x0004): ('PhotometricInterpretation', 'CS'),
    (0x0028, 0x0008): ('NumberOfFrames', 'IS'), (0x0028, 0x0010): ('Rows', 'US'),
    (0x0028, 0x0011): ('Columns', 'US'), (0x0028, 0x0030): ('PixelSpacing', 'DS'),
    (0x0028, 0x0100): ('BitsAllocated', 'US'), (0x0028, 0x0101): ('BitsStored', 'US'),
    (0x0028, 0x0102): ('HighBit', 'US'), (0x0028, 0x0103): ('PixelRepresentation', 'US'),
    (0x0028, 0x1052): ('RescaleIntercept', 'DS'), (0x0028, 0x1053): ('RescaleSlope', 'DS'),
    (0x7FE0, 0x0010): ('PixelData', 'OW'),
}
_LONG_LENGTH_VRS = (b'OB', b'OW', b'OF', b'SQ', b'UN', b'UT', b'UC', b'UR', b'OD', b'OL', b'OV')
_TRANSFER_SYNTAXES = (b'1.2.840.10008.1.2', b'1.2.840.10008.1.2.2', b'1.2.840.10008.1.2.4.50',
                      b'1.2.840.10008.1.2.5', b'1.2.840.10008.1.2.1.99', b'1.2.3')
_PHOTOMETRIC = (b'RGB', b'YBR_FULL', b'PALETTE COLOR', b'MONOCHROME1', b'')


def _find_element(data: bytes, keyword: str) -> tuple[int, int, int, int] | None:
  """(tag offset, length field offset, length field size, value length) in explicit VR LE."""
  tag = next(tag for tag, (name, _) in _DICOM_ELEMENTS.items() if name == keyword)
  position = data.find(np.array(tag, '<u2').tobytes())
  if position < 0 or position + 8 > len(data):
    return None
  vr = data[position + 4:position + 6]
  if vr in _LONG_LENGTH_VRS:
    length_offset, length_size = position + 8, 4
  else:
    length_offset, length_size = position + 6, 2
  length = int.from_bytes(data[length_offset:length_offset + length_size], 'little')
  return position, length_offset, length_size, length


def set_dicom_element(data: bytes, keyword: str, value: bytes) -> bytes:
  """Replaces the value of element `keyword` (e.g. 'PixelSpacing', b'abc') in an explicit VR
  little-endian file, with a matching length field: the file stays parseable."""
  _, length_offset, length_size, length = _find_element(data, keyword)
  if len(value) % 2:
    value += b' '  # DICOM values have even lengths
  value_start = length_offset + length_size
  new_length = len(value).to_bytes(length_size, 'little')
  return data[:length_offset] + new_length + value + data[value_start + length:]


def set_dicom_length(data: bytes, keyword: str, length: int) -> bytes:
  """Overwrites the length field of element `keyword`, leaving its value: the file is damaged."""
  _, length_offset, length_size, _ = _find_element(data, keyword)
  length &= (1 << (8 * length_size)) - 1
  return (data[:length_offset] + length.to_bytes(length_size, 'little')
          + data[length_offset + length_size:])


def corrupt_dicom_element(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
  """Gives one interpreted element an odd value, or a length that does not match its value."""
  keyword, vr = list(_DICOM_ELEMENTS.values())[int(rng.integers(0, len(_DICOM_ELEMENTS)))]
  if _find_element(data, keyword) is None:
    return mutate_bytes(data, rng)
  if rng.random() < 0.2:
    length = int(rng.choice([0, 1, 3, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFF0, rng.integers(0, 4096)]))
    return set_dicom_length(data, keyword, length), f'{keyword} length field = {length}'
  if vr == 'US':
    value = _encode(int(rng.choice(_INTERESTING_INTEGERS)), np.dtype('u2'))
  elif keyword == 'TransferSyntaxUID':
    value = _TRANSFER_SYNTAXES[int(rng.integers(0, len(_TRANSFER_SYNTAXES)))]
  elif keyword == 'PhotometricInterpretation':
    value = _PHOTOMETRIC[int(rng.integers(0, len(_PHOTOMETRIC)))]
  elif keyword == 'PixelData':
    value = rng.bytes(int(rng.choice([0, 2, 40, 84, 168, 1000])))
  else:
    value = _INTERESTING_TEXT[int(rng.integers(0, len(_INTERESTING_TEXT)))]
  return set_dicom_element(data, keyword, value), f'{keyword} = {value[:24]!r}'


def mutate_dicom_series(slices: dict, rng: np.random.Generator) -> tuple[dict, str]:
  """Damages one slice (bytes or an element), the same element in every slice, or the series
  (a slice removed, duplicated or left alone, a stray file added)."""
  slices = dict(slices)
  names = sorted(slices)
  victim = names[int(rng.integers(0, len(names)))]
  draw = rng.random()
  if draw < 0.35:
    slices[victim], description = mutate_bytes(slices[victim], rng)
    return slices, f'{victim}: {description}'
  if draw < 0.6:
    slices[victim], description = corrupt_dicom_element(slices[victim], rng)
    return slices, f'{victim}: {description}'
  if draw < 0.8:
    state = rng.bit_generator.state
    for name in names:  # the same damage in every slice keeps the series together
      rng.bit_generator.state = state
      slices[name], description = corrupt_dicom_element(slices[name], rng)
    return slices, f'every slice: {description}'
  structural = int(rng.integers(0, 4))
  if structural == 0:
    del slices[victim]
    return slices, f'remove {victim}'
  if structural == 1:
    slices['copy_of_' + victim] = slices[victim]
    return slices, f'duplicate {victim}'
  if structural == 2:
    return {victim: slices[victim]}, f'keep only {victim}'
  slices['stray.dcm'], description = random_bytes(slices[victim], rng)
  return slices, f'add stray.dcm of {description}'


# --- Seeds -------------------------------------------------------------------------------

def seed_array(dtype) -> np.ndarray:
  values = (np.arange(math.prod(SEED_SHAPE)) * 37 % 211 - 100).reshape(SEED_SHAPE)
  return values.astype(dtype)


def _seed_affine(spacing=(0.8, 0.9, 2.5), flips=(1.0, 1.0, 1.0), degrees=0.0) -> np.ndarray:
  angle = np.radians(degrees)
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                       [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag(np.asarray(flips) * np.asarray(spacing))
  affine[:3, 3] = (10.0, -20.0, 30.0)
  return affine


def nifti_seeds() -> dict[str, bytes]:
  """Valid single-file NIfTI payloads: scaled int16, float32, uint8 labels, 4D singleton,
  NIfTI-2."""
  import nibabel as nib

  def payload(image_class, array, affine, slope_inter=None):
    image = image_class(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if slope_inter:
      image.header.set_slope_inter(*slope_inter)
    return image.to_bytes()

  labels = np.abs(seed_array(np.int16)) % 3
  return {
      'int16_scaled_oblique': payload(nib.Nifti1Image, seed_array(np.int16),
                                      _seed_affine(degrees=20.0), (2.0, -1024.0)),
      'float32_lps': payload(nib.Nifti1Image, seed_array(np.float32) * 0.5,
                             _seed_affine(flips=(-1.0, -1.0, 1.0))),
      'uint8_label': payload(nib.Nifti1Image, labels.astype(np.uint8), _seed_affine()),
      'int16_4d_singleton': payload(nib.Nifti1Image, seed_array(np.int16)[..., None],
                                    _seed_affine()),
      'nifti2_int16': payload(nib.Nifti2Image, seed_array(np.int16), _seed_affine(degrees=-10.0)),
  }


def nrrd_seeds() -> dict[str, bytes]:
  """Valid attached NRRD files: raw int16 (LPS), gzip float32 (RAS), gzip with a channel axis."""
  import nrrd

  def file_bytes(array, space, directions, encoding):
    header = {'space': space, 'space directions': directions, 'space origin': np.ones(3),
              'encoding': encoding}
    if array.ndim == 4:
      header['kinds'] = ['vector', 'domain', 'domain', 'domain']
    with tempfile.TemporaryDirectory() as folder:
      path = os.path.join(folder, 'seed.nrrd')
      nrrd.write(path, array, header, index_order='F')
      return pathlib.Path(path).read_bytes()

  directions = _seed_affine(degrees=15.0)[:3, :3].T
  channel_directions = np.vstack([np.full(3, np.nan), directions])
  return {
      'raw_int16_lps': file_bytes(seed_array(np.int16), 'left-posterior-superior', directions,
                                  'raw'),
      'gzip_float32_ras': file_bytes(seed_array(np.float32), 'right-anterior-superior',
                                     directions, 'gzip'),
      'gzip_int16_channel': file_bytes(seed_array(np.int16)[None], 'left-posterior-superior',
                                       channel_directions, 'gzip'),
  }


def dicom_seed() -> dict[str, bytes]:
  """A valid 4-slice CT series of 6x7 pixels (file name -> bytes), as a scanner writes it."""
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

  array = seed_array(np.int16)[:, :, :4] + 1024  # (column, row, slice), stored as uint16
  series_uid = '1.2.826.0.1.3680043.8.498.1'
  slices = {}
  for k in range(array.shape[2]):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f'{series_uid}.{k + 1}'
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(f'slice_{k}.dcm', {}, file_meta=meta, preamble=b'\0' * 128)
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = 'CT'
    dataset.ImagePositionPatient = [-10.0, 20.0, 30.0 + 2.5 * k]
    dataset.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    dataset.PixelSpacing = [0.9, 0.8]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = 'MONOCHROME2'
    dataset.NumberOfFrames = 1
    dataset.Rows, dataset.Columns = array.shape[1], array.shape[0]
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = np.ascontiguousarray(array[:, :, k].T).astype(np.uint16).tobytes()
    buffer = bytes_io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    slices[f'slice_{k}.dcm'] = buffer.getvalue()
  return slices


def build_seeds(format_name: str) -> dict:
  """Seed name -> valid payload (NIfTI payloads are uncompressed; nifti_gz compresses them)."""
  if format_name in ('nifti', 'nifti_gz'):
    return nifti_seeds()
  if format_name == 'nrrd':
    return nrrd_seeds()
  if format_name == 'dicom':
    return {'ct_series': dicom_seed()}
  raise ValueError(f'unknown format {format_name!r}; choose one of {FORMATS}')


def case_rng(format_name: str, case_index: int, seed: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), FORMATS.index(format_name), int(case_index)])


def make_case(format_name: str, case_index: int, seed: int, seeds: dict | None = None) -> FuzzCase:
  """The damaged input number `case_index` of a format; the same arguments give the same bytes."""
  seeds = build_seeds(format_name) if seeds is None else seeds
  rng = case_rng(format_name, case_index, seed)
  seed_name = sorted(seeds)[int(rng.integers(0, len(seeds)))]
  if format_name == 'dicom':
    slices, description = mutate_dicom_series(seeds[seed_name], rng)
    files = {f'{DICOM_FOLDER}/{name}': data for name, data in slices.items()}
    return FuzzCase(files, DICOM_FOLDER, f'{seed_name}: {description}')
  mutate = {'nifti': mutate_nifti, 'nifti_gz': mutate_nifti_gz, 'nrrd': mutate_nrrd}[format_name]
  data, description = mutate(seeds[seed_name], rng)
  name = FILE_NAMES[format_name]
  return FuzzCase({name: data}, name, f'{seed_name}: {description}')


# --- Judging one read --------------------------------------------------------------------

def volume_problems(volume) -> list[str]:
  """What makes an accepted Volume unusable: not 3D, non-finite voxels or geometry, bad spacing."""
  from dualseg_jax.data import volume as volume_lib

  if not isinstance(volume, volume_lib.Volume):
    return [f'returned {type(volume).__name__}, not a Volume']
  array, problems = volume.array, []
  if not isinstance(array, np.ndarray) or array.dtype.kind not in 'buif':
    return [f'array is {type(array).__name__} of {getattr(array, "dtype", None)}, not numeric']
  if array.ndim != 3 or min(array.shape) < 1:
    problems.append(f'array shape {array.shape} is not a 3D volume')
  if array.dtype.kind == 'f' and not np.all(np.isfinite(array)):
    problems.append('non-finite voxels')
  spacing = np.asarray(volume.spacing_mm, dtype=np.float64)
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    problems.append(f'spacing {volume.spacing_mm} is not three positive finite values')
  if not np.all(np.isfinite(volume.geometry.affine)):
    problems.append('non-finite affine')
  if math.prod(volume.geometry.shape) != array.size:
    problems.append(f'geometry shape {volume.geometry.shape} does not match array {array.shape}')
  return problems


def run_case(format_name: str, case_index: int, seed: int, workdir: str | os.PathLike,
             seeds: dict | None = None, time_limit_s: float = CASE_TIME_LIMIT_S,
             reader: Callable | None = None) -> dict:
  """Writes one case under `workdir`, reads it with `reader` (io.read_volume), judges the outcome.

  Returns {'case', 'description', 'outcome', 'unclear', 'detail', 'seconds'}: `outcome` is
  'accepted', 'DataError' or the type of anything else raised; `unclear` says why the outcome is
  not allowed ('' when it is).
  """
  from dualseg_jax.data import io
  from dualseg_jax.errors import DataError

  reader = io.read_volume if reader is None else reader
  case = make_case(format_name, case_index, seed, seeds)
  case_folder = pathlib.Path(workdir) / f'{format_name}_{case_index}'
  shutil.rmtree(case_folder, ignore_errors=True)
  for relative_path, data in case.files.items():
    (case_folder / relative_path).parent.mkdir(parents=True, exist_ok=True)
    (case_folder / relative_path).write_bytes(data)
  read_path = case_folder / case.read_path
  detail, unclear = '', ''
  started = time.perf_counter()
  try:
    volume = reader(read_path)
    outcome = ACCEPTED
    problems = volume_problems(volume)
    if problems:
      unclear = 'accepted an unusable volume: ' + '; '.join(problems)
  except DataError as error:
    outcome, detail = DATA_ERROR, str(error)
    if str(read_path) not in detail:
      unclear = 'the DataError does not name the file'
  except Exception as error:  # noqa: BLE001 - anything else is exactly what is being hunted
    outcome, detail = type(error).__name__, str(error)
    unclear = f'raised {type(error).__module__}.{type(error).__name__}'
  seconds = time.perf_counter() - started
  if seconds > time_limit_s and not unclear:
    unclear = f'took {seconds:.1f} s (limit {time_limit_s} s)'
  shutil.rmtree(case_folder, ignore_errors=True)
  return {'case': case_index, 'description': case.description, 'outcome': outcome,
          'unclear': unclear, 'detail': detail[:300], 'seconds': seconds}


# --- Running many cases in a watched child process ---------------------------------------

def _limit_memory(limit_bytes: int | None) -> None:
  if not limit_bytes:
    return
  try:
    import resource
  except ImportError:  # not POSIX: run without the limit
    return
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  if hard == resource.RLIM_INFINITY or hard > limit_bytes:
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


def _worker(connection, format_name: str, case_indices: list[int], seed: int,
            memory_limit_bytes: int | None, time_limit_s: float, reader: Callable | None) -> None:
  _limit_memory(memory_limit_bytes)
  # Damaged headers make nibabel and pydicom warn on almost every case; outcomes are what count.
  logging.disable(logging.CRITICAL)
  warnings.simplefilter('ignore')
  seeds = build_seeds(format_name)
  workdir = tempfile.mkdtemp(prefix=f'fuzz_{format_name}_')
  try:
    for case_index in case_indices:
      connection.send(('start', case_index))
      connection.send(('done', run_case(format_name, case_index, seed, workdir, seeds,
                                        time_limit_s, reader)))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  connection.send(('finished', None))


def _run_watched(format_name: str, case_indices: list[int], seed: int,
                 memory_limit_bytes: int | None, time_limit_s: float, reader: Callable | None):
  """Yields one result per case; a case that hangs or kills the interpreter becomes a result
  too, and the cases after it are read in a fresh child process."""
  context = multiprocessing.get_context('spawn')  # no fork: the parent may hold JAX threads
  remaining = list(case_indices)
  while remaining:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker, args=(sender, format_name, remaining, seed, memory_limit_bytes,
                              time_limit_s, reader), daemon=True)
    process.start()
    sender.close()
    num_done, started, failure = 0, False, None
    while failure is None:
      # Start-up (imports, seeds) may take a while; a case gets a few times its time limit.
      wait_s = 3 * time_limit_s if started else 120.0
      if not receiver.poll(wait_s):
        process.kill()
        failure = f'no result within {wait_s:.0f} s: killed (a hang)'
        break
      try:
        kind, payload = receiver.recv()
      except EOFError:
        process.join()
        failure = f'the interpreter died (exit code {process.exitcode})'
        break
      if kind == 'start':
        started = True
      elif kind == 'done':
        num_done += 1
        started = False
        yield payload
      else:
        break
    process.join()
    receiver.close()
    if failure is None:
      return
    # The case in flight (or the next one, if it died between cases) is the culprit.
    culprit, remaining = remaining[num_done], remaining[num_done + 1:]
    yield {'case': culprit, 'description': make_case(format_name, culprit, seed).description,
           'outcome': 'crash or hang', 'unclear': failure, 'detail': '', 'seconds': float('nan')}


def fuzz_readers(num_cases_per_format, seed: int = 0, formats=FORMATS,
                 memory_limit_bytes: int | None = MEMORY_LIMIT_BYTES,
                 time_limit_s: float = CASE_TIME_LIMIT_S, reader: Callable | None = None) -> dict:
  """Reads `num_cases_per_format` damaged inputs of each format (an int, or format -> int).

  `reader` (default io.read_volume) must be a module-level function: it is sent to the child.

  Returns {'seed', 'formats': {format: {'tried', 'data_errors', 'accepted', 'unclear',
  'outcomes' (outcome -> count), 'failures' (the first unclear results), 'slowest_s'}},
  'unclear'}: `unclear` counts every outcome that is neither a sane Volume nor a DataError
  naming the file, within `time_limit_s` per case.
  """
  report = {'seed': int(seed), 'formats': {}, 'unclear': 0}
  for format_name in formats:
    if format_name not in FORMATS:
      raise ValueError(f'unknown format {format_name!r}; choose among {FORMATS}')
    count = (num_cases_per_format[format_name] if isinstance(num_cases_per_format, dict)
             else num_cases_per_format)
    outcomes, failures, slowest_s = collections.Counter(), [], 0.0
    for result in _run_watched(format_name, list(range(int(count))), seed, memory_limit_bytes,
                               time_limit_s, reader):
      outcomes[result['outcome']] += 1
      if result['unclear']:
        outcomes['unclear'] += 1
        if len(failures) < _FAILURES_KEPT:
          failures.append(result)
      if not math.isnan(result['seconds']):
        slowest_s = max(slowest_s, result['seconds'])
    report['formats'][format_name] = {
        'tried': int(count), 'data_errors': outcomes.pop(DATA_ERROR, 0),
        'accepted': outcomes.pop(ACCEPTED, 0), 'unclear': outcomes.pop('unclear', 0),
        'outcomes': dict(outcomes), 'failures': failures, 'slowest_s': slowest_s}
    report['unclear'] += report['formats'][format_name]['unclear']
  return report


def format_report(report: dict) -> str:
  """One line per format, then one line per unclear failure (case number, input, outcome)."""
  lines = [f'seed {report["seed"]}']
  for format_name, found in report['formats'].items():
    others = ', '.join(f'{name} {count}' for name, count in sorted(found['outcomes'].items()))
    lines.append(
        f'{format_name:9s} tried {found["tried"]:6d}  DataError {found["data_errors"]:6d}  '
        f'accepted {found["accepted"]:6d}  unclear {found["unclear"]:4d}'
        + (f'  (other outcomes: {others})' if others else '')
        + f'  slowest case {found["slowest_s"] * 1e3:.0f} ms')
    for failure in found['failures']:
      detail = re.sub(r'\s+', ' ', failure['detail'])[:160]
      lines.append(f'  {format_name} case {failure["case"]} [{failure["description"]}]: '
                   f'{failure["unclear"]}' + (f' -- {detail}' if detail else ''))
  lines.append(f'unclear outcomes in total: {report["unclear"]}')
  return '\n'.join(lines)
