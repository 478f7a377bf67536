"""The cascade's regions of interest and stage order with stand-in stage predictors: what each
fine stage sees, where its result lands, and an empty pancreas giving an empty result and a note;
the cascade spec (cascade.json / experiment folder) and `launch.predict --cascade` writing label
maps in the input's geometry with per-case notes."""

import json
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.data.volume import Geometry, Volume
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.experiments import cascade as cascade_training
from dualseg_jax.inference import cascade
from dualseg_jax.inference import run
from tests.experiments import fakes

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]


class ThresholdStage:
  """Labels voxels above `level` with `label`; records the shape of every volume it is given."""

  def __init__(self, level, label):
    self.level, self.label, self.seen = level, label, []

  def predict_volume(self, volume, tta_flips=None, progress=None, pancreas_mask=None):
    self.seen.append((volume.array.shape, None if pancreas_mask is None else int(pancreas_mask.sum())))
    label = np.where(volume.array > self.level, self.label, 0).astype(np.uint8)
    return {'label': label}


def _volume(array):
  return Volume(array=array.astype(np.float32), spacing_mm=(1.0, 1.0, 1.0),
                geometry=Geometry(affine=np.eye(4), shape=array.shape[::-1]))


def test_region_of_interest_against_explicit_bounds():
  mask = np.zeros((10, 20, 30), bool)
  mask[3:5, 4:9, 10:12] = True
  assert cascade.region_of_interest(mask, (1, 2, 25)) == (slice(2, 6), slice(2, 11), slice(0, 30))
  assert cascade.region_of_interest(np.zeros((4, 4, 4), bool), (1, 1, 1)) is None


def test_four_stages_in_their_regions_and_labels_on_the_input_grid():
  image = np.zeros((12, 24, 24))
  image[4:8, 6:14, 8:16] = 1.0  # pancreas
  image[5:7, 8:10, 9:11] = 2.0  # tumour inside it
  stages = {'pancreas_coarse': ThresholdStage(0.5, 1), 'pancreas_fine': ThresholdStage(0.5, 1),
            'tumour_coarse': ThresholdStage(1.5, 2), 'tumour_fine': ThresholdStage(1.5, 2)}
  output = cascade.cascade_predict(_volume(image), stages, (1, 2, 2), (0, 1, 1),
                                   tumour_coarse_margin_vox=(1, 1, 1))
  assert stages['pancreas_coarse'].seen == [((12, 24, 24), None)]
  assert stages['pancreas_fine'].seen == [((6, 12, 12), None)]  # box 3:9, 4:16, 6:18
  assert output.boxes['pancreas_fine'] == (slice(3, 9), slice(4, 16), slice(6, 18))
  # Tumour coarse inside the fine pancreas (4:8, 6:14, 8:16) + 1: 3:9, 5:15, 7:17.
  assert output.boxes['tumour_coarse'] == (slice(3, 9), slice(5, 15), slice(7, 17))
  assert stages['tumour_coarse'].seen == [((6, 10, 10), 4 * 8 * 8)]
  # Tumour fine inside the coarse tumour (5:7, 8:10, 9:11) + (0, 1, 1).
  assert output.boxes['tumour_fine'] == (slice(5, 7), slice(7, 11), slice(8, 12))
  assert stages['tumour_fine'].seen == [((2, 4, 4), 2 * 4 * 4)]
  expected = np.where(image >= 2, 2, np.where(image >= 1, 1, 0))
  np.testing.assert_array_equal(output.label, expected)
  assert output.label.shape == image.shape and output.notes == []


class TumourStage:
  """Labels the tumour voxels (value 2) of the box it is given; with `first_rows` only the first
  rows (y) of it, as a coarse stage that sees one end of an elongated tumour."""

  def __init__(self, first_rows=None):
    self.first_rows, self.seen = first_rows, []

  def predict_volume(self, volume, tta_flips=None, progress=None, pancreas_mask=None):
    self.seen.append(volume.array.shape)
    found = volume.array >= 2
    if self.first_rows is not None:
      rows = np.flatnonzero(found.any(axis=(0, 2)))
      found[:, rows[self.first_rows:]] = False
    return {'label': np.where(found, 2, 0).astype(np.uint8)}


