"""The cascade as an experiment: each stage's config (the reference's recipe or the config as
given), the four stages trained in order, once, and the whole cascade scored on the held-out
cases with stand-in stage predictors."""

import json
import os
import signal

import numpy as np
import pytest

from dualseg_jax.data import phantoms
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import cascade
from dualseg_jax.experiments import runs
from tests.conftest import tiny_run_config
from tests.experiments import fakes


def test_stage_configs_follow_the_reference_recipe(tiny_config):
  recipe = {stage: cascade.stage_config(tiny_config, stage) for stage in cascade.CASCADE_STAGES}
  assert all(recipe[stage].stage == stage and recipe[stage].model.num_classes == 1
             for stage in cascade.CASCADE_STAGES)
  coarse, fine = recipe['pancreas_coarse'], recipe['pancreas_fine']
  # Pancreas coarse: half the in-plane resolution, no SDF terms, cosine consistency of the views.
  z, y, x = tiny_config.data.target_spacing_mm
  assert tuple(coarse.data.target_spacing_mm) == (z, 2 * y, 2 * x)
  assert coarse.loss.consistency_form == 'cosine' and coarse.loss.weights.consistency == 1.0
  # Pancreas fine: its pancreas box + 20 voxels in-plane and 5% of the slices, one raw view.
  assert tuple(fine.data.target_spacing_mm) == (z, y, x) and fine.augment.raw_view
  assert tuple(fine.data.crop_margin_xy) == (20, 20) and fine.loss.weights.consistency == 0.0
  for stage in ('pancreas_coarse', 'pancreas_fine'):
    weights = recipe[stage].loss.weights
    assert weights.sdf_l1 == weights.sdf_to_mask_dice == 0.0 and weights.contrastive > 0
  # The tumour stages keep the dual-task terms; tumour fine crops around the tumour and adds the
  # slice head and the SDF maps' consistency.
  for stage in ('tumour_coarse', 'tumour_fine'):
    config = recipe[stage]
    assert config.loss.weights.sdf_l1 == tiny_config.loss.weights.sdf_l1 > 0
    assert config.loss.consistency_form == 'mse' and config.data.random_patch_fraction == 0.0
  assert recipe['tumour_coarse'].data.roi_structure == 'pancreas'
  tumour_fine = recipe['tumour_fine']
  assert tumour_fine.data.roi_structure == 'tumour' and tuple(tumour_fine.data.crop_margin_xy) == (-5, 40)
  assert tumour_fine.model.slice_head and tumour_fine.loss.weights.slice_bce == 1.0
  assert tumour_fine.loss.consistency_on_sdf and not recipe['tumour_coarse'].loss.consistency_on_sdf


def test_uniform_recipe_trains_every_stage_on_the_config_as_given(tiny_config):
  tiny_config.experiments.cascade_recipe = 'uniform'
  fine = cascade.stage_config(tiny_config, 'tumour_fine')
  assert (fine.stage, fine.model.num_classes, fine.model.slice_head) == ('tumour_fine', 1, True)
  assert fine.loss.weights.slice_bce == 1.0 and fine.loss.consistency_on_sdf
  coarse = cascade.stage_config(tiny_config, 'pancreas_coarse')
  assert (coarse.model.num_classes, coarse.model.slice_head) == (1, False)
  assert tuple(coarse.data.patch_size) == tuple(tiny_config.data.patch_size)
  assert tuple(coarse.data.target_spacing_mm) == tuple(tiny_config.data.target_spacing_mm)
  assert coarse.loss.weights.sdf_l1 == tiny_config.loss.weights.sdf_l1
  tiny_config.experiments.cascade_recipe = 'published'
  with pytest.raises(ConfigError, match='experiments.cascade_recipe'):
    cascade.stage_config(tiny_config, 'pancreas_fine')


def test_stages_train_in_order_once(tmp_path, tiny_config):
  tiny_config.data.root = str(tmp_path / 'data')
  tiny_config.experiments.cascade_fine_patch_size = (16, 24, 24)
  training = fakes.FakeTraining()
  folders = cascade.train_stages(tiny_config, tmp_path / 'exp', train_fn=training)
  assert training.calls == list(cascade.CASCADE_STAGES) == list(folders)
  saved = {stage: json.loads((tmp_path / 'exp' / stage / 'config.json').read_text())
           for stage in cascade.CASCADE_STAGES}
  assert [saved[s]['stage'] for s in cascade.CASCADE_STAGES] == list(cascade.CASCADE_STAGES)
  assert all(saved[s]['model']['num_classes'] == 1 for s in cascade.CASCADE_STAGES)
  assert [saved[s]['data']['patch_size'] for s in cascade.CASCADE_STAGES] == [
      [16, 32, 32], [16, 24, 24], [16, 32, 32], [16, 24, 24]]
  assert [saved[s]['model']['slice_head'] for s in cascade.CASCADE_STAGES] == [False, False, False, True]
  again = fakes.FakeTraining()
  cascade.train_stages(tiny_config, tmp_path / 'exp', train_fn=again)
  assert again.calls == []


