"""Evaluating a folder of predicted label maps against a folder of references: per-case CSV,
summary JSON and Markdown per structure and center, and a figure (box plots, example overlays).

A prediction that cannot be read (a truncated or corrupt file) is reported by name and never
scored; the report files are written whole or not at all, summary.json last, so a report
folder with summary.json holds a finished report.
"""

from __future__ import annotations

import csv
import io as text_io
import json
import logging
import math
import os
import pathlib
from typing import Any

import numpy as np

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax.data import io
from dualseg_jax.errors import DataError
from dualseg_jax.evaluation import metrics as metrics_lib

log = logging.getLogger(__name__)

ALL_CENTERS = 'all'
# Outputs of `launch.predict --save_probabilities` that sit beside the label maps.
_NON_LABEL_SUFFIXES = ('_probabilities', '_sdf')
_VOLUME_SUFFIXES = io.NIFTI_SUFFIXES + io.NRRD_SUFFIXES
HD95_CONVENTION = ('max of the two directed 95th percentiles of surface-voxel distances '
                   '(linear interpolation); infinite when one mask is empty')


REPORT_FILES = ('per_case.csv', 'summary.json', 'summary.md', 'evaluation.png')


def case_name(path: str | pathlib.Path) -> str:
  """File name without its volume suffix: `case_001.nii.gz` -> `case_001`."""
  name = pathlib.Path(path).name
  for suffix in sorted(_VOLUME_SUFFIXES, key=len, reverse=True):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return name


def _volume_files(folder: pathlib.Path, what: str) -> dict[str, pathlib.Path]:
  if not folder.is_dir():
    raise DataError(f'{folder} is not a folder: --{what} must be a folder of NIfTI/NRRD label maps')
  files = {}
  for path in sorted(folder.iterdir()):
    if not path.is_file() or not any(path.name.lower().endswith(s) for s in _VOLUME_SUFFIXES):
      continue
    if path.name.startswith('.'):
      continue  # a half-written output (.NAME.partial) or macOS's ._NAME copy: never a case
    name = case_name(path)
    if name.endswith(_NON_LABEL_SUFFIXES):
      continue
    if name in files:
      raise DataError(f'{folder} holds two files for case {name!r} ({files[name].name}, '
                      f'{path.name}): keep one')
    files[name] = path
  return files


def load_centers(manifest: str | pathlib.Path) -> dict[str, str]:
  """case -> center from a JSON object {case: center}, or JSON list / CSV rows with a `center`
  column and a `case` column (or an `image`/`label` path whose file name gives the case)."""
  manifest = pathlib.Path(manifest)
  if not manifest.exists():
    raise DataError(f'{manifest} does not exist: --centers must be a JSON or CSV manifest')
  try:
    if manifest.suffix.lower() == '.json':
      content = json.loads(manifest.read_text())
      if isinstance(content, dict):
        return {str(case): str(center) for case, center in content.items()}
      rows = content
    else:
      with manifest.open(newline='') as file:
        rows = list(csv.DictReader(file))
    centers = {}
    for row in rows:
      case = row.get('case') or case_name(row.get('label') or row['image'])
      centers[str(case)] = str(row['center'])
    return centers
  except (KeyError, TypeError, AttributeError, ValueError) as error:
    raise DataError(
        f'{manifest} cannot be read as a case -> center manifest ({type(error).__name__}: '
        f'{error}); give a JSON object {{"case": "center"}} or rows with columns case,center'
    ) from error


def _read_label(path: pathlib.Path, label_map) -> Any:
  volume = io.read_volume(path)
  volume.array = io.map_labels(volume.array, label_map, str(path))
  return volume


