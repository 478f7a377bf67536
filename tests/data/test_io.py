"""Volume readers and writers: orientation and geometry round trips, real CT, every bad input."""

import os

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dualseg_jax.data import io
from dualseg_jax.errors import ConfigError, DataError

SOURCE_SHAPE = (6, 7, 8)  # (i, j, k) as stored
MARKER_INDEX = (1, 5, 2)
MARKER_VALUE = 1000


def _rotation(degrees_xyz):
  """Rotation matrix from angles about x, then y, then z (right-handed)."""
  ax, ay, az = np.radians(degrees_xyz)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _affine(directions, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)):
  affine = np.eye(4)
  affine[:3, :3] = np.asarray(directions, float) @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


AFFINES = {
    'ras': _affine(np.eye(3)),
    'lps': _affine(np.diag([-1.0, -1.0, 1.0])),
    # Rotated 10-20 degrees about every axis and with axes permuted (a sagittal-ish acquisition).
    'oblique': _affine(
        _rotation((12.0, -17.0, 20.0)) @ np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])),
}


def _source_array(dtype=np.int16):
  array = (np.arange(np.prod(SOURCE_SHAPE)) % 97).reshape(SOURCE_SHAPE).astype(dtype)
  array[MARKER_INDEX] = MARKER_VALUE
  return array


def _expected_canonical_index(affine, source_index, shape):
  """Independent of nibabel: each source axis goes to the world axis it points along most,
  flipped when it points backwards; canonical order is (z, y, x) = world axes (2, 1, 0)."""
  canonical = [None, None, None]
  for axis in range(3):
    column = affine[:3, axis]
    world_axis = int(np.argmax(np.abs(column)))
    assert np.sort(np.abs(column / np.linalg.norm(column)))[-2] < 0.9  # unambiguous
    position = source_index[axis]
    if column[world_axis] < 0:
      position = shape[axis] - 1 - position
    canonical[2 - world_axis] = position
  return tuple(canonical)


def _save_nifti(path, array, affine):
  image = nib.Nifti1Image(array, affine)
  image.set_sform(affine, code=1)
  image.set_qform(affine, code=1)
  nib.save(image, path)
  return str(path)


@pytest.mark.parametrize('name', sorted(AFFINES))
def test_round_trip_keeps_geometry_and_orients_canonically(tmp_path, name):
  affine = AFFINES[name]
  source = _save_nifti(tmp_path / 'source.nii.gz', _source_array(), affine)
  volume = io.read_volume(source)

  assert volume.geometry.shape == SOURCE_SHAPE
  np.testing.assert_allclose(volume.geometry.affine, affine, atol=1e-5)
  expected_index = _expected_canonical_index(affine, MARKER_INDEX, SOURCE_SHAPE)
  assert volume.array[expected_index] == MARKER_VALUE
  assert np.count_nonzero(volume.array == MARKER_VALUE) == 1
  # The canonical affine puts the marker at the world point the source affine gives.
  world = affine @ np.array([*MARKER_INDEX, 1.0])
  np.testing.assert_allclose(volume.canonical_affine @ np.array([*expected_index, 1.0]), world,
                             atol=1e-4)
  canonical_spacing = [np.linalg.norm(affine[:3, 2 - a]) for a in range(3)]
  if name != 'oblique':
    np.testing.assert_allclose(volume.spacing_mm, canonical_spacing, atol=1e-6)

  first = io.write_volume(volume, tmp_path / 'nested' / 'again' / 'first.nii.gz')
  reread = io.read_volume(first)
  second = io.write_volume(reread, tmp_path / 'second.nii')
  final = io.read_volume(second)
  for result in (reread, final):
    assert result.geometry.shape == SOURCE_SHAPE
    assert result.array.dtype == np.int16
    np.testing.assert_allclose(result.geometry.affine, affine, atol=1e-5)
    np.testing.assert_allclose(result.spacing_mm, volume.spacing_mm, atol=1e-6)
    np.testing.assert_array_equal(result.array, volume.array)
  # On disk the data keep the source's own axis order.
  np.testing.assert_array_equal(np.asarray(nib.load(second).dataobj), _source_array())


