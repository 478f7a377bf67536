"""The coarse-to-fine cascade as an experiment: each stage's training config (the reference's
recipe or the config as given), training the four stages in order with the cascade spec
(cascade.json) naming them, and scoring the whole cascade on the held-out cases. Predicting
with the stages is inference/cascade.py's."""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Any, Callable

import ml_collections

from dualseg_jax import config_base
from dualseg_jax import files
from dualseg_jax.data import pipeline
from dualseg_jax.data import registry
from dualseg_jax.errors import ConfigError
from dualseg_jax.evaluation import held_out
from dualseg_jax.experiments import runs
from dualseg_jax.inference import run as run_lib
from dualseg_jax.inference.cascade import CascadeSpec, load_predictors, write_spec
from dualseg_jax.structures import CASCADE_STAGES

log = logging.getLogger('dualseg_jax')

CASCADE_RECIPES = ('reference', 'uniform')
# Crops of the reference's training scripts: (in-plane voxel margin range, z margin range as a
# share of the slices, the structure whose box they grow).
_REFERENCE_CROPS = {
    'pancreas_fine': ((20, 20), (0.05, 0.05), 'pancreas'),
    'tumour_coarse': ((0, 30), (0.01, 0.1), 'pancreas'),
    'tumour_fine': ((-5, 40), (0.01, 0.1), 'tumour'),
}


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The config of one cascade stage: one output channel, the fine patch size for fine stages,
  the slice-classification head for the fine tumour stage, and with
  `experiments.cascade_recipe='reference'` the reference's per-stage resolution, crops, losses
  and views (docs/fidelity.md)."""
  if stage not in CASCADE_STAGES:
    raise ConfigError(f'stage {stage!r} is not a cascade stage {CASCADE_STAGES}')
  recipe = config.experiments.cascade_recipe
  if recipe not in CASCADE_RECIPES:
    raise ConfigError(f'experiments.cascade_recipe={recipe!r}: choose one of {CASCADE_RECIPES}')
  overrides: dict[str, Any] = {'stage': stage, 'model.num_classes': 1}
  fine_patch = tuple(config.experiments.cascade_fine_patch_size)
  if stage.endswith('_fine') and fine_patch:
    overrides['data.patch_size'] = fine_patch
  if stage == 'tumour_fine':
    overrides['model.slice_head'] = True
    overrides['loss.weights.slice_bce'] = 1.0
  if recipe == 'uniform':
    if stage.endswith('_fine'):
      overrides['loss.consistency_on_sdf'] = True
    return config_base.with_overrides(config, overrides)

  if stage.startswith('pancreas_'):
    # The SDF terms belong to the reference's tumour stages only.
    overrides['loss.weights.sdf_l1'] = 0.0
    overrides['loss.weights.sdf_to_mask_dice'] = 0.0
    overrides['loss.consistency_on_sdf'] = False
    overrides['augment.elastic_prob'] = 0.5  # the reference's pancreas stages (tumour: 0.1)
  if stage == 'pancreas_coarse':
    factor = tuple(float(f) for f in config.experiments.cascade_coarse_spacing_factor)
    if len(factor) != 3 or any(f <= 0 for f in factor):
      raise ConfigError(f'experiments.cascade_coarse_spacing_factor={factor}: give three positive '
                        'factors (z, y, x), e.g. (1, 2, 2) for half the in-plane resolution')
    overrides['data.target_spacing_mm'] = tuple(
        s * f for s, f in zip(config.data.target_spacing_mm, factor))
    overrides['loss.consistency_form'] = 'cosine'
  elif stage == 'pancreas_fine':
    overrides['loss.weights.consistency'] = 0.0
    overrides['augment.raw_view'] = True
  else:
    overrides['loss.consistency_form'] = 'mse'
    overrides['loss.consistency_on_sdf'] = stage == 'tumour_fine'
  if stage in _REFERENCE_CROPS:
    margin_xy, margin_z, structure = _REFERENCE_CROPS[stage]
    overrides['data.crop_margin_xy'] = margin_xy
    overrides['data.crop_margin_z_fraction'] = margin_z
    overrides['data.roi_structure'] = structure
    # These stages only ever predict inside the box of the stage before them.
    overrides['data.random_patch_fraction'] = 0.0
  return config_base.with_overrides(config, overrides)


def stage_steps(config: ml_collections.ConfigDict, stage: str, num_train_cases: int) -> int:
  """Training steps of one stage: `experiments.cascade_epochs` of that stage times the steps of
  an epoch over `num_train_cases` (ceil(cases / data.batch_size)), or train.steps when the
  epochs are ()."""
  epochs = tuple(config.experiments.cascade_epochs)
  if not epochs:
    return int(config.train.steps)
  if len(epochs) != len(CASCADE_STAGES) or any(int(e) != e or e <= 0 for e in epochs):
    raise ConfigError(
        f'experiments.cascade_epochs={epochs}: give {len(CASCADE_STAGES)} positive whole numbers '
        f'({", ".join(CASCADE_STAGES)}), e.g. (150, 150, 800, 800), or () to train every stage '
        'train.steps')
  if num_train_cases <= 0:
    raise ConfigError('the split holds no training cases: an epoch has no steps')
  per_epoch = math.ceil(num_train_cases / int(config.data.batch_size))
  return int(epochs[CASCADE_STAGES.index(stage)]) * per_epoch


def _split(config: ml_collections.ConfigDict) -> registry.Split:
  """The train/val/test cases of `config`, its data root resolved in place."""
  with config.unlocked():
    pipeline.resolve_data_root(config)
  return pipeline.list_and_split(config)[1]


def train_stages(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 train_fn: Callable | None = None) -> dict[str, pathlib.Path]:
  """Trains the four stages in order in workdir/<stage> (finished ones are not redone), each for
  `stage_steps`; the stages skip their own held-out evaluation, which only the whole cascade is
  given. Then writes workdir/cascade.json, so `launch.predict --cascade=workdir` finds the stages
  and margins."""
  num_train_cases = (len(_split(config_base.with_overrides(config, {})).train)
                     if tuple(config.experiments.cascade_epochs) else 0)
  specs = []
  for stage in CASCADE_STAGES:
    stage_overrides = config_base.differences(config, stage_config(config, stage))
    stage_overrides['train.steps'] = stage_steps(config, stage, num_train_cases)
    stage_overrides['train.evaluate_test_center'] = False
    specs.append(runs.RunSpec(name=stage, overrides=stage_overrides))
  stage_dirs = runs.run_all(config, workdir, specs, train_fn=train_fn)
  write_spec(workdir, stage_dirs, config.experiments)
  return stage_dirs


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             stage_dirs: dict[str, pathlib.Path]) -> dict | None:
  """Predicts the held-out cases with the cascade and scores them (held_out.evaluate):
  workdir/evaluation/ holds predictions/ (input geometry), ground_truth/ and images/ (links),
  notes.json (what the cascade could not do per case), the report and summary.json. A stop on
  request raises runs.ExperimentInterrupted; rerunning the command predicts every case again."""
  workdir = pathlib.Path(workdir)
  evaluation_config = stage_config(config, 'tumour_fine')
  split = _split(evaluation_config)
  # The first evaluation records the data; a later one refuses data changed since.
  pipeline.check_data_identity(evaluation_config, split, workdir)
  cases = [case for case in split.test if case.label_path]
  if not cases:
    log.warning('no labelled test cases for the cascade to evaluate')
    return None
  spec = CascadeSpec.from_config(stage_dirs, config.experiments, source=workdir)
  predictors = load_predictors(spec)
  out_dir = workdir / 'evaluation'
  notes = {}

  def predict(planned, should_stop):
    notes.update(run_lib.predict_planned_with_cascade(
        lambda volume: spec.predict(volume, predictors), planned, resume=True,
        should_stop=should_stop))
    files.write_json(out_dir / 'notes.json', notes)

  try:
    summary = held_out.evaluate(cases, out_dir, predict, config)
  except held_out.HeldOutEvaluationStopped as stopped:
    raise runs.ExperimentInterrupted(str(stopped)) from None
  summary['notes'] = notes
  return summary
