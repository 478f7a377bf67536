"""A training run meets a busy workdir, a lock left by a killed run, a full disk and a read-only
one: each ends the run with one message saying what, where and what is safe, before any harm."""

import errno
import json
import logging
import os
import pathlib
import subprocess

import matplotlib.figure
import pytest

from dualseg_jax import locks
from dualseg_jax.errors import StorageError
from dualseg_jax.tools import kill_resume
from dualseg_jax.train import checkpoint as checkpoint_lib
from dualseg_jax.train import loop
from dualseg_jax.train import validate as validate_lib
from tests import faults
from tests.conftest import PROJECT_ROOT, tiny_run_config

# A refused checkpoint save leaves writes that report late: "Event loop is closed" as unraisable,
# and coroutines never awaited, collected in whichever test runs next (the command drops both).
pytestmark = [pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
              pytest.mark.filterwarnings("ignore:coroutine 'async_serialize_from_host")]

COMPILATION_CACHE = os.environ.get('DUALSEG_TEST_COMPILATION_CACHE',
                                   '/tmp/dualseg_jax_test_xla_cache')


def _config(root, steps, **overrides):
  return tiny_run_config(root, steps, **{'train.checkpoint_every': 1, **overrides})


def test_a_second_run_on_a_held_workdir_is_refused_at_once_naming_the_holder(phantom_root,
                                                                             tmp_path):
  workdir = tmp_path / 'run'
  holder = faults.start_holder(workdir)
  try:
    with pytest.raises(locks.FolderBusyError,
                       match=f'process {holder.pid} on .* for the training run'):
      loop.train_and_evaluate(_config(phantom_root, steps=1), workdir)
  finally:
    holder.communicate('')
  assert sorted(os.listdir(workdir)) == [locks.LOCK_FILE]  # not even config.json


def test_a_lock_left_by_a_killed_run_is_taken_over_and_released_at_the_end(phantom_root, tmp_path,
                                                                          caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  stale = {'host': 'node7', 'pid': 999999, 'started': '2025-01-01T00:00:00', 'command': 'train'}
  (workdir / locks.LOCK_FILE).write_text(json.dumps(stale) + '\n')
  with caplog.at_level(logging.WARNING, logger='dualseg_jax.locks'):
    result = loop.train_and_evaluate(_config(phantom_root, steps=1), workdir)
  assert result.final_step == 1
  assert 'taking over the lock left by process 999999 on node7' in caplog.text
  assert (workdir / locks.LOCK_FILE).read_text() == ''


def test_too_little_free_space_is_refused_before_anything_is_trained(phantom_root, tmp_path):
  with faults.tmpfs(tmp_path / 'small', 'size=8m') as folder:
    with pytest.raises(StorageError) as raised:
      loop.train_and_evaluate(_config(phantom_root, steps=2), folder / 'run')
    # config.json comes only once every check has passed: the corrected command starts afresh.
    assert sorted(os.listdir(folder / 'run')) == [locks.LOCK_FILE]
  message = str(raised.value)
  # 4 tiny checkpoints (26,880 float32 parameters and two Adam moments: 315 KiB each) and the
  # 64 MiB kept for metrics, plots and evaluation.
  assert message.startswith(f'not enough free space for the training run in {folder}/run: it needs '
                            'about 65.2 MiB (4 checkpoints of 315.0 KiB'), message
  assert 'MiB are free there. Nothing was trained by this command; free space there' in message


def test_a_read_only_workdir_is_refused_with_one_message(phantom_root, tmp_path):
  with faults.tmpfs(tmp_path / 'read_only', 'ro') as folder:
    with pytest.raises(StorageError, match=r'cannot write the lock file for the training run '
                       rf'\({folder}/run/.dualseg.lock\): Read-only file system \(EROFS\)'):
      loop.train_and_evaluate(_config(phantom_root, steps=1), folder / 'run')


def _fill_at_step_2(folder, save):
  """Checkpointer.save that fills `folder`'s filesystem, to 64 KiB, just before step 2's save:
  room for metrics rows, none for a checkpoint (~250 KiB)."""
  def save_on_a_filling_disk(self, step, *args, **kwargs):
    if step == 2 and not (folder / 'ballast').exists():
      self.wait()  # step 1's save is asynchronous: let it complete first
      faults.fill(folder, leave_bytes=64 * 1024)
    return save(self, step, *args, **kwargs)
  return save_on_a_filling_disk


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_one_and_the_rerun_resumes(
    phantom_root, tmp_path, monkeypatch, caplog):
  # 72 MiB passes the run's estimate (4 tiny checkpoints + 64 MiB of outputs).
  with faults.tmpfs(tmp_path / 'small', 'size=72m') as folder:
    workdir = folder / 'run'
    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save',
                        _fill_at_step_2(folder, checkpoint_lib.Checkpointer.save))
    with pytest.raises(StorageError) as raised:
      loop.train_and_evaluate(_config(phantom_root, steps=3), workdir)
    assert checkpoint_lib.complete_steps(workdir) == [1]
    assert (workdir / locks.LOCK_FILE).read_text() == ''  # released on the way out
    os.remove(folder / 'ballast')
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger='dualseg_jax'):
      result = loop.train_and_evaluate(_config(phantom_root, steps=3), workdir)
    assert 'resumed from the checkpoint at step 1' in caplog.text
    assert result.final_step == 3 and checkpoint_lib.complete_steps(workdir) == [2, 3]
    assert not [name for name in os.listdir(workdir / 'checkpoints') if 'tmp' in name]
  message = str(raised.value)
  assert message.startswith(f'cannot write a checkpoint ({workdir}/checkpoints): No space left on '
                            'device (ENOSPC), ')
  assert message.endswith(f'free on that filesystem. The last complete checkpoint is step 1 in '
                          f'{workdir}/checkpoints; free space there (or raise the quota) and rerun '
                          'the same command')