def test_write_nifti_casts_and_writes_channels(tmp_path):
  volume = io.read_volume(_save_nifti(tmp_path / 'source.nii.gz', _source_array(), AFFINES['lps']))
  probabilities = np.stack([volume.array / 2000.0, 1 - volume.array / 2000.0], axis=-1)
  path = io.write_nifti(probabilities, volume.geometry, tmp_path / 'p.nii.gz', dtype=np.float32)
  written = nib.load(path)
  assert written.shape == SOURCE_SHAPE + (2,)
  np.testing.assert_allclose(
      np.asarray(written.dataobj)[..., 0], _source_array() / 2000.0, atol=1e-6)
  labels = io.write_nifti(volume.array > 500, volume.geometry, tmp_path / 'l.nii.gz')
  assert nib.load(labels).get_data_dtype() == np.uint8
  with pytest.raises(DataError, match='out.mha'):
    io.write_nifti(volume.array, volume.geometry, tmp_path / 'out.mha')
  assert not [p for p in os.listdir(tmp_path) if 'partial' in p]


def test_scaled_integers_stay_integers_and_fractional_scaling_gives_float(tmp_path):
  raw = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) + 10
  image = nib.Nifti1Image(raw, np.eye(4))
  image.header.set_slope_inter(2.0, -1024.0)
  nib.save(image, tmp_path / 'int.nii')
  volume = io.read_volume(tmp_path / 'int.nii')
  assert np.issubdtype(volume.array.dtype, np.signedinteger)
  np.testing.assert_array_equal(volume.array, (raw.astype(np.int64) * 2 - 1024).transpose(2, 1, 0))
  image.header.set_slope_inter(0.5, 0.25)
  nib.save(image, tmp_path / 'float.nii')
  volume = io.read_volume(tmp_path / 'float.nii')
  assert volume.array.dtype == np.float32
  np.testing.assert_allclose(volume.array, (raw * 0.5 + 0.25).transpose(2, 1, 0))


@pytest.mark.parametrize('space, name', [('left-posterior-superior', 'v.nrrd'),
                                         ('right-anterior-superior', 'v.nrrd'),
                                         ('left-posterior-superior', 'v.nhdr')])
def test_nrrd_matches_nifti_of_the_same_data(tmp_path, space, name):
  affine_ras = AFFINES['oblique']
  array = _source_array()
  flips = np.diag([-1.0, -1.0, 1.0, 1.0]) if space.startswith('left') else np.eye(4)
  affine_space = flips @ affine_ras
  header = {'space': space, 'space directions': affine_space[:3, :3].T,
            'space origin': affine_space[:3, 3]}
  nrrd.write(str(tmp_path / name), array, header, index_order='F',
             detached_header=name.endswith('.nhdr'))
  from_nrrd = io.read_volume(tmp_path / name)
  from_nifti = io.read_volume(_save_nifti(tmp_path / 'v.nii.gz', array, affine_ras))

  np.testing.assert_allclose(from_nrrd.geometry.affine, affine_ras, atol=1e-9)
  np.testing.assert_array_equal(from_nrrd.array, from_nifti.array)
  def marker_world(volume):
    index = np.argwhere(volume.array == MARKER_VALUE)[0]
    return (volume.canonical_affine @ np.array([*index, 1.0]))[:3]
  world = affine_ras @ np.array([*MARKER_INDEX, 1.0])
  np.testing.assert_allclose(marker_world(from_nrrd), world[:3], atol=1e-9)
  np.testing.assert_allclose(marker_world(from_nrrd), marker_world(from_nifti), atol=1e-4)


def test_nrrd_singleton_channel_axis_is_dropped(tmp_path):
  array = _source_array()[None]
  directions = np.vstack([np.full(3, np.nan), np.diag([0.5, 0.6, 0.7])])
  header = {'space': 'left-posterior-superior', 'space directions': directions,
            'space origin': np.zeros(3), 'kinds': ['vector', 'domain', 'domain', 'domain']}
  nrrd.write(str(tmp_path / 'c.nrrd'), array, header, index_order='F')
  volume = io.read_volume(tmp_path / 'c.nrrd')
  assert volume.geometry.shape == SOURCE_SHAPE
  np.testing.assert_allclose(volume.geometry.affine[:3, :3], np.diag([-0.5, -0.6, 0.7]))


# --- DICOM ---------------------------------------------------------------------------------------

def _write_dicom_series(folder, array_ijk, affine_lps, series_uid, slope=1.0, intercept=-1024.0,
                        names=None):
  """One CT slice per k, pixel rows along j and columns along i, as a scanner would write it."""
  folder.mkdir(parents=True, exist_ok=True)
  row_direction = affine_lps[:3, 0] / np.linalg.norm(affine_lps[:3, 0])
  column_direction = affine_lps[:3, 1] / np.linalg.norm(affine_lps[:3, 1])
  for k in range(array_ijk.shape[2]):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / (names[k] if names else f'slice_{k:03d}.dcm')
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b'\0' * 128)
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = 'CT'
    dataset.Rows, dataset.Columns = array_ijk.shape[1], array_ijk.shape[0]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = 'MONOCHROME2'
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    dataset.ImageOrientationPatient = [float(v) for v in (*row_direction, *column_direction)]
    dataset.ImagePositionPatient = [float(v) for v in affine_lps @ np.array([0, 0, k, 1.0])][:3]
    dataset.PixelSpacing = [float(np.linalg.norm(affine_lps[:3, 1])),
                            float(np.linalg.norm(affine_lps[:3, 0]))]
    dataset.SliceThickness = 9.0  # deliberately wrong: spacing must come from the positions
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    stored = np.round((array_ijk[:, :, k].T - intercept) / slope).astype(np.uint16)
    dataset.PixelData = stored.tobytes()
    dataset.save_as(path, enforce_file_format=True)


