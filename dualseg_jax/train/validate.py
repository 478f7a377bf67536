"""Validation during training (whole-volume Dice on held-out cases of the training centers) and
the final evaluation of the test center with the inference and evaluation pipelines."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

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


def evaluate_test_center(config: ml_collections.ConfigDict, workdir: pathlib.Path, test_cases: list,
                         tag: str) -> dict | None:
  """Predicts the held-out cases with the run's best parameters and writes the evaluation report.

  Everything lands in workdir/evaluation/<tag>/: predictions/, ground_truth/ and images/ (links to
  the inputs), per_case.csv, summary.json, summary.md, evaluation.png.
  """
  from dualseg_jax.evaluation import report
  from dualseg_jax.inference import run as run_lib
  cases = [case for case in test_cases if case.label_path]
  if not cases:
    log.warning('no labelled test cases to evaluate')
    return None
  out_dir = pathlib.Path(workdir) / 'evaluation' / tag
  predictor = predictor_lib.load_predictor(workdir)
  image_links = {f'{case.case_id}{_file_suffix(case.image_path)}': case.image_path for case in cases}
  label_links = {f'{case.case_id}{_file_suffix(case.label_path)}': case.label_path for case in cases}
  _link_all(image_links, out_dir / 'images')
  _link_all(label_links, out_dir / 'ground_truth')
  run_lib.predict_cases(predictor, out_dir / 'images', out_dir / 'predictions', overwrite=True)
  centers = {case.case_id: case.center for case in cases}
  summary = report.evaluate_folder(
      out_dir / 'predictions', out_dir / 'ground_truth', out_dir, centers=centers,
      images_dir=out_dir / 'images', nsd_tolerance_mm=config.evaluation.nsd_tolerance_mm,
      gt_label_map=config.data.label_map or None)
  summary['report_dir'] = str(out_dir)
  summary['table'] = (out_dir / 'summary.md').read_text()
  return summary
