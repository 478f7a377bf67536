"""The readers never fail in an unclear way: thousands of damaged NIfTI, NRRD and DICOM inputs end
in a sane Volume or a DataError naming the file; every bug the fuzzer found stays fixed."""

import gzip
import os
import pathlib
import time

import numpy as np
import pytest

from dualseg_jax.data import io
from dualseg_jax.errors import DataError
from dualseg_jax.tools import fuzz_readers as fuzz

# A few thousand cases in all; a DICOM case reads several files, so it gets fewer.
CASES_PER_FORMAT = {'nifti': 2500, 'nifti_gz': 2500, 'nrrd': 2500, 'dicom': 1200}


@pytest.mark.parametrize('format_name', fuzz.FORMATS)
def test_damaged_inputs_end_in_a_sane_volume_or_a_data_error(format_name):
  count = CASES_PER_FORMAT[format_name]
  report = fuzz.fuzz_readers({format_name: count}, seed=0, formats=(format_name,))
  summary = fuzz.format_report(report)
  print('\n' + summary)
  found = report['formats'][format_name]
  assert found['unclear'] == 0, summary
  assert found['tried'] == count
  num_outcomes = found['data_errors'] + found['accepted'] + sum(found['outcomes'].values())
  assert num_outcomes == count, summary
  # Neither every mutation fatal nor every one harmless: both outcomes are exercised.
  assert found['data_errors'] > 0.2 * count and found['accepted'] > 0.1 * count, summary


def test_cases_are_replayable_and_seeds_read_back_exactly(tmp_path):
  for format_name in fuzz.FORMATS:
    seeds = fuzz.build_seeds(format_name)
    first = fuzz.make_case(format_name, 7, seed=0, seeds=seeds)
    assert first == fuzz.make_case(format_name, 7, seed=0, seeds=seeds)
    assert first != fuzz.make_case(format_name, 8, seed=0, seeds=seeds)
  # The undamaged seeds hold the values they were made from (in whatever orientation).
  expected = fuzz.seed_array(np.float64)
  for name, payload in fuzz.nifti_seeds().items():
    path = tmp_path / f'{name}.nii.gz'
    path.write_bytes(gzip.compress(payload))
    values = expected * 2 - 1024 if name == 'int16_scaled_oblique' else expected
    values = np.abs(expected) % 3 if name == 'uint8_label' else values
    values = values * 0.5 if name == 'float32_lps' else values
    volume = io.read_volume(path)
    assert volume.array.shape == fuzz.SEED_SHAPE[::-1]
    np.testing.assert_array_equal(np.sort(volume.array.ravel()), np.sort(values.ravel()))
  for name, data in fuzz.nrrd_seeds().items():
    (tmp_path / f'{name}.nrrd').write_bytes(data)
    volume = io.read_volume(tmp_path / f'{name}.nrrd')
    np.testing.assert_array_equal(np.sort(volume.array.ravel()), np.sort(expected.ravel()))
  _write_series(tmp_path / 'series', fuzz.dicom_seed())
  volume = io.read_volume(tmp_path / 'series')
  assert volume.array.shape == (4, 7, 6)
  np.testing.assert_allclose(volume.spacing_mm, (2.5, 0.9, 0.8))
  np.testing.assert_array_equal(np.sort(volume.array.ravel()),
                                np.sort(expected[:, :, :4].ravel()))


def _write_series(folder, slices):
  folder.mkdir(parents=True, exist_ok=True)
  for name, data in slices.items():
    (folder / name).write_bytes(data)
  return folder


# --- The watchdog: hangs, crashes and huge allocations are reported, not fatal -----------

def _misbehaving_reader(path):
  """Case 1 kills the interpreter, case 3 hangs, case 4 allocates 16 GB; others are refused."""
  case_index = int(pathlib.Path(path).parent.name.rsplit('_', 1)[1])
  if case_index == 1:
    os._exit(3)
  if case_index == 3:
    time.sleep(600)
  if case_index == 4:
    return np.ones(2 ** 34, np.uint8)
  raise DataError(f'{path} is refused')


