"""Ablation runs and tables: the paper's ladder, table contents against the scores each run
wrote, resuming after an interruption, the dry run, and one real two-variant ablation."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import three_center
from dualseg_jax import config_base
from dualseg_jax.experiments import ablation
from dualseg_jax.experiments import runs
from dualseg_jax.train import loop
from tests.conftest import tiny_run_config
from tests.experiments import fakes

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSSES = ('dice', 'bce', 'sdf_l1', 'sdf_to_mask_dice', 'consistency', 'contrastive', 'slice_bce')


def _config(root, steps=1):
  return tiny_run_config(root, steps)


def _weights(config):
  return {name: config.loss.weights[name] for name in LOSSES}


def test_paper_ladder_adds_one_ingredient_per_row_and_ends_at_the_default_config(tmp_path):
  config = _config(tmp_path)
  ladder = dict(ablation.variants('paper', config))
  assert list(ladder) == ['seg_only', '+sdf', '+transform', '+views', 'full']
  enabled = {name: sorted(k for k, v in _weights(config_base.with_overrides(config, o)).items() if v > 0)
             for name, o in ladder.items()}
  assert enabled == {
      'seg_only': ['bce', 'dice'],
      '+sdf': ['bce', 'dice', 'sdf_l1'],
      '+transform': ['bce', 'dice', 'sdf_l1', 'sdf_to_mask_dice'],
      '+views': ['bce', 'consistency', 'dice', 'sdf_l1', 'sdf_to_mask_dice'],
      'full': ['bce', 'consistency', 'contrastive', 'dice', 'sdf_l1', 'sdf_to_mask_dice']}
  views = {name: config_base.with_overrides(config, o).augment.num_views for name, o in ladder.items()}
  assert views == {'seg_only': 1, '+sdf': 1, '+transform': 1, '+views': 2, 'full': 2}
  full = config_base.with_overrides(config, ladder['full'])
  default = config_base.base_config()
  assert _weights(full) == _weights(default) and full.augment.num_views == default.augment.num_views
  # The variant is a copy: the experiment's config is untouched.
  assert config.augment.num_views == 2
  # A preset's own weights are the ones switched on (the quick preset's SDF weights are 0.3).
  quick = three_center.get_config('quick')
  quick_ladder = dict(ablation.variants('paper', quick))
  assert quick_ladder['+sdf']['loss.weights.sdf_l1'] == quick.loss.weights.sdf_l1 == 0.3
  assert _weights(config_base.with_overrides(quick, quick_ladder['full'])) == _weights(quick)
  # The 'ends' grid is the ladder's first and last rows, with the same overrides.
  ends = dict(ablation.variants('ends', quick))
  assert list(ends) == ['seg_only', 'full'] and ends['seg_only'] == quick_ladder['seg_only']
  assert config_base.with_overrides(quick, ends['full']) == config_base.with_overrides(quick, quick_ladder['full'])


def test_unknown_override_key_and_ablation_name_are_config_errors(tmp_path):
  from dualseg_jax.errors import ConfigError
  with pytest.raises(ConfigError, match='loss.weights.sdf'):
    config_base.with_overrides(_config(tmp_path), {'loss.weights.sdf': 1.0})
  with pytest.raises(ConfigError, match='--ablation'):
    ablation.plan(_config(tmp_path), 'no_such_ablation')


def test_table_rows_columns_means_and_gains(tmp_path):
  config = _config(tmp_path / 'data')
  training = fakes.FakeTraining()
  table = ablation.run_ablation(config, tmp_path / 'exp', 'paper', seeds=[2022, 2023],
                                test_centers=['center_c', 'center_a'], train_fn=training)
  names = ['seg_only', '+sdf', '+transform', '+views', 'full']
  assert len(training.calls) == 5 * 2 * 2
  assert 'seg_only' in training.calls and '+sdf_seed2023_test_center_a' in training.calls
  expected = {}
  for name, overrides in ablation.variants('paper', config):
    for center in ('center_c', 'center_a'):
      for structure in ('tumour', 'pancreas'):
        per_seed = [fakes.expected_scores(config_base.with_overrides(config, {
            **overrides, 'seed': seed, 'data.test_center': center}))[structure]['dice']
            for seed in (2022, 2023)]
        expected[name, center, structure] = (np.mean(per_seed), np.std(per_seed))

  with (tmp_path / 'exp' / 'ablation.csv').open() as file:
    rows = list(csv.DictReader(file))
  assert [row['variant'] for row in rows] == names
  for row in rows:
    for center in ('center_c', 'center_a'):
      for structure in ('tumour', 'pancreas'):
        mean = float(row[f'{center}/{structure}_dice_mean'])
        std = float(row[f'{center}/{structure}_dice_std'])
        gain = float(row[f'{center}/{structure}_dice_gain'])
        assert 0.0 <= mean <= 1.0
        want_mean, want_std = expected[row['variant'], center, structure]
        assert mean == pytest.approx(want_mean, abs=1e-5)
        assert std == pytest.approx(want_std, abs=1e-5)
        assert gain == pytest.approx(want_mean - expected['seg_only', center, structure][0], abs=1e-5)
  saved = json.loads((tmp_path / 'exp' / 'ablation.json').read_text())
  assert saved == json.loads(json.dumps(table))
  assert saved['seeds'] == [2022, 2023] and saved['test_centers'] == ['center_c', 'center_a']
  markdown = (tmp_path / 'exp' / 'ablation.md').read_text().splitlines()
  table_lines = [line for line in markdown if line.startswith('| ')]
  assert table_lines[0].split(' | ')[1:3] == ['center_c tumour Dice (%)', 'center_c pancreas Dice (%)']
  assert [line.split(' | ')[0][2:] for line in table_lines[1:]] == names
  seg_only_tumour = expected['seg_only', 'center_c', 'tumour']
  assert f'{100 * seg_only_tumour[0]:.2f} ± {100 * seg_only_tumour[1]:.2f}' in table_lines[1]


def test_one_seed_has_no_std_and_plain_folder_names(tmp_path):
  config = _config(tmp_path / 'data')
  training = fakes.FakeTraining()
  table = ablation.run_ablation(config, tmp_path / 'exp', 'transform_k', train_fn=training)
  assert training.calls == ['k100', 'k1500']
  assert [row['dice']['center_c']['tumour']['std'] for row in table['rows']] == [None, None]
  assert table['rows'][0]['gain']['center_c']['tumour'] == 0.0


def test_interrupted_ablation_resumes_without_redoing_finished_runs(tmp_path):
  config = _config(tmp_path / 'data')
  interrupted = fakes.FakeTraining(stop_on_call=3)
  with pytest.raises(runs.ExperimentInterrupted, match='rerun the same command'):
    ablation.run_ablation(config, tmp_path / 'exp', 'paper', train_fn=interrupted)
  assert interrupted.calls == ['seg_only', '+sdf', '+transform']
  assert not (tmp_path / 'exp' / 'ablation.csv').exists()

  resumed = fakes.FakeTraining()
  ablation.run_ablation(config, tmp_path / 'exp', 'paper', train_fn=resumed)
  assert resumed.calls == ['+transform', '+views', 'full']
  assert (tmp_path / 'exp' / 'ablation.csv').exists()

  again = fakes.FakeTraining()
  ablation.run_ablation(config, tmp_path / 'exp', 'paper', train_fn=again)
  assert again.calls == []
  # More steps make every run unfinished again (train_and_evaluate resumes each from its checkpoint).
  longer = fakes.FakeTraining()
  ablation.run_ablation(_config(tmp_path / 'data', steps=2), tmp_path / 'exp', 'paper',
                        train_fn=longer)
  assert longer.calls == ['seg_only', '+sdf', '+transform', '+views', 'full']


def test_shards_share_the_runs_and_the_unsharded_command_writes_the_table(tmp_path):
  config = _config(tmp_path / 'data')
  first, second = fakes.FakeTraining(), fakes.FakeTraining()
  assert ablation.run_ablation(config, tmp_path / 'exp', 'paper', seeds=[2022, 2023],
                               train_fn=first, shard=(0, 2)) is None
  ablation.run_ablation(config, tmp_path / 'exp', 'paper', seeds=[2022, 2023], train_fn=second,
                        shard=(1, 2))
  planned = [run.spec.name for run in ablation.plan(config, 'paper', [2022, 2023])]
  assert first.calls == planned[0::2] and second.calls == planned[1::2]
  assert not (tmp_path / 'exp' / 'ablation.csv').exists()
  tables = fakes.FakeTraining()
  ablation.run_ablation(config, tmp_path / 'exp', 'paper', seeds=[2022, 2023], train_fn=tables)
  assert tables.calls == [] and (tmp_path / 'exp' / 'ablation.csv').exists()
  with pytest.raises(ablation.ConfigError, match='--shard=2/2'):
    ablation.run_ablation(config, tmp_path / 'exp', 'paper', train_fn=tables, shard=(2, 2))


def test_dry_run_lists_variants_and_runs_nothing(tmp_path):
  workdir = tmp_path / 'exp'
  completed = subprocess.run(
      [sys.executable, '-m', 'launch.ablate', '--config=configs/three_center.py:tiny',
       '--ablation=paper', '--dry_run', '--seeds=2022,2023', f'--workdir={workdir}'],
      cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
  listed = [line.split(':')[0].strip() for line in completed.stdout.splitlines()[1:]]
  assert listed == [f'{name}{suffix}' for name in ('seg_only', '+sdf', '+transform', '+views', 'full')
                    for suffix in ('', '_seed2023')]
  seg_only = completed.stdout.splitlines()[1]
  assert '--config.augment.num_views=1' in seg_only and '--config.loss.weights.sdf_l1=0.0' in seg_only
  assert not workdir.exists()


def test_real_two_variant_ablation_end_to_end(phantom_root, tmp_path, monkeypatch):
  monkeypatch.setitem(ablation.ABLATIONS, 'two', ablation.ABLATIONS['paper'][:2])
  calls = []

  def counted(config, workdir, **kwargs):
    calls.append(pathlib.Path(workdir).name)
    return loop.train_and_evaluate(config, workdir, **kwargs)

  config = _config(phantom_root)
  # The held-out prediction dominates the time: coarse voxels and no window overlap keep it short.
  config.data.target_spacing_mm = (6.0, 6.0, 6.0)
  config.inference.overlap = 0.0
  config.inference.windows_per_batch = 16
  table = ablation.run_ablation(config, tmp_path / 'exp', 'two', train_fn=counted)
  assert calls == ['seg_only', '+sdf']
  for name in calls:
    run_dir = tmp_path / 'exp' / name
    saved = json.loads((run_dir / 'config.json').read_text())
    assert saved['augment']['num_views'] == 1 and saved['train']['evaluate_test_center']
    assert saved['loss']['weights']['sdf_l1'] == (1.0 if name == '+sdf' else 0.0)
    summary = json.loads((run_dir / 'evaluation' / 'test_center_c' / 'summary.json').read_text())
    row = next(r for r in table['rows'] if r['variant'] == name)
    for structure in ('tumour', 'pancreas'):
      dice = summary['by_center']['center_c'][structure]['dice']['mean']
      assert row['dice']['center_c'][structure]['mean'] == dice and 0.0 <= dice <= 1.0
  with (tmp_path / 'exp' / 'ablation.csv').open() as file:
    assert [row['variant'] for row in csv.DictReader(file)] == ['seg_only', '+sdf']
  ablation.run_ablation(config, tmp_path / 'exp', 'two', train_fn=counted)
  assert calls == ['seg_only', '+sdf'], 'finished runs must not be trained or evaluated again'
