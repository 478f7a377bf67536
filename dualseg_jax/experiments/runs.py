"""Many training runs under one folder: config variants from dotted-key overrides
(`config_base.with_overrides`), each run in its own subfolder unless it already finished, so an
interrupted experiment resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from typing import Any, Callable

import ml_collections

from dualseg_jax import config_base
from dualseg_jax import files

log = logging.getLogger('dualseg_jax')

# Written into a run's folder when train_and_evaluate returned without being stopped.
FINISHED_MARKER = 'experiment_run.json'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of an experiment: its folder name and the config keys it changes."""
  name: str
  overrides: dict[str, Any]


class ExperimentInterrupted(Exception):
  """A run stopped on request (SIGTERM / Ctrl-C); rerunning the same command resumes it."""


def format_overrides(overrides: dict[str, Any]) -> str:
  return ' '.join(f'--config.{key}={_flag_value(value)}' for key, value in overrides.items()) or '(none)'


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '"(' + ', '.join(repr(item) for item in value) + ')"'
  return str(value)


def config_sha256(workdir: str | pathlib.Path) -> str | None:
  """sha256 of the run's config.json as written, or None before the run has started."""
  path = pathlib.Path(workdir) / 'config.json'
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def read_test_summary(workdir: str | pathlib.Path) -> dict | None:
  """The held-out evaluation's summary.json of a run (evaluation/test_*/summary.json), or None."""
  paths = sorted((pathlib.Path(workdir) / 'evaluation').glob('test*/summary.json'))
  if not paths:
    return None
  if len(paths) > 1:
    log.warning('%s holds %d test evaluations; reading %s', workdir, len(paths), paths[-1])
  return json.loads(paths[-1].read_text())


def is_finished(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> bool:
  """True when `workdir` holds this config's run, trained to train.steps, with its evaluation."""
  from dualseg_jax.train import loop  # deferred: dry runs and tables need no jax
  workdir = pathlib.Path(workdir)
  marker, saved = workdir / FINISHED_MARKER, workdir / 'config.json'
  if not (marker.exists() and saved.exists()):
    return False
  if json.loads(marker.read_text()).get('final_step') != config.train.steps:
    return False
  if loop.config_differences(json.loads(saved.read_text()),
                             json.loads(config.to_json_best_effort())):
    return False
  return not config.train.evaluate_test_center or read_test_summary(workdir) is not None


def run_all(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
            specs: list[RunSpec], train_fn: Callable | None = None) -> dict[str, pathlib.Path]:
  """Trains and evaluates every spec in workdir/<spec.name>, skipping finished runs.

  `train_fn` defaults to `loop.train_and_evaluate`; each run's summary is printed as
  `launch.train` prints it. Raises ExperimentInterrupted when a run was stopped on request, so no
  table is written from a half-finished experiment.
  """
  from dualseg_jax.data import pipeline  # deferred: pulls in grain and jax
  from dualseg_jax.train import loop
  train_fn = train_fn or loop.train_and_evaluate
  workdir = pathlib.Path(workdir)
  folders = {}
  for index, spec in enumerate(specs, start=1):
    run_config = config_base.with_overrides(config, spec.overrides)
    # The resolved root goes into config.json, so the finished check compares like with like.
    with run_config.unlocked():
      pipeline.resolve_data_root(run_config)
    run_dir = workdir / spec.name
    folders[spec.name] = run_dir
    if is_finished(run_config, run_dir):
      log.info('[%d/%d] %s: finished earlier, not rerun', index, len(specs), spec.name)
      continue
    log.info('[%d/%d] %s: %s', index, len(specs), spec.name, format_overrides(spec.overrides))
    result = train_fn(run_config, run_dir)
    loop.print_summary(result)
    if result.stopped_early:
      raise ExperimentInterrupted(f'run {run_dir} stopped at step {result.final_step}; rerun the '
                                  'same command to resume it and the runs after it')
    files.write_json(run_dir / FINISHED_MARKER,
                     {'final_step': result.final_step, 'wall_time_s': result.wall_time_s,
                      'config_sha256': config_sha256(run_dir)})
  return folders
