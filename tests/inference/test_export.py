"""Sharing a model: an export holds the parameters only, with the config and a model card, and
predicts the labels of its run; several models average their probabilities before the threshold;
prediction settings change at predict time, and only those."""

import json
import subprocess
import sys

import flax.serialization
import jax
import nibabel as nib
import numpy as np
import pytest

from dualseg_jax import config_base
from dualseg_jax import run_dir
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.inference import model_dir
from dualseg_jax.inference import overrides
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.inference import run
from dualseg_jax.train import loop
from tests.conftest import PROJECT_ROOT, tiny_run_config
from tests.inference.helpers import random_params, save_params_for_test

# Thresholds alone, so the expected label map is one NumPy line per structure.
THRESHOLD_ONLY = ('inference.postprocess=none', 'inference.tumour_inside_pancreas=false')


@pytest.fixture(scope='module')
def trained_run(phantom_root, tmp_path_factory):
  # A foreground prior of 0.5 puts a one-step network's probabilities around the threshold, so
  # averaging two networks changes labels; no window overlap keeps prediction short.
  config = tiny_run_config(phantom_root, steps=1, **{
      'inference.overlap': 0.0, 'model.foreground_prior': 0.5})
  workdir = tmp_path_factory.mktemp('export') / 'run'
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def exported(trained_run):
  out_dir = trained_run.parent / 'model'
  info = model_dir.export_model(trained_run, out_dir)
  return out_dir, info


@pytest.fixture(scope='module')
def other_model(trained_run):
  """A second model of the same stage with other parameters, exported from a run that has a
  held-out summary."""
  config = predictor_lib.load_config(trained_run)
  workdir = save_params_for_test(trained_run.parent / 'other_run', config,
                                 random_params(config, seed=3))
  summary = workdir / 'evaluation' / 'test_center_c' / 'summary.json'
  summary.parent.mkdir(parents=True)
  summary.write_text(json.dumps({'num_cases': 4, 'by_center': {'all': {
      'pancreas': {'dice': {'mean': 0.8125, 'std': 0.1}, 'hd95_mm': {'mean': 7.25}},
      'tumour': {'dice': {'mean': 0.5, 'n': 3}, 'nsd': {'mean': 0.4375}}}}}))
  out_dir = trained_run.parent / 'other_model'
  model_dir.export_model(workdir, out_dir)
  return out_dir


@pytest.fixture(scope='module')
def ct_path(tmp_path_factory):
  """A small CT of a bright box in dark tissue at spacing (1.6, 2.1, 2.7) mm."""
  path = tmp_path_factory.mktemp('ct') / 'case_1.nii.gz'
  image = np.full((22, 18, 15), -60, np.int16)
  image[5:15, 4:12, 3:10] = 200
  nib.save(nib.Nifti1Image(image, np.diag([1.6, 2.1, 2.7, 1.0])), path)
  return path


def _predict(ct_path, output_dir, models, **kwargs):
  """(label, probabilities) of `models` on the CT, as read back from the files written."""
  written = run.predict_with_models(models, ct_path, output_dir, save_probabilities=True, **kwargs)
  return (np.asarray(nib.load(written[0]['label']).dataobj),
          np.asarray(nib.load(written[0]['probabilities']).dataobj))


def test_the_export_holds_the_parameters_only(trained_run, exported):
  out_dir, info = exported
  assert sorted(path.name for path in out_dir.iterdir()) == [
      'config.json', 'model.json', 'model_card.md', 'params.msgpack']
  params, step = run_dir.restore_params(trained_run, which='best')
  saved = flax.serialization.msgpack_restore((out_dir / 'params.msgpack').read_bytes())
  # The parameter tree and nothing else: no optimizer moments, no step, no iterator.
  assert jax.tree.structure(saved) == jax.tree.structure(params)
  for saved_leaf, leaf in zip(jax.tree.leaves(saved), jax.tree.leaves(params)):
    np.testing.assert_array_equal(saved_leaf, np.asarray(leaf))
  assert info['step'] == step == 1 and info['checkpoint'] == 'checkpoints/1'  # no validation ran
  assert info['num_parameters'] == sum(leaf.size for leaf in jax.tree.leaves(saved))
  assert info['params_bytes'] == (out_dir / 'params.msgpack').stat().st_size
  # Adam's two moments alone are twice the parameters: the checkpoint is about three times larger.
  assert info['params_bytes'] < info['checkpoint_bytes'] / 2
  assert info['stage'] == 'joint' and info['preset'] == 'tiny'
  assert info['data']['trained_on'] == ['center_a', 'center_b']
  assert info['data']['test_center'] == 'center_c' and info['held_out'] is None
  assert json.loads((out_dir / 'model.json').read_text()) == info
  assert predictor_lib.load_config(out_dir).to_dict() == (
      predictor_lib.load_config(trained_run).to_dict())
  card = (out_dir / 'model_card.md').read_text()
  assert f'step {step}' in card and 'None: the run has no evaluation' in card
  assert f'--model={out_dir}' in card


