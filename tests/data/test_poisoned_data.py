"""Poisoned cases (non-finite or constant images, empty or unknown labels, absurd spacing, wrong
dimensionality, mismatched grids) are each refused at load time by a message naming the file."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.data import io
from dualseg_jax.data import registry
from dualseg_jax.errors import DataError
from dualseg_jax.tools import fuzz_readers as fuzz

SHAPE = (6, 6, 4)
CENTER = 'poisoned'


def _ramp(shape=SHAPE, dtype=np.int16):
  return (np.arange(int(np.prod(shape))) % 50 * 20 - 500).reshape(shape).astype(dtype)


def _pancreas(shape=SHAPE, value=1):
  label = np.zeros(shape, np.uint8)
  label[2:4, 2:4, 1:3] = value
  return label


def _save(path, array, affine=None):
  nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
  return path


def _save_raw(path, array, **fields):
  """A NIfTI whose header fields are written byte by byte, as a broken exporter would."""
  payload = nib.Nifti1Image(array, np.eye(4)).to_bytes()
  for name, values in fields.items():
    payload = fuzz.set_nifti_field(payload, name, values)
  path.write_bytes(gzip.compress(payload) if path.name.endswith('.gz') else payload)
  return path


def _with_values(array, positions_values):
  array = array.copy()
  for position, value in positions_values:
    array[position] = value
  return array


def _shifted_affine():
  affine = np.eye(4)
  affine[0, 3] = 0.5
  return affine


# case id -> (image writer, label writer, which file is named, what the message says); a writer
# takes the path to write. None as the fragment: a usable case, absent from the report.
POISONED = {
    'nan_voxels': (
        lambda p: _save(p, _with_values(_ramp(dtype=np.float32), [((1, 1, 1), np.nan)])),
        None, 'image', '1 NaN or infinite voxels'),
    'inf_voxels': (
        lambda p: _save(p, _with_values(_ramp(dtype=np.float32), [((0, 0, 0), np.inf),
                                                                  ((5, 5, 3), -np.inf)])),
        None, 'image', '2 NaN or infinite voxels'),
    'constant_image': (
        lambda p: _save(p, np.full(SHAPE, -1024, np.int16)), None, 'image',
        'single value -1024 in all 144 voxels'),
    'empty_label': (None, lambda p: _save(p, np.zeros(SHAPE, np.uint8)), 'label',
                    'no pancreas or tumour voxels'),
    'unknown_label_values': (
        None, lambda p: _save(p, _with_values(_pancreas(), [((0, 0, 0), 5), ((1, 0, 0), 9)])),
        'label', r'label values [5, 9] outside (0, 1, 2)'),
    'zero_spacing': (
        lambda p: _save_raw(p, _ramp(), qform_code=0, sform_code=1,
                            srow=[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]),
        None, 'image', 'voxel spacing [0.0, 1.0, 1.0] mm'),
    'negative_spacing': (
        lambda p: _save_raw(p, _ramp(), pixdim=[1.0, -2.0, 1.0, 1.0]), None, 'image',
        'declares pixdim (voxel size) [-2.0, 1.0, 1.0]'),
    'spacing_100mm': (
        lambda p: _save(p, _ramp(), np.diag([100.0, 1.0, 1.0, 1.0])),
        lambda p: _save(p, _pancreas(), np.diag([100.0, 1.0, 1.0, 1.0])), 'image',
        'declares pixdim (voxel size) [100.0, 1.0, 1.0]'),
    'two_dimensional': (lambda p: _save(p, _ramp((6, 6))), None, 'image', 'is a 2D image'),
    'four_d_three_channels': (
        lambda p: _save(p, _ramp(SHAPE + (3,))), None, 'image', 'holds 3 volumes or channels'),
    'five_d_two_channels': (
        lambda p: _save(p, _ramp(SHAPE + (1, 2))), None, 'image', 'holds 2 volumes or channels'),
    'label_of_another_shape': (
        None, lambda p: _save(p, _pancreas((6, 6, 5))), 'label', 'is not on the voxel grid'),
    'label_shifted_half_a_voxel': (
        None, lambda p: _save(p, _pancreas(), _shifted_affine()), 'label',
        'is not on the voxel grid'),
    # Usable: singleton trailing axes are dropped; a label with tumour only still has foreground.
    'four_d_singleton': (lambda p: _save(p, _ramp(SHAPE + (1,))), None, None, None),
    'five_d_singleton': (lambda p: _save(p, _ramp(SHAPE + (1, 1))), None, None, None),
    'tumour_only_label': (None, lambda p: _save(p, _pancreas(value=2)), None, None),
    'good': (None, None, None, None),
}


def _poisoned_cases(folder):
  cases = {}
  for case_id, (write_image, write_label, _, _) in POISONED.items():
    image = (write_image or (lambda p: _save(p, _ramp())))(folder / f'{case_id}_image.nii.gz')
    label = (write_label or (lambda p: _save(p, _pancreas())))(folder / f'{case_id}_label.nii.gz')
    cases[case_id] = registry.Case(CENTER, case_id, str(image), str(label))
  return cases


def test_every_poisoned_case_is_listed_once_naming_its_file(tmp_path):
  cases = _poisoned_cases(tmp_path)
  bad = {case_id: row for case_id, row in POISONED.items() if row[3] is not None}
  with pytest.raises(DataError) as raised:
    registry.check_cases(list(cases.values()))
  message = str(raised.value)
  assert f'{len(bad)} of {len(cases)} cases cannot be used' in message
  assert 'data.skip_bad_cases=True' in message

  kept, report = registry.check_cases(list(cases.values()), skip_bad_cases=True)
  assert [case.case_id for case in kept] == [c for c in POISONED if c not in bad]
  assert len(report) == len(bad)
  for case_id, (_, _, which, fragment) in bad.items():
    path = getattr(cases[case_id], f'{which}_path')
    entries = [entry for entry in report if entry.startswith(f'{CENTER}/{case_id}: ')]
    assert len(entries) == 1, (case_id, report)
    assert path in entries[0] and fragment in entries[0], (case_id, entries[0])
    assert entries[0] in message
  for case_id in POISONED:
    if case_id not in bad:
      assert f'{CENTER}/{case_id}:' not in message


def test_constant_image_is_refused_but_an_empty_label_is_read(tmp_path):
  image = _save(tmp_path / 'flat.nii.gz', np.full(SHAPE, 0.25, np.float32))
  label = _save(tmp_path / 'label.nii.gz', _pancreas())
  with pytest.raises(DataError, match=r'image .*flat\.nii\.gz holds the single value 0\.25'):
    io.read_case(image, label)
  # A label without foreground is a valid file; the case check reports it (above).
  empty = _save(tmp_path / 'empty.nii.gz', np.zeros(SHAPE, np.uint8))
  ct = _save(tmp_path / 'ct.nii.gz', _ramp())
  _, read_label = io.read_case(ct, empty)
  assert read_label.array.dtype == np.uint8 and not read_label.array.any()
  case = registry.Case(CENTER, 'empty', str(ct), str(empty))
  problems = registry.case_problems(case)
  assert problems == [f'{CENTER}/empty: label {empty} has no pancreas or tumour voxels (all '
                      'background after data.label_map): give the label that marks the pancreas, '
                      'or check data.label_map']
  # After a label map that keeps no source value the label is empty too.
  mapped = _save(tmp_path / 'mapped.nii.gz', _pancreas(value=1))
  assert registry.case_problems(registry.Case(CENTER, 'm', str(ct), str(mapped)), '7:1')


def test_spacing_of_100_mm_is_refused_in_every_format(tmp_path):
  nrrd_path = tmp_path / 'wide.nrrd'
  nrrd_path.write_bytes(fuzz.set_nrrd_field(
      fuzz.nrrd_seeds()['raw_int16_lps'], 'space directions', '(100,0,0) (0,1,0) (0,0,1)'))
  with pytest.raises(DataError, match=r'wide\.nrrd has voxel spacing \[100\.0, 1\.0, 1\.0\] mm'):
    io.read_volume(nrrd_path)
  folder = tmp_path / 'series'
  folder.mkdir()
  for name, data in fuzz.dicom_seed().items():
    (folder / name).write_bytes(fuzz.set_dicom_element(data, 'PixelSpacing', b'100\\0.8'))
  with pytest.raises(DataError, match=r'series/slice_\d\.dcm declares PixelSpacing \[100\.0'):
    io.read_volume(folder)
  nifti_path = _save_raw(tmp_path / 'wide.nii', _ramp(), qform_code=0, sform_code=1,
                         srow=[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 100, 0])
  with pytest.raises(DataError, match=r'wide\.nii has voxel spacing \[1\.0, 1\.0, 100\.0\] mm'):
    io.read_volume(nifti_path)
