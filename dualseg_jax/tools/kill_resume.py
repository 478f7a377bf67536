"""Crash safety of training, proven by doing it: a tiny run is SIGKILLed at random moments (some
inside a checkpoint write), rerun each time, and compared step by step with a run left alone."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np

from dualseg_jax.train import reporting

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPORARY_MARK = '.orbax-checkpoint-tmp'
# How each life of the killed run is ended; drawn in turn so that every kind is hit.
KILL_PLANS = ('checkpoint write', 'between checkpoints', 'startup')
_RESUMED = re.compile(r'resumed from the checkpoint at step (\d+)')
_UNREADABLE = re.compile(r'checkpoint at step (\d+) .*cannot be restored')
_TRAINING_STARTED = re.compile(r'train \w+:')  # the progress bar, shown once restoring is done


@dataclasses.dataclass
class Kill:
  """One SIGKILL: what it was aimed at and what it hit, read from the checkpoint folder."""

  plan: str  # one of KILL_PLANS
  seconds_after_start: float
  newest_complete_step: int | None  # the newest finalized checkpoint left behind
  writing_steps: list[int]  # steps whose temporary (unfinished) checkpoint folder was left behind
  phase: str = ''  # how far the killed life had got, read from its log
  resumed_from: int | None = None  # step the next life resumed from (0: scratch; None: not seen)

  @property
  def moment(self) -> str:
    if self.writing_steps:
      return f'{self.phase}, during the checkpoint write of step {max(self.writing_steps)}'
    if self.newest_complete_step is None:
      return f'{self.phase}, before the first checkpoint'
    return f'{self.phase}, after the checkpoint of step {self.newest_complete_step}'


@dataclasses.dataclass
class CrashReport:
  kills: list[Kill]
  mismatches: list[str]
  final_step: int | None

  def summary(self) -> str:
    lines = [f'{len(self.kills)} kill(s) survived' if not self.mismatches
             else f'{len(self.kills)} kill(s), {len(self.mismatches)} mismatch(es)']
    for index, kill in enumerate(self.kills, 1):
      lines.append(f'  kill {index} ({kill.plan}, {kill.seconds_after_start:.1f} s after start): '
                   f'{kill.moment}; {_resume_text(kill.resumed_from)}')
    lines.extend(f'  MISMATCH: {text}' for text in self.mismatches)
    return '\n'.join(lines)


def _phase(output: str) -> str:
  """The last stage a life's log shows: start-up, data preparation, restore and compilation, or training."""
  if _TRAINING_STARTED.search(output):
    return 'training'
  if _RESUMED.search(output) or 'train: ' in output:
    return 'restoring and compiling' if _RESUMED.search(output) else 'preparing data or compiling'
  if 'preset ' in output:
    return 'generating or preprocessing data'
  return 'python start-up'


def resumed_step(output: str) -> int | None:
  """The step a run's log says it resumed from: 0 when it started afresh, None when not seen."""
  found = _RESUMED.findall(output)
  if found:
    return int(found[-1])
  return 0 if _TRAINING_STARTED.search(output) else None


def _resume_text(resumed_from: int | None) -> str:
  if resumed_from is None:
    return 'the next life was killed before restoring'
  return 'restarted from scratch' if resumed_from == 0 else f'resumed from step {resumed_from}'


def subprocess_environment(compilation_cache_dir: str | os.PathLike | None = None,
                           devices: int = 1) -> dict[str, str]:
  """The environment of a training subprocess: CPU, `devices` fake devices, a shared compile cache
  (jax reads its options from JAX_* variables), and the project importable."""
  environment = dict(os.environ)
  environment['JAX_PLATFORMS'] = 'cpu'
  environment['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if compilation_cache_dir:
    environment['JAX_COMPILATION_CACHE_DIR'] = str(compilation_cache_dir)
    environment['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    environment['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  environment['PYTHONPATH'] = os.pathsep.join(
      [str(PROJECT_ROOT)] + [p for p in environment.get('PYTHONPATH', '').split(os.pathsep) if p])
  environment['PYTHONUNBUFFERED'] = '1'
  return environment


def train_command(workdir: pathlib.Path, data_root: pathlib.Path, steps: int,
                  overrides: dict[str, object] | None = None) -> list[str]:
  """`python -m launch.train` on the tiny preset with frequent checkpoints and no evaluation."""
  settings = {'data.root': data_root, 'data.synthetic_cases_per_center': 2, 'data.batch_size': 2,
              'train.steps': steps, 'train.checkpoint_every': 1, 'train.eval_every': 0,
              'train.evaluate_test_center': False}
  settings.update(overrides or {})
  return ([sys.executable, '-m', 'launch.train', '--config=configs/three_center.py:tiny',
           f'--workdir={workdir}'] + [f'--config.{key}={value}' for key, value in settings.items()])


def checkpoint_folders(workdir: pathlib.Path) -> tuple[list[int], list[int]]:
  """(finalized steps, steps with an unfinished temporary folder) under workdir/checkpoints."""
  finalized, temporary = [], []
  try:
    names = os.listdir(pathlib.Path(workdir) / 'checkpoints')
  except FileNotFoundError:
    return [], []
  for name in names:
    if name.isdigit():
      finalized.append(int(name))
    elif TEMPORARY_MARK in name and name.split('.')[0].isdigit():
      temporary.append(int(name.split('.')[0]))
  return sorted(finalized), sorted(temporary)


def run_to_completion(command: list[str], environment: dict[str, str], log_path: pathlib.Path,
                      timeout_s: float = 600.0) -> str:
  """Runs a training command to its end; its output goes to `log_path` and is returned."""
  with open(log_path, 'w') as log_file:
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=environment, stdout=log_file,
                               stderr=subprocess.STDOUT, timeout=timeout_s)
  output = pathlib.Path(log_path).read_text()
  if completed.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} exited with {completed.returncode}; its output is in '
                       f'{log_path}:\n{output[-3000:]}')
  return output


