"""The paper's evaluation protocol: leave-one-center-out with each center held out in turn, and
in-domain k-fold cross-validation for the pancreas; one report of Dice, HD95 and NSD per held-out
center, fold and structure, each row with the command that repeats it and its config hash."""

from __future__ import annotations

import logging
import pathlib
from typing import Callable

import ml_collections

from dualseg_jax import files
from dualseg_jax import structures
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import runs
from dualseg_jax.experiments import tables

log = logging.getLogger('dualseg_jax')

STRUCTURES = structures.NAMES
# (summary key, column prefix, label, scale for the Markdown table, unit)
METRICS = (('dice', 'dice', 'Dice', 100.0, '%'), ('hd95_mm', 'hd95_mm', 'HD95', 1.0, 'mm'),
           ('nsd', 'nsd', 'NSD', 100.0, '%'))
LEAVE_ONE_OUT, IN_DOMAIN, SUMMARY = 'leave-one-center-out', 'in-domain fold', 'mean over runs'


def plan(config: ml_collections.ConfigDict, folds: list[int] | None = None,
         leave_one_out: bool = True) -> list[runs.RunSpec]:
  """test_<center> for every center of data.centers, then fold<k> for the in-domain folds
  (all data.num_folds of them unless `folds` names some; an empty list after `[]` skips them)."""
  num_folds = int(config.data.num_folds)
  folds = list(range(num_folds)) if folds is None else list(folds)
  wrong = [fold for fold in folds if not 0 <= fold < num_folds]
  if wrong:
    raise ConfigError(f'folds {wrong} are outside 0..{num_folds - 1} (data.num_folds={num_folds})')
  specs = []
  if leave_one_out:
    specs += [runs.RunSpec(name=f'test_{center}', overrides={
        'data.fold': -1, 'data.test_center': center, 'train.evaluate_test_center': True})
        for center in config.data.centers]
  specs += [runs.RunSpec(name=f'fold{fold}', overrides={
      'data.fold': fold, 'train.evaluate_test_center': True}) for fold in folds]
  return specs


def describe(config: ml_collections.ConfigDict, specs: list[runs.RunSpec]) -> str:
  lines = [f'protocol: {len(specs)} run(s), {config.train.steps} steps each']
  lines += [f'  {spec.name}: {runs.format_overrides(spec.overrides)}' for spec in specs]
  return '\n'.join(lines)