def test_watchdog_reports_crash_hang_and_memory_blowup():
  report = fuzz.fuzz_readers(6, seed=0, formats=('nifti',), time_limit_s=1.0,
                             reader=_misbehaving_reader)
  found = report['formats']['nifti']
  failures = {failure['case']: failure['unclear'] for failure in found['failures']}
  assert found['tried'] == 6 and found['data_errors'] == 3, fuzz.format_report(report)
  assert sorted(failures) == [1, 3, 4] and report['unclear'] == 3
  assert 'interpreter died (exit code 3)' in failures[1]
  assert 'a hang' in failures[3]
  assert 'MemoryError' in failures[4]


def test_slow_case_is_a_failure(tmp_path):
  result = fuzz.run_case('nrrd', 0, seed=0, workdir=tmp_path, time_limit_s=0.0)
  assert result['outcome'] in (fuzz.ACCEPTED, fuzz.DATA_ERROR)
  assert result['unclear'].startswith('took')
  assert not list(tmp_path.iterdir())  # each case cleans up after itself


# --- Each bug the fuzzer found, as a fixed input -----------------------------------------

def _nifti(tmp_path, payload, name, compress=False):
  path = tmp_path / name
  path.write_bytes(gzip.compress(payload) if compress else payload)
  return path


@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('extent', [1000, 32767])
def test_nifti_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path, compress, extent):
  payload = fuzz.set_nifti_field(fuzz.nifti_seeds()['float32_lps'], 'dim',
                                 [3, extent, extent, extent])
  path = _nifti(tmp_path, payload, 'huge.nii.gz' if compress else 'huge.nii', compress)
  with pytest.raises(DataError, match=rf'huge\.nii.*claims shape \({extent}, {extent}, {extent}\)'):
    io.read_volume(path)


def test_nifti_huge_integral_scale_gives_floats_not_overflow(tmp_path):
  seed = fuzz.nifti_seeds()['uint8_label']
  path = _nifti(tmp_path, fuzz.set_nifti_field(seed, 'scl_slope', 1e30), 'scaled.nii')
  volume = io.read_volume(path)
  labels = np.abs(fuzz.seed_array(np.float64)) % 3
  assert volume.array.dtype == np.float32
  np.testing.assert_allclose(np.sort(volume.array.ravel()), np.sort(labels.ravel()) * 1e30,
                             rtol=1e-6)
  # Beyond float32 the scaled voxels are infinite: refused, naming the file.
  seed = fuzz.nifti_seeds()['int16_scaled_oblique']
  path = _nifti(tmp_path, fuzz.set_nifti_field(seed, 'scl_slope', 3.4e38), 'overflow.nii')
  with pytest.raises(DataError, match=r'overflow\.nii has \d+ NaN or infinite voxels'):
    io.read_volume(path)


def test_apply_scaling_keeps_exact_integers_and_falls_back_to_float():
  raw = np.array([0, 1, 2], np.uint8)
  np.testing.assert_array_equal(io._apply_scaling(raw, 2.0, -1024.0), [-1024, -1022, -1020])
  assert io._apply_scaling(raw, 2.0, -1024.0).dtype == np.int16
  # A slope too large for the smallest integer type that holds the values.
  zeros = np.zeros(3, np.uint8)
  assert io._apply_scaling(zeros, 1e18, 0.0).dtype == np.int64
  assert io._apply_scaling(raw, 1e20, 0.0).dtype == np.float32


def test_nifti_infinite_vox_offset_is_a_data_error(tmp_path):
  seed = fuzz.nifti_seeds()['uint8_label']
  path = _nifti(tmp_path, fuzz.set_nifti_field(seed, 'vox_offset', float('-inf')), 'offset.nii')
  with pytest.raises(DataError, match=r'offset\.nii is truncated or corrupt'):
    io.read_volume(path)


