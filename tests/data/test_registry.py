"""Case discovery (MSD folders, manifests), train/val/test splits and the up-front case check."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.data import registry
from dualseg_jax.errors import ConfigError, DataError
from tests.data.registry_cases import cases as _cases
from tests.data.registry_cases import data_config as _data_config

SHAPE = (6, 6, 4)


def _write(path, array, affine=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
  return path


def _image(path, shape=SHAPE):
  return _write(path, (np.arange(np.prod(shape)) % 7 * 40 - 100).reshape(shape).astype(np.int16))


def _label(path, shape=SHAPE, value=1):
  array = np.zeros(shape, np.uint8)
  array[2:4, 2:4, 1:3] = value
  return _write(path, array)


def _msd_center(root, case_ids, nnunet_names=False, with_json=True):
  for case_id in case_ids:
    image_name = f'{case_id}_0000.nii.gz' if nnunet_names else f'{case_id}.nii.gz'
    _image(root / 'imagesTr' / image_name)
    _label(root / 'labelsTr' / f'{case_id}.nii.gz')
    (root / 'imagesTr' / f'._{image_name}').write_bytes(b'macOS resource fork')
  if with_json:
    training = [{'image': f'./imagesTr/{c}.nii.gz', 'label': f'./labelsTr/{c}.nii.gz'}
                for c in case_ids]
    (root / 'dataset.json').write_text(json.dumps({'name': 'Pancreas', 'training': training,
                                                   'test': []}))
  return root


@pytest.mark.parametrize('nnunet_names', [False, True])
@pytest.mark.parametrize('with_json', [False, True])
def test_discover_msd_layout(tmp_path, nnunet_names, with_json):
  root = _msd_center(tmp_path / 'Task07_Pancreas', ['pancreas_004', 'pancreas_001'],
                     nnunet_names, with_json)
  (root / 'imagesTr' / 'pancreas_009.nii.gz').write_bytes(b'')  # image without a label
  cases = registry.discover_center(root, 'msd')
  by_id = {case.case_id: case for case in cases}
  assert set(by_id) >= {'pancreas_001', 'pancreas_004'}
  for case_id in ('pancreas_001', 'pancreas_004'):
    case = by_id[case_id]
    assert case.center == 'msd'
    assert pathlib.Path(case.image_path).is_file() and pathlib.Path(case.label_path).is_file()
    assert pathlib.Path(case.label_path).name == f'{case_id}.nii.gz'
    assert pathlib.Path(case.image_path).parent.name == 'imagesTr'
  if not with_json:
    assert by_id['pancreas_009'].label_path is None
  assert not any(pathlib.Path(c.image_path).name.startswith('._') for c in cases)


def test_discover_center_errors_name_the_folder(tmp_path):
  with pytest.raises(DataError, match='nothing_here'):
    registry.discover_center(tmp_path / 'nothing_here')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='empty.*imagesTr'):
    registry.discover_center(tmp_path / 'empty')


def test_manifest_csv_and_json_resolve_relative_paths(tmp_path):
  _image(tmp_path / 'a' / 'ct1.nii.gz')
  _label(tmp_path / 'a' / 'seg1.nii.gz')
  _image(tmp_path / 'b' / 'ct2.nii.gz')
  (tmp_path / 'lists').mkdir()
  (tmp_path / 'lists' / 'cases.csv').write_text(
      'center,case_id,image,label\n'
      'hospital_a,p1,../a/ct1.nii.gz,../a/seg1.nii.gz\n'
      f'hospital_b,,{tmp_path}/b/ct2.nii.gz,\n')
  rows = [{'center': 'hospital_a', 'case_id': 'p1', 'image': '../a/ct1.nii.gz',
           'label': '../a/seg1.nii.gz'},
          {'center': 'hospital_b', 'image': str(tmp_path / 'b' / 'ct2.nii.gz')}]
  (tmp_path / 'lists' / 'cases.json').write_text(json.dumps(rows))
  expected = [
      registry.Case('hospital_a', 'p1', str(tmp_path / 'a' / 'ct1.nii.gz'),
                    str(tmp_path / 'a' / 'seg1.nii.gz')),
      registry.Case('hospital_b', 'ct2', str(tmp_path / 'b' / 'ct2.nii.gz'), None)]
  assert registry.read_manifest(tmp_path / 'lists' / 'cases.csv') == expected
  assert registry.read_manifest(tmp_path / 'lists' / 'cases.json') == expected


def test_manifest_errors(tmp_path):
  (tmp_path / 'm.csv').write_text('center,case_id,image,label\nx,1,,\n')
  with pytest.raises(DataError, match=r"m.csv, row 1: needs 'center' and 'image'"):
    registry.read_manifest(tmp_path / 'm.csv')
  (tmp_path / 'd.csv').write_text('center,case_id,image\nx,1,a.nii\nx,1,b.nii\n')
  with pytest.raises(DataError, match=r"d.csv lists .* more than once: \[\('x', '1'\)\]"):
    registry.read_manifest(tmp_path / 'd.csv')


def test_list_cases_for_each_source(tmp_path):
  for center, count in (('center_a', 2), ('center_b', 3), ('center_c', 1)):
    _msd_center(tmp_path / 'synthetic' / center, [f'{center}_{i}' for i in range(count)],
                with_json=False)
  cases = registry.list_cases(_data_config(root=str(tmp_path / 'synthetic')))
  assert list(cases) == ['center_a', 'center_b', 'center_c']
  assert [len(cases[c]) for c in cases] == [2, 3, 1]
  assert all(case.center == center for center, found in cases.items() for case in found)

  msd = _msd_center(tmp_path / 'Task07', ['pancreas_001', 'pancreas_002'], nnunet_names=True)
  cases = registry.list_cases(_data_config(source='msd', root=str(msd), centers=('msd',)))
  assert list(cases) == ['msd'] and len(cases['msd']) == 2
  with pytest.raises(ConfigError, match='data.root'):
    registry.list_cases(_data_config(source='msd', root='', centers=('msd',)))
  with pytest.raises(ConfigError, match=r"data.centers also names \['center_b'"):
    registry.list_cases(_data_config(source='msd', root=str(msd), centers=('msd', 'center_b')))

  (tmp_path / 'all.csv').write_text(
      'center,case_id,image,label\n'
      'center_b,b1,synthetic/center_b/imagesTr/center_b_0.nii.gz,'
      'synthetic/center_b/labelsTr/center_b_0.nii.gz\n')
  data = _data_config(source='folders', centers=('center_a', 'center_b'),
                      manifest=str(tmp_path / 'all.csv'))
  data.center_roots.center_a = str(tmp_path / 'synthetic' / 'center_a')
  cases = registry.list_cases(data)
  assert [case.case_id for case in cases['center_b']] == ['b1']
  assert len(cases['center_a']) == 2
  data = _data_config(source='folders', centers=('center_a', 'center_z'),
                      manifest=str(tmp_path / 'all.csv'))
  with pytest.raises(ConfigError, match=r"centers \['center_a', 'center_z'\].*"
                     r"data.center_roots.center_a, data.center_roots.center_z.*\['center_b'\]"):
    registry.list_cases(data)
  with pytest.raises(ConfigError, match=r"data.source.*\('synthetic', 'msd', 'folders'\)"):
    registry.list_cases(_data_config(source='s3', root='x'))


def test_leave_one_center_out_split():
  cases = {'center_a': _cases('center_a', 10), 'center_b': _cases('center_b', 3),
           'center_c': _cases('center_c', 4)}
  data = _data_config(test_center='center_b', val_fraction=0.2)
  split = registry.split_cases(data, cases, seed=2022)
  assert sorted(split.test, key=lambda c: c.case_id) == cases['center_b']
  assert not {c.center for c in split.train + split.val} & {'center_b'}
  training = sorted(split.train + split.val, key=lambda c: c.case_id)
  assert training == cases['center_a'] + cases['center_c']
  val_counts = {center: sum(c.center == center for c in split.val)
                for center in ('center_a', 'center_c')}
  assert val_counts == {'center_a': 2, 'center_c': 1}  # round(0.2 * 4) = 1 anyway; >= 1 for 2+
  # Deterministic, independent of the listing order, and moved by the seed.
  shuffled = {center: list(reversed(found)) for center, found in reversed(list(cases.items()))}
  assert registry.split_cases(data, shuffled, seed=2022) == split
  other_seeds = [registry.split_cases(data, cases, seed=s).val for s in range(5)]
  assert any(val != split.val for val in other_seeds)


def test_small_center_still_gets_one_validation_case():
  cases = {'center_a': _cases('center_a', 2), 'center_c': _cases('center_c', 3)}
  data = _data_config(centers=('center_a', 'center_c'), test_center='center_c', val_fraction=0.1)
  split = registry.split_cases(data, cases)
  assert len(split.val) == 1 and len(split.train) == 1


def test_kfold_partitions_all_cases():
  cases = {'center_a': _cases('center_a', 7), 'center_b': _cases('center_b', 5),
           'center_c': _cases('center_c', 2)}
  all_cases = {case for found in cases.values() for case in found}
  tests = []
  for fold in range(4):
    split = registry.split_cases(_data_config(fold=fold, num_folds=4, val_fraction=0.2), cases)
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == all_cases
    assert len(val) >= 2  # one per center with >= 2 remaining cases
    tests.append(test)
  assert set().union(*tests) == all_cases and sum(len(t) for t in tests) == len(all_cases)
  assert sorted(len(t) for t in tests) == [3, 3, 4, 4]


def test_split_config_errors():
  cases = {c: _cases(c, 3) for c in ('center_a', 'center_b', 'center_c')}
  with pytest.raises(ConfigError, match=r"data.test_center is 'center_x'.*'center_a', 'center_b', "
                     r"'center_c'"):
    registry.split_cases(_data_config(test_center='center_x'), cases)
  with pytest.raises(ConfigError, match=r'data.fold is 4.*0..3'):
    registry.split_cases(_data_config(fold=4, num_folds=4), cases)
  with pytest.raises(ConfigError, match='data.val_fraction'):
    registry.split_cases(_data_config(val_fraction=1.0), cases)
  with pytest.raises(ConfigError, match='leaves no training center'):
    registry.split_cases(_data_config(centers=('center_c',), test_center='center_c'), cases)
  one_each = {c: _cases(c, 1) for c in ('center_a', 'center_b', 'center_c')}
  with pytest.raises(ConfigError, match='leaves val empty'):
    registry.split_cases(_data_config(), one_each)
  assert registry.split_cases(_data_config(val_fraction=0.0), one_each).val == []


def test_check_cases_reports_every_bad_case_at_once(tmp_path):
  good = registry.Case('a', 'good', str(_image(tmp_path / 'good.nii.gz')),
                       str(_label(tmp_path / 'good_seg.nii.gz')))
  missing = registry.Case('a', 'missing', str(tmp_path / 'absent.nii.gz'),
                          str(tmp_path / 'absent_seg.nii.gz'))
  mismatch = registry.Case('a', 'mismatch', str(_image(tmp_path / 'mm.nii.gz')),
                           str(_label(tmp_path / 'mm_seg.nii.gz', shape=(6, 6, 5))))
  bad_values = registry.Case('b', 'values', str(_image(tmp_path / 'v.nii.gz')),
                             str(_label(tmp_path / 'v_seg.nii.gz', value=5)))
  nan_array = np.zeros(SHAPE, np.float32)
  nan_array[0, 0, 0] = np.nan
  nan_image = registry.Case('b', 'nan', str(_write(tmp_path / 'nan.nii.gz', nan_array)),
                            str(_label(tmp_path / 'nan_seg.nii.gz')))
  unlabelled = registry.Case('b', 'unlabelled', good.image_path, None)
  cases = [good, missing, mismatch, bad_values, nan_image, unlabelled]

  problems = registry.validate_cases(cases)
  with pytest.raises(DataError) as raised:
    registry.check_cases(cases)
  message = str(raised.value)
  assert '5 of 6 cases cannot be used' in message
  for fragment in ('a/missing: image', 'absent.nii.gz does not exist', 'absent_seg.nii.gz',
                   'a/mismatch: label', 'mm_seg.nii.gz', 'resample', 'b/values', '[5]',
                   'data.label_map', 'b/nan', 'nan.nii.gz has 1 NaN', 'b/unlabelled: no label',
                   'data.skip_bad_cases'):
    assert fragment in message
  assert 'a/good' not in message
  assert all(problem in message for problem in problems)

  kept, report = registry.check_cases(cases, skip_bad_cases=True)
  assert kept == [good] and report == problems
  kept, report = registry.check_cases(cases[:1] + [bad_values], label_map='1:1,5:2')
  assert kept == [good, bad_values] and report == []