def _kill_group(process: subprocess.Popen) -> None:
  # The run was started in its own session: its group holds it and any loader workers it spawned.
  if process.poll() is None:  # once reaped, its id may belong to someone else
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  process.wait()


def _wait_for_kill_moment(process: subprocess.Popen, workdir: pathlib.Path, plan: str,
                          rng: np.random.Generator, poll_s: float, timeout_s: float) -> bool:
  """Waits until the moment `plan` aims at; False when the run ended first."""
  started = time.monotonic()
  finalized, _ = checkpoint_folders(workdir)
  newest = max(finalized, default=0)
  if plan == 'startup':
    delay = rng.uniform(0.5, 6.0)  # imports, data preparation, restore, compilation
    while time.monotonic() - started < delay:
      if process.poll() is not None:
        return False
      time.sleep(poll_s)
    return True
  while time.monotonic() - started < timeout_s:
    if process.poll() is not None:
      return False
    finalized, temporary = checkpoint_folders(workdir)
    if plan == 'checkpoint write':
      # At least one new complete checkpoint first, so that every life moves the run on.
      if any(step >= newest + 2 for step in temporary):
        return True
    elif any(step > newest for step in finalized):
      time.sleep(rng.uniform(0.0, 0.5))
      return True
    time.sleep(poll_s)
  raise TimeoutError(f'no checkpoint progress in {workdir} within {timeout_s} s')


def kill_and_resume(workdir: pathlib.Path, command: list[str], environment: dict[str, str],
                    kills: int, rng: np.random.Generator, log_dir: pathlib.Path,
                    poll_s: float = 0.002, timeout_s: float = 600.0) -> tuple[list[Kill], list[str]]:
  """Starts `command`, SIGKILLs it `kills` times at moments drawn from `rng` (restarting it after
  each), then lets it finish. Returns the kills and any resume that went wrong."""
  log_dir.mkdir(parents=True, exist_ok=True)
  first = int(rng.integers(len(KILL_PLANS)))
  plans = [KILL_PLANS[(first + index) % len(KILL_PLANS)] for index in range(kills)]
  done, problems = [], []
  expected_resume = None
  for life, plan in enumerate(plans):
    log_path = log_dir / f'life_{life:02d}.log'
    with open(log_path, 'w') as log_file:
      process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
      started = time.monotonic()
      try:
        reached = _wait_for_kill_moment(process, workdir, plan, rng, poll_s, timeout_s)
        killed_after_s = time.monotonic() - started
      finally:
        _kill_group(process)
    output = log_path.read_text()
    problems += _check_resume(output, expected_resume, done[-1] if done else None)
    if not reached:  # the run ended before its kill: nothing more to kill
      if process.returncode != 0:
        problems.append(f'life {life} exited with {process.returncode} before its kill; see {log_path}')
      break
    finalized, temporary = checkpoint_folders(workdir)
    kill = Kill(plan=plan, seconds_after_start=killed_after_s,
                newest_complete_step=max(finalized, default=None),
                writing_steps=[step for step in temporary if step not in finalized],
                phase=_phase(output))
    done.append(kill)
    expected_resume = kill.newest_complete_step
  else:
    log_path = log_dir / f'life_{len(plans):02d}.log'
    output = run_to_completion(command, environment, log_path, timeout_s)
    problems += _check_resume(output, expected_resume, done[-1] if done else None)
  finalized, temporary = checkpoint_folders(workdir)
  if temporary:
    problems.append(f'temporary checkpoint folders of steps {temporary} were left after the last run')
  return done, problems


