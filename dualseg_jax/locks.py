"""One process at a time per folder: a run's workdir, a prediction or report folder, a
preprocessing cache.

A lock is an advisory `flock` on `<folder>/.dualseg.lock`, which also records the holder (host,
PID, command, start time) so that a refused process can say who holds the folder. The kernel
drops a `flock` when its process ends in any way, SIGKILL included, so a lock never outlives its
holder: a lock file that still names a holder nobody locks is stale, and the next process takes
it over with a note. The file itself stays (deleting it would let two processes lock two
different files of the same name).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
from collections.abc import Iterator

from dualseg_jax import files
from dualseg_jax.errors import DataError

log = logging.getLogger(__name__)

LOCK_FILE = '.dualseg.lock'

# Folders this process holds -> the thread holding each. A second `hold` of one folder by the same
# thread joins the first: `flock` treats every open of the file as a separate holder, so it
# would refuse the thread (or, with `wait`, block it forever) on its own lock.
_held: dict[pathlib.Path, int] = {}


class FolderBusyError(DataError):
  """Another live process holds the folder's lock."""


def _holder_text(holder: dict | None) -> str:
  if not holder:
    return 'another process (it left no details)'
  return (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
          f"({holder.get('command')})")


def _read_holder(handle) -> dict | None:
  handle.seek(0)
  text = handle.read().strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def _open_lock_file(folder: pathlib.Path, what: str):
  try:
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / LOCK_FILE, 'a+', encoding='utf-8')  # noqa: SIM115 (held until release)
  except OSError as error:
    refused = files.refused_write(error, f'the lock file for {what}', folder / LOCK_FILE)
    if refused is not None:
      raise refused from error
    raise DataError(f'cannot use {folder} for {what} ({error.strerror or error}): choose a folder '
                    'that exists and is writable') from error


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str, wait: bool = False,
         poll_s: float = 1.0) -> Iterator[None]:
  """Holds `folder` for this process while the block runs.

  `what` names the work in messages ("the training run", "predictions"). A folder another live
  process holds raises FolderBusyError naming that process, or with `wait` blocks until it is
  free (a shared cache: the second process then finds the work done). A `hold` of a folder the
  same thread already holds joins the outer one.
  """
  folder = pathlib.Path(folder)
  key = folder.resolve()
  if _held.get(key) == threading.get_ident():
    yield
    return
  handle = _open_lock_file(folder, what)
  try:
    waited = False
    while True:
      try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        holder = _read_holder(handle)
        if not wait:
          raise FolderBusyError(
              f'{folder} is in use by {_holder_text(holder)} for {what}: wait for it to finish, '
              'stop it, or use another folder') from None
        if not waited:
          log.warning('%s is in use by %s; waiting for it to finish', folder, _holder_text(holder))
          waited = True
        time.sleep(poll_s)
    previous = _read_holder(handle)
    if previous:
      log.warning('%s: taking over the lock left by %s, which has ended without releasing it',
                  folder, _holder_text(previous))
    holder = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': datetime.datetime.now().isoformat(timespec='seconds'),
              'command': ' '.join(sys.argv)[:300]}
    with files.writing(f'the lock file for {what}', folder / LOCK_FILE):
      handle.seek(0)
      handle.truncate()
      handle.write(json.dumps(holder) + '\n')
      handle.flush()
    _held[key] = threading.get_ident()
    try:
      yield
    finally:
      del _held[key]
      # An empty file tells the next holder that this one ended cleanly. On a filesystem that
      # has turned read-only this fails; the lock is released all the same when the file closes,
      # and the error that ended the block is the one to report.
      try:
        handle.seek(0)
        handle.truncate()
        handle.flush()
      except OSError as error:
        log.debug('cannot clear %s (%s); the next holder will report it as left over',
                  folder / LOCK_FILE, error)
      fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
  finally:
    handle.close()
