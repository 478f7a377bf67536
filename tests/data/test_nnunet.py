"""nnU-Net interoperability on the data side: case ids from nnU-Net file names, the label
numbering of dataset.json, and folds read from and written as nnU-Net's splits_final.json."""

import json

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax import config_base
from dualseg_jax.data import io
from dualseg_jax.data import pipeline
from dualseg_jax.data import registry
from dualseg_jax.errors import ConfigError, DataError
from tests.data.registry_cases import cases as _cases
from tests.data.registry_cases import data_config as _data_config


def _ids(cases):
  return sorted(case.case_id for case in cases)


@pytest.mark.parametrize('name, case_id', [
    ('pancreas_001_0000.nii.gz', 'pancreas_001'),  # nnU-Net's first channel
    ('pancreas_001.nii.gz', 'pancreas_001'),
    ('pancreas_001_0000.NII', 'pancreas_001'),
    ('scan_0000.nrrd', 'scan'),
    ('scan.mha', 'scan'),
    ('scan_0001.nii.gz', 'scan_0001'),  # a second channel is not the case's name
    ('series_0000', 'series_0000'),  # a DICOM folder keeps its name
])
def test_case_id_from_path_strips_volume_and_channel_suffixes(name, case_id):
  assert io.case_id_from_path(f'/data/imagesTs/{name}') == case_id


def test_volume_suffix_is_returned_as_written():
  assert io.volume_suffix('a_0000.nii.gz') == '.nii.gz'
  assert io.volume_suffix('A.NRRD') == '.NRRD'
  assert io.volume_suffix('notes.json') == ''


# --- dataset.json labels -----------------------------------------------------------------------

@pytest.mark.parametrize('labels, label_map', [
    ({'background': 0, 'pancreas': 1, 'cancer': 2}, ''),  # nnU-Net v2, already 0/1/2
    ({'0': 'background', '1': 'pancreas', '2': 'cancer'}, ''),  # MSD Task07
    ({'background': 0, 'cancer': 1, 'pancreas': 2}, '1:2,2:1'),  # swapped numbering
    ({'0': 'background', '1': 'Tumor', '2': 'Pancreas'}, '1:2,2:1'),
    ({'background': 0, 'liver': 1, 'pancreas': 7, 'pancreatic lesion': 9}, '7:1,9:2'),
    ({'background': 0, 'pancreas': [1, 2], 'cancer': 2}, ''),  # nnU-Net region: 2 stays tumour
    ({'background': 0, 'pancreas': 1}, ''),
])
def test_dataset_json_labels_give_the_label_map(tmp_path, labels, label_map):
  path = tmp_path / 'dataset.json'
  path.write_text(json.dumps({'name': 'x', 'labels': labels}))
  assert registry.label_map_from_dataset_json(path) == label_map


def test_a_swapped_label_file_reads_as_pancreas_1_and_tumour_2(tmp_path):
  path = tmp_path / 'dataset.json'
  path.write_text(json.dumps({'labels': {'background': 0, 'cancer': 1, 'pancreas': 2}}))
  stored = np.array([[[0, 1, 2, 2]]], np.uint8)  # one tumour voxel, two pancreas voxels
  mapped = io.map_labels(stored, registry.label_map_from_dataset_json(path), 'label')
  np.testing.assert_array_equal(mapped, [[[0, 2, 1, 1]]])


def test_dataset_json_labels_that_name_no_structure_here_leave_the_labels_as_they_are(tmp_path):
  path = tmp_path / 'dataset.json'
  path.write_text(json.dumps({'labels': {'background': 0, 'foreground': 1}}))
  assert registry.label_map_from_dataset_json(path) is None
  path.write_text(json.dumps({'training': []}))
  assert registry.label_map_from_dataset_json(path) is None
  path.write_text(json.dumps({'labels': {'background': 0, 'pancreas': 'one'}}))
  with pytest.raises(DataError, match=r"dataset.json: 'labels' .* cannot be read"):
    registry.label_map_from_dataset_json(path)


def _center_with_labels(folder, labels):
  folder.mkdir(parents=True)
  if labels is not None:
    (folder / 'dataset.json').write_text(json.dumps({'labels': labels}))
  return folder


def test_a_swapped_numbering_becomes_the_runs_label_map(tmp_path):
  swapped = {'background': 0, 'cancer': 1, 'pancreas': 2}
  for center in ('center_a', 'center_b'):
    _center_with_labels(tmp_path / center, swapped)
  config = config_base.base_config()
  config.data.source, config.data.root = 'synthetic', str(tmp_path)
  config.data.centers, config.data.test_center = ('center_a', 'center_b'), 'center_b'
  pipeline.resolve_data_root(config)
  assert config.data.label_map == '1:2,2:1'
  config.data.label_map = '7:1'  # an explicit map is kept
  pipeline.resolve_data_root(config)
  assert config.data.label_map == '7:1'


