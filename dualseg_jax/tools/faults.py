"""Operational faults, proven by causing them on tiny real runs: second starts on a workdir in
use, a disk that fills at several points of a run, and a prediction killed midway. Each part
reports what a user saw and whether anything was lost.

The disk part mounts small tmpfs filesystems, so it needs root (or CAP_SYS_ADMIN); without that it
is reported as not run, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from dualseg_jax.tools import kill_resume

# The lines a refused or failed command prints start with this (launch/*.py).
_ERROR_PREFIX = 'error: '


@dataclasses.dataclass
class FaultResult:
  """One kind of fault: how many times it was caused, how many ended as they should."""

  name: str
  caused: int
  survived: int
  lines: list[str]  # what each occurrence showed (messages verbatim) and what was checked
  problems: list[str]
  skipped: str = ''  # why the part did not run

  def summary(self) -> str:
    if self.skipped:
      return f'{self.name}: not run ({self.skipped})'
    head = f'{self.name}: {self.survived} of {self.caused} survived'
    return '\n'.join([head] + [f'  {line}' for line in self.lines]
                     + [f'  PROBLEM: {problem}' for problem in self.problems])


def _error_line(output: str) -> str:
  lines = [line for line in output.splitlines() if line.startswith(_ERROR_PREFIX)]
  return lines[-1] if lines else ''


def _run(command: list[str], environment: dict[str, str], timeout_s: float = 1800.0
         ) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=kill_resume.PROJECT_ROOT, env=environment, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)


def _wait_for(condition, process: subprocess.Popen | None, timeout_s: float, what: str,
              poll_s: float = 0.05) -> None:
  started = time.monotonic()
  while not condition():
    if process is not None and process.poll() is not None:
      raise RuntimeError(f'the process ended (status {process.returncode}) before {what}')
    if time.monotonic() - started > timeout_s:
      raise TimeoutError(f'no {what} within {timeout_s} s')
    time.sleep(poll_s)


def _metric_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line)['step'] for line in path.read_text().splitlines() if line.strip()]


def _check_finished(workdir: pathlib.Path, steps: int) -> list[str]:
  """A finished run's traces: its last checkpoint, one metrics row per logged step, in order."""
  problems = []
  finalized, _ = kill_resume.checkpoint_folders(workdir)
  if steps not in finalized:
    problems.append(f'{workdir}: no checkpoint of the last step {steps} (have {finalized})')
  logged = _metric_steps(workdir)
  if logged != sorted(set(logged)):
    problems.append(f'{workdir}/metrics.jsonl: steps repeated or out of order: {logged}')
  return problems


# --- Second starts on a workdir in use ---------------------------------------------------------

def concurrent_starts(directory: pathlib.Path, data_root: pathlib.Path,
                      environment: dict[str, str], starts: int = 3, steps: int = 30) -> FaultResult:
  """Starts a run, then `starts` more on its workdir while it trains: each must be refused at once
  naming the running one, which must finish untouched."""
  workdir = directory / 'concurrent'
  shutil.rmtree(workdir, ignore_errors=True)
  command = kill_resume.train_command(workdir, data_root, steps, {'train.checkpoint_every': 5})
  lines, problems, refused = [], [], 0
  with open(directory / 'concurrent.log', 'w') as log_file:
    first = subprocess.Popen(command, cwd=kill_resume.PROJECT_ROOT, env=environment,
                             stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      lock_file = workdir / '.dualseg.lock'
      _wait_for(lambda: lock_file.exists() and str(first.pid) in lock_file.read_text(), first,
                300.0, 'lock taken by the first run')
      for index in range(starts):
        started = time.monotonic()
        second = _run(command, environment, timeout_s=300.0)
        seconds = time.monotonic() - started
        message = _error_line(second.stdout)
        if second.returncode == 2 and f'process {first.pid}' in message:
          refused += 1
          if index == 0:
            lines.append(f'second start refused in {seconds:.1f} s: {message}')
        else:
          problems.append(f'start {index + 2} was not refused (status {second.returncode}): '
                          f'{second.stdout[-500:]}')
      first_status = first.wait(timeout=600)
    finally:
      if first.poll() is None:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
  if first_status != 0:
    problems.append(f'the running run ended with status {first_status} ({directory}/concurrent.log)')
  problems += _check_finished(workdir, steps)
  if not problems:
    lines.append(f'the running run finished at step {steps}; metrics.jsonl holds '
                 f'{len(_metric_steps(workdir))} rows, each step once')
  return FaultResult('second starts on a workdir in use', starts, refused if not problems else 0,
                     lines, problems)


# --- A disk that fills ---------------------------------------------------------------------------

def _mount_tmpfs(folder: pathlib.Path, size: str) -> str:
  """Mounts a tmpfs of `size` on `folder`; returns why not when this machine refuses."""
  folder.mkdir(parents=True, exist_ok=True)
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                             capture_output=True, text=True, check=False)
  except OSError as error:  # no mount command on this machine
    return str(error)
  return '' if mounted.returncode == 0 else (mounted.stderr.strip() or 'mount failed')