def test_stages_train_the_reference_epochs_over_the_training_cases(tmp_path, tiny_config):
  from dualseg_jax.data import pipeline, registry
  tiny_config.data.root = str(tmp_path / 'data')
  tiny_config.data.batch_size = 2
  tiny_config.experiments.cascade_epochs = (2, 3, 5, 7)
  cascade.train_stages(tiny_config, tmp_path / 'exp', train_fn=fakes.FakeTraining())
  pipeline.resolve_data_root(tiny_config)  # where the phantoms were generated
  split = registry.split_cases(tiny_config.data, registry.list_cases(tiny_config.data),
                               seed=tiny_config.seed)
  # Tiny: 3 cases in each of the two training centers, one of each for validation.
  assert len(split.train) == 4
  steps = [json.loads((tmp_path / 'exp' / stage / 'config.json').read_text())['train']['steps']
           for stage in cascade.CASCADE_STAGES]
  assert steps == [2 * 2, 3 * 2, 5 * 2, 7 * 2]  # epochs x ceil(4 cases / batch 2)
  assert cascade.stage_steps(tiny_config, 'tumour_fine', num_train_cases=5) == 7 * 3
  tiny_config.experiments.cascade_epochs = ()
  assert cascade.stage_steps(tiny_config, 'tumour_fine', 5) == tiny_config.train.steps
  for epochs in ((150, 800), (150, 150, 0, 800), (1.5, 1, 1, 1)):
    tiny_config.experiments.cascade_epochs = epochs
    with pytest.raises(ConfigError, match='experiments.cascade_epochs'):
      cascade.stage_steps(tiny_config, 'pancreas_coarse', 4)


def test_the_presets_schedule_the_cascade_as_they_should():
  from configs import three_center
  # The paper preset: the reference's 150 epochs for the pancreas stages, 800 for the tumour's.
  assert tuple(three_center.get_config('paper').experiments.cascade_epochs) == (150, 150, 800, 800)
  for preset in ('quick', 'tiny'):
    assert tuple(three_center.get_config(preset).experiments.cascade_epochs) == ()


class BlockStage:
  """Labels the middle third of every volume it is given with `label`; calls `on_first_call`
  (if any) before its first prediction."""

  def __init__(self, label, on_first_call=None):
    self.label, self.on_first_call, self.calls = label, on_first_call, 0

  def predict_volume(self, volume, tta_flips=None, progress=None, pancreas_mask=None):
    self.calls += 1
    if self.calls == 1 and self.on_first_call is not None:
      self.on_first_call()
    label = np.zeros(volume.array.shape, np.uint8)
    label[tuple(slice(size // 3, max(size // 3 + 1, 2 * size // 3)) for size in label.shape)] = self.label
    return {'label': label}


def test_the_cascade_is_scored_on_every_held_out_case_and_a_stop_interrupts_the_experiment(
    phantom_root, tmp_path, monkeypatch):
  config = tiny_run_config(phantom_root, steps=1)
  phantoms.ensure_synthetic_data(config.data)
  workdir = tmp_path / 'exp'
  stage_dirs = cascade.train_stages(config, workdir, train_fn=fakes.FakeTraining())
  held_out = sorted(path.name.removesuffix('.nii.gz')
                    for path in (phantom_root / 'center_c' / 'labelsTr').glob('*.nii.gz'))
  assert held_out

  def stages(on_first_call=None):
    return {stage: BlockStage(1 if stage.startswith('pancreas') else 2,
                              on_first_call if stage == 'pancreas_coarse' else None)
            for stage in cascade.CASCADE_STAGES}

  # SIGTERM during the first case: the experiment is interrupted, as a stopped stage run is.
  monkeypatch.setattr(cascade, 'load_predictors',
                      lambda spec: stages(lambda: os.kill(os.getpid(), signal.SIGTERM)))
  with pytest.raises(runs.ExperimentInterrupted, match='held-out evaluation stopped by signal 15'):
    cascade.evaluate(config, workdir, stage_dirs)
  assert not (workdir / 'evaluation' / 'summary.json').exists()

  monkeypatch.setattr(cascade, 'load_predictors', lambda spec: stages())
  summary = cascade.evaluate(config, workdir, stage_dirs)
  predictions = workdir / 'evaluation' / 'predictions'
  assert sorted(path.name for path in predictions.glob('*.nii.gz')) == [
      f'{case}.nii.gz' for case in held_out]
  assert summary['num_cases'] == len(held_out) and summary['complete']
  assert sorted(summary['notes']) == held_out
  assert json.loads((workdir / 'evaluation' / 'notes.json').read_text()) == summary['notes']
  assert (workdir / 'evaluation' / 'summary.md').read_text() == summary['table']