def test_the_model_card_shows_the_held_out_means(other_model):
  info = model_dir.read_info(other_model)
  assert info['held_out']['center'] == 'center_c' and info['held_out']['num_cases'] == 4
  assert info['held_out']['means'] == {'pancreas': {'dice': 0.8125, 'hd95_mm': 7.25},
                                       'tumour': {'dice': 0.5, 'nsd': 0.4375}}
  card = (other_model / 'model_card.md').read_text()
  assert '## Held-out evaluation (center_c, 4 cases; means over cases)' in card
  assert '| structure | dice | nsd | hd95_mm |' in card
  assert '| pancreas | 0.812 |  | 7.250 |' in card
  assert '| tumour | 0.500 | 0.438 |  |' in card


def test_a_summary_in_another_layout_gives_a_note_not_an_error(tmp_path):
  summary = tmp_path / 'evaluation' / 'test_x' / 'summary.json'
  summary.parent.mkdir(parents=True)
  summary.write_text('{"pancreas": {"dice": {"mean": 0.5}}, "rows": [1, 2]}')
  assert model_dir.held_out_means(tmp_path)['means'] == {'pancreas': {'dice': 0.5}}
  summary.write_text('{"by_center": {"all": [1, 2]}, "cases": 3}')
  assert 'no per-structure means' in model_dir.held_out_means(tmp_path)['note']
  summary.write_text('{"trunc')
  assert 'not readable' in model_dir.held_out_means(tmp_path)['note']
  assert model_dir.held_out_means(tmp_path / 'elsewhere') is None


def test_an_exported_model_predicts_the_labels_of_its_run(tmp_path, ct_path, trained_run,
                                                          exported):
  run_label, run_probabilities = _predict(ct_path, tmp_path / 'from_run', [trained_run])
  model_label, model_probabilities = _predict(ct_path, tmp_path / 'from_model', [exported[0]])
  np.testing.assert_array_equal(model_label, run_label)
  np.testing.assert_array_equal(model_probabilities, run_probabilities)
  assert run_label.shape == (22, 18, 15)
  # The same model twice is the model.
  twice_label, twice_probabilities = _predict(ct_path, tmp_path / 'twice', [exported[0]] * 2)
  np.testing.assert_array_equal(twice_label, model_label)
  np.testing.assert_array_equal(twice_probabilities, model_probabilities)


def test_an_ensemble_averages_probabilities_then_thresholds(tmp_path, ct_path, exported,
                                                           other_model):
  models = [exported[0], other_model]
  first_label, first = _predict(ct_path, tmp_path / 'first', models[:1],
                                inference_overrides=THRESHOLD_ONLY)
  _, second = _predict(ct_path, tmp_path / 'second', models[1:],
                       inference_overrides=THRESHOLD_ONLY)
  label, probabilities = _predict(ct_path, tmp_path / 'ensemble', models,
                                  inference_overrides=THRESHOLD_ONLY)
  average = (first + second) / np.float32(2)
  np.testing.assert_array_equal(probabilities, average)
  expected = np.where(average[..., 1] > 0.5, 2, np.where(average[..., 0] > 0.5, 1, 0))
  np.testing.assert_array_equal(label, expected)
  assert np.any(label != first_label)  # the second model moved some voxels across the threshold
  # The same override changes the post-processing: each model alone, too.
  np.testing.assert_array_equal(
      first_label, np.where(first[..., 1] > 0.5, 2, np.where(first[..., 0] > 0.5, 1, 0)))


def test_an_override_changes_the_post_processing(tmp_path, ct_path, exported):
  kept_largest, probabilities = _predict(ct_path, tmp_path / 'largest', [exported[0]])
  kept_all, same_probabilities = _predict(ct_path, tmp_path / 'all', [exported[0]],
                                          inference_overrides=['inference.postprocess=none'])
  np.testing.assert_array_equal(same_probabilities, probabilities)
  assert np.all(kept_largest <= kept_all) and np.any(kept_largest != kept_all)