def _unmount(folder: pathlib.Path) -> None:
  if subprocess.run(['umount', str(folder)], capture_output=True, check=False).returncode != 0:
    subprocess.run(['umount', '-l', str(folder)], capture_output=True, check=False)


def _fill(folder: pathlib.Path) -> pathlib.Path:
  """Takes all the free space of `folder`'s filesystem, as another job writing there would."""
  ballast = folder / 'ballast'
  stats = os.statvfs(folder)
  try:
    with ballast.open('wb') as handle:
      handle.write(b'\0' * (stats.f_bavail * stats.f_frsize))
  except OSError:
    pass  # the run wrote too in between: full either way
  return ballast


# (name, tmpfs size, what is on it and when it fills: None = the run, too small from the start;
# 'cache' = only the preprocessing cache, too small for it; an int = the run, filled by another
# writer once that checkpoint step is complete)
DISK_POINTS = (('too small at the start', '8m', None),
               ('a cache disk too small for the cache', '1m', 'cache'),
               ('full after the checkpoint of step 2', '256m', 2))


def disk_full(directory: pathlib.Path, data_root: pathlib.Path, environment: dict[str, str],
              steps: int = 20) -> FaultResult:
  """For each of DISK_POINTS: the run must end with one `error:` line, and once the space is free
  the same command must finish the run."""
  name = 'a disk that fills'
  if hasattr(os, 'geteuid') and os.geteuid() != 0:
    return FaultResult(name, 0, 0, [], [], skipped='mounting a small filesystem needs root')
  lines, problems, survived = [], [], 0
  for label, size, moment in DISK_POINTS:
    mount_point = directory / f'disk_{len(lines)}'
    _unmount(mount_point)
    why_not = _mount_tmpfs(mount_point, size)
    if why_not:
      return FaultResult(name, 0, 0, [], [], skipped=f'cannot mount a tmpfs here: {why_not}')
    try:
      # The cache point: the cache alone on the small disk, the run on the large one.
      workdir = (directory / f'disk_{len(lines)}_run' if moment == 'cache'
                 else mount_point / 'run')
      shutil.rmtree(workdir, ignore_errors=True)
      command = kill_resume.train_command(
          workdir, data_root, steps, {'data.cache_dir': mount_point / 'cache'})
      with open(directory / f'disk_{len(lines)}.log', 'w') as log_file:
        process = subprocess.Popen(command, cwd=kill_resume.PROJECT_ROOT, env=environment,
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        if isinstance(moment, int):
          _wait_for(lambda: moment in kill_resume.checkpoint_folders(workdir)[0], process, 300.0,
                    f'checkpoint of step {moment}')
          _fill(mount_point)
        status = process.wait(timeout=600)
      output = (directory / f'disk_{len(lines)}.log').read_text()
      message = _error_line(output)
      before = kill_resume.checkpoint_folders(workdir)[0]
      (mount_point / 'ballast').unlink(missing_ok=True)
      subprocess.run(['mount', '-o', 'remount,size=256m', str(mount_point)], check=False)
      if status != 2 or not message:
        problems.append(f'{label}: status {status} without one error line: {output[-800:]}')
        lines.append(f'{label}: status {status}')
        continue
      tracebacks = output.count('Traceback (most recent call last)')
      rerun = _run(command, environment)
      rerun_problems = ([] if rerun.returncode == 0 else
                        [f'{label}: the rerun ended with status {rerun.returncode}: '
                         f'{rerun.stdout[-800:]}'])
      rerun_problems += _check_finished(workdir, steps)
      resumed = kill_resume.resumed_step(rerun.stdout)
      if before and resumed != max(before):
        rerun_problems.append(f'{label}: the rerun started from step {resumed}, not from the last '
                              f'complete checkpoint {max(before)}')
      if tracebacks:
        rerun_problems.append(f'{label}: {tracebacks} traceback(s) printed besides the message')
      lines.append(f'{label}: exit 2, {message}; complete checkpoints then {before}; after '
                   f'freeing space the same command finished step {steps}')
      problems += rerun_problems
      survived += not rerun_problems
    finally:
      _unmount(mount_point)
  return FaultResult(name, len(DISK_POINTS), survived, lines, problems)


# --- A prediction killed midway ------------------------------------------------------------------

def _labels(folder: pathlib.Path) -> dict[str, np.ndarray]:
  import nibabel as nib  # deferred: only this part reads the outputs
  return {path.name: np.asarray(nib.load(path).dataobj)
          for path in sorted(folder.glob('*.nii.gz')) if not path.name.startswith('.')}


def interrupted_prediction(directory: pathlib.Path, run_workdir: pathlib.Path,
                           data_root: pathlib.Path, environment: dict[str, str]) -> FaultResult:
  """Predicts a folder once without interruption; predicts it again, SIGKILLed after the first
  case is written, then reruns that with --resume: the labels must equal the uninterrupted ones."""
  inputs = directory / 'prediction_inputs'
  shutil.rmtree(inputs, ignore_errors=True)
  inputs.mkdir(parents=True)
  for image in sorted(data_root.glob('center_*/imagesTr/*.nii.gz')):
    (inputs / image.name).symlink_to(image.absolute())
  count = len(list(inputs.iterdir()))

  def predict(output: pathlib.Path, *flags: str) -> list[str]:
    return [sys.executable, '-m', 'launch.predict', f'--workdir={run_workdir}',
            f'--input={inputs}', f'--output={output}', '--checkpoint=latest', *flags]

  reference, killed = directory / 'predicted_whole', directory / 'predicted_killed'
  for folder in (reference, killed):
    shutil.rmtree(folder, ignore_errors=True)
  problems, lines = [], []
  whole = _run(predict(reference), environment)
  if whole.returncode != 0:
    return FaultResult('a prediction killed midway', 1, 0, [],
                       [f'the uninterrupted prediction failed: {whole.stdout[-800:]}'])
  process = subprocess.Popen(predict(killed), cwd=kill_resume.PROJECT_ROOT, env=environment,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
  try:
    _wait_for(lambda: killed.exists() and any(not path.name.startswith('.')
                                              for path in killed.glob('*.nii.gz')),
              process, 300.0, 'first predicted case')
    os.killpg(process.pid, signal.SIGKILL)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()
  written = len(_labels(killed))
  refused = _run(predict(killed), environment)
  resumed = _run(predict(killed, '--resume'), environment)
  skipped = [line for line in resumed.stdout.splitlines() if 'already have all their outputs' in line]
  if refused.returncode == 0:
    problems.append('a rerun without --resume overwrote the outputs instead of refusing')
  if resumed.returncode != 0:
    problems.append(f'--resume ended with status {resumed.returncode}: {resumed.stdout[-800:]}')
  expected, got = _labels(reference), _labels(killed)
  if set(expected) != set(got):
    problems.append(f'outputs {sorted(got)} differ from {sorted(expected)}')
  different = [name for name in expected if name in got and not np.array_equal(expected[name], got[name])]
  if different:
    problems.append(f'labels that differ from the uninterrupted prediction: {different}')
  lines.append(f'killed after {written} of {count} cases were written; a rerun without --resume: '
               f'{_error_line(refused.stdout) or "(no error line)"}')
  lines.append(f'--resume: {skipped[-1].split("] ")[-1] if skipped else "(no skip message)"}; '
               f'{len(got)} of {count} labels equal the uninterrupted prediction: '
               f'{len(got) - len(different) if set(expected) == set(got) else 0}')
  return FaultResult('a prediction killed midway', 1, 0 if problems else 1, lines, problems)


def check_faults(directory: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 compilation_cache_dir: str | os.PathLike | None = None,
                 parts: tuple[str, ...] = ('concurrent', 'disk', 'prediction')) -> list[FaultResult]:
  """Every part in `directory` (kept for inspection: logs, runs, predictions)."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  data_root = pathlib.Path(data_root or directory / 'phantoms').absolute()
  environment = kill_resume.subprocess_environment(compilation_cache_dir or directory / 'xla_cache')
  results = []
  if 'concurrent' in parts or 'prediction' in parts:
    results.append(concurrent_starts(directory, data_root, environment))
  if 'disk' in parts:
    results.append(disk_full(directory, data_root, environment))
  if 'prediction' in parts:
    results.append(interrupted_prediction(directory, directory / 'concurrent', data_root,
                                          environment))
  return [result for result in results if result.name != 'second starts on a workdir in use'
          or 'concurrent' in parts]
