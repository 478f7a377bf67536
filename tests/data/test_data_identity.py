"""A run records the data it trains and will be evaluated on, and refuses data changed under it."""

import json
import os

import ml_collections
import pytest

from dualseg_jax.data import pipeline
from dualseg_jax.data import registry
from dualseg_jax.errors import DataError


def _case(folder, center, case_id):
  image = folder / f'{case_id}_image.nii.gz'
  label = folder / f'{case_id}_label.nii.gz'
  image.write_bytes(b'image of ' + case_id.encode())
  label.write_bytes(b'label of ' + case_id.encode())
  return registry.Case(center, case_id, str(image), str(label))


@pytest.fixture
def split(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  return registry.Split(train=[_case(data, 'a', 'a_000'), _case(data, 'b', 'b_000')],
                        val=[_case(data, 'a', 'a_001')], test=[_case(data, 'c', 'c_000')])


def _config(root):
  return ml_collections.ConfigDict({'data': {'source': 'msd', 'root': str(root)}})


def test_a_new_run_records_every_case_with_its_role(tmp_path, split):
  workdir = tmp_path / 'run'  # not made yet: recording makes it
  pipeline.check_data_identity(_config(tmp_path / 'data'), split, workdir)
  recorded = json.loads((workdir / pipeline.IDENTITY_FILE).read_text())
  assert {name: case['role'] for name, case in recorded['cases'].items()} == {
      'a/a_000': 'train', 'b/b_000': 'train', 'a/a_001': 'val', 'c/c_000': 'test'}
  assert recorded['cases']['c/c_000']['label'][0] == len(b'label of c_000')
  # The same data again: accepted.
  pipeline.check_data_identity(_config(tmp_path / 'data'), split, workdir)


def test_a_replaced_test_label_or_a_moved_case_is_refused_with_the_case_named(tmp_path, split):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  pipeline.check_data_identity(_config(tmp_path / 'data'), split, workdir)
  label = split.test[0].label_path
  with open(label, 'wb') as handle:
    handle.write(b'a regenerated label')
  with pytest.raises(DataError, match=r'c/c_000: its label file changed[\s\S]*new --workdir'):
    pipeline.check_data_identity(_config(tmp_path / 'data'), split, workdir)
  os.utime(label, ns=(0, 0))
  moved = registry.Split(train=split.train, val=[], test=split.test + split.val)
  with pytest.raises(DataError, match='a/a_001: val case of the run, now test'):
    pipeline.check_data_identity(_config(tmp_path / 'data'), moved, workdir)


def test_identity_changes_name_added_and_missing_cases():
  recorded = {'cases': {'a/1': {'role': 'train', 'image': [1, 1]}}}
  current = {'cases': {'a/2': {'role': 'train', 'image': [1, 1]}}}
  assert pipeline.identity_changes(recorded, current) == [
      'a/1: train case of the run, now missing', 'a/2: not in the run\'s data, now train']
  assert pipeline.identity_changes(recorded, recorded) == []