def run_protocol(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 folds: list[int] | None = None, leave_one_out: bool = True,
                 base_command: str = 'python -m launch.train --config=CONFIG',
                 train_fn: Callable | None = None) -> dict:
  """Trains and evaluates every protocol run in workdir/<run> (finished ones are not redone),
  then writes workdir/protocol.md, protocol.csv, protocol.json and protocol.png."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  specs = plan(config, folds, leave_one_out)
  runs.run_all(config, workdir, specs, train_fn=train_fn)
  report = protocol_report(workdir, specs, base_command)
  write_report(report, workdir)
  return report


def _metric_cell(summary: dict | None, center: str, structure: str, metric: str) -> dict:
  if summary is None:
    return {'mean': None, 'std': None, 'n': 0, 'n_excluded': 0}
  by_center = summary['by_center']
  return by_center.get(center, by_center.get('all', {})).get(structure, {}).get(
      metric, {'mean': None, 'std': None, 'n': 0, 'n_excluded': 0})


def protocol_report(workdir: pathlib.Path, specs: list[runs.RunSpec], base_command: str) -> dict:
  """One row per run and structure, then per kind and structure the mean ± std over its runs."""
  rows = []
  for spec in specs:
    run_dir = workdir / spec.name
    summary = runs.read_test_summary(run_dir)
    fold = spec.overrides['data.fold']
    kind = LEAVE_ONE_OUT if fold == -1 else IN_DOMAIN
    held_out = spec.overrides['data.test_center'] if fold == -1 else f'fold {fold}'
    # In-domain test folds mix centers: their score is over all of the fold's cases.
    center_key = spec.overrides['data.test_center'] if fold == -1 else 'all'
    command = (f'{base_command} {runs.format_overrides(spec.overrides)} --workdir={run_dir}')
    for structure in STRUCTURES:
      row = {'run': spec.name, 'kind': kind, 'held_out': held_out, 'structure': structure}
      for key, column, *_ in METRICS:
        cell = _metric_cell(summary, center_key, structure, key)
        row[f'{column}_mean'], row[f'{column}_std'] = cell['mean'], cell['std']
        row[f'{column}_n'], row[f'{column}_n_excluded'] = cell['n'], cell['n_excluded']
      row.update(command=command, config_sha256=runs.config_sha256(run_dir), workdir=str(run_dir))
      rows.append(row)
  aggregates = []
  for kind in (LEAVE_ONE_OUT, IN_DOMAIN):
    for structure in STRUCTURES:
      selected = [row for row in rows if row['kind'] == kind and row['structure'] == structure]
      if not selected:
        continue
      aggregate = {'run': f'{kind} ({len(selected)} runs)', 'kind': SUMMARY,
                   'held_out': kind, 'structure': structure}
      for _, column, *_ in METRICS:
        mean, std, count = tables.mean_and_std([row[f'{column}_mean'] for row in selected])
        aggregate[f'{column}_mean'], aggregate[f'{column}_std'] = mean, std
        aggregate[f'{column}_n'] = count
      aggregates.append(aggregate)
  return {'structures': list(STRUCTURES), 'rows': rows, 'aggregates': aggregates,
          'note': 'per run: mean ± std over the test cases (a missed or false-positive structure '
                  'scores Dice 0 and HD95 at the image diagonal; a structure absent from both '
                  'reference and prediction is left out and counted in *_n_excluded); '
                  'aggregates: mean ± std of the run means'}


def write_report(report: dict, workdir: pathlib.Path) -> None:
  files.write_json(workdir / 'protocol.json', report)
  tables.write_csv(workdir / 'protocol.csv', report['rows'] + report['aggregates'])
  columns = ['Held out', 'Structure'] + [f'{label} ({unit})' for _, _, label, _, unit in METRICS]
  columns += ['n (cases; runs in aggregates)', 'config sha256']
  markdown_rows = []
  for row in report['rows'] + report['aggregates']:
    cells = [row['held_out'] if row['kind'] != SUMMARY else f'**{row["run"]}**', row['structure']]
    for _, column, _, scale, _ in METRICS:
      cell = tables.format_cell(row[f'{column}_mean'], row[f'{column}_std'], scale=scale, digits=2)
      # Cases where the structure is absent from reference and prediction have no value: say how
      # many the figure leaves out, so a mean over few cases is read as such.
      if row.get(f'{column}_n_excluded'):
        cell += f' [{row[f"{column}_n_excluded"]} of {row[f"{column}_n"] + row[f"{column}_n_excluded"]} cases excluded]'
      cells.append(cell)
    cells += [row.get('dice_n', ''), (row.get('config_sha256') or '')[:12]]
    markdown_rows.append(cells)
  commands = ['', 'Commands (each repeats one run; the config hash is the sha256 of its config.json):', '']
  commands += [f'- `{row["run"]}` (sha256 {row["config_sha256"]}): `{row["command"]}`'
               for row in report['rows'] if row['structure'] == STRUCTURES[0]]
  (workdir / 'protocol.md').write_text(
      '# Evaluation protocol\n\n' + report['note'] + '.\n\n' +
      tables.markdown(columns, markdown_rows) + '\n'.join(commands) + '\n')
  plot(report, workdir / 'protocol.png')


def plot(report: dict, path: pathlib.Path) -> None:
  """Bars of mean ± std per held-out center or fold, one panel per metric, one colour per structure."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  groups = list(dict.fromkeys(row['held_out'] for row in report['rows']))
  width = 0.8 / len(report['structures'])
  figure, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4.0), squeeze=False)
  positions = np.arange(len(groups))
  for axis, (_, column, label, scale, unit) in zip(axes[0], METRICS):
    for index, structure in enumerate(report['structures']):
      means, stds = [], []
      for group in groups:
        row = next(r for r in report['rows'] if r['held_out'] == group and r['structure'] == structure)
        means.append(np.nan if row[f'{column}_mean'] is None else row[f'{column}_mean'] * scale)
        stds.append(0.0 if row[f'{column}_std'] is None else row[f'{column}_std'] * scale)
      axis.bar(positions + (index - (len(report['structures']) - 1) / 2) * width, means, width,
               yerr=stds, capsize=3, label=structure)
    axis.set_xticks(positions, groups, rotation=30, ha='right')
    axis.set_title(f'{label} ({unit})')
    if column != 'hd95_mm':
      axis.set_ylim(0, 100)
    axis.grid(axis='y', alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  figure.legend(handles, labels, loc='upper right', ncol=len(labels))
  figure.suptitle('Held-out test sets: mean ± std over cases')
  figure.tight_layout(rect=(0, 0, 1, 0.93))
  figure.savefig(path, dpi=110)
  plt.close(figure)
