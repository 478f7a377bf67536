"""Ablations as config variants: the paper's ladder (segmentation only, then + SDF regression,
+ SDF->mask transform, + two views with consistency, + contrastive) and further grids, each
variant trained with the same seeds on the same held-out centers, then one table of test Dice."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import ml_collections

from dualseg_jax import config_base
from dualseg_jax import files
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import runs
from dualseg_jax.experiments import tables

log = logging.getLogger('dualseg_jax')

STRUCTURES = ('tumour', 'pancreas')


def _ladder(steps: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
  """Each step keeps the overrides of the steps before it and adds its own."""
  cumulative, variants = {}, []
  for name, added in steps:
    cumulative = {**cumulative, **added}
    variants.append((name, dict(cumulative)))
  return variants


class _ConfigValue:
  """An override that sets the key to the experiment config's own value (a preset's weights)."""

  def __repr__(self):
    return 'CONFIG_VALUE'


CONFIG_VALUE = _ConfigValue()

_SEGMENTATION_ONLY = {
    'loss.weights.dice': CONFIG_VALUE, 'loss.weights.bce': CONFIG_VALUE, 'loss.weights.sdf_l1': 0.0,
    'loss.weights.sdf_to_mask_dice': 0.0, 'loss.weights.consistency': 0.0,
    'loss.weights.contrastive': 0.0, 'loss.weights.slice_bce': 0.0, 'augment.num_views': 1}

# Every ablation in one place: name -> [(variant name, {dotted config key: value})]. The variant
# name is its run folder; the first variant is the baseline the gains are measured against.
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # The paper's table; each step switches an ingredient on at the experiment config's own
    # weight, so 'full' equals the experiment config (config_base's weights for the paper preset).
    'paper': _ladder([
        ('seg_only', _SEGMENTATION_ONLY),
        ('+sdf', {'loss.weights.sdf_l1': CONFIG_VALUE}),
        ('+transform', {'loss.weights.sdf_to_mask_dice': CONFIG_VALUE}),
        ('+views', {'augment.num_views': CONFIG_VALUE, 'loss.weights.consistency': CONFIG_VALUE}),
        ('full', {'loss.weights.contrastive': CONFIG_VALUE}),
    ]),
    # The ladder's two ends alone: a cheap way to run both under several seeds (--seeds).
    'ends': [('seg_only', _SEGMENTATION_ONLY), ('full', {})],
    # Sharpness of the smooth SDF -> mask transform sigmoid(-k * sdf).
    'transform_k': [
        ('k100', {'loss.transform': 'smooth', 'loss.transform_k': 100.0}),
        ('k1500', {'loss.transform': 'smooth', 'loss.transform_k': 1500.0}),
    ],
    # The reference's hard threshold (almost no gradient) against the smooth transform.
    'transform': [
        ('hard', {'loss.transform': 'hard'}),
        ('smooth_k1500', {'loss.transform': 'smooth', 'loss.transform_k': 1500.0}),
    ],
    # The default config under three seeds: the spread a single-seed ablation row carries.
    'seeds': [('seed2022', {'seed': 2022}), ('seed2023', {'seed': 2023}), ('seed2024', {'seed': 2024})],
}


@dataclasses.dataclass(frozen=True)
class AblationRun:
  variant: str
  seed: int
  test_center: str
  spec: runs.RunSpec


def variants(ablation: str, config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
  """The ablation's (variant, overrides), CONFIG_VALUE replaced by `config`'s values."""
  if ablation not in ABLATIONS:
    raise ConfigError(f'--ablation={ablation!r}: choose one of {sorted(ABLATIONS)} (defined in '
                      'dualseg_jax/experiments/ablation.py::ABLATIONS)')
  own_values = config_base.flatten(config)
  return [(name, {key: own_values[key] if value is CONFIG_VALUE else value
                  for key, value in overrides.items()})
          for name, overrides in ABLATIONS[ablation]]


def plan(config: ml_collections.ConfigDict, ablation: str, seeds: list[int] | None = None,
         test_centers: list[str] | None = None) -> list[AblationRun]:
  """Every (variant, seed, held-out center) run; folder <variant>[_seed<s>][_test_<center>], the
  suffixes only where seed or center differ from the config's, so adding seeds keeps old runs."""
  seeds = list(seeds) if seeds else [int(config.seed)]
  test_centers = list(test_centers) if test_centers else [config.data.test_center]
  unknown = [center for center in test_centers if center not in config.data.centers]
  if unknown:
    raise ConfigError(f'held-out center(s) {unknown} are not in data.centers='
                      f'{tuple(config.data.centers)}')
  planned = []
  for name, overrides in variants(ablation, config):
    for center in test_centers:
      for seed in seeds:
        folder = name + (f'_seed{seed}' if seed != config.seed else '') + (
            f'_test_{center}' if center != config.data.test_center else '')
        # The variant's own seed override (the 'seeds' grid) wins over --seeds.
        full_overrides = {'seed': seed, 'data.fold': -1, 'data.test_center': center,
                          'train.evaluate_test_center': True, **overrides}
        planned.append(AblationRun(variant=name, seed=int(full_overrides['seed']),
                                   test_center=center,
                                   spec=runs.RunSpec(name=folder, overrides=full_overrides)))
  return planned


def describe(config: ml_collections.ConfigDict, ablation: str, seeds: list[int] | None = None,
             test_centers: list[str] | None = None) -> str:
  """What a dry run prints: each run's folder and the config keys it sets."""
  planned = plan(config, ablation, seeds, test_centers)
  lines = [f'ablation {ablation!r}: {len(planned)} run(s), {config.train.steps} steps each']
  for run in planned:
    lines.append(f'  {run.spec.name}: {runs.format_overrides(run.spec.overrides)}')
  return '\n'.join(lines)