def test_overrides_are_parsed_as_their_keys_types_and_checked():
  config = config_base.base_config()
  parsed = overrides.parse(['inference.overlap=0.25', 'inference.tta_flips=2',
                            'inference.tumour_inside_pancreas=False',
                            'inference.postprocess=min_volume', 'inference.min_component_mm3=250'],
                           config.inference)
  assert parsed == {'overlap': 0.25, 'tta_flips': 2, 'tumour_inside_pancreas': False,
                    'postprocess': 'min_volume', 'min_component_mm3': 250.0}
  assert isinstance(parsed['min_component_mm3'], float)
  changed = overrides.apply(config, parsed)
  assert changed.inference.overlap == 0.25 and config.inference.overlap == 0.5  # a copy
  with pytest.raises(ConfigError, match=r'model\.widths: only inference\.\* settings'):
    overrides.parse(['model.widths=4'], config.inference)
  with pytest.raises(ConfigError, match='inference.overlapp: no such key; did you mean '
                                        'inference.overlap[?] inference keys: '):
    overrides.parse(['inference.overlapp=0.25'], config.inference)
  with pytest.raises(ConfigError, match='inference.tta_flips=two: give an integer'):
    overrides.parse(['inference.tta_flips=two'], config.inference)
  with pytest.raises(ConfigError, match='write inference.KEY=VALUE'):
    overrides.parse(['inference.overlap'], config.inference)
  with pytest.raises(ConfigError, match=r"inference.postprocess = 'biggest': choose one of"):
    overrides.apply(config, overrides.parse(['inference.postprocess=biggest'], config.inference))
  with pytest.raises(ConfigError, match=r'inference.overlap = 1.0: choose a fraction in \[0, 1\)'):
    overrides.apply(config, {'overlap': 1.0})


def test_models_that_cannot_be_averaged_and_changed_files_are_refused(tmp_path, exported,
                                                                      ct_path):
  tumour_model = tmp_path / 'tumour_model'
  tumour_model.mkdir()
  for name in ('model.json', 'params.msgpack', 'model_card.md'):
    (tumour_model / name).write_bytes((exported[0] / name).read_bytes())
  config = json.loads((exported[0] / 'config.json').read_text())
  config['stage'], config['model']['num_classes'] = 'tumour_fine', 1
  (tumour_model / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=f"{tumour_model} predicts stage 'tumour_fine' but"):
    run.predict_with_models([exported[0], tumour_model], ct_path, tmp_path / 'out')
  with pytest.raises(ConfigError, match='is an exported model: it holds the parameters of one '
                                        r'checkpoint \(checkpoints/1\); drop --checkpoint'):
    predictor_lib.load_predictor(exported[0], checkpoint='latest')
  with pytest.raises(ConfigError, match='drop inference.checkpoint'):
    predictor_lib.load_predictor(exported[0], inference_overrides=['inference.checkpoint=latest'])
  with (tumour_model / 'params.msgpack').open('r+b') as params_file:
    params_file.seek(100)
    params_file.write(b'\x00\x01\x02')
  with pytest.raises(DataError, match='params.msgpack differs from the file exported'):
    model_dir.load_params(tumour_model)
  assert not (tmp_path / 'out').exists()


def _launch(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})


def test_command_lines_export_and_refuse_a_bad_override(tmp_path, trained_run, exported,
                                                        ct_path):
  out_dir = tmp_path / 'model'
  result = _launch('launch.export', f'--workdir={trained_run}', f'--out={out_dir}')
  assert result.returncode == 0, result.stderr
  assert f'exported checkpoints/1 of {trained_run.resolve()} to {out_dir}:' in result.stdout
  assert (out_dir / 'params.msgpack').read_bytes() == (exported[0] / 'params.msgpack').read_bytes()
  result = _launch('launch.export', f'--workdir={trained_run}', f'--out={out_dir}')
  assert result.returncode == 2
  assert f'error: {out_dir} exists and is not empty' in result.stderr
  result = _launch('launch.predict', f'--model={out_dir}', f'--input={ct_path}',
                   f'--output={tmp_path / "out"}', '--override=model.widths=4')
  assert result.returncode == 2
  assert 'error: --override model.widths: only inference.* settings' in result.stderr
  assert not (tmp_path / 'out').exists()