@pytest.mark.parametrize('rounds, predicted_rounds, found_rows', [(1, 1, (10, 19)), (4, 4, (10, 30)),
                                                                  (6, 4, (10, 30))])
def test_tumour_fine_is_recropped_to_its_own_result_until_the_box_settles(
    rounds, predicted_rounds, found_rows):
  image = np.zeros((12, 40, 40))
  image[2:10, 2:38, 2:38] = 1.0  # pancreas
  image[5:7, 10:30, 12:14] = 2.0  # a tumour elongated along y
  stages = {'pancreas_coarse': ThresholdStage(0.5, 1), 'pancreas_fine': ThresholdStage(0.5, 1),
            'tumour_coarse': TumourStage(first_rows=3), 'tumour_fine': TumourStage()}
  output = cascade.cascade_predict(_volume(image), stages, (0, 0, 0), (0, 6, 6),
                                   tumour_coarse_margin_vox=(1, 1, 1), tumour_rounds=rounds)
  # Coarse finds rows 10:13; each round's box is the last find + 6 rows: 4:19, 4:25, 4:31, 4:36;
  # the fourth finds the whole tumour, whose box + margin is the fourth box again: settled.
  assert len(stages['tumour_fine'].seen) == predicted_rounds
  expected = np.zeros(image.shape, bool)
  expected[5:7, found_rows[0]:found_rows[1], 12:14] = True
  np.testing.assert_array_equal(output.label == 2, expected)
  if rounds >= 4:
    assert output.boxes['tumour_fine'] == (slice(5, 7), slice(4, 36), slice(6, 20))


def test_empty_pancreas_gives_an_empty_label_and_a_note():
  image = np.zeros((8, 16, 16))
  stages = {name: ThresholdStage(0.5, 1 if name.startswith('pancreas') else 2)
            for name in cascade.CASCADE_STAGES}
  output = cascade.cascade_predict(_volume(image), stages, (1, 1, 1), (1, 1, 1))
  assert not output.label.any() and output.label.shape == image.shape
  assert output.notes and 'no pancreas' in output.notes[0]
  assert stages['pancreas_fine'].seen == [] and stages['tumour_fine'].seen == []
  # A coarse pancreas the fine stage rejects: also empty, with a note naming the region.
  image[2:4, 5:8, 5:8] = 1.0
  stages['pancreas_fine'] = ThresholdStage(5.0, 1)
  output = cascade.cascade_predict(_volume(image), stages, (0, 0, 0), (1, 1, 1))
  assert not output.label.any() and 'pancreas_fine found no pancreas in the region [2:4, 5:8, 5:8]' in output.notes[0]


def _fake_experiment(tmp_path, tiny_config, margins=((3, 5, 7), (1, 2, 3))):
  tiny_config.data.root = str(tmp_path / 'data')
  tiny_config.experiments.cascade_pancreas_margin_vox = margins[0]
  tiny_config.experiments.cascade_tumour_margin_vox = margins[1]
  cascade_training.train_stages(tiny_config, tmp_path / 'exp', train_fn=fakes.FakeTraining())
  return tmp_path / 'exp'


def test_train_stages_writes_a_spec_that_survives_moving_the_folder(tmp_path, tiny_config):
  experiment = _fake_experiment(tmp_path, tiny_config)
  written = json.loads((experiment / 'cascade.json').read_text())
  assert written == {'pancreas_coarse': 'pancreas_coarse', 'pancreas_fine': 'pancreas_fine',
                     'tumour_coarse': 'tumour_coarse', 'tumour_fine': 'tumour_fine',
                     'pancreas_margin_vox': [3, 5, 7], 'tumour_coarse_margin_vox': [8, 30, 30],
                     'tumour_margin_vox': [1, 2, 3], 'tumour_rounds': 4}
  moved = pathlib.Path(shutil.move(experiment, tmp_path / 'elsewhere'))
  for spec_path in (moved, moved / 'cascade.json'):
    spec = cascade.read_spec(spec_path)
    assert spec.stage_dirs == {stage: moved / stage for stage in cascade.CASCADE_STAGES}
    assert (spec.pancreas_margin_vox, spec.tumour_margin_vox) == ((3, 5, 7), (1, 2, 3))
    assert (spec.tumour_coarse_margin_vox, spec.tumour_rounds) == ((8, 30, 30), 4)