def run_ablation(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 ablation: str = 'paper', seeds: list[int] | None = None,
                 test_centers: list[str] | None = None, train_fn: Callable | None = None,
                 shard: tuple[int, int] | None = None) -> dict | None:
  """Trains every run of the ablation (finished ones are not redone) and writes the tables:
  workdir/ablation.md, ablation.csv, ablation.json. Returns the table dict.

  `shard` = (i, n) trains only the planned runs whose position modulo n is i and writes no
  table (returns None): n processes share the runs without touching one run folder twice; the
  same command without a shard then finds every run finished and writes the tables.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  planned = plan(config, ablation, seeds, test_centers)
  specs = [run.spec for run in planned]
  if shard is not None:
    index, count = shard
    if not 0 <= index < count:
      raise ConfigError(f'--shard={index}/{count}: give I/N with 0 <= I < N, e.g. --shard=0/2')
    runs.run_all(config, workdir, specs[index::count], train_fn=train_fn)
    return None
  runs.run_all(config, workdir, specs, train_fn=train_fn)
  table = ablation_table(workdir, planned, ablation)
  write_tables(table, workdir)
  return table


def ablation_table(workdir: pathlib.Path, planned: list[AblationRun], ablation: str) -> dict:
  """Test Dice per variant, held-out center and structure: mean (and std) over seeds, and the
  gain of each mean over the first variant's."""
  centers = list(dict.fromkeys(run.test_center for run in planned))
  names = list(dict.fromkeys(run.variant for run in planned))
  rows = []
  for name in names:
    row = {'variant': name, 'overrides': None, 'runs': [], 'dice': {}}
    for center in centers:
      row['dice'][center] = {}
      selected = [run for run in planned if run.variant == name and run.test_center == center]
      per_seed = {structure: [] for structure in STRUCTURES}
      for run in selected:
        row['overrides'] = {k: v for k, v in run.spec.overrides.items()
                            if k not in ('seed', 'data.fold', 'data.test_center',
                                         'train.evaluate_test_center')}
        row['runs'].append(str(workdir / run.spec.name))
        summary = runs.read_test_summary(workdir / run.spec.name)
        for structure in STRUCTURES:
          per_seed[structure].append(_test_dice(summary, center, structure))
      for structure in STRUCTURES:
        mean, std, count = tables.mean_and_std(per_seed[structure])
        row['dice'][center][structure] = {
            'mean': mean, 'std': std if len(selected) > 1 else None, 'n_seeds': count,
            'per_seed': per_seed[structure]}
    rows.append(row)
  baseline = rows[0]
  for row in rows:
    row['gain'] = {center: {structure: _difference(row['dice'][center][structure]['mean'],
                                                   baseline['dice'][center][structure]['mean'])
                            for structure in STRUCTURES} for center in centers}
  return {'ablation': ablation, 'baseline': baseline['variant'], 'test_centers': centers,
          'seeds': sorted({run.seed for run in planned}), 'structures': list(STRUCTURES),
          'rows': rows}


def _test_dice(summary: dict | None, center: str, structure: str) -> float | None:
  if summary is None:
    return None
  by_center = summary['by_center']
  return by_center.get(center, by_center.get('all', {})).get(structure, {}).get('dice', {}).get('mean')


def _difference(value: float | None, baseline: float | None) -> float | None:
  return None if value is None or baseline is None else value - baseline


def write_tables(table: dict, workdir: pathlib.Path) -> None:
  """ablation.json (everything), ablation.csv (one flat row per variant), ablation.md (readable)."""
  files.write_json(workdir / 'ablation.json', table)
  flat_rows, markdown_rows = [], []
  columns = ['Variant']
  for center in table['test_centers']:
    columns += [f'{center} {structure} Dice (%)' for structure in table['structures']]
  for center in table['test_centers']:
    columns += [f'{center} {structure} gain (points)' for structure in table['structures']]
  for row in table['rows']:
    flat = {'variant': row['variant']}
    cells = [row['variant']]
    for center in table['test_centers']:
      for structure in table['structures']:
        cell = row['dice'][center][structure]
        flat[f'{center}/{structure}_dice_mean'] = cell['mean']
        flat[f'{center}/{structure}_dice_std'] = cell['std']
        cells.append(tables.format_cell(cell['mean'], cell['std'], scale=100.0, digits=2))
    for center in table['test_centers']:
      for structure in table['structures']:
        gain = row['gain'][center][structure]
        flat[f'{center}/{structure}_dice_gain'] = gain
        cells.append(tables.format_cell(gain, scale=100.0, digits=2, signed=True))
    flat['overrides'] = runs.format_overrides(row['overrides'] or {})
    flat_rows.append(flat)
    markdown_rows.append(cells)
  tables.write_csv(workdir / 'ablation.csv', flat_rows)
  seeds = table['seeds']
  header = [f'# Ablation {table["ablation"]!r}', '',
            f'Test Dice on each held-out center, mean over {len(seeds)} seed(s) {seeds}'
            + (' ± std over seeds' if len(seeds) > 1 else '')
            + f'; gains in Dice points over {table["baseline"]!r}.', '']
  overrides = ['', 'Overrides per variant:', '']
  overrides += [f'- `{row["variant"]}`: `{runs.format_overrides(row["overrides"] or {})}`'
                for row in table['rows']]
  (workdir / 'ablation.md').write_text('\n'.join(header) + '\n' +
                                       tables.markdown(columns, markdown_rows) +
                                       '\n'.join(overrides) + '\n')