def test_centers_numbering_labels_differently_are_refused(tmp_path):
  _center_with_labels(tmp_path / 'center_a', {'background': 0, 'cancer': 1, 'pancreas': 2})
  _center_with_labels(tmp_path / 'center_b', {'0': 'background', '1': 'pancreas', '2': 'cancer'})
  _center_with_labels(tmp_path / 'center_c', None)
  data = _data_config(source='synthetic', root=str(tmp_path), centers=('center_a', 'center_b'))
  with pytest.raises(ConfigError, match=r"center_a: '1:2,2:1', center_b: 0/1/2 as they are"):
    registry.dataset_label_map(data)
  data = _data_config(source='synthetic', root=str(tmp_path), centers=('center_a', 'center_c'))
  with pytest.raises(ConfigError, match=r'center_c: no dataset.json labels naming'):
    registry.dataset_label_map(data)
  data = _data_config(source='synthetic', root=str(tmp_path), centers=('center_b', 'center_c'))
  assert registry.dataset_label_map(data) == ('', [tmp_path / 'center_b' / 'dataset.json'])


# --- splits.json / splits_final.json ----------------------------------------------------------

def _write_splits(path, folds):
  path.write_text(json.dumps(folds))
  return path


def test_splits_final_json_is_honoured(tmp_path):
  cases = {'center_a': _cases('center_a', 6), 'center_b': _cases('center_b', 4)}
  folds = [{'train': ['center_a_00', 'center_a_01', 'center_a_02', 'center_b_00', 'center_b_01'],
            'val': ['center_a_03', 'center_b_02']},
           {'train': ['center_a_03', 'center_a_04', 'center_b_02', 'center_b_03'],
            'val': ['center_a_00', 'center_a_05', 'center_b/center_b_01']}]
  path = _write_splits(tmp_path / 'splits_final.json', folds)
  for fold in (0, 1):
    for val_fraction in (0.0, 0.2):
      data = _data_config(centers=('center_a', 'center_b'), splits_file=str(path), fold=fold,
                          num_folds=2, val_fraction=val_fraction)
      split = registry.split_cases(data, cases, seed=2022)
      # nnU-Net's "val" is the held-out fold: the test cases here.
      assert _ids(split.test) == sorted(name.split('/')[-1] for name in folds[fold]['val'])
      assert _ids(split.train + split.val) == sorted(folds[fold]['train'])
      assert bool(split.val) == (val_fraction > 0)
      if fold == 0:  # cases the fold does not name take no part
        assert not {'center_a_04', 'center_a_05', 'center_b_03'} & set(
            _ids(split.train + split.val + split.test))


def test_splits_file_errors_name_the_file_and_the_key(tmp_path):
  cases = {'center_a': _cases('center_a', 4)}
  path = _write_splits(tmp_path / 'splits_final.json',
                       [{'train': ['center_a_00', 'case_x'], 'val': ['center_a_01', 'case_y']},
                        {'train': ['center_a_01'], 'val': ['center_a_00']}])

  def split(**overrides):
    settings = dict(centers=('center_a',), splits_file=str(path), fold=1, num_folds=2)
    return registry.split_cases(_data_config(**{**settings, **overrides}), cases)

  with pytest.raises(DataError, match=r"splits_final.json names 2 case\(s\) that data.centers "
                                      r"\('center_a',\) do not hold: \['case_x', 'case_y'\]"):
    split()
  _write_splits(path, [{'train': ['center_a_00', 'center_a_01'], 'val': ['center_a_01']}] * 2)
  with pytest.raises(DataError, match=r"fold 1 lists \['center_a_01'\] in both"):
    split()
  with pytest.raises(ConfigError, match=r'holds 2 folds but data.num_folds is 5.*num_folds=2'):
    split(num_folds=5)
  with pytest.raises(ConfigError, match=r'data.splits_file=.*data.fold is -1'):
    split(fold=-1)
  path.write_text('{"train": []}')
  with pytest.raises(DataError, match=r'splits_final.json is not a list of folds'):
    split()
  with pytest.raises(DataError, match=r'data.splits_file .*missing.json does not exist'):
    split(splits_file=str(tmp_path / 'missing.json'))


def test_written_kfold_splits_give_the_same_split_when_read_back(tmp_path):
  cases = {'center_a': _cases('center_a', 7), 'center_b': _cases('center_b', 5)}
  data = _data_config(centers=('center_a', 'center_b'), fold=2, num_folds=3)
  split = registry.split_cases(data, cases, seed=7)
  folds = registry.nnunet_splits(data, cases, split, seed=7)
  assert len(folds) == 3
  everything = _ids(cases['center_a'] + cases['center_b'])
  assert sorted(name for fold in folds for name in fold['val']) == everything  # a partition
  for fold in folds:
    assert sorted(fold['train'] + fold['val']) == everything
  assert folds[2]['val'] == _ids(split.test)
  path = _write_splits(tmp_path / 'splits.json', folds)
  read_back = _data_config(centers=('center_a', 'center_b'), fold=2, num_folds=3,
                           splits_file=str(path))
  same = registry.split_cases(read_back, cases, seed=7)
  assert same.train == split.train and same.val == split.val
  assert _ids(same.test) == _ids(split.test)


