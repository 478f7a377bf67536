"""The protocol: one run per held-out center and per fold, and a report whose numbers, hashes and
commands match what each run wrote."""

import csv
import json

import numpy as np
import pytest

from configs import three_center
from dualseg_jax import config_base
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import protocol
from tests.experiments import fakes


def _config(root):
  config = three_center.get_config('tiny')
  config.data.root = str(root)
  config.data.synthetic_cases_per_center = 2
  config.data.num_folds = 3
  config.train.steps = 1
  return config


def test_plan_holds_out_each_center_then_each_fold(tmp_path):
  config = _config(tmp_path)
  names = [spec.name for spec in protocol.plan(config)]
  assert names == ['test_center_a', 'test_center_b', 'test_center_c', 'fold0', 'fold1', 'fold2']
  assert [spec.name for spec in protocol.plan(config, folds=[1], leave_one_out=False)] == ['fold1']
  with pytest.raises(ConfigError, match='data.num_folds=3'):
    protocol.plan(config, folds=[3])


def test_report_rows_numbers_hashes_and_figure(tmp_path):
  config = _config(tmp_path / 'data')
  training = fakes.FakeTraining()
  workdir = tmp_path / 'exp'
  report = protocol.run_protocol(config, workdir, folds=[0, 2], train_fn=training,
                                 base_command='python -m launch.train --config=configs/three_center.py:tiny')
  assert training.calls == ['test_center_a', 'test_center_b', 'test_center_c', 'fold0', 'fold2']
  with (workdir / 'protocol.csv').open() as file:
    rows = list(csv.DictReader(file))
  run_rows = [row for row in rows if row['kind'] != protocol.SUMMARY]
  assert [(row['held_out'], row['structure']) for row in run_rows] == [
      (held_out, structure) for held_out in ('center_a', 'center_b', 'center_c', 'fold 0', 'fold 2')
      for structure in ('pancreas', 'tumour')]
  for row in run_rows:
    run_config = config_base.with_overrides(config, {'data.fold': -1, 'data.test_center': row['held_out']}
                                     if row['kind'] == protocol.LEAVE_ONE_OUT else
                                     {'data.fold': int(row['held_out'].split()[-1])})
    expected = fakes.expected_scores(run_config)[row['structure']]
    for metric in ('dice', 'hd95_mm', 'nsd'):
      assert float(row[f'{metric}_mean']) == pytest.approx(expected[metric], abs=1e-5)
      assert float(row[f'{metric}_std']) == pytest.approx(0.01)
    assert 0.0 <= float(row['dice_mean']) <= 1.0 and 0.0 <= float(row['nsd_mean']) <= 1.0
    run_dir = workdir / row['run']
    assert row['config_sha256'] == fakes.sha256_of(run_dir / 'config.json')
    assert row['command'].startswith('python -m launch.train --config=configs/three_center.py:tiny')
    assert row['command'].endswith(f'--workdir={run_dir}')
    assert f'--config.data.fold={json.loads((run_dir / "config.json").read_text())["data"]["fold"]}' in row['command']
  # Aggregates: mean ± std of the per-run means, per kind and structure.
  for kind, held_out in ((protocol.LEAVE_ONE_OUT, ('center_a', 'center_b', 'center_c')),
                         (protocol.IN_DOMAIN, ('fold 0', 'fold 2'))):
    for structure in ('pancreas', 'tumour'):
      means = [float(r['dice_mean']) for r in run_rows
               if r['held_out'] in held_out and r['structure'] == structure]
      aggregate = next(a for a in report['aggregates']
                       if a['held_out'] == kind and a['structure'] == structure)
      assert aggregate['dice_mean'] == pytest.approx(np.mean(means), abs=1e-6)
      assert aggregate['dice_std'] == pytest.approx(np.std(means), abs=1e-6)
  assert json.loads((workdir / 'protocol.json').read_text())['rows'][0]['run'] == 'test_center_a'
  markdown = (workdir / 'protocol.md').read_text()
  assert markdown.count('| center_a | pancreas |') == 1 and '| fold 2 | tumour |' in markdown
  for line in markdown.splitlines():
    if line.startswith('| center_a | tumour |'):
      assert '[1 of 2 cases excluded]' in line.split('|')[4]  # the HD95 column
    if line.startswith('| center_a | pancreas |'):
      assert 'excluded' not in line
  assert all(row['hd95_mm_n_excluded'] == str(int(row['structure'] == 'tumour')) for row in run_rows)
  figure = workdir / 'protocol.png'
  assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and figure.stat().st_size > 10_000

  again = fakes.FakeTraining()
  protocol.run_protocol(config, workdir, folds=[0, 2], train_fn=again)
  assert again.calls == []