def test_spec_file_paths_are_relative_to_it_and_margins_default_to_the_trained_config(
    tmp_path, tiny_config):
  experiment = _fake_experiment(tmp_path, tiny_config, margins=((2, 4, 6), (0, 1, 1)))
  specs = tmp_path / 'specs'
  specs.mkdir()
  stages = {stage: f'../exp/{stage}' for stage in cascade.CASCADE_STAGES}
  stages['tumour_fine'] = str((experiment / 'tumour_fine').absolute())
  (specs / 'mine.json').write_text(json.dumps({**stages, 'tumour_margin_vox': [9, 8, 7],
                                               'tumour_rounds': 2}))
  spec = cascade.read_spec(specs / 'mine.json')
  assert {stage: path.resolve() for stage, path in spec.stage_dirs.items()} == {
      stage: (experiment / stage).resolve() for stage in cascade.CASCADE_STAGES}
  # Absent margins come from the pancreas_coarse run's config.json, given ones from the file.
  assert (spec.pancreas_margin_vox, spec.tumour_margin_vox) == ((2, 4, 6), (9, 8, 7))
  assert (spec.tumour_coarse_margin_vox, spec.tumour_rounds) == ((8, 30, 30), 2)
  # An experiment folder without cascade.json (e.g. interrupted) is read by its stage folders.
  (experiment / 'cascade.json').unlink()
  spec = cascade.read_spec(experiment)
  assert spec.stage_dirs['pancreas_fine'] == experiment / 'pancreas_fine'
  assert (spec.pancreas_margin_vox, spec.tumour_margin_vox) == ((2, 4, 6), (0, 1, 1))


def test_spec_errors_name_the_stage_directory_or_key(tmp_path, tiny_config):
  experiment = _fake_experiment(tmp_path, tiny_config)
  spec_path = experiment / 'cascade.json'
  good = json.loads(spec_path.read_text())

  def fails_with(content, pattern, path=spec_path):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=pattern):
      cascade.read_spec(experiment)

  fails_with({**good, 'tumour_fine': 'runs/nowhere'},
             r"the tumour_fine run directory .*runs/nowhere does not exist")
  fails_with({**good, 'pancreas_margin': [1, 1, 1]}, r"unknown key 'pancreas_margin'")
  fails_with({key: value for key, value in good.items() if key != 'pancreas_fine'},
             r"lacks the run directory of the stage 'pancreas_fine'")
  fails_with({**good, 'tumour_margin_vox': [1, 2]}, r"'tumour_margin_vox' = \[1, 2\]; give three")
  fails_with({**good, 'pancreas_margin_vox': [1, -2, 3]}, r"'pancreas_margin_vox'")
  fails_with({**good, 'tumour_rounds': 0}, r"tumour_rounds = 0; give a whole number >= 1")
  fails_with({**good, 'tumour_coarse': 7}, r"'tumour_coarse' must be a run directory path")
  fails_with('{"pancreas_coarse": ', r'cascade.json is not readable JSON')
  (experiment / 'not_a_run').mkdir()
  fails_with({**good, 'pancreas_fine': 'not_a_run'}, r'not_a_run holds no config.json')
  with pytest.raises(ConfigError, match=r'--cascade=.*missing does not exist'):
    cascade.read_spec(tmp_path / 'missing')
  shutil.rmtree(experiment / 'tumour_coarse')
  spec_path.unlink()
  with pytest.raises(ConfigError, match=r'the tumour_coarse run directory .*exp/tumour_coarse does not exist'):
    cascade.read_spec(experiment)
  # A run of another stage under a stage's name would have its channel read as the wrong structure.
  spec_path.write_text(json.dumps({**good, 'tumour_coarse': 'pancreas_coarse'}))
  with pytest.raises(ConfigError, match=r"'tumour_coarse' names .*pancreas_coarse, a run trained "
                                        r"as stage 'pancreas_coarse'"):
    cascade.load_predictors(cascade.read_spec(experiment))


def _lps_affine():
  affine = np.diag([-0.9, -0.9, 2.5, 1.0])  # voxel axes towards patient left and posterior
  affine[:3, 3] = (30.0, 20.0, -40.0)
  return affine