def test_leave_one_center_out_writes_its_one_split():
  cases = {'center_a': _cases('center_a', 3), 'center_b': _cases('center_b', 2)}
  data = _data_config(centers=('center_a', 'center_b'), test_center='center_b', fold=-1)
  split = registry.split_cases(data, cases)
  assert registry.nnunet_splits(data, cases, split, seed=2022) == [
      {'train': _ids(cases['center_a']), 'val': _ids(cases['center_b'])}]


def test_centers_sharing_a_case_id_are_named_with_their_center():
  cases = {'a': [registry.Case('a', 'p1', '/a/p1.nii.gz'), registry.Case('a', 'p2', '/a/p2.nii')],
           'b': [registry.Case('b', 'p1', '/b/p1.nii.gz')]}
  data = _data_config(centers=('a', 'b'), test_center='b', fold=-1, val_fraction=0.0)
  split = registry.split_cases(data, cases)
  assert registry.nnunet_splits(data, cases, split, seed=2022) == [
      {'train': ['a/p1', 'p2'], 'val': ['b/p1']}]


# --- MetaImage through SimpleITK, when it is installed ---------------------------------------

def test_metaimage_reads_like_the_same_nifti(tmp_path):
  sitk = pytest.importorskip('SimpleITK')
  array_zyx = (np.arange(4 * 5 * 6) % 50 - 20).reshape(4, 5, 6).astype(np.int16)
  image = sitk.GetImageFromArray(array_zyx)
  image.SetSpacing((0.8, 0.9, 2.5))
  image.SetOrigin((10.0, -20.0, 30.0))
  image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
  sitk.WriteImage(image, str(tmp_path / 'scan_0000.mha'))
  sitk.WriteImage(image, str(tmp_path / 'scan.nii.gz'))  # ITK's own LPS -> NIfTI conversion
  from_metaimage = io.read_volume(tmp_path / 'scan_0000.mha')
  from_nifti = io.read_volume(tmp_path / 'scan.nii.gz')
  np.testing.assert_array_equal(from_metaimage.array, from_nifti.array)
  np.testing.assert_allclose(from_metaimage.canonical_affine, from_nifti.canonical_affine)


def test_metaimage_without_simpleitk_says_what_to_install(tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, 'SimpleITK', None)  # import SimpleITK now raises ImportError
  (tmp_path / 'scan.mha').write_bytes(b'ObjectType = Image\n')
  with pytest.raises(DataError, match=r'scan.mha: MetaImage files .* pip install SimpleITK'):
    io.read_volume(tmp_path / 'scan.mha')


# --- A run on an nnU-Net dataset -----------------------------------------------------------------

def _nnunet_dataset(root, case_ids):
  """imagesTr/<id>_0000.nii.gz and labelsTr/<id>.nii.gz, labels numbered cancer 1, pancreas 2."""
  affine = np.diag([1.5, 1.5, 2.5, 1.0])
  for case_id in case_ids:
    image = np.full((24, 24, 12), -1000, np.int16)
    image[4:20, 4:20, 2:10] = 40  # the body
    label = np.zeros(image.shape, np.uint8)
    label[8:16, 8:16, 4:8] = 2
    label[10:12, 10:12, 5:7] = 1
    for path, array in ((root / 'imagesTr' / f'{case_id}_0000.nii.gz', image),
                        (root / 'labelsTr' / f'{case_id}.nii.gz', label)):
      path.parent.mkdir(parents=True, exist_ok=True)
      nib.save(nib.Nifti1Image(array, affine), path)
  (root / 'dataset.json').write_text(json.dumps({
      'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'cancer': 1, 'pancreas': 2},
      'numTraining': len(case_ids), 'file_ending': '.nii.gz'}))
  return root


def test_a_run_on_an_nnunet_dataset_uses_its_labels_and_splits(tmp_path, tiny_config):
  root = _nnunet_dataset(tmp_path / 'Dataset007_Pancreas', [f'pancreas_{i:03d}' for i in range(5)])
  splits_final = _write_splits(tmp_path / 'splits_final.json', [
      {'train': ['pancreas_000', 'pancreas_001', 'pancreas_002'],
       'val': ['pancreas_003', 'pancreas_004']},
      {'train': ['pancreas_003', 'pancreas_004'], 'val': ['pancreas_000', 'pancreas_001']}])
  config = tiny_config
  config.data.source, config.data.root = 'msd', str(root)
  config.data.centers, config.data.test_center = ('msd',), 'msd'
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.fold, config.data.num_folds = 0, 2
  config.data.val_fraction = 0.0
  config.data.splits_file = str(splits_final)
  pipeline.resolve_data_root(config)
  assert config.data.label_map == '1:2,2:1'
  data = pipeline.prepare(config, tmp_path / 'run')
  assert _ids(data.split.train) == ['pancreas_000', 'pancreas_001', 'pancreas_002']
  assert _ids(data.split.test) == ['pancreas_003', 'pancreas_004']
  written = json.loads((tmp_path / 'run' / registry.SPLITS_FILE).read_text())
  assert written == json.loads(splits_final.read_text())