def test_dicom_series_matches_nifti_of_the_same_data(tmp_path):
  array = _source_array().astype(np.int32) - 500  # HU, some negative
  affine_ras = AFFINES['oblique'].copy()
  affine_ras[:3, 0], affine_ras[:3, 1] = (AFFINES['oblique'][:3, 1], AFFINES['oblique'][:3, 2])
  affine_ras[:3, 2] = AFFINES['oblique'][:3, 0]
  affine_ras[:3, :2] *= 0.7 / np.linalg.norm(affine_ras[:3, :2], axis=0)  # square pixels
  affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
  names = [f'im{(7 * k) % 8}.dcm' for k in range(array.shape[2])]  # file order != slice order
  _write_dicom_series(tmp_path / 'series', array, affine_lps, generate_uid(), names=names)
  _write_dicom_series(tmp_path / 'series' / 'scout', array[:, :, :2], affine_lps, generate_uid())
  (tmp_path / 'series' / 'README.txt').write_text('not dicom')

  from_dicom = io.read_volume(tmp_path / 'series')
  from_nifti = io.read_volume(_save_nifti(tmp_path / 'same.nii.gz', array, affine_ras))
  assert 'ignored the smaller series' in from_dicom.source
  np.testing.assert_allclose(from_dicom.geometry.affine, affine_ras, atol=1e-4)
  np.testing.assert_allclose(from_dicom.canonical_affine, from_nifti.canonical_affine, atol=1e-4)
  np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
  assert np.issubdtype(from_dicom.array.dtype, np.signedinteger)


def test_dicom_truncated_slice_names_the_slice(tmp_path):
  array = _source_array().astype(np.int32)
  _write_dicom_series(tmp_path / 's', array, np.diag([-0.7, -0.7, 2.0, 1.0]), generate_uid())
  victim = tmp_path / 's' / 'slice_003.dcm'
  victim.write_bytes(victim.read_bytes()[:-40])
  with pytest.raises(DataError, match='slice_003.dcm'):
    io.read_volume(tmp_path / 's')


# --- Real CT -------------------------------------------------------------------------------------

def test_real_ct_nifti_and_totalsegmentator_pancreas(real_ct_dir):
  image, label = io.read_case(real_ct_dir / 'example_ct.nii.gz',
                              real_ct_dir / 'example_seg_fast_force_split.nii.gz', '7:1')
  assert image.array.shape == (112, 101, 122)
  np.testing.assert_allclose(image.spacing_mm, (3.0, 3.0, 3.0))
  assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
  assert (image.array.min(), image.array.max()) == (-1207.0, 3382.0)
  assert int((label.array == 1).sum()) == 695
  assert set(np.unique(label.array)) == {0, 1}


def test_real_dicom_series_aligns_with_its_nifti_label(real_ct_dir):
  image, label = io.read_case(real_ct_dir / 'example_ct_dicom',
                              real_ct_dir / 'example_seg_dicom.nii.gz', {7: 1})
  assert image.array.shape == (20, 512, 512) == label.array.shape
  np.testing.assert_allclose(image.spacing_mm, (2.0, 0.9765625, 0.9765625), atol=1e-4)
  seg = io.read_volume(real_ct_dir / 'example_seg_dicom.nii.gz')
  np.testing.assert_allclose(image.canonical_affine, seg.canonical_affine, atol=1e-3)
  assert int((label.array == 1).sum()) == 1327
  assert -2048 <= image.array.min() <= -1000 and image.array.max() > 1000
  # Aligned, the labelled pancreas is soft tissue; flipped front to back it would not be.
  pancreas = label.array == 1
  assert 20 < np.median(image.array[pancreas]) < 150
  assert np.median(np.flip(image.array, axis=1)[pancreas]) < 0


# --- Bad inputs ----------------------------------------------------------------------------------

