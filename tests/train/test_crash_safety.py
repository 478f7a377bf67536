"""Training survives what real runs meet: SIGKILL at any moment, a corrupted newest checkpoint,
non-finite losses, and SIGTERM; each resumed run is compared with one left alone."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dualseg_jax import run_dir
from dualseg_jax.data import pipeline
from dualseg_jax.tools import kill_resume
from dualseg_jax.train import loop
from dualseg_jax.train import reporting
from tests.conftest import tiny_run_config

STEPS = 10  # of the subprocess runs; one checkpoint per step
CACHE = os.environ.get('DUALSEG_TEST_COMPILATION_CACHE', '/tmp/dualseg_jax_test_xla_cache')


@pytest.fixture(scope='module')
def environment():
  return kill_resume.subprocess_environment(CACHE)


@pytest.fixture(scope='module')
def uninterrupted(phantom_root, environment, tmp_path_factory):
  """The subprocess run every interrupted one is compared with; it also generates the phantoms."""
  workdir = tmp_path_factory.mktemp('uninterrupted') / 'run'
  kill_resume.run_to_completion(kill_resume.train_command(workdir, phantom_root, STEPS),
                                environment, workdir.parent / 'run.log')
  return workdir


def _config(root, steps, **overrides):
  return tiny_run_config(root, steps, **{'train.checkpoint_every': 1, **overrides})


def _restore_state(workdir, step):
  """The whole saved TrainState of one step, read independently of the Checkpointer."""
  manager = ocp.CheckpointManager(pathlib.Path(workdir, 'checkpoints').absolute(),
                                  item_names=('state',),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def _assert_trees_equal(tree_a, tree_b):
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- 1. SIGKILL at random moments -------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_run(uninterrupted, phantom_root,
                                                           environment, tmp_path):
  workdir = tmp_path / 'killed'
  kills, problems = kill_resume.kill_and_resume(
      workdir, kill_resume.train_command(workdir, phantom_root, STEPS), environment, kills=5,
      rng=np.random.default_rng(0), log_dir=tmp_path / 'logs')
  report = kill_resume.CrashReport(kills=kills, mismatches=problems, final_step=STEPS)
  print(report.summary())
  assert not problems, report.summary()
  assert len(kills) >= 5, report.summary()
  assert {kill.plan for kill in kills} == set(kill_resume.KILL_PLANS)
  # Losses step by step and the final parameters, against the run left alone.
  assert kill_resume.compare_runs(uninterrupted, workdir, STEPS) == []
  rows = reporting.MetricsLog.read(workdir / 'metrics.jsonl')
  assert [row['step'] for row in rows] == list(range(1, STEPS + 1))


def test_metrics_rows_past_the_resumed_step_are_dropped_atomically(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': step, 'loss': float(step)} for step in range(1, 6)]
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows) + '{"step": 6, "lo')  # cut by a kill
  log = reporting.MetricsLog(path, resume_step=3)
  assert [row['step'] for row in log.rows] == [1, 2, 3]
  assert reporting.MetricsLog.read(path) == rows[:3]
  assert not path.with_name(path.name + '.tmp').exists()
  log.write(4, {'loss': 40.0})
  assert [row['loss'] for row in reporting.MetricsLog.read(path)] == [1.0, 2.0, 3.0, 40.0]
  assert reporting.MetricsLog(path, resume_step=0).rows == []  # no checkpoint: a fresh start


def test_preprocess_cache_rebuilds_a_case_whose_write_a_kill_cut_short(uninterrupted, phantom_root):
  """A kill inside the cache's case write leaves `<case>.partial/` and no (or the old) case folder;
  the next build must not read the partial arrays."""
  from dualseg_jax.data import preprocess
  from dualseg_jax.data import registry
  del uninterrupted  # built the cache
  config = _config(phantom_root, 1)
  cases = registry.list_cases(config.data)['center_a'][:1]
  cache = preprocess.build_cache(config.data, cases, progress=False)
  folder = cache.case_directory(cases[0].center, cases[0].case_id)
  saved = {path.name: np.load(path) for path in folder.glob('*.npy')}
  partial = folder.with_name(folder.name + '.partial')
  shutil.copytree(folder, partial)
  (partial / 'case.json').unlink()
  some_array = sorted(partial.glob('*.npy'))[0]
  some_array.write_bytes(some_array.read_bytes()[:64])  # the write the kill interrupted
  shutil.rmtree(folder)  # the kill landed between removing the old folder and the rename
  rebuilt = preprocess.build_cache(config.data, cases, progress=False)
  folder = rebuilt.case_directory(cases[0].center, cases[0].case_id)
  assert not partial.exists()
  assert sorted(path.name for path in folder.glob('*.npy')) == sorted(saved)
  for name, array in saved.items():
    np.testing.assert_array_equal(np.load(folder / name), array)


# --- 2. A corrupted newest checkpoint ---------------------------------------------------------

@pytest.fixture(scope='module')
def three_steps(phantom_root, uninterrupted, tmp_path_factory):
  del uninterrupted  # generated the phantoms
  workdir = tmp_path_factory.mktemp('three_steps') / 'run'
  loop.train_and_evaluate(_config(phantom_root, 3), workdir)
  return workdir


def _largest_file(folder):
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _write_garbage(step_folder):
  target = _largest_file(step_folder / 'state')
  content = bytearray(target.read_bytes())
  middle = len(content) // 2
  content[middle:middle + 512] = np.random.default_rng(0).integers(0, 256, 512, np.uint8).tobytes()
  target.write_bytes(bytes(content))


def _truncate(step_folder):
  target = _largest_file(step_folder / 'state')
  target.write_bytes(target.read_bytes()[:target.stat().st_size // 3])


def _delete_iterator_state(step_folder):
  for path in (step_folder / 'data').glob('process_*.json'):
    path.unlink()


@pytest.mark.parametrize('corrupt', [_write_garbage, _truncate, _delete_iterator_state],
                         ids=['garbage', 'truncated', 'missing_iterator_state'])
def test_corrupted_latest_checkpoint_is_reported_and_the_previous_one_used(
    three_steps, phantom_root, tmp_path, caplog, corrupt):
  workdir = tmp_path / 'run'
  shutil.copytree(three_steps, workdir)
  corrupt(workdir / 'checkpoints' / '3')
  with caplog.at_level(logging.INFO):
    result = loop.train_and_evaluate(_config(phantom_root, 3), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('checkpoint at step 3' in message and 'cannot be restored' in message
             for message in warnings), warnings
  assert any('resumed from the checkpoint at step 2' in r.getMessage() for r in caplog.records)
  assert result.final_step == 3
  # Step 3 was trained again from step 2 and its checkpoint replaced: same loss, same state.
  original = kill_resume.loss_rows(three_steps)[0]
  assert kill_resume.loss_rows(workdir) == (original, [])
  _assert_trees_equal(_restore_state(workdir, 3), _restore_state(three_steps, 3))
  assert run_dir.restore_params(workdir, 'latest')[1] == 3


# --- 3. Non-finite losses ----------------------------------------------------------------------

class _PoisonedIterator:
  """Yields the loader's batches, with NaN images from batch `first_bad` on; checkpoints as it."""

  def __init__(self, iterator, first_bad):
    self._iterator, self._first_bad, self._drawn = iterator, first_bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._iterator))
    self._drawn += 1
    if self._drawn >= self._first_bad:
      batch['image'] = np.full_like(batch['image'], np.nan)
    return batch

  def get_state(self):
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state):
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self):
    pass


