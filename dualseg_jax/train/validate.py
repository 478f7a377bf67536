"""Validation during training (whole-volume Dice on held-out cases of the training centers) and
the final evaluation of the test center with the inference and evaluation pipelines."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax import signals
from dualseg_jax.data import io
from dualseg_jax.evaluation import metrics as metrics_lib
from dualseg_jax.inference import predictor as predictor_lib

log = logging.getLogger('dualseg_jax')

# Above this many voxels in all validation volumes together, they are re-read at each validation.
_KEEP_IN_MEMORY_VOXELS = 200_000_000


def stage_structures(stage: str) -> tuple[str, ...]:
  if stage == 'joint':
    return ('pancreas', 'tumour')
  return ('pancreas',) if stage.startswith('pancreas') else ('tumour',)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
  """Dice of two boolean masks; two empty masks agree perfectly (1.0)."""
  total = int(prediction.sum()) + int(reference.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.count_nonzero(prediction & reference)) / total


class Validator:
  """Predicts each validation case whole (sliding window, no flips) and scores Dice per structure."""

  def __init__(self, config: ml_collections.ConfigDict, model: Any, cases: list, mesh=None):
    del model, mesh  # the predictor rebuilds the same network from config.model
    self.config = config
    self.cases = list(cases)
    self.structures = stage_structures(config.stage)
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
        select = metrics_lib.STRUCTURES[name]
        reference = select(label.array)
        # A case without the structure would score 1 for predicting nothing: it would reward an
        # untrained network and pick the wrong best checkpoint, so it does not count here.
        if reference.any():
          scores[name].append(dice(select(predicted), reference))
    result = {f'dice_{name}': float(np.mean(values)) for name, values in scores.items() if values}
    if result:
      result['dice_mean'] = float(np.mean(list(result.values())))
    return result


def _link_all(paths: dict[str, str], folder: pathlib.Path) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for name, source in paths.items():
    link = folder / name
    if link.is_symlink() or link.exists():
      link.unlink()
    os.symlink(pathlib.Path(source).absolute(), link)


def _file_suffix(path: str) -> str:
  name = pathlib.Path(path).name
  for suffix in ('.nii.gz', '.nii', '.nrrd', '.nhdr'):
    if name.endswith(suffix):
      return suffix
  return ''.join(pathlib.Path(path).suffixes)


# Beside the held-out predictions: what they were predicted with, so that a rerun keeps them
# only when it would predict the same.
PREDICTED_WITH = 'predicted_with.json'


class HeldOutEvaluationStopped(Exception):
  """SIGTERM / Ctrl-C during the held-out evaluation: the cases predicted so far are kept, and
  rerunning the same command predicts the others and writes the report."""


def parameters_crc32(params) -> str:
  """One CRC32 over every parameter array's bytes, in tree order."""
  crc = 0
  for leaf in jax.tree.leaves(params):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return f'{crc:08x}'


def _predicted_with(predictor: predictor_lib.Predictor, checkpoint: str, step: int) -> dict:
  # The inference settings too: a different overlap, flip count or post-processing gives a
  # different label from the same parameters.
  return {'checkpoint': checkpoint, 'step': int(step),
          'parameters_crc32': parameters_crc32(predictor.params),
          'inference': json.loads(predictor.config.inference.to_json_best_effort())}


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _keep_or_clear(predictions_dir: pathlib.Path, planned: list, predicted_with: dict) -> None:
  """Keeps the predictions in `predictions_dir` when they were made with `predicted_with`, else
  deletes them before writing the new record, so the record always describes every file."""
  record = predictions_dir / PREDICTED_WITH
  previous = _read_json(record)
  if previous == predicted_with:
    return
  stale = [path for _, paths in planned for path in paths.values() if path.exists()]
  if stale:
    why = (f'other parameters or settings (checkpoint {previous.get("checkpoint")} step '
           f'{previous.get("step")}, parameters {previous.get("parameters_crc32")})'
           if isinstance(previous, dict) else f'unrecorded parameters (no readable {record.name})')
    log.info('the %d held-out prediction(s) in %s were made with %s: predicting every case again '
             'with checkpoint %s step %d (parameters %s)', len(stale), predictions_dir, why,
             predicted_with['checkpoint'], predicted_with['step'],
             predicted_with['parameters_crc32'])
  record.unlink(missing_ok=True)
  for path in stale:
    path.unlink()
  files.write_json(record, predicted_with)


