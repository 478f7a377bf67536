"""Real faults for tests: small and read-only filesystems (tmpfs mounts, where allowed) and a
folder held by another live process."""

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

# Holds a folder until its stdin closes, after saying so on stdout.
_HOLDER = """
import sys
from dualseg_jax import locks
with locks.hold(sys.argv[1], 'a test holder'):
  print('held', flush=True)
  sys.stdin.read()
"""


def start_holder(folder: pathlib.Path) -> subprocess.Popen:
  """A process that holds `folder`'s lock until `.communicate('')` closes its stdin."""
  process = subprocess.Popen([sys.executable, '-c', _HOLDER, str(folder)], cwd=PROJECT_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'held'
  return process


@contextlib.contextmanager
def tmpfs(folder: pathlib.Path, options: str):
  """Mounts a tmpfs with `options` ('size=300k', 'ro') on `folder` for the block; skips the test
  where this machine does not let the tests mount (needs root, or CAP_SYS_ADMIN)."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  try:
    mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                           capture_output=True, text=True, check=False)
  except OSError as error:  # no mount command on this machine
    pytest.skip(f'cannot mount a tmpfs here ({error}): this test needs a real full or read-only '
                'filesystem')
  if mount.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here ({mount.stderr.strip() or "mount failed"}): this test '
                'needs a real full or read-only filesystem')
  try:
    yield folder
  finally:
    # A process that died on the full disk may still hold a file there; detach it all the same.
    if subprocess.run(['umount', str(folder)], capture_output=True, check=False).returncode != 0:
      subprocess.run(['umount', '-l', str(folder)], capture_output=True, check=False)


def fill(folder: pathlib.Path, leave_bytes: int = 0) -> pathlib.Path:
  """Writes a ballast file that leaves about `leave_bytes` free on `folder`'s filesystem."""
  ballast = pathlib.Path(folder) / 'ballast'
  stats = os.statvfs(folder)
  size = max(0, stats.f_bavail * stats.f_frsize - leave_bytes)
  with ballast.open('wb') as file:
    file.write(b'\0' * size)
  return ballast