@pytest.mark.parametrize('field, value, message', [
    ('data file', '/dev/zero', 'not a regular file'),
    ('data file', 'missing.raw', 'not a regular file'),
    ('line skip', '1000000000', 'skips 1000000000 lines'),
    ('space origin', '(1,2)', "'space origin'"),
    ('space directions', '(1,0,0) (0,1,0)', "'space directions'.*do not describe 3 axes"),
])
def test_nrrd_header_fields_that_hung_or_escaped(tmp_path, field, value, message):
  seed = fuzz.nrrd_seeds()['gzip_float32_ras']
  path = tmp_path / 'bad.nrrd'
  path.write_bytes(fuzz.set_nrrd_field(seed, field, value))
  with pytest.raises(DataError, match=rf'bad\.nrrd.*{message}'):
    io.read_volume(path)


def test_empty_nrrd_is_a_data_error(tmp_path):
  (tmp_path / 'empty.nrrd').write_bytes(b'')
  with pytest.raises(DataError, match=r'empty\.nrrd is truncated or corrupt'):
    io.read_volume(tmp_path / 'empty.nrrd')


@pytest.mark.parametrize('keyword, value, message', [
    ('PixelSpacing', b'abc', r'PixelSpacing \[.abc.\] is not 2 finite numbers'),
    ('PixelSpacing', b'1\\2\\3', 'PixelSpacing .* is not 2 finite numbers'),
    ('PixelSpacing', b'0.5', 'PixelSpacing .* is not 2 finite numbers'),
    ('ImageOrientationPatient', b'inf', 'ImageOrientationPatient .* is not 6 finite numbers'),
    ('ImagePositionPatient', b'1\\2', 'ImagePositionPatient .* is not 3 finite numbers'),
    ('RescaleSlope', b'1\\2', 'RescaleSlope .* is not 1 finite number'),
    ('RescaleIntercept', b'nan', 'RescaleIntercept .* is not 1 finite number'),
    ('NumberOfFrames', b'inf', 'pixel data cannot be decoded'),
])
@pytest.mark.filterwarnings('ignore:Invalid value for VR')
def test_dicom_bad_numbers_in_every_slice_name_the_slice(tmp_path, keyword, value, message):
  slices = {name: fuzz.set_dicom_element(data, keyword, value)
            for name, data in fuzz.dicom_seed().items()}
  folder = _write_series(tmp_path / 'series', slices)
  with pytest.raises(DataError, match=rf'series/slice_\d\.dcm.*{message}'):
    io.read_volume(folder)


def test_dicom_huge_integral_rescale_gives_floats(tmp_path):
  slices = {name: fuzz.set_dicom_element(data, 'RescaleSlope', b'99999999999999999999')
            for name, data in fuzz.dicom_seed().items()}
  volume = io.read_volume(_write_series(tmp_path / 'series', slices))
  assert volume.array.dtype == np.float32 and np.all(np.isfinite(volume.array))
  stored = fuzz.seed_array(np.float64)[:, :, :4] + 1024
  np.testing.assert_allclose(np.sort(volume.array.ravel()),
                             np.sort(stored.ravel()) * 1e20 - 1024, rtol=1e-6)


@pytest.mark.parametrize('keyword, length', [('BitsStored', 1), ('PixelRepresentation', 3)])
def test_dicom_length_field_damage_names_the_slice(tmp_path, keyword, length):
  slices = fuzz.dicom_seed()
  slices['slice_2.dcm'] = fuzz.set_dicom_length(slices['slice_2.dcm'], keyword, length)
  with pytest.raises(DataError, match=r'series/slice_2\.dcm.*BytesLengthException'):
    io.read_volume(_write_series(tmp_path / 'series', slices))


def test_dicom_length_field_of_gigabytes_is_a_data_error(tmp_path):
  # Where the 4 GB read fails (a memory limit) the slice is named as corrupt; where it succeeds
  # the slice is not DICOM and the series misses it: either way a DataError naming the folder.
  slices = fuzz.dicom_seed()
  slices['slice_2.dcm'] = fuzz.set_dicom_length(
      slices['slice_2.dcm'], 'FileMetaInformationVersion', 0xFFFFFFF0)
  folder = _write_series(tmp_path / 'series', slices)
  with pytest.raises(DataError, match='uneven slice spacing|slice_2.dcm is truncated') as raised:
    io.read_volume(folder)
  assert str(folder) in str(raised.value)
