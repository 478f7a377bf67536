"""Evaluating a folder of predicted label maps against a folder of references: per-case CSV,
summary JSON and Markdown per structure and center, and a figure (box plots, example overlays).

Every case that can be scored is scored. A case whose prediction is missing, cannot be read, holds
values other than 0/1/2 or lies on another voxel grid than its reference, or whose reference cannot
be read or mapped, is skipped: the report lists it with its reasons, and evaluate_folder then
raises CasesSkipped naming every skipped case and reason, so that a command exits with an error.

Missed structures are scored, never left out (metrics.py has the conventions): per structure,
- reference has it, prediction empty ('missed'): Dice and NSD 0, HD95 and ASSD the image diagonal;
- prediction has it, reference empty ('false positive'): the same;
- both empty ('absent'): no value; left out of that structure's statistics and counted (a
  tumour-free case neither lifts nor lowers the tumour scores).
'pancreas' is labels 1+2 (the gland including its tumour), 'tumour' is label 2.

The report files are written whole or not at all, summary.json last, so a report folder with
summary.json holds a finished report; its `skipped` list says which cases it lacks.
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

from nibabel import orientations
import tqdm

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax.data import io
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.evaluation import metrics as metrics_lib

log = logging.getLogger(__name__)

ALL_CENTERS = 'all'
# Outputs of `launch.predict --save_probabilities` that sit beside the label maps.
_NON_LABEL_SUFFIXES = ('_probabilities', '_sdf')
_VOLUME_SUFFIXES = io.VOLUME_SUFFIXES
HD95_CONVENTION = ('max of the two directed 95th percentiles of surface-voxel distances '
                   '(linear interpolation)')
EMPTY_CONVENTION = (
    'reference has the structure but the prediction is empty (missed), or the prediction has it '
    'but the reference is empty (false positive): Dice and NSD 0, HD95 and ASSD the image diagonal '
    '(sqrt(sum((voxels * spacing_mm)^2)), the largest distance on the grid), in every mean; both '
    'empty (absent): no value, left out of mean/std/median and counted in n_excluded')
# The figure's example cases are ranked by this structure's Dice: every case of a pancreas data set
# has a pancreas, while a tumour-free case has no tumour Dice to rank by.
EXAMPLE_STRUCTURE = 'pancreas'
EXAMPLE_CRITERION = (f'{metrics_lib.display_name(EXAMPLE_STRUCTURE)} Dice (median: the middle '
                     'case, the lower of the two for an even count; equal Dice in case-name order)')


REPORT_FILES = ('per_case.csv', 'summary.json', 'summary.md', 'evaluation.png')


class CasesSkipped(DataError):
  """Some cases could not be scored; the report on the others is written and is `summary`."""

  def __init__(self, message: str, summary: dict):
    super().__init__(message)
    self.summary = summary

  def __reduce__(self):
    return type(self), (str(self), self.summary)


def _volume_files(folder: pathlib.Path, what: str) -> dict[str, pathlib.Path]:
  if not folder.is_dir():
    raise DataError(f'{folder} is not a folder: --{what} must be a folder of NIfTI/NRRD label maps')
  files = {}
  for path in sorted(folder.iterdir()):
    if not path.is_file() or not any(path.name.lower().endswith(s) for s in _VOLUME_SUFFIXES):
      continue
    if path.name.startswith('.'):
      continue  # a half-written output (.NAME.partial) or macOS's ._NAME copy: never a case
    name = io.case_id_from_path(path)  # nnU-Net's case_001_0000 is case_001
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
      case = row.get('case') or io.case_id_from_path(row.get('label') or row['image'])
      centers[str(case)] = str(row['center'])
    return centers
  except (KeyError, TypeError, AttributeError, ValueError) as error:
    raise DataError(
        f'{manifest} cannot be read as a case -> center manifest ({type(error).__name__}: '
        f'{error}); give a JSON object {{"case": "center"}} or rows with columns case,center'
    ) from error


def _parse_label_map(label_map, setting: str) -> dict[int, int] | None:
  try:
    return io.parse_label_map(label_map)
  except ConfigError as error:
    # The parser names the training config's key; the caller knows its own setting's name.
    raise ConfigError(str(error).replace('data.label_map', setting, 1)) from None


def _values_outside_labels(volume) -> list:
  # Non-integer values are io.map_labels's to report (it says the file looks like an image).
  return [value for value in io.present_values(volume.array).tolist()
          if float(value).is_integer() and value not in io.LABEL_VALUES]


def _shown(values: list) -> str:
  shown = [int(value) for value in values[:10]]
  return f'{shown}' + (f' and {len(values) - 10} more' if len(values) > 10 else '')


def _read_prediction(path: pathlib.Path) -> Any:
  try:
    volume = io.read_volume(path)
  except DataError as error:
    reason = str(error)
    if reason.endswith(': re-export it'):  # the reader's advice is for scans
      reason = (reason.removesuffix(': re-export it') + ': delete it, then rerun launch.predict '
                'into the same folder with --resume')
    raise DataError(f'prediction {reason}') from None
  outside = _values_outside_labels(volume)
  if outside:
    raise DataError(
        f'prediction {path} has label values {_shown(outside)} outside {io.LABEL_VALUES} (0 '
        'background, 1 pancreas, 2 tumour): give the label map launch.predict writes')
  volume.array = io.map_labels(volume.array, None, f'prediction {path}')
  return volume


def _read_reference(path: pathlib.Path, label_mapping: dict[int, int] | None,
                    label_map_setting: str) -> Any:
  try:
    volume = io.read_volume(path)
  except DataError as error:
    raise DataError(f'reference {error}') from None
  if label_mapping is None:
    outside = _values_outside_labels(volume)
    if outside:
      raise DataError(
          f'reference {path} has label values {_shown(outside)} outside {io.LABEL_VALUES} (0 '
          f'background, 1 pancreas, 2 tumour): set {label_map_setting} to map them, e.g. '
          f"{label_map_setting}='7:1' for TotalSegmentator's pancreas")
  volume.array = io.map_labels(volume.array, label_mapping, f'reference {path}')
  return volume


def _describe_grid(volume) -> str:
  geometry = volume.geometry
  spacing = tuple(round(value, 4) for value in geometry.spacing_mm)
  origin = tuple(round(float(value), 2) for value in geometry.affine[:3, 3])
  axes = ''.join(orientations.aff2axcodes(geometry.affine))
  return f'shape {geometry.shape}, spacing {spacing} mm, origin {origin} mm, axes {axes}'


def _read_case(prediction_path: pathlib.Path | None, reference_path: pathlib.Path,
               pred_dir: pathlib.Path, label_mapping, label_map_setting: str):
  """(prediction, reference, reasons): the two volumes when the case can be scored, else every
  reason why not (both files are checked, so one run names all of a case's problems)."""
  reasons, prediction, reference = [], None, None
  if prediction_path is None:
    reasons.append(f'no prediction in {pred_dir}: predict it (file names must match the '
                   'references)')
  else:
    try:
      prediction = _read_prediction(prediction_path)
    except DataError as error:
      reasons.append(str(error))
  try:
    reference = _read_reference(reference_path, label_mapping, label_map_setting)
  except DataError as error:
    reasons.append(str(error))
  if (prediction is not None and reference is not None
      and not io.same_canonical_grid(prediction, reference)):
    reasons.append(f'prediction {prediction_path} ({_describe_grid(prediction)}) is not on the '
                   f'voxel grid of reference {reference_path} ({_describe_grid(reference)}): '
                   "predict on the reference's image")
  if reasons:
    return None, None, [' '.join(reason.split()) for reason in reasons]  # one line each
  return prediction, reference, []


def evaluate_folder(pred_dir: str | pathlib.Path, gt_dir: str | pathlib.Path,
                    out_dir: str | pathlib.Path, centers: str | pathlib.Path | dict | None = None,
                    images_dir: str | pathlib.Path | None = None, nsd_tolerance_mm: float = 2.0,
                    gt_label_map: str | None = None, overwrite: bool = True,
                    label_map_setting: str = 'data.label_map', show_progress: bool = True) -> dict:
  """Scores every reference case in `gt_dir` against the same-named file in `pred_dir`.

  Writes out_dir/per_case.csv (one row per case and structure), summary.json, summary.md and
  evaluation.png; returns the summary dict: summary['by_center'][center][structure][metric] =
  {mean, std, median, n, n_excluded}, with center 'all' always present, and summary['skipped'].
  `centers` is a manifest path or a {case: center} dict; `gt_label_map` (e.g. '7:1') maps
  reference label values, and errors name it as `label_map_setting` (e.g. '--gt_label_map').

  Cases that cannot be scored are skipped: when some are and others are scored, the report is
  written (listing them) and CasesSkipped is raised, naming every skipped case and reason and
  holding the summary; when none can be scored, a DataError names them all and nothing is written.
  `out_dir` is held while the report is made: a second evaluation into it is refused
  (locks.FolderBusyError).
  """
  out_dir = pathlib.Path(out_dir)
  with locks.hold(out_dir, 'an evaluation report'):
    return _evaluate_folder(pathlib.Path(pred_dir), pathlib.Path(gt_dir), out_dir, centers,
                            images_dir, nsd_tolerance_mm, gt_label_map, overwrite,
                            label_map_setting, show_progress)


def _evaluate_folder(pred_dir: pathlib.Path, gt_dir: pathlib.Path, out_dir: pathlib.Path,
                     centers, images_dir, nsd_tolerance_mm: float, gt_label_map,
                     overwrite: bool, label_map_setting: str, show_progress: bool) -> dict:
  label_mapping = _parse_label_map(gt_label_map, label_map_setting)
  if not overwrite:
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing:
      raise DataError(f'{out_dir} already holds a report ({", ".join(existing)}): choose another '
                      '--out, or pass --overwrite to replace it')
  references = _volume_files(gt_dir, 'gt')
  predictions = _volume_files(pred_dir, 'pred')
  if not references:
    raise DataError(f'{gt_dir} holds no NIfTI/NRRD reference label maps')
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

  rows, skipped = [], []
  for name, reference_path in tqdm.tqdm(references.items(), desc='evaluate', unit='case',
                                        disable=not show_progress, dynamic_ncols=True):
    prediction_path = predictions.get(name)
    prediction, reference, reasons = _read_case(prediction_path, reference_path, pred_dir,
                                                label_mapping, label_map_setting)
    if reasons:
      skipped.append({'case': name, 'reasons': reasons, 'reference': str(reference_path),
                      'prediction': str(prediction_path) if prediction_path else None})
      continue
    center = case_centers[name] if case_centers is not None else ALL_CENTERS
    per_structure = metrics_lib.case_metrics(prediction.array, reference.array,
                                             reference.spacing_mm, nsd_tolerance_mm)
    for structure, values in per_structure.items():
      rows.append({'case': name, 'center': center, 'structure': structure,
                   'outcome': metrics_lib.outcome(values), **values})
  if skipped and not rows:
    raise DataError(f'none of the {len(references)} case(s) can be scored, so no report is '
                    f'written:\n{_skipped_lines(skipped)}')

  out_dir.mkdir(parents=True, exist_ok=True)
  num_scored = len(references) - len(skipped)
  examples = select_examples(rows)
  summary = {
      'num_cases': num_scored,
      'num_references': len(references),
      'complete': not skipped,
      'skipped': skipped,
      'structures': {name: metrics_lib.display_name(name) for name in metrics_lib.STRUCTURES},
      'nsd_tolerance_mm': nsd_tolerance_mm,
      'hd95_convention': HD95_CONVENTION,
      'empty_convention': EMPTY_CONVENTION,
      'examples': {'criterion': EXAMPLE_CRITERION, **examples},
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
        rows, figure_partial, examples=examples, criterion=EXAMPLE_CRITERION,
        case_paths={name: (predictions[name], references[name]) for name in examples.values()},
        images_dir=pathlib.Path(images_dir) if images_dir else None,
        gt_label_map=label_mapping, num_skipped=len(skipped))
    os.replace(figure_partial, out_dir / 'evaluation.png')
  finally:
    files.discard(figure_partial)
  # Last: a folder with summary.json holds a finished report (the training run's rerun reads it).
  files.write_json(out_dir / 'summary.json', summary)
  if skipped:
    raise CasesSkipped(
        f'{len(skipped)} of {len(references)} case(s) cannot be scored; the report in {out_dir} '
        f'scores the other {num_scored} and lists these:\n{_skipped_lines(skipped)}', summary)
  return summary


def _skipped_lines(skipped: list[dict]) -> str:
  return '\n'.join(f'  {entry["case"]}: {reason}' for entry in skipped
                   for reason in entry['reasons'])


def select_examples(rows: list[dict]) -> dict[str, str]:
  """{'best', 'median', 'worst'} -> case, ranked on EXAMPLE_CRITERION alone; cases where the
  structure is absent from both masks have no Dice and are not ranked ({} when none has one)."""
  ranked = sorted((row['dice'], row['case']) for row in rows
                  if row['structure'] == EXAMPLE_STRUCTURE and math.isfinite(row['dice']))
  if not ranked:
    return {}
  return {'best': ranked[-1][1], 'median': ranked[(len(ranked) - 1) // 2][1],
          'worst': ranked[0][1]}


def summarise_rows(rows: list[dict]) -> dict:
  """center ('all' first) -> structure -> metric -> summary statistics."""
  centers = [ALL_CENTERS] + sorted({row['center'] for row in rows} - {ALL_CENTERS})
  by_center = {}
  for center in centers:
    center_rows = [row for row in rows if center == ALL_CENTERS or row['center'] == center]
    by_center[center] = {}
    for structure in metrics_lib.STRUCTURES:
      structure_rows = [row for row in center_rows if row['structure'] == structure]
      statistics = {metric: metrics_lib.summarise([row[metric] for row in structure_rows])
                    for metric in metrics_lib.METRIC_NAMES}
      statistics['outcomes'] = {name: sum(row['outcome'] == name for row in structure_rows)
                                for name in metrics_lib.OUTCOMES.values()}
      by_center[center][structure] = statistics
  return by_center


def _write_csv(rows: list[dict], path: pathlib.Path) -> None:
  columns = ['case', 'center', 'structure', 'outcome', *metrics_lib.METRIC_NAMES]
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
_PENALISED_METRICS = ('hd95_mm', 'assd_mm')


def markdown_table(summary: dict) -> str:
  """One row per center and structure: mean ± std (median) of the main metrics, the outcome
  counts, the example cases and the skipped cases."""
  skipped = summary.get('skipped', [])
  title = f'# Evaluation of {summary["num_cases"]} case(s)'
  if skipped:
    title = (f'# Evaluation of {summary["num_cases"]} of {summary["num_references"]} case(s): '
             f'{len(skipped)} skipped (listed below)')
  lines = [title, '',
           f'Structures: {", ".join(summary["structures"].values())}. NSD tolerance '
           f'{summary["nsd_tolerance_mm"]} mm. HD95: {summary["hd95_convention"]}.', '',
           f'Empty masks: {summary["empty_convention"]}. Cells: mean ± std (median) over the '
           'scored cases; [k at penalty]: k missed or false-positive cases in the mean at the '
           'image diagonal; [n/a in k]: k cases without a value, left out.', '',
           '| center | structure | n | ' + ' | '.join(label for _, label, _, _ in _MARKDOWN_METRICS)
           + ' | found / missed / false positive / absent |',
           '|' + '---|' * (4 + len(_MARKDOWN_METRICS))]
  for center, structures in summary['by_center'].items():
    for structure, statistics in structures.items():
      outcomes = statistics['outcomes']
      penalised = sum(outcomes[name] for name in metrics_lib.PENALISED_OUTCOMES)
      cells = []
      for metric, _, scale, unit in _MARKDOWN_METRICS:
        stats = statistics[metric]
        if stats['n'] == 0:
          cell = 'n/a'
        else:
          cell = (f'{stats["mean"] * scale:.2f} ± {stats["std"] * scale:.2f} '
                  f'({stats["median"] * scale:.2f}){unit}')
        if metric in _PENALISED_METRICS and penalised:
          cell += f' [{penalised} at penalty]'
        if stats['n_excluded']:
          cell += f' [n/a in {stats["n_excluded"]}]'
        cells.append(cell)
      count = sum(outcomes.values())
      lines.append(f'| {center} | {summary["structures"][structure]} | {count} | '
                   + ' | '.join(cells) + ' | ' + ' / '.join(str(n) for n in outcomes.values())
                   + ' |')
  examples = summary['examples']
  if len(examples) > 1:
    lines += ['', f'Example cases in evaluation.png, ranked by {examples["criterion"]}: '
              + ', '.join(f'{pick} {examples[pick]}' for pick in ('best', 'median', 'worst'))
              + '.']
  if skipped:
    lines += ['', f'## Skipped cases ({len(skipped)} of {summary["num_references"]})', '',
              'Not scored, so not in any number above.', '', '| case | reason |', '|---|---|']
    for entry in skipped:
      for reason in entry['reasons']:
        lines.append(f'| {entry["case"]} | {reason.replace("|", "/")} |')
  return '\n'.join(lines) + '\n'