def _refused(error_number):
  def refuse(*args, **kwargs):
    raise OSError(error_number, os.strerror(error_number))
  return refuse


def _refuse_config_json(monkeypatch):
  write_bytes = pathlib.Path.write_bytes

  def write(path, data):
    return (_refused(errno.ENOSPC) if 'config.json' in path.name else write_bytes)(path, data)
  monkeypatch.setattr(pathlib.Path, 'write_bytes', write)


def _refuse_metrics_rows(monkeypatch):
  open_path = pathlib.Path.open

  def open_(path, mode='r', *args, **kwargs):
    refuse = path.name == 'metrics.jsonl' and mode == 'a'
    return (_refused(errno.ENOSPC) if refuse else open_path)(path, mode, *args, **kwargs)
  monkeypatch.setattr(pathlib.Path, 'open', open_)


def _refuse_curves(monkeypatch):
  monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', _refused(errno.EDQUOT))


def _refuse_evaluation(monkeypatch):
  monkeypatch.setattr(validate_lib, 'evaluate_test_center', _refused(errno.EACCES))


# Each write of a run, how it is refused, the message's start, and the last complete checkpoint
# at that moment (checkpoint_every=1; at step 2 validation and its plot precede that step's
# checkpoint, the held-out evaluation follows the last).
@pytest.mark.parametrize('refuse, overrides, expected, last_checkpoint', [
    pytest.param(_refuse_config_json, {}, 'cannot write config.json ({workdir}/config.json): No '
                 'space left on device', None, id='config.json'),
    pytest.param(_refuse_metrics_rows, {}, 'cannot write the metrics log '
                 '({workdir}/metrics.jsonl): No space left on device', None, id='metrics.jsonl'),
    pytest.param(_refuse_curves, {'train.eval_every': 2}, 'cannot write the training curves '
                 '({workdir}/curves.png): Disk quota exceeded', 1, id='curves.png'),
    pytest.param(_refuse_evaluation, {'train.evaluate_test_center': True}, 'cannot write the '
                 'held-out evaluation ({workdir}/evaluation/test_center_c): Permission denied', 2,
                 id='evaluation'),
])
def test_every_write_of_a_run_ends_it_with_one_message(phantom_root, tmp_path, monkeypatch, refuse,
                                                       overrides, expected, last_checkpoint):
  workdir = tmp_path / 'run'
  refuse(monkeypatch)
  with pytest.raises(StorageError) as raised:
    loop.train_and_evaluate(_config(phantom_root, steps=2, **overrides), workdir)
  message = str(raised.value)
  assert message.startswith(expected.format(workdir=workdir)), message
  if last_checkpoint is None:
    assert 'No checkpoint is complete yet, so the rerun starts from step 0' in message
  else:
    assert (f'The last complete checkpoint is step {last_checkpoint} in {workdir}/checkpoints;'
            in message)
  assert message.endswith('rerun the same command') and '\n' not in message
  assert not [name for name in os.listdir(workdir) if 'tmp' in name or 'partial' in name]


# `python -m launch.train` with its disk filled at step 2's checkpoint, as in the test above.
_TRAIN_ON_A_FILLING_DISK = """
import pathlib
import sys
from launch import cli
from launch import train
from dualseg_jax.train import checkpoint as checkpoint_lib
from tests.train import test_storage_faults

folder = pathlib.Path(sys.argv[1])
checkpoint_lib.Checkpointer.save = test_storage_faults._fill_at_step_2(
    folder, checkpoint_lib.Checkpointer.save)
sys.argv = sys.argv[2:]
cli.run(train.main)
"""


def test_the_command_ends_a_failed_checkpoint_with_one_error_line_and_status_2(phantom_root,
                                                                               tmp_path):
  with faults.tmpfs(tmp_path / 'small', 'size=72m') as folder:
    command = kill_resume.train_command(folder / 'run', phantom_root, steps=3)
    command[1:3] = ['-c', _TRAIN_ON_A_FILLING_DISK, str(folder), 'launch.train']
    finished = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              env=kill_resume.subprocess_environment(COMPILATION_CACHE),
                              timeout=600, check=False)
  assert finished.returncode == 2, finished.stderr[-3000:]
  # Orbax's threads, asyncio's abandoned tasks and TensorStore's late callbacks each report the
  # same failure; none of it reaches the user.
  for noise in ('Traceback', 'never retrieved', 'Event loop is closed', 'never awaited'):
    assert noise not in finished.stderr, finished.stderr[-3000:]
  last_line = finished.stderr.strip().splitlines()[-1]
  assert last_line.startswith(f'error: cannot write a checkpoint ({folder}/run/checkpoints): No '
                              'space left on device (ENOSPC), ')
  assert last_line.endswith(f'The last complete checkpoint is step 1 in {folder}/run/checkpoints; '
                            'free space there (or raise the quota) and rerun the same command')