def test_non_finite_steps_stop_the_run_with_the_last_good_state_saved(phantom_root, uninterrupted,
                                                                     tmp_path, monkeypatch):
  del uninterrupted  # generated the phantoms
  real_train_iterator = pipeline.train_iterator
  monkeypatch.setattr(pipeline, 'train_iterator', lambda *args: _PoisonedIterator(
      real_train_iterator(*args), first_bad=4))
  config = _config(phantom_root, 8, **{'train.max_bad_steps': 2, 'train.keep_checkpoints': 3})
  workdir = tmp_path / 'run'
  with pytest.raises(FloatingPointError, match=r'up to step 5\).*learning_rate.*NaN voxels'):
    loop.train_and_evaluate(config, workdir)
  rows = [row for row in reporting.MetricsLog.read(workdir / 'metrics.jsonl') if 'loss' in row]
  assert [row['step'] for row in rows] == [1, 2, 3, 4, 5]
  assert [row['nonfinite'] for row in rows] == [0.0, 0.0, 0.0, 1.0, 1.0]
  assert [row['loss'] is None for row in rows] == [False, False, False, True, True]
  last_good, final = _restore_state(workdir, 3), _restore_state(workdir, 5)
  _assert_trees_equal(final['params'], last_good['params'])
  _assert_trees_equal(final['opt_state'], last_good['opt_state'])
  assert int(final['bad_steps']) == 2 and int(final['total_bad_steps']) == 2
  assert int(final['step']) == 5
  assert run_dir.restore_params(workdir, 'latest')[1] == 5


# --- 4. SIGTERM ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_cleanly_and_the_rerun_continues(
    uninterrupted, phantom_root, environment, tmp_path):
  workdir = tmp_path / 'run'
  # Checkpoints only at the end: the one found after SIGTERM must be the stop's own.
  command = kill_resume.train_command(workdir, phantom_root, STEPS,
                                      {'train.checkpoint_every': 1000})
  with open(tmp_path / 'stopped.log', 'w') as log_file:
    process = subprocess.Popen(command, cwd=kill_resume.PROJECT_ROOT, env=environment,
                               stdout=log_file, stderr=subprocess.STDOUT)
    try:
      while len(kill_resume.loss_rows(workdir)[0]) < 2:  # the loop is running: handlers are set
        assert process.poll() is None, (tmp_path / 'stopped.log').read_text()[-3000:]
        time.sleep(0.05)
      process.send_signal(signal.SIGTERM)
      returncode = process.wait(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
  output = (tmp_path / 'stopped.log').read_text()
  assert returncode == 0, output[-3000:]
  assert 'stopped on request' in output
  finalized, temporary = kill_resume.checkpoint_folders(workdir)
  losses, _ = kill_resume.loss_rows(workdir)
  assert len(finalized) == 1 and not temporary
  stopped_at = finalized[0]
  assert 2 <= stopped_at < STEPS and sorted(losses) == list(range(1, stopped_at + 1))
  rerun = kill_resume.run_to_completion(command, environment, tmp_path / 'rerun.log')
  assert f'resumed from the checkpoint at step {stopped_at}' in rerun
  assert kill_resume.compare_runs(uninterrupted, workdir, STEPS) == []