def evaluate_folder(pred_dir: str | pathlib.Path, gt_dir: str | pathlib.Path,
                    out_dir: str | pathlib.Path, centers: str | pathlib.Path | dict | None = None,
                    images_dir: str | pathlib.Path | None = None, nsd_tolerance_mm: float = 2.0,
                    gt_label_map: str | None = None, overwrite: bool = True) -> dict:
  """Scores every reference case in `gt_dir` against the same-named file in `pred_dir`.

  Writes out_dir/per_case.csv (one row per case and structure), summary.json, summary.md and
  evaluation.png; returns the summary dict: summary['by_center'][center][structure][metric] =
  {mean, std, median, n, n_excluded}, with center 'all' always present. `centers` is a manifest
  path or a {case: center} dict; `gt_label_map` (e.g. '7:1') maps reference label values.

  A prediction that cannot be read is a DataError naming it (and every other one), raised
  after the readable ones are scored and before any report file is written. `out_dir` is held
  while the report is made: a second evaluation into it is refused (locks.FolderBusyError).
  """
  out_dir = pathlib.Path(out_dir)
  with locks.hold(out_dir, 'an evaluation report'):
    return _evaluate_folder(pathlib.Path(pred_dir), pathlib.Path(gt_dir), out_dir, centers,
                            images_dir, nsd_tolerance_mm, gt_label_map, overwrite)


def _evaluate_folder(pred_dir: pathlib.Path, gt_dir: pathlib.Path, out_dir: pathlib.Path,
                     centers, images_dir, nsd_tolerance_mm: float, gt_label_map,
                     overwrite: bool) -> dict:
  if not overwrite:
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing:
      raise DataError(f'{out_dir} already holds a report ({", ".join(existing)}): choose another '
                      '--out, or pass --overwrite to replace it')
  references = _volume_files(gt_dir, 'gt')
  predictions = _volume_files(pred_dir, 'pred')
  if not references:
    raise DataError(f'{gt_dir} holds no NIfTI/NRRD reference label maps')
  missing = sorted(set(references) - set(predictions))
  if missing:
    raise DataError(f'{pred_dir} has no prediction for {len(missing)} reference case(s), e.g. '
                    f'{missing[:5]}: predict them first (names must match the files in {gt_dir})')
  unmatched = sorted(set(predictions) - set(references))
  if unmatched:
    log.warning('%d prediction(s) without a reference are ignored, e.g. %s', len(unmatched),
                unmatched[:5])
  case_centers = load_centers(centers) if isinstance(centers, (str, pathlib.Path)) else centers
  case_centers = case_centers or None
  if case_centers is not None:
    unassigned = sorted(set(references) - set(case_centers))
    if unassigned:
      raise DataError(f'the centers manifest {centers} has no center for {len(unassigned)} '
                      f'case(s), e.g. {unassigned[:5]}: add them')

  rows = []
  unreadable = []  # why each prediction that cannot be read failed
  for name, reference_path in references.items():
    prediction_path = predictions[name]
    try:
      prediction = _read_label(prediction_path, None)
    except DataError as error:
      # The reader's advice is for scans; a prediction is made again, not re-exported.
      unreadable.append(str(error).removesuffix(': re-export it'))
      continue
    reference = _read_label(reference_path, gt_label_map)
    if not io.same_canonical_grid(prediction, reference):
      raise DataError(
          f'prediction {prediction_path} (shape {prediction.geometry.shape}, affine\n'
          f'{np.round(prediction.geometry.affine, 4)}) is not on the voxel grid of reference '
          f'{reference_path} (shape {reference.geometry.shape}, affine\n'
          f'{np.round(reference.geometry.affine, 4)}): predict on the reference\'s image')
    center = case_centers[name] if case_centers is not None else ALL_CENTERS
    per_structure = metrics_lib.case_metrics(prediction.array, reference.array,
                                             reference.spacing_mm, nsd_tolerance_mm)
    for structure, values in per_structure.items():
      rows.append({'case': name, 'center': center, 'structure': structure, **values})
  if unreadable:
    # A case left out would shift every mean, so there is no report without it.
    raise DataError(
        f'{len(unreadable)} of {len(references)} prediction(s) cannot be read, so no report is '
        'written: ' + '; '.join(f'bad prediction {why}' for why in unreadable)
        + '. Predict these cases again: delete the files named, then rerun launch.predict into '
        'the same folder with --resume')

  out_dir.mkdir(parents=True, exist_ok=True)
  summary = {
      'num_cases': len(references),
      'nsd_tolerance_mm': nsd_tolerance_mm,
      'hd95_convention': HD95_CONVENTION,
      'empty_convention': 'both empty: Dice/NSD 1, HD95/ASSD 0; one empty: Dice/NSD 0, HD95/ASSD '
                          'inf (left out of mean/std/median, counted in n_excluded)',
      'unmatched_predictions': unmatched,
      'by_center': summarise_rows(rows),
      'files': {kind: str(out_dir / file_name) for kind, file_name in (
          ('per_case', 'per_case.csv'), ('summary', 'summary.json'),
          ('markdown', 'summary.md'), ('figure', 'evaluation.png'))},
  }
  _write_csv(rows, out_dir / 'per_case.csv')
  files.write_bytes(out_dir / 'summary.md', markdown_table(summary).encode())
  from dualseg_jax.evaluation import figures  # deferred: matplotlib only when writing figures
  # matplotlib takes the format from the suffix, so the partial name keeps .png; it is hidden.
  figure_partial = out_dir / '.evaluation.partial.png'
  try:
    figures.evaluation_figure(
        rows, figure_partial,
        case_paths={name: (predictions[name], references[name]) for name in references},
        images_dir=pathlib.Path(images_dir) if images_dir else None, gt_label_map=gt_label_map)
    os.replace(figure_partial, out_dir / 'evaluation.png')
  finally:
    files.discard(figure_partial)
  # Last: a folder with summary.json holds a finished report (the training run's rerun reads it).
  files.write_json(out_dir / 'summary.json', summary)
  return summary