def _check_resume(output: str, expected: int | None, previous_kill: Kill | None) -> list[str]:
  """The life after a kill must resume from the newest complete checkpoint, and read it at once."""
  if previous_kill is None:
    return []
  problems = [f'checkpoint at step {step} could not be restored after a kill'
              for step in _UNREADABLE.findall(output)]
  found = _RESUMED.search(output)
  if found is not None:
    previous_kill.resumed_from = int(found.group(1))
    if previous_kill.resumed_from != expected:
      problems.append(f'resumed from step {previous_kill.resumed_from}, but the newest complete '
                      f'checkpoint was step {expected}')
  elif _TRAINING_STARTED.search(output):
    previous_kill.resumed_from = 0
    if expected is not None:
      problems.append(f'started from scratch although the checkpoint of step {expected} was complete')
  # Otherwise this life was killed before it restored anything: the next one is checked instead.
  return problems


def loss_rows(workdir: pathlib.Path) -> tuple[dict[int, float | None], list[int]]:
  """step -> logged loss of metrics.jsonl, and the steps that appear more than once."""
  losses, repeated = {}, []
  for row in reporting.MetricsLog.read(pathlib.Path(workdir) / 'metrics.jsonl'):
    if 'loss' not in row:
      continue
    if row['step'] in losses:
      repeated.append(row['step'])
    losses[row['step']] = row['loss']
  return losses, repeated


def compare_runs(reference: pathlib.Path, candidate: pathlib.Path, steps: int,
                 rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
  """Every step's loss and the final parameters of `candidate` against `reference`."""
  import jax  # deferred: the subprocess launcher itself needs no jax

  from dualseg_jax import run_dir
  mismatches = []
  reference_losses, _ = loss_rows(reference)
  losses, repeated = loss_rows(candidate)
  if repeated:
    mismatches.append(f'metrics.jsonl repeats steps {sorted(set(repeated))}')
  if sorted(losses) != list(range(1, steps + 1)):
    missing = sorted(set(range(1, steps + 1)) - set(losses))
    extra = sorted(set(losses) - set(range(1, steps + 1)))
    mismatches.append(f'metrics.jsonl loss rows: missing steps {missing}, unexpected {extra}')
  for step in range(1, steps + 1):
    want, have = reference_losses.get(step), losses.get(step)
    if want is None or have is None:
      continue
    if not np.isclose(have, want, rtol=rtol, atol=atol):
      mismatches.append(f'step {step}: loss {have!r}, uninterrupted run {want!r}')
  params, step = run_dir.restore_params(candidate, 'latest')
  reference_params, reference_step = run_dir.restore_params(reference, 'latest')
  if step != reference_step:
    mismatches.append(f'final checkpoint at step {step}, uninterrupted run at {reference_step}')
  leaves = jax.tree_util.tree_leaves_with_path(params)
  reference_leaves = dict(jax.tree_util.tree_leaves_with_path(reference_params))
  for path, leaf in leaves:
    want = reference_leaves.get(path)
    if want is None or not np.allclose(np.asarray(leaf), np.asarray(want), rtol=rtol, atol=atol):
      mismatches.append(f'final parameter {jax.tree_util.keystr(path)} differs')
  return mismatches


def check_kill_resume(directory: pathlib.Path, kills: int = 8, seed: int = 0, steps: int = 12,
                      data_root: pathlib.Path | None = None,
                      compilation_cache_dir: pathlib.Path | None = None,
                      reference: pathlib.Path | None = None) -> CrashReport:
  """The whole check in `directory`: an uninterrupted run (unless `reference` names one), a run
  killed `kills` times, and their comparison."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  data_root = pathlib.Path(data_root or directory / 'phantoms').absolute()
  environment = subprocess_environment(compilation_cache_dir or directory / 'xla_cache')
  if reference is None:
    reference = directory / 'uninterrupted'
    if not (reference / 'checkpoints' / str(steps)).exists():
      run_to_completion(train_command(reference, data_root, steps), environment,
                        directory / 'uninterrupted.log')
  killed = directory / 'killed'
  done, problems = kill_and_resume(killed, train_command(killed, data_root, steps), environment,
                                   kills, np.random.default_rng(seed), directory / 'logs')
  mismatches = problems + compare_runs(reference, killed, steps)
  finalized, _ = checkpoint_folders(killed)
  return CrashReport(kills=done, mismatches=mismatches, final_step=max(finalized, default=None))
