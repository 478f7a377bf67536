"""Folder locks: a live holder is named and refused (or waited for), a dead one's lock is taken
over, and concurrent atomic writes of one file never clobber each other."""

import errno
import json
import logging
import os
import signal
import threading
import time

import pytest

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax.errors import StorageError
from tests import faults


def _lock_text(folder):
  return (folder / locks.LOCK_FILE).read_text()


def test_a_folder_held_by_a_live_process_is_refused_naming_it(tmp_path):
  holder = faults.start_holder(tmp_path)
  try:
    with pytest.raises(locks.FolderBusyError) as raised:
      with locks.hold(tmp_path, 'predictions'):
        pass
  finally:
    holder.communicate('')
  message = str(raised.value)
  assert f'process {holder.pid} on ' in message and 'for predictions' in message
  assert 'a test holder' not in message  # `what` is the refused work; the holder names its command
  # The refused process left the holder's record alone, and the holder cleared it on release.
  assert _lock_text(tmp_path) == ''


def test_waiting_for_a_folder_starts_when_its_holder_ends(tmp_path, caplog):
  holder = faults.start_holder(tmp_path)
  releaser = threading.Timer(0.5, holder.communicate, args=('',))
  releaser.start()
  started = time.monotonic()
  with caplog.at_level(logging.WARNING, logger='dualseg_jax.locks'):
    with locks.hold(tmp_path, 'building the cache', wait=True, poll_s=0.05):
      waited_s = time.monotonic() - started
      assert json.loads(_lock_text(tmp_path))['pid'] == os.getpid()
  releaser.join()
  assert waited_s >= 0.4
  assert f'in use by process {holder.pid}' in caplog.text and 'waiting' in caplog.text


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, caplog):
  holder = faults.start_holder(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert json.loads(_lock_text(tmp_path))['pid'] == holder.pid  # its record outlives it
  with caplog.at_level(logging.WARNING, logger='dualseg_jax.locks'):
    with locks.hold(tmp_path, 'the training run'):
      assert json.loads(_lock_text(tmp_path))['pid'] == os.getpid()
  assert f'taking over the lock left by process {holder.pid}' in caplog.text
  assert _lock_text(tmp_path) == ''


def test_the_same_thread_may_hold_a_folder_again_but_another_thread_waits(tmp_path):
  order = []

  def other_thread():
    with locks.hold(tmp_path, 'the other thread', wait=True, poll_s=0.02):
      order.append('other')

  with locks.hold(tmp_path, 'the outer block'):
    with locks.hold(tmp_path, 'a nested block', wait=True):  # would block forever without joining
      order.append('nested')
    thread = threading.Thread(target=other_thread)
    thread.start()
    time.sleep(0.2)
    order.append('outer ends')
  thread.join(timeout=10)
  assert order == ['nested', 'outer ends', 'other']


def test_a_lock_in_a_read_only_folder_is_one_storage_error(tmp_path):
  with faults.tmpfs(tmp_path / 'read_only', 'ro') as folder:
    with pytest.raises(StorageError, match=r'the lock file for the training run .*Read-only file '
                       r'system \(EROFS\).*Make .*read_only writable'):
      with locks.hold(folder, 'the training run'):
        pass


def test_concurrent_atomic_writes_of_one_file_never_clobber_each_other(tmp_path):
  path = tmp_path / 'manifest.json'
  errors = []

  def write_many(index):
    try:
      for round_ in range(40):
        files.write_json(path, {'writer': index, 'round': round_, 'padding': 'x' * 20000})
    except Exception as error:  # noqa: BLE001 (collected for the assertion)
      errors.append(error)

  threads = [threading.Thread(target=write_many, args=(index,)) for index in range(6)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert errors == []
  assert json.loads(path.read_text())['round'] == 39  # whole, from one writer's last round
  assert sorted(os.listdir(tmp_path)) == ['manifest.json']  # no partial file left behind


def test_a_full_filesystem_keeps_the_old_file_and_says_what_and_where(tmp_path):
  with faults.tmpfs(tmp_path / 'small', 'size=300k') as folder:
    files.write_bytes(folder / 'summary.json', b'old')
    with pytest.raises(StorageError) as raised:
      files.write_bytes(folder / 'summary.json', b'x' * 400_000)
    assert (folder / 'summary.json').read_bytes() == b'old'
    assert sorted(os.listdir(folder)) == ['summary.json']
  assert str(raised.value).startswith(
      f'cannot write summary.json ({folder}/summary.json): No space left on device (ENOSPC), ')
  assert 'free on that filesystem. Free space there' in str(raised.value)


def test_storage_failures_are_found_through_wrapping_and_quoted_text():
  quoted = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database: Failed to write '
                      "206302 bytes to file 11: No space left on device [os_error_code='28']")
  assert files.storage_errno(quoted) == errno.ENOSPC
  try:
    try:
      raise OSError(errno.EROFS, 'Read-only file system')
    except OSError as cause:
      raise RuntimeError('commit failed') from cause
  except RuntimeError as wrapped:
    assert files.storage_errno(wrapped) == errno.EROFS
  group = ExceptionGroup('saves', [KeyError('x'), OSError(errno.EDQUOT, 'Disk quota exceeded')])
  assert files.storage_errno(group) == errno.EDQUOT
  # np.save on a full disk: a short write, without an errno.
  assert files.storage_errno(OSError('563072 requested and 101344 written')) == errno.ENOSPC
  assert files.storage_errno(ValueError('array shapes differ')) is None
  assert files.storage_errno(OSError(errno.ENOENT, 'No such file or directory')) is None