def summarise_rows(rows: list[dict]) -> dict:
  """center ('all' first) -> structure -> metric -> summary statistics."""
  centers = [ALL_CENTERS] + sorted({row['center'] for row in rows} - {ALL_CENTERS})
  by_center = {}
  for center in centers:
    center_rows = [row for row in rows if center == ALL_CENTERS or row['center'] == center]
    by_center[center] = {
        structure: {metric: metrics_lib.summarise(
            [row[metric] for row in center_rows if row['structure'] == structure])
            for metric in metrics_lib.METRIC_NAMES}
        for structure in metrics_lib.STRUCTURES}
  return by_center


def _write_csv(rows: list[dict], path: pathlib.Path) -> None:
  columns = ['case', 'center', 'structure', *metrics_lib.METRIC_NAMES]
  text = text_io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({key: _format_number(value) for key, value in row.items()})
  files.write_bytes(path, text.getvalue().encode())


def _format_number(value):
  if isinstance(value, float):
    return 'inf' if math.isinf(value) else ('nan' if math.isnan(value) else f'{value:.6g}')
  return value


_MARKDOWN_METRICS = (('dice', 'Dice', 100.0, '%'), ('nsd', 'NSD', 100.0, '%'),
                     ('hd95_mm', 'HD95', 1.0, ' mm'), ('assd_mm', 'ASSD', 1.0, ' mm'),
                     ('volume_difference_relative', 'Rel. vol. diff.', 100.0, '%'))


def markdown_table(summary: dict) -> str:
  """One row per center and structure: mean ± std (median) of the main metrics."""
  lines = [f'# Evaluation of {summary["num_cases"]} case(s)', '',
           f'NSD tolerance {summary["nsd_tolerance_mm"]} mm. HD95: {summary["hd95_convention"]}. '
           'Cells: mean ± std (median); [k excluded] counts infinite values (an empty mask).', '',
           '| center | structure | n | ' + ' | '.join(label for _, label, _, _ in _MARKDOWN_METRICS)
           + ' |',
           '|' + '---|' * (3 + len(_MARKDOWN_METRICS))]
  for center, structures in summary['by_center'].items():
    for structure, statistics in structures.items():
      cells = []
      for metric, _, scale, unit in _MARKDOWN_METRICS:
        stats = statistics[metric]
        if stats['n'] == 0:
          cell = 'n/a'
        else:
          cell = (f'{stats["mean"] * scale:.2f} ± {stats["std"] * scale:.2f} '
                  f'({stats["median"] * scale:.2f}){unit}')
        if stats['n_excluded']:
          cell += f' [{stats["n_excluded"]} excluded]'
        cells.append(cell)
      count = statistics['dice']['n'] + statistics['dice']['n_excluded']
      lines.append(f'| {center} | {structure} | {count} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
