"""Predicting a file, a DICOM series or a folder of volumes with a trained run, an exported model,
an ensemble of them or a four-stage cascade, writing label maps (and optionally probabilities and
SDFs) as NIfTI in each input's own geometry.

Every output is written whole or not at all, and one process at a time predicts into a folder,
so a prediction that was killed can be finished with `resume`: the cases whose outputs are all
present are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable, Sequence

import numpy as np
import tqdm

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax.data import io
from dualseg_jax.data.volume import Volume
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.inference import cascade as cascade_lib
from dualseg_jax.inference.predictor import (Predictor, check_averageable, load_ensemble,
                                              load_model_config)

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = io.VOLUME_SUFFIXES

# What the output folder's lock names in the message a second process gets.
LOCK_PURPOSE = 'predictions'

Planned = list[tuple['Case', dict[str, pathlib.Path]]]
StopFn = Callable[[], bool]


class PredictionStopped(Exception):
  """`should_stop` asked to stop: every case before the current one has all its outputs, the
  current one has none."""

  def __init__(self, num_complete: int, num_cases: int):
    super().__init__(f'stopped with {num_complete} of {num_cases} case(s) predicted')
    self.num_complete = num_complete
    self.num_cases = num_cases


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # outputs: <name>.nii.gz, <name>_probabilities/_sdf.nii.gz, cascade <name>_notes.json
  source: pathlib.Path  # a volume file or a DICOM series folder


def find_cases(input_path: str | pathlib.Path) -> list[Case]:
  """A volume file, a folder of volume files (each a case) or a DICOM series folder (one case)."""
  input_path = pathlib.Path(input_path)
  if not input_path.exists():
    raise DataError(f'{input_path} does not exist: --input must be a NIfTI/NRRD file, a folder of '
                    'them, or a DICOM series folder')
  if input_path.is_file():
    return [Case(io.case_id_from_path(input_path), input_path)]
  # Hidden files are never cases: half-written outputs (.NAME.partial), macOS's ._NAME copies.
  volume_files = sorted(path for path in input_path.iterdir()
                        if path.is_file() and not path.name.startswith('.')
                        and any(path.name.lower().endswith(s) for s in VOLUME_SUFFIXES))
  if volume_files:
    cases = [Case(io.case_id_from_path(path), path) for path in volume_files]
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
      raise DataError(f'{input_path} holds several files for the cases {duplicates} (e.g. .nii '
                      'and .nii.gz, or X and X_0000): keep one file per case')
    return cases
  return [Case(input_path.name, input_path)]


def output_paths(case: Case, output_dir: pathlib.Path, save_probabilities: bool,
                 notes: bool = False) -> dict:
  paths = {'label': output_dir / f'{case.name}.nii.gz'}
  if save_probabilities:
    paths['probabilities'] = output_dir / f'{case.name}_probabilities.nii.gz'
    paths['sdf'] = output_dir / f'{case.name}_sdf.nii.gz'
  if notes:
    paths['notes'] = output_dir / f'{case.name}_notes.json'
  return paths


def plan_outputs(input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                 save_probabilities: bool = False, overwrite: bool = False, notes: bool = False,
                 resume: bool = False) -> Planned:
  """Each case under `input_path` with its output paths (`notes`: also the cascade's notes file);
  refuses existing outputs unless `overwrite` (replace them) or `resume` (keep the cases whose
  outputs are all there), before anything is predicted, so a refusal leaves nothing half done."""
  if overwrite and resume:
    raise ConfigError('--resume keeps the cases already predicted and --overwrite predicts them '
                      'again: choose one')
  output_dir = pathlib.Path(output_dir)
  planned = [(case, output_paths(case, output_dir, save_probabilities, notes))
             for case in find_cases(input_path)]
  if not (overwrite or resume):
    existing = [str(path) for _, paths in planned for path in paths.values() if path.exists()]
    if existing:
      more = f' (and {len(existing) - 1} more outputs)' if len(existing) > 1 else ''
      raise DataError(f'{existing[0]} already exists{more}: choose another --output folder, pass '
                      '--resume to predict only the cases whose outputs are missing, or '
                      '--overwrite to predict every case again')
  return planned


def is_complete(paths: dict[str, pathlib.Path]) -> bool:
  """Whether a case has all its outputs; outputs are written whole or not at all, so one that
  exists is complete."""
  return all(path.exists() for path in paths.values())


def _all_complete(planned: Planned, output_dir) -> bool:
  """True, said in the log, when a resumed prediction has nothing left to do: no network need be
  restored."""
  if not all(is_complete(paths) for _, paths in planned):
    return False
  log.info('all %d case(s) in %s already have their outputs: nothing to predict', len(planned),
           output_dir)
  return True


def _predict_each(planned: Planned, predict_and_write: Callable, resume: bool,
                  should_stop: StopFn | None, show_progress: bool = False
                  ) -> list[dict[str, pathlib.Path]]:
  """Runs `predict_and_write(case, paths, check_stop)` for every planned case (with `resume`,
  those without all their outputs); returns the output paths of every case.

  `should_stop` is asked before each case and, through `check_stop`, between batches of
  windows; when it says yes, PredictionStopped is raised, after the current case's outputs are
  written in full or before any of them is.
  """
  to_predict = [(case, paths) for case, paths in planned if not (resume and is_complete(paths))]
  num_complete = len(planned) - len(to_predict)
  if resume and planned:
    log.info('resuming in %s: %d of %d case(s) already have all their outputs and are skipped; '
             '%d to predict', planned[0][1]['label'].parent, num_complete, len(planned),
             len(to_predict))

  def check_stop():
    if should_stop is not None and should_stop():
      raise PredictionStopped(num_complete, len(planned))

  for case, paths in tqdm.tqdm(to_predict, desc='cases', unit='case',
                               disable=not show_progress or len(to_predict) < 2):
    check_stop()
    for path in paths.values():
      # Half-written files of a killed earlier run: this process holds the folder, so no live
      # writer owns them.
      for partial in io.partial_files(path):
        partial.unlink(missing_ok=True)
    predict_and_write(case, paths, check_stop)
    num_complete += 1
    log.info('%s -> %s', case.source, paths['label'])
  return [paths for _, paths in planned]


def predict_planned(predictor: Predictor, planned: Planned, tta_flips: int | None = None,
                    save_probabilities: bool = False, resume: bool = False,
                    show_progress: bool = True, should_stop: StopFn | None = None
                    ) -> list[dict[str, pathlib.Path]]:
  """Predicts the cases `plan_outputs` planned, for a caller that holds the output folder's lock
  (`locks.hold(output_dir, LOCK_PURPOSE)`); see predict_cases."""

  def predict_and_write(case, paths, check_stop):
    volume = io.read_volume(case.source)
    with tqdm.tqdm(desc=case.name, unit='window', disable=not show_progress) as bar:
      def progress(done, total, bar=bar):
        bar.total = total
        bar.update(done - bar.n)
        check_stop()
      outputs = predictor.predict_volume(volume, tta_flips=tta_flips, progress=progress)
    # The label last: a case whose label exists is complete, whatever else it asked for, even
    # for a reader that knows nothing of the other outputs.
    if save_probabilities:
      io.write_nifti(outputs['probabilities'], volume.geometry, paths['probabilities'],
                     dtype=np.float32)
      io.write_nifti(outputs['sdf'], volume.geometry, paths['sdf'], dtype=np.float32)
    io.write_nifti(outputs['label'], volume.geometry, paths['label'], dtype=np.uint8)

  return _predict_each(planned, predict_and_write, resume, should_stop)


def predict_cases(predictor: Predictor, input_path: str | pathlib.Path,
                  output_dir: str | pathlib.Path, tta_flips: int | None = None,
                  save_probabilities: bool = False, overwrite: bool = False,
                  show_progress: bool = True, resume: bool = False,
                  should_stop: StopFn | None = None) -> list[dict[str, pathlib.Path]]:
  """Predicts every case under `input_path` (with `resume`, every case missing an output);
  returns the output paths of every case.

  Label maps are uint8 0/1/2; probabilities and SDFs are 4D float32 (one volume per output
  channel); all have exactly the input's shape and affine. The output folder is held for the
  duration: a second process predicting into it is refused (locks.FolderBusyError). When
  `should_stop()` turns true, PredictionStopped is raised with the cases before the current one
  complete and the current one left out.
  """
  with locks.hold(output_dir, LOCK_PURPOSE):
    planned = plan_outputs(input_path, output_dir, save_probabilities, overwrite, resume=resume)
    return predict_planned(predictor, planned, tta_flips=tta_flips,
                           save_probabilities=save_probabilities, resume=resume,
                           show_progress=show_progress, should_stop=should_stop)


def predict_with_run(workdir: str | pathlib.Path, input_path: str | pathlib.Path,
                     output_dir: str | pathlib.Path, tta_flips: int | None = None,
                     save_probabilities: bool = False, overwrite: bool = False,
                     checkpoint: str | None = None, resume: bool = False,
                     inference_overrides: Sequence[str] = ()) -> list[dict[str, pathlib.Path]]:
  """`python -m launch.predict --workdir=RUN`: load the run's predictor and predict every case
  under the input (with `resume`, the cases an interrupted call into the same folder left without
  outputs). `workdir` may also be an exported model (launch.export)."""
  return predict_with_models([workdir], input_path, output_dir, tta_flips=tta_flips,
                             save_probabilities=save_probabilities, overwrite=overwrite,
                             checkpoint=checkpoint, resume=resume,
                             inference_overrides=inference_overrides)


def predict_with_models(model_paths: Sequence[str | pathlib.Path],
                        input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                        tta_flips: int | None = None, save_probabilities: bool = False,
                        overwrite: bool = False, checkpoint: str | None = None,
                        resume: bool = False, inference_overrides: Sequence[str] = ()
                        ) -> list[dict[str, pathlib.Path]]:
  """`python -m launch.predict --model=A[,B,...]`: predict every case under the input with one
  exported model or run directory, or with several averaged (predictor.EnsemblePredictor; the
  saved probabilities and SDFs are then the averages). `inference_overrides` are
  'inference.KEY=VALUE' texts applied to every model's config."""
  # Fail on the inputs, outputs and models before making the output folder or restoring a network.
  plan_outputs(input_path, output_dir, save_probabilities, overwrite, resume=resume)
  check_averageable([str(path) for path in model_paths],
                    [load_model_config(path, checkpoint, inference_overrides)
                     for path in model_paths])
  with locks.hold(output_dir, LOCK_PURPOSE):
    # Again: another process may have written there before this one held the folder.
    planned = plan_outputs(input_path, output_dir, save_probabilities, overwrite, resume=resume)
    if resume and _all_complete(planned, output_dir):
      return [paths for _, paths in planned]
    predictor = load_ensemble(model_paths, checkpoint=checkpoint,
                              inference_overrides=inference_overrides)
    return predict_planned(predictor, planned, tta_flips=tta_flips,
                           save_probabilities=save_probabilities, resume=resume)


def predict_cases_with_cascade(predict: Callable[[Volume], cascade_lib.CascadeOutput],
                               input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                               overwrite: bool = False, resume: bool = False
                               ) -> list[dict[str, pathlib.Path]]:
  """Predicts every case under `input_path` with the cascade's `predict` (e.g. CascadeSpec.predict
  or `cascade.cascade_predict` with its predictors and regions bound); writes per case
  <case>.nii.gz (uint8 0/1/2, the input's exact shape and affine) and <case>_notes.json (what the
  cascade could not do, e.g. an empty pancreas region, and the boxes the later stages saw)."""
  with locks.hold(output_dir, LOCK_PURPOSE):
    planned = plan_outputs(input_path, output_dir, overwrite=overwrite, notes=True, resume=resume)
    predict_planned_with_cascade(predict, planned, resume)
    return [paths for _, paths in planned]


def predict_planned_with_cascade(predict: Callable[[Volume], cascade_lib.CascadeOutput],
                                 planned: Planned, resume: bool = False,
                                 should_stop: StopFn | None = None) -> dict[str, list[str]]:
  """Predicts the cases `plan_outputs` planned with the cascade's `predict` (e.g.
  CascadeSpec.predict with the stage predictors), for a caller that holds the output folder's
  lock: each case's label map and, where planned, its notes file. `should_stop` is asked before
  each case (the four stages run whole). Returns the notes of each case predicted, by name."""
  notes = {}

  def predict_and_write(case, paths, check_stop):
    del check_stop  # the four stages run whole; the next case is where a stop takes effect
    volume = io.read_volume(case.source)
    output = predict(volume)
    if 'notes' in paths:
      _write_notes(paths['notes'], case, output)  # the label last: see predict_planned
    io.write_nifti(output.label, volume.geometry, paths['label'], dtype=np.uint8)
    notes[case.name] = output.notes
    for note in output.notes:
      log.warning('%s: %s', case.name, note)

  _predict_each(planned, predict_and_write, resume, should_stop, show_progress=True)
  return notes


def _write_notes(path: pathlib.Path, case: Case, output: cascade_lib.CascadeOutput) -> None:
  boxes = {stage: None if box is None else [[region.start, region.stop] for region in box]
           for stage, box in output.boxes.items()}
  content = {'case': case.name, 'source': str(case.source), 'notes': output.notes,
             # [start, stop) per axis of the canonical (z, y, x) array, not of the input file;
             # tumour_fine's is the box of its last round.
             'stage_boxes_zyx': boxes}
  files.write_json(path, content)


def predict_with_cascade(spec_path: str | pathlib.Path, input_path: str | pathlib.Path,
                         output_dir: str | pathlib.Path, tta_flips: int | None = None,
                         overwrite: bool = False, checkpoint: str | None = None,
                         resume: bool = False) -> list[dict[str, pathlib.Path]]:
  """`python -m launch.predict --cascade=SPEC`: read the cascade spec (see
  cascade.read_spec), restore the four stages and predict every case under the input."""
  # Fail on the inputs, outputs and spec before making the output folder or restoring networks.
  plan_outputs(input_path, output_dir, overwrite=overwrite, notes=True, resume=resume)
  spec = cascade_lib.read_spec(spec_path)
  with locks.hold(output_dir, LOCK_PURPOSE):
    # Again: another process may have written there before this one held the folder.
    planned = plan_outputs(input_path, output_dir, overwrite=overwrite, notes=True, resume=resume)
    if resume and _all_complete(planned, output_dir):
      return [paths for _, paths in planned]
    predictors = cascade_lib.load_predictors(spec, checkpoint=checkpoint)
    predict_planned_with_cascade(
        lambda volume: spec.predict(volume, predictors, tta_flips=tta_flips), planned, resume)
    return [paths for _, paths in planned]