def evaluate_test_center(config: ml_collections.ConfigDict, workdir: pathlib.Path, test_cases: list,
                         tag: str) -> dict | None:
  """Predicts the held-out cases with the run's best parameters and writes the evaluation report.

  Everything lands in workdir/evaluation/<tag>/: predictions/ (with predicted_with.json),
  ground_truth/ and images/ (links to the inputs), per_case.csv, summary.json, summary.md,
  evaluation.png. Predictions an earlier, interrupted call made with the same parameters and
  settings are kept, so a rerun predicts only the cases it lacks.

  SIGTERM / Ctrl-C stops it, keeping every case predicted in full, and raises
  HeldOutEvaluationStopped (the current case is abandoned, or finished when it is being written).
  """
  from dualseg_jax.evaluation import report
  from dualseg_jax.inference import run as run_lib
  from dualseg_jax.train.checkpoint import restore_params  # deferred: pulls in orbax and grain
  cases = [case for case in test_cases if case.label_path]
  if not cases:
    log.warning('no labelled test cases to evaluate')
    return None
  workdir = pathlib.Path(workdir)
  out_dir = workdir / 'evaluation' / tag
  predictions_dir = out_dir / 'predictions'
  run_config = predictor_lib.load_config(workdir)
  checkpoint = run_config.inference.checkpoint
  params, step = restore_params(workdir, which=checkpoint)
  predictor = predictor_lib.Predictor(run_config, params)
  image_links = {f'{case.case_id}{_file_suffix(case.image_path)}': case.image_path for case in cases}
  label_links = {f'{case.case_id}{_file_suffix(case.label_path)}': case.label_path for case in cases}
  _link_all(image_links, out_dir / 'images')
  _link_all(label_links, out_dir / 'ground_truth')
  with signals.StopOnSignal('stopping the held-out evaluation (the case being predicted is '
                            'abandoned, one being written is finished; a second signal stops at '
                            'once)') as stop:
    try:
      with locks.hold(predictions_dir, run_lib.LOCK_PURPOSE):
        planned = run_lib.plan_outputs(out_dir / 'images', predictions_dir, resume=True)
        _keep_or_clear(predictions_dir, planned, _predicted_with(predictor, checkpoint, step))
        run_lib.predict_planned(predictor, planned, resume=True,
                                should_stop=lambda: stop.requested)
      if stop.requested:  # after the last case: the report is quick, but it was asked to stop
        raise run_lib.PredictionStopped(len(planned), len(planned))
    except run_lib.PredictionStopped as stopped:
      message = (f'held-out evaluation stopped by signal {stop.signal_number} with '
                 f'{stopped.num_complete} of {stopped.num_cases} case(s) predicted (kept in '
                 f'{predictions_dir}); rerun the same command to finish the evaluation')
      log.warning('%s', message)
      raise HeldOutEvaluationStopped(message) from None
    centers = {case.case_id: case.center for case in cases}
    # Scoring writes nothing until its end, and then whole files: a signal stops it at once.
    stop.stop_at_once = HeldOutEvaluationStopped(
        f'held-out evaluation stopped while scoring; all {len(planned)} predictions are kept in '
        f'{predictions_dir}: rerun the same command to write the report')
    summary = report.evaluate_folder(
        predictions_dir, out_dir / 'ground_truth', out_dir, centers=centers,
        images_dir=out_dir / 'images', nsd_tolerance_mm=config.evaluation.nsd_tolerance_mm,
        gt_label_map=config.data.label_map or None)
  summary['report_dir'] = str(out_dir)
  summary['table'] = (out_dir / 'summary.md').read_text()
  return summary
