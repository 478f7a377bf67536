"""Validation during training (whole-volume Dice on held-out cases of the training centers) and
the final evaluation of the test center with the run's best parameters."""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections
import numpy as np

from dualseg_jax import run_dir
from dualseg_jax import structures
from dualseg_jax.data import io
from dualseg_jax.evaluation import held_out
from dualseg_jax.evaluation import metrics as metrics_lib
# What evaluate_test_center raises and writes; the loop and the tests name them here.
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.inference import run as run_lib

log = logging.getLogger('dualseg_jax')

# Above this many voxels in all validation volumes together, they are re-read at each validation.
_KEEP_IN_MEMORY_VOXELS = 200_000_000


class Validator:
  """Predicts each validation case whole (sliding window, no flips) and scores Dice per structure."""

  def __init__(self, config: ml_collections.ConfigDict, cases: list):
    # The predictor builds the network from config.model; every process validates on its own.
    self.config = config
    self.cases = list(cases)
    self.structures = structures.stage_structures(config.stage)
    self._volumes: dict[str, tuple] = {}
    self._keep = None
    self._predictor = None  # built once, so the network compiles once

  def _load(self, case):
    if case.case_id in self._volumes:
      return self._volumes[case.case_id]
    image, label = io.read_case(case.image_path, case.label_path, self.config.data.label_map or None)
    if self._keep is None:
      self._keep = image.array.size * max(1, len(self.cases)) <= _KEEP_IN_MEMORY_VOXELS
    if self._keep:
      self._volumes[case.case_id] = (image, label)
    return image, label

  def run(self, params) -> dict[str, float]:
    if not self.cases:
      return {}
    # The replicated parameters' local copy: prediction is a purely local computation, so every
    # process of a multi-host run can validate on its own.
    params = jax.tree.map(lambda array: array.addressable_data(0), params)
    if self._predictor is None:
      self._predictor = predictor_lib.Predictor(self.config, params)
    predictor = self._predictor.with_params(params)
    scores: dict[str, list[float]] = {name: [] for name in self.structures}
    for case in self.cases:
      image, label = self._load(case)
      predicted = predictor.predict_volume(image, tta_flips=1)['label']
      for name in self.structures:
        select = structures.MASKS[name]
        reference = select(label.array)
        # A case without the structure would score 1 for predicting nothing: it would reward an
        # untrained network and pick the wrong best checkpoint, so it does not count here.
        if reference.any():
          scores[name].append(metrics_lib.dice(select(predicted), reference))
    result = {f'dice_{name}': float(np.mean(values)) for name, values in scores.items() if values}
    if result:
      result['dice_mean'] = float(np.mean(list(result.values())))
    return result


def evaluate_test_center(config: ml_collections.ConfigDict, workdir: pathlib.Path, test_cases: list,
                         tag: str) -> dict | None:
  """Predicts the held-out cases with the run's best parameters and writes the evaluation report
  to workdir/evaluation/<tag>/ (held_out.evaluate: predictions an earlier, interrupted call made
  with the same parameters and settings are kept; SIGTERM / Ctrl-C raises
  held_out.HeldOutEvaluationStopped). None when no test case has a label."""
  cases = [case for case in test_cases if case.label_path]
  if not cases:
    log.warning('no labelled test cases to evaluate')
    return None
  workdir = pathlib.Path(workdir)
  run_config = run_dir.load_config(workdir)
  checkpoint = run_config.inference.checkpoint
  params, step = run_dir.restore_params(workdir, which=checkpoint)
  predictor = predictor_lib.Predictor(run_config, params)

  def predict(planned, should_stop):
    run_lib.predict_planned(predictor, planned, resume=True, should_stop=should_stop)

  return held_out.evaluate(cases, workdir / 'evaluation' / tag, predict, config,
                           description=held_out.predicted_with(predictor, checkpoint, step))
