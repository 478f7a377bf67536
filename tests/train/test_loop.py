"""The training loop end to end on the tiny preset: files written, exact resume, data parallelism."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, tiny_run_config
from dualseg_jax.errors import ConfigError
from dualseg_jax.train import loop
from dualseg_jax.train import reporting


_config = tiny_run_config


def _losses(workdir):
  return {row['step']: row['loss'] for row in reporting.MetricsLog.read(workdir / 'metrics.jsonl')
          if 'loss' in row}


def _params(workdir):
  from dualseg_jax.run_dir import restore_params
  params, step = restore_params(workdir, which='latest')
  return params, step


def test_three_steps_write_checkpoints_metrics_and_plot(phantom_root, tmp_path):
  config = _config(phantom_root, steps=3, **{'train.eval_every': 3, 'train.checkpoint_every': 2})
  result = loop.train_and_evaluate(config, tmp_path / 'run')
  workdir = tmp_path / 'run'
  assert result.final_step == 3 and not result.stopped_early
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['train']['steps'] == 3 and saved['data']['root'] == str(phantom_root)
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 3]
  rows = reporting.MetricsLog.read(workdir / 'metrics.jsonl')
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  validation = [r for r in rows if 'val/dice_mean' in r]
  assert len(validation) == 1 and 0.0 <= validation[0]['val/dice_mean'] <= 1.0
  assert (workdir / 'curves.png').stat().st_size > 1000
  assert (workdir / 'best').exists()
  # Where the minutes went: every phase ran, and the phases with 'other' sum to the wall time.
  timing = json.loads((workdir / loop.TIMING_FILE).read_text())
  assert timing == result.time_breakdown
  assert all(timing[phase] > 0 for phase in ('data', 'compile', 'training', 'validation',
                                             'checkpoints'))
  assert timing['held-out evaluation'] == 0  # the tiny run config turns it off
  parts = sum(value for name, value in timing.items() if name != 'total')
  assert parts == pytest.approx(timing['total'], abs=0.1)
  assert abs(timing['total'] - result.wall_time_s) < 0.01


def test_the_summary_says_where_the_time_went(tmp_path, capsys):
  breakdown = {'data': 12.0, 'compile': 30.0, 'training': 240.0, 'validation': 0.0,
               'checkpoints': 3.0, 'held-out evaluation': 60.0, 'other': 5.0, 'total': 350.0}
  loop.print_summary(loop.RunResult(tmp_path, 600, 350.0, False, 0.5, None, breakdown))
  printed = capsys.readouterr().out
  assert ('time:        data 12.0 s (3%), compile 30.0 s (9%), training 4.0 min (69%), '
          'checkpoints 3.0 s (1%), held-out evaluation 60.0 s (17%), other 5.0 s (1%)') in printed


def test_resume_continues_exactly(phantom_root, tmp_path):
  straight = tmp_path / 'straight'
  loop.train_and_evaluate(_config(phantom_root, steps=8, **{'train.checkpoint_every': 4}), straight)
  resumed = tmp_path / 'resumed'
  interrupted = loop.train_and_evaluate(
      _config(phantom_root, steps=8, **{'train.checkpoint_every': 4}), resumed, stop_at_step=4)
  assert interrupted.stopped_early and interrupted.final_step == 4
  # Rerunning the same command resumes from step 4.
  result = loop.train_and_evaluate(_config(phantom_root, steps=8, **{'train.checkpoint_every': 4}),
                                   resumed)
  assert result.final_step == 8
  straight_losses, resumed_losses = _losses(straight), _losses(resumed)
  assert sorted(resumed_losses) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-5, abs=1e-6), step
  params_a, _ = _params(straight)
  params_b, _ = _params(resumed)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_two_devices_match_one(phantom_root, tmp_path):
  assert jax.device_count() == 2, 'tests/conftest.py sets two fake CPU devices'
  one = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                      devices=jax.devices()[:1])
  config = _config(phantom_root, steps=3)
  loop.train_and_evaluate(config, tmp_path / 'one', mesh=one)
  loop.train_and_evaluate(_config(phantom_root, steps=3), tmp_path / 'two')
  losses_one, losses_two = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  # Step 1 is the same computation split over two devices; later steps also carry the float32
  # rounding of gradients summed in another order through the updates.
  assert losses_two[1] == pytest.approx(losses_one[1], rel=1e-5)
  for step in (2, 3):
    assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-3)
  # A process with one device reads the checkpoint two devices wrote (predicting after training).
  script = ('import jax, sys; from dualseg_jax.run_dir import restore_params; '
            'params, step = restore_params(sys.argv[1], "latest"); '
            'print(jax.device_count(), step, len(jax.tree.leaves(params)))')
  environment = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
  output = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'two')], env=environment,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
  assert output.returncode == 0, output.stderr[-2000:]
  devices, step, num_leaves = output.stdout.split()[-3:]
  assert (devices, step) == ('1', '3') and int(num_leaves) > 10


def test_batch_not_divisible_by_devices_is_a_clear_error(phantom_root, tmp_path):
  config = _config(phantom_root, steps=1, **{'data.batch_size': 3})
  with pytest.raises(ConfigError, match='data.batch_size=3 must be divisible by the number of devices'):
    loop.train_and_evaluate(config, tmp_path / 'run')


def test_resuming_with_a_different_config_is_refused(phantom_root, tmp_path):
  # Runs of 3 steps and a changed seed: the compiled step of the 3-step test above serves all.
  loop.train_and_evaluate(_config(phantom_root, steps=3), tmp_path / 'run', stop_at_step=1)
  changed = _config(phantom_root, steps=3, **{'seed': 7})
  with pytest.raises(ConfigError, match='seed'):
    loop.train_and_evaluate(changed, tmp_path / 'run')
  result = loop.train_and_evaluate(changed, tmp_path / 'run', allow_config_change=True)
  assert result.final_step == 3


def test_an_attempt_that_failed_before_config_json_binds_nothing(phantom_root, tmp_path):
  # What a failed attempt (say, on a bad case, since fixed) recorded about data it never trained on.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'data_identity.json').write_text(json.dumps({'source': 'synthetic', 'cases': {}}))
  result = loop.train_and_evaluate(_config(phantom_root, steps=1), workdir)
  assert result.final_step == 1
  assert json.loads((workdir / 'data_identity.json').read_text())['cases']
  assert json.loads((workdir / 'config.json').read_text())['train']['steps'] == 1


@pytest.mark.parametrize('key, value, message', [
    ('data.patch_size', (16, 32), 'give three values'),
    ('data.patch_size', (16, 30, 32), 'multiple of 8'),
    ('data.test_center', 'center_x', 'center_x'),
    ('model.num_classes', 3, 'model.num_classes'),
    ('loss.transform', 'soft', 'loss.transform'),
    # Validation and the held-out report predict with the inference settings.
    ('inference.overlap', 1.0, r'inference.overlap = 1.0: choose a fraction'),
    ('inference.postprocess', 'biggest', 'inference.postprocess'),
    ('inference.tta_flips', 9, 'inference.tta_flips = 9'),
])
def test_impossible_configs_fail_before_any_work(tmp_path, key, value, message):
  config = _config(tmp_path / 'never_generated', steps=1, **{key: value})
  with pytest.raises(ConfigError, match=message):
    loop.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'never_generated').exists()


def test_compute_choices_may_change_on_resume_but_the_recipe_may_not():
  saved = {'model': {'conv_impl': 'conv3d', 'remat': False, 'widths': [4, 8]}, 'train': {'steps': 3}}
  current = {'model': {'conv_impl': 'depth_folded', 'remat': True, 'widths': [4, 8]},
             'train': {'steps': 6}}
  assert loop.config_differences(saved, current) == []
  current['model']['widths'] = [4, 16]
  assert loop.config_differences(saved, current) == ["model.widths: run has [4, 8], now [4, 16]"]
  # A key added after the run started is no difference while it holds its default.
  added = {**saved, 'augment': {'raw_view': False}}
  assert loop.config_differences(saved, added) == []
  added['augment']['raw_view'] = True
  assert loop.config_differences(saved, added) == ["augment.raw_view: run has None, now True"]
  # ... unless its default computes something else than the run did: RandConv kernels had std
  # sqrt(2 / k^3) before `augment.randconv_gain` existed.
  old_run = {**saved, 'augment': {'num_views': 2}}
  changed = {**saved, 'augment': {'num_views': 2, 'randconv_gain': 1.0}}
  assert loop.config_differences(old_run, changed) == [
      f'augment.randconv_gain: run has {2 ** 0.5!r}, now 1.0']
  changed['augment']['randconv_gain'] = 2 ** 0.5
  assert loop.config_differences(old_run, changed) == []


def test_a_steps_metrics_are_read_once_the_next_step_is_queued(tmp_path):
  from tqdm import tqdm
  metrics_log = reporting.MetricsLog(tmp_path / 'metrics.jsonl', write=False)
  writer = loop._OneStepLateWriter(metrics_log, tqdm(total=4, disable=True))
  writer.step_done(1, {'loss': jax.numpy.float32(0.5)})
  assert metrics_log.rows == []  # step 1 may still be running on the device
  writer.step_done(2, None)  # a step that logs nothing still lets the row before it out
  assert [(row['step'], row['loss']) for row in metrics_log.rows] == [(1, 0.5)]
  writer.step_done(3, {'loss': jax.numpy.float32(0.25)})
  writer.flush()  # before a checkpoint, a validation or the end
  writer.flush()
  assert [row['step'] for row in metrics_log.rows] == [1, 3]
  assert all('steps_per_s' in row for row in metrics_log.rows)


def test_runs_that_differ_only_outside_the_step_share_its_compilation(tmp_path):
  from dualseg_jax.train import parallel
  from dualseg_jax.train import step as step_lib
  mesh = parallel.make_mesh()
  config = _config(tmp_path, steps=5, **{'loss.weights.dice': 0.75})  # a key no other test uses
  model, state, optimizer = step_lib.create_train_state(config, jax.random.PRNGKey(0), (16, 32, 32))
  first, _ = loop._compiled_steps(config, model, optimizer, state, mesh)
  elsewhere = _config(tmp_path / 'other', steps=5, **{
      'loss.weights.dice': 0.75, 'seed': 9, 'train.checkpoint_every': 2, 'train.eval_every': 5})
  assert loop._compiled_steps(elsewhere, model, optimizer, state, mesh)[0] is first
  for key, value in (('loss.weights.dice', 0.5), ('train.steps', 6), ('augment.raw_view', True),
                     ('train.grad_balance_every', 2)):
    changed = _config(tmp_path, steps=5, **{'loss.weights.dice': 0.75, key: value})
    assert loop._compiled_steps(changed, model, optimizer, state, mesh)[0] is not first, key
  # Every run's step is built from `_step_config` alone: the training tests run such steps.