def _valid_file(tmp_path, name='good.nii.gz', shape=(24, 24, 24)):
  rng = np.random.default_rng(0)
  return _save_nifti(tmp_path / name, rng.integers(-1000, 1000, shape).astype(np.int16), np.eye(4))


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match='nowhere.nii.gz.*does not exist'):
    io.read_volume(tmp_path / 'nowhere.nii.gz')


@pytest.mark.parametrize('keep_fraction', [0.5, 0.9])
def test_truncated_nifti(tmp_path, keep_fraction):
  data = open(_valid_file(tmp_path), 'rb').read()
  (tmp_path / 'cut.nii.gz').write_bytes(data[:int(len(data) * keep_fraction)])
  with pytest.raises(DataError, match='cut.nii.gz is truncated or corrupt.*re-export'):
    io.read_volume(tmp_path / 'cut.nii.gz')


@pytest.mark.parametrize('name', ['noise.nii.gz', 'noise.nii', 'noise.nrrd'])
def test_random_bytes(tmp_path, name):
  (tmp_path / name).write_bytes(np.random.default_rng(1).bytes(3000))
  with pytest.raises(DataError, match=name.replace('.', r'\.')):
    io.read_volume(tmp_path / name)


def test_uncompressed_nifti_cut_short(tmp_path):
  data = open(_valid_file(tmp_path, 'good.nii'), 'rb').read()
  (tmp_path / 'short.nii').write_bytes(data[:len(data) - 100])
  with pytest.raises(DataError, match='short.nii is truncated'):
    io.read_volume(tmp_path / 'short.nii')


def test_unsupported_suffix(tmp_path):
  (tmp_path / 'scan.mnc').write_bytes(b'x')
  with pytest.raises(DataError, match='scan.mnc: unsupported'):
    io.read_volume(tmp_path / 'scan.mnc')


def test_shape_mismatch_names_both_files(tmp_path):
  image = _valid_file(tmp_path, 'image.nii.gz', (24, 24, 24))
  label = _save_nifti(tmp_path / 'label.nii.gz', np.zeros((24, 24, 20), np.uint8), np.eye(4))
  with pytest.raises(DataError, match=r'(?s)label\.nii\.gz.*\(24, 24, 20\).*image\.nii\.gz.*'
                     r'\(24, 24, 24\).*resample the label'):
    io.read_case(image, label)


def test_affine_mismatch_names_both_files(tmp_path):
  image = _valid_file(tmp_path, 'image.nii.gz', (24, 24, 24))
  shifted = np.eye(4)
  shifted[0, 3] = 0.5
  label = _save_nifti(tmp_path / 'label.nii.gz', np.zeros((24, 24, 24), np.uint8), shifted)
  with pytest.raises(DataError, match=r'(?s)case 7: label .*label\.nii\.gz.*image\.nii\.gz'):
    io.read_case(image, label, source_desc='case 7')


def test_same_grid_in_another_axis_order_is_accepted(tmp_path):
  image = _save_nifti(tmp_path / 'image.nii.gz', _source_array(), AFFINES['ras'])
  # The same voxels stored left-to-right reversed (LAS), as DICOM converters often write labels.
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, SOURCE_SHAPE[0] - 1
  labels = (_source_array() == MARKER_VALUE).astype(np.uint8)
  label = _save_nifti(tmp_path / 'label.nii.gz', labels[::-1], AFFINES['ras'] @ flip)
  image_volume, label_volume = io.read_case(image, label)
  np.testing.assert_array_equal(label_volume.array == 1, image_volume.array == MARKER_VALUE)


def test_label_values_and_maps(tmp_path):
  image = _valid_file(tmp_path, 'image.nii.gz', (8, 8, 8))
  values = np.zeros((8, 8, 8), np.uint8)
  values[1, 1, 1], values[2, 2, 2], values[3, 3, 3], values[4, 4, 4] = 5, 7, 8, 2
  label = _save_nifti(tmp_path / 'label.nii.gz', values, np.eye(4))
  with pytest.raises(DataError, match=r'label\.nii\.gz.*\[5, 7, 8\].*data\.label_map'):
    io.read_case(image, label)
  _, mapped = io.read_case(image, label, '7:1')
  assert mapped.array.dtype == np.uint8
  assert sorted(zip(*np.nonzero(mapped.array))) == [(2, 2, 2)]
  _, mapped = io.read_case(image, label, '7:1,8:2')
  assert mapped.array[3, 3, 3] == 2 and mapped.array[2, 2, 2] == 1 and mapped.array.sum() == 3
  _, mapped = io.read_case(image, label, {'8': 2, '5': 0})
  assert mapped.array.sum() == 2
  with pytest.raises(ConfigError, match='data.label_map'):
    io.read_case(image, label, '7:3')
  with pytest.raises(ConfigError, match='data.label_map'):
    io.parse_label_map('seven')


