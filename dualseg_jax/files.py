"""Atomic file writes (a killed run leaves either the old file or the new one, never half of
one), and the one message for a write the filesystem refuses (full, read-only, not permitted)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import Any

from dualseg_jax.errors import ConfigError, DataError, StorageError

# The failures that are the filesystem's, not the data's: full, over quota, read-only, forbidden.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
# Orbax and TensorStore raise a write's failure from a background thread as a ValueError that
# only quotes it: "... Failed to write 206302 bytes to file 11: No space left on device
# [os_error_code='28']".
_STORAGE_PHRASES = {os.strerror(number): number for number in STORAGE_ERRNOS}
_STORAGE_PHRASES.update({errno.errorcode[number]: number for number in STORAGE_ERRNOS})
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# NumPy's `tofile` (under np.save) reports a full disk as a short write without an errno:
# "563072 requested and 101344 written".
_SHORT_WRITE = re.compile(r'\d+ requested and \d+ written')


def storage_errno(error: BaseException | None) -> int | None:
  """The errno of a full, read-only or forbidden filesystem anywhere in `error`'s cause chain
  (OSError, or the text of an error that wraps one), else None."""
  pending, seen = [error], set()
  while pending:
    current = pending.pop()
    if current is None or id(current) in seen:
      continue
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
      return current.errno
    text = str(current)
    if isinstance(current, OSError) and current.errno is None and _SHORT_WRITE.search(text):
      return errno.ENOSPC
    code = _OS_ERROR_CODE.search(text)
    if code and int(code.group(1)) in STORAGE_ERRNOS:
      return int(code.group(1))
    for phrase, number in _STORAGE_PHRASES.items():
      if phrase in text:
        return number
    pending.extend((current.__cause__, current.__context__))
    pending.extend(getattr(current, 'exceptions', ()))  # an ExceptionGroup's members
  return None


def free_bytes(path: str | os.PathLike) -> int | None:
  """Free bytes on the filesystem of `path`, or of its nearest existing parent."""
  path = pathlib.Path(path).absolute()
  for candidate in (path, *path.parents):
    try:
      return shutil.disk_usage(candidate).free
    except OSError:
      continue
  return None


def format_bytes(count: float | None) -> str:
  if count is None:
    return 'unknown'
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(count) < 1024:
      return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.1f} {unit}'
    count /= 1024
  return f'{count:.1f} TiB'


def refused_write(error: BaseException, what: str, path: str | os.PathLike,
                  safe: str = '') -> StorageError | None:
  """The StorageError for `error` when a full, read-only or forbidden filesystem caused it (`what`
  was being written to `path`; `safe` says what is intact), else None."""
  if isinstance(error, StorageError):
    return error
  if isinstance(error, (DataError, ConfigError)):
    return None  # already says what to do: an unreadable input's "Permission denied" is no write
  number = storage_errno(error)
  if number is None:
    return None
  failure = (f'cannot write {what} ({path}): {os.strerror(number)} ({errno.errorcode[number]}), '
             f'{format_bytes(free_bytes(path))} free on that filesystem')
  if number in (errno.ENOSPC, errno.EDQUOT):
    remedy = 'free space there (or raise the quota) and rerun the same command'
  else:
    folder = pathlib.Path(path)
    while not folder.is_dir() and folder != folder.parent:  # the folder that refused it
      folder = folder.parent
    remedy = f'make {folder} writable (or choose a writable folder) and rerun the same command'
  return StorageError(failure, remedy, safe)


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike, safe: str = '') -> Iterator[None]:
  """Turns a write the filesystem refuses inside the block into one StorageError naming `what`,
  `path` and the free space there; every other error passes unchanged."""
  try:
    yield
  except StorageError as error:
    if safe and not error.safe:
      raise error.with_safe(safe) from error
    raise
  except Exception as error:
    refused = refused_write(error, what, path, safe)
    if refused is None:
      raise
    raise refused from error


def discard(path: str | os.PathLike) -> None:
  """Removes a leftover file if it is there. On a read-only filesystem even removing a missing
  file fails; the write's own error is the one worth reporting, so that failure is ignored."""
  with contextlib.suppress(OSError):
    pathlib.Path(path).unlink(missing_ok=True)


def write_bytes(path: str | pathlib.Path, data: bytes) -> None:
  """Writes `data` to a hidden sibling, then renames it over `path`; a DataError names the path
  when the folder cannot be written (a StorageError when the filesystem refuses)."""
  path = pathlib.Path(path)
  # One sibling per writer: two processes or threads writing one path never rename each other's
  # half-written file into place, or away.
  partial = path.with_name(f'.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial')
  try:
    partial.write_bytes(data)
    os.replace(partial, path)
  except BaseException as error:
    discard(partial)  # also on Ctrl-C: no hidden half-written file stays behind
    if not isinstance(error, OSError):
      raise
    refused = refused_write(error, path.name, path)
    if refused is not None:
      raise refused from error
    raise DataError(f'cannot write {path} ({error}): check that the folder exists, is writable '
                    'and has free space') from error


def write_json(path: str | pathlib.Path, content: Any, sort_keys: bool = False) -> None:
  """`content` as indented JSON (values JSON cannot hold are written as their str)."""
  text = json.dumps(content, indent=2, sort_keys=sort_keys, default=str) + '\n'
  write_bytes(path, text.encode())
