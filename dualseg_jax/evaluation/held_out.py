"""The held-out evaluation of a run or a cascade: the labelled held-out cases predicted into a
report folder and scored there, resumable after SIGTERM / Ctrl-C.

The folder holds images/ and ground_truth/ (links to the inputs, named by case), predictions/
(with predicted_with.json when the predictor describes itself), per_case.csv, summary.json,
summary.md and evaluation.png.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import zlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax import signals
from dualseg_jax.data import io
from dualseg_jax.evaluation import report
from dualseg_jax.inference import run as run_lib

log = logging.getLogger('dualseg_jax')

# Beside the held-out predictions: what they were predicted with, so that a rerun keeps them
# only when it would predict the same.
PREDICTED_WITH = 'predicted_with.json'

# Predicts the planned cases (each case's output paths) into predictions/, skipping the cases
# whose outputs are all there and asking the stop function between cases.
PredictFn = Callable[[run_lib.Planned, run_lib.StopFn], Any]


class HeldOutEvaluationStopped(Exception):
  """SIGTERM / Ctrl-C during the held-out evaluation: the cases predicted so far are kept, and
  rerunning the same command predicts the others and writes the report."""


def parameters_crc32(params) -> str:
  """One CRC32 over every parameter array's bytes, in tree order."""
  crc = 0
  for leaf in jax.tree.leaves(params):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return f'{crc:08x}'


def predicted_with(predictor, checkpoint: str, step: int) -> dict:
  """What a Predictor predicts with, as `evaluate` records it: the checkpoint, its parameters'
  CRC32 and the inference settings (a different overlap, flip count or post-processing gives a
  different label from the same parameters)."""
  return {'checkpoint': checkpoint, 'step': int(step),
          'parameters_crc32': parameters_crc32(predictor.params),
          'inference': json.loads(predictor.config.inference.to_json_best_effort())}


def evaluate(cases: Sequence, out_dir: str | pathlib.Path, predict: PredictFn,
             config: ml_collections.ConfigDict, description: dict | None = None) -> dict:
  """Predicts the labelled `cases` (registry.Case) with `predict` into out_dir/predictions and
  writes the evaluation report in out_dir; returns its summary, with `report_dir` and the
  Markdown `table` added.

  `description` (from `predicted_with`) says what the predictor predicts with: predictions an
  earlier, interrupted call made with the same are kept, so a rerun predicts only the cases it
  lacks. Without one every case is predicted again. `config` gives the NSD tolerance
  (evaluation.nsd_tolerance_mm) and the references' label map (data.label_map).

  SIGTERM / Ctrl-C stops it, keeping every case predicted in full, and raises
  HeldOutEvaluationStopped (the current case is abandoned, or finished when it is being written).
  """
  out_dir = pathlib.Path(out_dir)
  predictions_dir = out_dir / 'predictions'
  _link_all({f'{case.case_id}{io.volume_suffix(case.image_path)}': case.image_path
             for case in cases}, out_dir / 'images')
  _link_all({f'{case.case_id}{io.volume_suffix(case.label_path)}': case.label_path
             for case in cases}, out_dir / 'ground_truth')
  with signals.StopOnSignal('stopping the held-out evaluation (the case being predicted is '
                            'abandoned, one being written is finished; a second signal stops at '
                            'once)') as stop:
    try:
      with locks.hold(predictions_dir, run_lib.LOCK_PURPOSE):
        planned = run_lib.plan_outputs(out_dir / 'images', predictions_dir, resume=True)
        _keep_or_clear(predictions_dir, planned, description)
        predict(planned, lambda: stop.requested)
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


def _link_all(paths: dict[str, str], folder: pathlib.Path) -> None:
  """folder/<name> -> source for each name, so the evaluation matches files by case name."""
  folder.mkdir(parents=True, exist_ok=True)
  for name, source in paths.items():
    link = folder / name
    if link.is_symlink() or link.exists():
      link.unlink()
    os.symlink(pathlib.Path(source).absolute(), link)


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _keep_or_clear(predictions_dir: pathlib.Path, planned: run_lib.Planned,
                   description: dict | None) -> None:
  """Keeps the predictions in `predictions_dir` when they were made with `description`, else
  deletes them before writing the new record, so the record always describes every file."""
  record = predictions_dir / PREDICTED_WITH
  previous = _read_json(record)
  if description is not None and previous == description:
    return
  stale = [path for _, paths in planned for path in paths.values() if path.exists()]
  if stale and description is not None:
    why = (f'other parameters or settings (checkpoint {previous.get("checkpoint")} step '
           f'{previous.get("step")}, parameters {previous.get("parameters_crc32")})'
           if isinstance(previous, dict) else f'unrecorded parameters (no readable {record.name})')
    log.info('the %d held-out prediction(s) in %s were made with %s: predicting every case again '
             'with checkpoint %s step %d (parameters %s)', len(stale), predictions_dir, why,
             description['checkpoint'], description['step'], description['parameters_crc32'])
  record.unlink(missing_ok=True)
  for path in stale:
    path.unlink()
  if description is not None:
    files.write_json(record, description)