def _write_planted(path, with_pancreas=True):
  """A (x, y, z) = (24, 20, 10) image: pancreas 1, tumour 2 inside it, background 0."""
  source = np.zeros((24, 20, 10), np.int16)
  if with_pancreas:
    source[6:16, 5:12, 2:7] = 1
    source[8:11, 6:9, 3:5] = 2
  nib.save(nib.Nifti1Image(source, _lps_affine()), path)
  return source


def _threshold_stages():
  return {stage: ThresholdStage(0.5, 1) if stage.startswith('pancreas') else ThresholdStage(1.5, 2)
          for stage in cascade.CASCADE_STAGES}


def _threshold_cascade():
  """The threshold stages with pancreas margin (1, 1, 1) and tumour margin (0, 1, 1)."""
  stages = _threshold_stages()
  return lambda volume: cascade.cascade_predict(volume, stages, (1, 1, 1), (0, 1, 1))


def test_cascade_outputs_in_the_input_geometry_with_notes_and_overwrite_refusal(tmp_path):
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  planted = _write_planted(inputs / 'a.nii.gz')
  _write_planted(inputs / 'b.nii', with_pancreas=False)
  output = tmp_path / 'out'
  written = run.predict_cases_with_cascade(_threshold_cascade(), inputs, output)
  assert [paths['label'].name for paths in written] == ['a.nii.gz', 'b.nii.gz']
  assert [paths['notes'].name for paths in written] == ['a_notes.json', 'b_notes.json']
  for paths, expected in zip(written, (planted, np.zeros_like(planted))):
    image = nib.load(paths['label'])
    assert image.shape == expected.shape and image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(image.affine, nib.load(inputs / 'a.nii.gz').affine)
    # Thresholding commutes with reorientation: the source array's own labels are the answer.
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
  notes = {paths['label'].name: json.loads(paths['notes'].read_text()) for paths in written}
  assert notes['a.nii.gz']['notes'] == [] and notes['a.nii.gz']['case'] == 'a'
  # Canonical (z, y, x) = source (k, flipped j, flipped i): pancreas k 2:7, j 5:12, i 6:16,
  # grown by (1, 1, 1) and clipped; flipped j of 20 and i of 24 give 8:15 and 8:18.
  assert notes['a.nii.gz']['stage_boxes_zyx']['pancreas_fine'] == [[1, 8], [7, 16], [7, 19]]
  assert 'pancreas_coarse found no pancreas' in notes['b.nii.gz']['notes'][0]
  assert notes['b.nii.gz']['stage_boxes_zyx'] == {'pancreas_fine': None, 'tumour_coarse': None, 'tumour_fine': None}

  before = (output / 'a.nii.gz').stat().st_mtime_ns
  (output / 'b.nii.gz').unlink()  # the notes file alone also blocks b
  with pytest.raises(DataError, match=r'b_notes\.json already exists.*--overwrite'):
    run.predict_with_cascade(tmp_path / 'no_cascade', inputs / 'b.nii', output)
  with pytest.raises(DataError, match=r'a\.nii\.gz already exists \(and 2 more outputs\).*--overwrite'):
    run.predict_cases_with_cascade(_threshold_cascade(), inputs, output)
  assert (output / 'a.nii.gz').stat().st_mtime_ns == before and not (output / 'b.nii.gz').exists()
  run.predict_cases_with_cascade(_threshold_cascade(), inputs, output, overwrite=True)
  assert (output / 'b.nii.gz').exists()


def test_command_line_cascade_flags(tmp_path):
  def predict(*flags):
    return subprocess.run(
        [sys.executable, '-m', 'launch.predict', f'--input={tmp_path / "case.nii.gz"}',
         f'--output={tmp_path / "out"}', *flags],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})

  _write_planted(tmp_path / 'case.nii.gz')
  both = predict(f'--workdir={tmp_path}', f'--cascade={tmp_path}')
  assert both.returncode != 0 and 'Exactly one of (workdir, cascade, model)' in both.stderr
  (tmp_path / 'exp' / 'pancreas_coarse').mkdir(parents=True)
  (tmp_path / 'exp' / 'pancreas_coarse' / 'config.json').write_text('{}')
  missing = predict(f'--cascade={tmp_path / "exp"}')
  assert missing.returncode == 2
  assert f'the pancreas_fine run directory {tmp_path / "exp" / "pancreas_fine"} does not exist' in missing.stderr
  assert not (tmp_path / 'out').exists()