def test_fractional_label_values(tmp_path):
  image = _valid_file(tmp_path, 'image.nii.gz', (8, 8, 8))
  label = _save_nifti(tmp_path / 'soft.nii.gz', np.full((8, 8, 8), 0.5, np.float32), np.eye(4))
  with pytest.raises(DataError, match='soft.nii.gz has non-integer label'):
    io.read_case(image, label)


@pytest.mark.parametrize('what', ['image', 'label'])
def test_nan_voxels(tmp_path, what):
  array = np.zeros((8, 8, 8), np.float32)
  array[0, 0, :3] = np.nan
  array[1, 1, 1] = np.inf
  bad = _save_nifti(tmp_path / f'bad_{what}.nii.gz', array, np.eye(4))
  good = _valid_file(tmp_path, 'good.nii.gz', (8, 8, 8))
  image, label = (bad, good) if what == 'image' else (good, bad)
  with pytest.raises(DataError, match=f'bad_{what}.nii.gz has 4 NaN or infinite voxels'):
    io.read_case(image, label)


def test_two_dimensional_image(tmp_path):
  path = _save_nifti(tmp_path / 'flat.nii.gz', np.zeros((16, 16), np.int16), np.eye(4))
  with pytest.raises(DataError, match='flat.nii.gz is a 2D image'):
    io.read_volume(path)
  path = _save_nifti(tmp_path / 'slab.nii.gz', np.zeros((16, 16, 1), np.int16), np.eye(4))
  with pytest.raises(DataError, match='slab.nii.gz is a 2D image'):
    io.read_volume(path)


def test_multichannel_and_singleton_4d(tmp_path):
  path = _save_nifti(tmp_path / 'rgb.nii.gz', np.zeros((6, 6, 6, 3), np.int16), np.eye(4))
  with pytest.raises(DataError, match=r'rgb.nii.gz holds 3 volumes'):
    io.read_volume(path)
  array = _source_array()
  for extra in [(1,), (1, 1)]:
    path = _save_nifti(tmp_path / f'4d{len(extra)}.nii.gz', array.reshape(SOURCE_SHAPE + extra),
                       AFFINES['lps'])
    volume = io.read_volume(path)
    assert volume.geometry.shape == SOURCE_SHAPE
    np.testing.assert_array_equal(volume.array, io.read_volume(
        _save_nifti(tmp_path / '3d.nii.gz', array, AFFINES['lps'])).array)


def _save_with_raw_affine(path, array, affine=np.eye(4), pixdim=None):
  """Writes header fields byte by byte, as a broken exporter would; nibabel refuses to."""
  _save_nifti(path, array, np.eye(4))
  raw = bytearray(path.read_bytes())
  raw[252:256] = np.array([0, 1], np.int16).tobytes()  # qform_code 0, sform_code 1
  raw[280:328] = np.asarray(affine[:3], np.float32).tobytes()  # srow_x, srow_y, srow_z
  if pixdim is not None:
    raw[80:92] = np.asarray(pixdim, np.float32).tobytes()  # pixdim[1:4]
  path.write_bytes(bytes(raw))
  return path


@pytest.mark.parametrize('spacing', [(1.0, 0.0, 1.0), (1.0, 1.0, 80.0), (np.nan, 1.0, 1.0)])
def test_bad_affine_spacing(tmp_path, spacing):
  path = _save_with_raw_affine(tmp_path / 'spacing.nii', np.zeros((4, 4, 4), np.int16),
                               np.diag([*spacing, 1.0]))
  with pytest.raises(DataError, match='spacing.nii'):
    io.read_volume(path)


def test_negative_pixdim(tmp_path):
  path = _save_with_raw_affine(tmp_path / 'negative.nii', np.zeros((4, 4, 4), np.int16),
                               pixdim=(-2.0, 1.0, 1.0))
  with pytest.raises(DataError, match=r'negative.nii declares pixdim.*-2\.0'):
    io.read_volume(path)


def test_dicom_zero_pixel_spacing(tmp_path):
  array = _source_array().astype(np.int32)
  _write_dicom_series(tmp_path / 's', array, np.diag([-0.7, -0.7, 2.0, 1.0]), generate_uid())
  for path in (tmp_path / 's').iterdir():
    dataset = pydicom.dcmread(path)
    dataset.PixelSpacing = [0.0, 0.7]
    dataset.save_as(path)
  with pytest.raises(DataError, match='PixelSpacing'):
    io.read_volume(tmp_path / 's')
