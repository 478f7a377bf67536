"""Predicting a file, a DICOM series or a folder of volumes with a trained run or a four-stage
cascade, writing label maps (and optionally probabilities and SDFs) as NIfTI in each input's own
geometry.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Sequence

import numpy as np
import tqdm

from dualseg_jax import files
from dualseg_jax.data import io
from dualseg_jax.errors import DataError
from dualseg_jax.experiments import cascade as cascade_lib
from dualseg_jax.inference.predictor import Predictor, load_predictor

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = io.NIFTI_SUFFIXES + io.NRRD_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Case:
  name: str  # outputs: <name>.nii.gz, <name>_probabilities/_sdf.nii.gz, cascade <name>_notes.json
  source: pathlib.Path  # a volume file or a DICOM series folder


def case_name(path: pathlib.Path) -> str:
  """File name without its volume suffix (`a.nii.gz` -> `a`); a DICOM folder keeps its name."""
  name = path.name
  for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def find_cases(input_path: str | pathlib.Path) -> list[Case]:
  """A volume file, a folder of volume files (each a case) or a DICOM series folder (one case)."""
  input_path = pathlib.Path(input_path)
  if not input_path.exists():
    raise DataError(f'{input_path} does not exist: --input must be a NIfTI/NRRD file, a folder of '
                    'them, or a DICOM series folder')
  if input_path.is_file():
    return [Case(case_name(input_path), input_path)]
  volume_files = sorted(path for path in input_path.iterdir() if path.is_file()
                        and any(path.name.lower().endswith(s) for s in VOLUME_SUFFIXES))
  if volume_files:
    cases = [Case(case_name(path), path) for path in volume_files]
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
      raise DataError(f'{input_path} holds several files for the cases {duplicates} (e.g. .nii '
                      'and .nii.gz): keep one file per case')
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
                 save_probabilities: bool = False, overwrite: bool = False, notes: bool = False
                 ) -> list[tuple[Case, dict[str, pathlib.Path]]]:
  """Each case under `input_path` with its output paths (`notes`: also the cascade's notes file);
  refuses existing outputs unless `overwrite`, before anything is predicted, so a refusal leaves
  nothing half done."""
  output_dir = pathlib.Path(output_dir)
  planned = [(case, output_paths(case, output_dir, save_probabilities, notes))
             for case in find_cases(input_path)]
  if not overwrite:
    existing = [str(path) for _, paths in planned for path in paths.values() if path.exists()]
    if existing:
      more = f' (and {len(existing) - 1} more outputs)' if len(existing) > 1 else ''
      raise DataError(f'{existing[0]} already exists{more}: choose another --output folder or '
                      'pass --overwrite')
  return planned


def predict_cases(predictor: Predictor, input_path: str | pathlib.Path,
                  output_dir: str | pathlib.Path, tta_flips: int | None = None,
                  save_probabilities: bool = False, overwrite: bool = False,
                  show_progress: bool = True) -> list[dict[str, pathlib.Path]]:
  """Predicts every case under `input_path`; returns the written paths per case.

  Label maps are uint8 0/1/2; probabilities and SDFs are 4D float32 (one volume per output
  channel); all have exactly the input's shape and affine.
  """
  planned = plan_outputs(input_path, output_dir, save_probabilities, overwrite)
  written = []
  for case, paths in planned:
    volume = io.read_volume(case.source)
    with tqdm.tqdm(desc=case.name, unit='window', disable=not show_progress) as bar:
      def progress(done, total, bar=bar):
        bar.total = total
        bar.update(done - bar.n)
      outputs = predictor.predict_volume(volume, tta_flips=tta_flips, progress=progress)
    io.write_nifti(outputs['label'], volume.geometry, paths['label'], dtype=np.uint8)
    if save_probabilities:
      io.write_nifti(outputs['probabilities'], volume.geometry, paths['probabilities'],
                     dtype=np.float32)
      io.write_nifti(outputs['sdf'], volume.geometry, paths['sdf'], dtype=np.float32)
    log.info('%s -> %s', case.source, paths['label'])
    written.append(paths)
  return written


def predict_with_run(workdir: str | pathlib.Path, input_path: str | pathlib.Path,
                     output_dir: str | pathlib.Path, tta_flips: int | None = None,
                     save_probabilities: bool = False, overwrite: bool = False,
                     checkpoint: str | None = None) -> list[dict[str, pathlib.Path]]:
  """`python -m launch.predict`: load the run's predictor and predict every case under the input."""
  # Fail on the inputs and outputs before spending time on restoring the network.
  plan_outputs(input_path, output_dir, save_probabilities, overwrite)
  predictor = load_predictor(workdir, checkpoint=checkpoint)
  return predict_cases(predictor, input_path, output_dir, tta_flips=tta_flips,
                       save_probabilities=save_probabilities, overwrite=overwrite)


def predict_cases_with_cascade(predictors: dict[str, cascade_lib.StagePredictor],
                               pancreas_margin_vox: Sequence[int], tumour_margin_vox: Sequence[int],
                               input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                               tta_flips: int | None = None, overwrite: bool = False
                               ) -> list[dict[str, pathlib.Path]]:
  """Predicts every case under `input_path` with the four cascade stages; writes per case
  <case>.nii.gz (uint8 0/1/2, the input's exact shape and affine) and <case>_notes.json (what the
  cascade could not do, e.g. an empty pancreas region, and the boxes the fine stages saw)."""
  planned = plan_outputs(input_path, output_dir, overwrite=overwrite, notes=True)
  written = []
  for case, paths in tqdm.tqdm(planned, desc='cascade', unit='case', disable=len(planned) < 2):
    volume = io.read_volume(case.source)
    output = cascade_lib.cascade_predict(volume, predictors, pancreas_margin_vox, tumour_margin_vox,
                                         tta_flips=tta_flips)
    io.write_nifti(output.label, volume.geometry, paths['label'], dtype=np.uint8)
    _write_notes(paths['notes'], case, output)
    for note in output.notes:
      log.warning('%s: %s', case.name, note)
    log.info('%s -> %s', case.source, paths['label'])
    written.append(paths)
  return written


def _write_notes(path: pathlib.Path, case: Case, output: cascade_lib.CascadeOutput) -> None:
  boxes = {stage: None if box is None else [[region.start, region.stop] for region in box]
           for stage, box in output.boxes.items()}
  content = {'case': case.name, 'source': str(case.source), 'notes': output.notes,
             # [start, stop) per axis of the canonical (z, y, x) array, not of the input file.
             'fine_stage_boxes_zyx': boxes}
  files.write_json(path, content)


def predict_with_cascade(spec_path: str | pathlib.Path, input_path: str | pathlib.Path,
                         output_dir: str | pathlib.Path, tta_flips: int | None = None,
                         overwrite: bool = False, checkpoint: str | None = None
                         ) -> list[dict[str, pathlib.Path]]:
  """`python -m launch.predict --cascade=SPEC`: read the cascade spec (see
  cascade.read_spec), restore the four stages and predict every case under the input."""
  # Fail on the inputs, outputs and spec before spending time on restoring four networks.
  plan_outputs(input_path, output_dir, overwrite=overwrite, notes=True)
  spec = cascade_lib.read_spec(spec_path)
  predictors = cascade_lib.load_predictors(spec, checkpoint=checkpoint)
  return predict_cases_with_cascade(predictors, spec.pancreas_margin_vox, spec.tumour_margin_vox,
                                    input_path, output_dir, tta_flips=tta_flips,
                                    overwrite=overwrite)
