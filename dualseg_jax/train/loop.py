"""The training loop: data, mesh, jitted step, checkpoints, validation, and the held-out evaluation.

`train_and_evaluate(config, workdir)` is the one function `python -m launch.train` calls. Rerun
with the same workdir to resume exactly where the last checkpoint left off.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import sys
import time
import warnings

import jax
import ml_collections
from tqdm import tqdm

from dualseg_jax import config_base
from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax import run_dir
from dualseg_jax import signals
from dualseg_jax.errors import ConfigError, StorageError
from dualseg_jax.evaluation import held_out
from dualseg_jax.inference import overrides as inference_overrides
from dualseg_jax.losses import registry as loss_registry
from dualseg_jax.train import balance as balance_lib
from dualseg_jax.train import checkpoint as checkpoint_lib
from dualseg_jax.train import parallel
from dualseg_jax.train import reporting
from dualseg_jax.train import step as step_lib
from dualseg_jax.train import validate as validate_lib

log = logging.getLogger('dualseg_jax')

# Keys that may differ between a run and its resumption without changing what it computes; the
# model's compute choices (how convolutions run, remat) give the same numbers up to rounding.
_RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
                      'train.grad_balance_every', 'train.keep_checkpoints', 'train.tensorboard',
                      'train.evaluate_test_center', 'data.num_workers', 'data.prefetch', 'inference',
                      'model.conv_impl', 'model.subsample_stride', 'model.remat')


def config_differences(saved: dict, current: dict) -> list[str]:
  """Keys whose values differ between two config dicts, ignoring those a resume may change and
  keys added to the project after the run started that hold their default (the run computed
  what the default computes)."""
  saved_flat = config_base.flatten(config_base.with_earlier_values(saved))
  current_flat = config_base.flatten(current)
  defaults = config_base.flatten(json.loads(config_base.base_config().to_json_best_effort()))
  differences = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if any(key == allowed or key.startswith(allowed + '.') for allowed in _RESUMABLE_CHANGES):
      continue
    if key not in saved_flat and key in defaults and current_flat.get(key) == defaults[key]:
      continue
    if key not in current_flat and key in config_base.VALUES_BEFORE_KEYS:
      continue  # filled in for the saved side only; a complete current config holds every key
    if saved_flat.get(key) != current_flat.get(key):
      differences.append(f'{key}: run has {saved_flat.get(key)!r}, now {current_flat.get(key)!r}')
  return differences


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Impossible settings fail here, naming the key, before any data is read."""
  if config.stage not in config_base.STAGES:
    raise ConfigError(f'stage={config.stage!r}: choose one of {config_base.STAGES}')
  for key, example in (('patch_size', '24,48,48'), ('target_spacing_mm', '3,3,3')):
    if len(config.data[key]) != 3:
      raise ConfigError(f'data.{key}={tuple(config.data[key])}: give three values (z, y, x), e.g. '
                        f'--config.data.{key}={example}')
  for size in config.data.patch_size:
    if size % 8:
      raise ConfigError(f'data.patch_size={tuple(config.data.patch_size)}: every size must be a '
                        'multiple of 8 (the network downsamples three times)')
  if config.data.batch_size < 1:
    raise ConfigError(f'data.batch_size={config.data.batch_size}: must be at least 1')
  if config.augment.num_views not in (1, 2):
    raise ConfigError(f'augment.num_views={config.augment.num_views}: choose 1 or 2')
  if config.train.steps < 1:
    raise ConfigError(f'train.steps={config.train.steps}: must be at least 1')
  expected_classes = 2 if config.stage == 'joint' else 1
  if config.model.num_classes != expected_classes:
    raise ConfigError(f'model.num_classes={config.model.num_classes} but stage {config.stage!r} '
                      f'predicts {expected_classes} channel(s); set --config.model.num_classes='
                      f'{expected_classes}')
  if config.model.widths[0] % config.model.num_groups:
    raise ConfigError(f'model.widths[0]={config.model.widths[0]} is not divisible by '
                      f'model.num_groups={config.model.num_groups}')
  if config.loss.supervised_views not in loss_registry.SUPERVISED_VIEWS:
    raise ConfigError(f'loss.supervised_views={config.loss.supervised_views!r}: choose one of '
                      f'{loss_registry.SUPERVISED_VIEWS}')
  if config.loss.transform not in ('smooth', 'hard'):
    raise ConfigError(f'loss.transform={config.loss.transform!r}: choose smooth or hard')
  # Validation and the held-out report predict with these: fail now, not after training.
  inference_overrides.check(config.inference)
  if config.data.fold == -1 and config.data.test_center and config.data.test_center not in config.data.centers:
    raise ConfigError(f'data.test_center={config.data.test_center!r} is not one of data.centers='
                      f'{tuple(config.data.centers)}')


def default_workdir(config: ml_collections.ConfigDict, name: str = 'run') -> pathlib.Path:
  """runs/<name>-<stage>-<preset>-test_<center> (or -fold<k>), `name` the config file's."""
  held_out = (f'test_{config.data.test_center}' if config.data.fold < 0
              else f'fold{config.data.fold}')
  return pathlib.Path('runs') / f'{name}-{config.stage}-{config.preset}-{held_out}'


def _check_workdir(config, workdir: pathlib.Path, allow_config_change: bool) -> dict:
  """Returns the config as config.json holds it; refuses a workdir whose run has another one.

  config.json is written once the data and the config have passed their checks, so a command
  that failed on them leaves no run behind and the corrected command is not refused.
  """
  from dualseg_jax.data import pipeline  # deferred: data modules pull in grain and scipy
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    differences = config_differences(saved, current)
    if differences and not allow_config_change:
      raise ConfigError(
          f'{workdir} holds a run with a different config:\n  ' + '\n  '.join(differences) +
          '\nuse another --workdir, or --allow_config_change to continue this run with the new '
          'config')
  elif jax.process_index() == 0:
    # No run started here: what a failed attempt recorded about its data does not bind this one.
    (workdir / pipeline.IDENTITY_FILE).unlink(missing_ok=True)
  return current


class PhaseTimes:
  """Wall time of one command's phases: where a run's minutes go (printed at its end and written
  to timing.json). Dispatch is asynchronous, so a step's device time can land in the phase that
  next waits for it; that is at most one step per phase boundary."""

  PHASES = ('data', 'compile', 'training', 'validation', 'checkpoints', 'held-out evaluation')

  def __init__(self):
    self.seconds = dict.fromkeys(self.PHASES, 0.0)

  @contextlib.contextmanager
  def phase(self, name: str):
    started = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - started

  def breakdown(self, wall_time_s: float) -> dict[str, float]:
    """Seconds per phase, plus 'other' (setup, plots, the rest) so that they sum to the wall time."""
    other = max(0.0, wall_time_s - sum(self.seconds.values()))
    return {**{name: round(value, 2) for name, value in self.seconds.items()},
            'other': round(other, 2), 'total': round(wall_time_s, 2)}


def format_breakdown(seconds: dict[str, float]) -> str:
  """'data 12 s (4%), compile 30 s (10%), ...' for the phases that took time."""
  total = seconds.get('total') or sum(seconds.values())
  parts = [f'{name} {_format_seconds(value)} ({100 * value / total:.0f}%)'
           for name, value in seconds.items() if name != 'total' and value >= 0.05 and total > 0]
  return ', '.join(parts)


def _format_seconds(value: float) -> str:
  return f'{value:.1f} s' if value < 90 else f'{value / 60:.1f} min'


# Where the last command's minutes went, per phase (PhaseTimes.breakdown), in the workdir.
TIMING_FILE = 'timing.json'


@dataclasses.dataclass
class RunResult:
  workdir: pathlib.Path
  final_step: int
  wall_time_s: float
  stopped_early: bool
  best_val_dice: float | None
  test_summary: dict | None
  # Seconds per phase of this command (PhaseTimes.breakdown); empty for a result built elsewhere.
  time_breakdown: dict[str, float] = dataclasses.field(default_factory=dict)


def _shardings_for(state, mesh):
  return jax.tree.map(lambda _: parallel.replicated_sharding(mesh), state)


# Besides its checkpoints a run writes metrics.jsonl (~300 B a logged step), curves.png (~100 kB),
# TensorBoard events and the held-out evaluation (about 1 MB of compressed predictions a case).
_OUTPUTS_MARGIN_BYTES = 64 * 2**20


def _check_free_space(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses a run whose checkpoints and outputs would not fit in the workdir's free space."""
  state = jax.eval_shape(  # shapes only: nothing is computed or allocated
      lambda key: step_lib.create_train_state(config, key, tuple(config.data.patch_size))[1],
      jax.random.PRNGKey(config.seed))
  # The parameters, the two Adam moments and the counters: one checkpoint's arrays.
  checkpoint_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
  # The latest train.keep_checkpoints, the best, and one being written before the oldest goes.
  copies = config.train.keep_checkpoints + 2
  saved_bytes = sum(run_dir.bytes_on_disk(workdir / folder)
                    for folder in ('checkpoints', 'best'))
  need = max(0, copies * checkpoint_bytes - saved_bytes) + _OUTPUTS_MARGIN_BYTES
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise StorageError(
        f'not enough free space for the training run in {workdir}: it needs about '
        f'{files.format_bytes(need)} ({copies} checkpoints of '
        f'{files.format_bytes(checkpoint_bytes)}: train.keep_checkpoints={config.train.keep_checkpoints}, the best and one being written; '
        f'{files.format_bytes(_OUTPUTS_MARGIN_BYTES)} for metrics, plots and the held-out '
        f'evaluation) and {files.format_bytes(free)} are free there',
        'free space there, choose another --workdir or lower --config.train.keep_checkpoints, '
        'and rerun', safe='nothing was trained by this command')


def _resume_point(workdir: pathlib.Path) -> str:
  """What a run that ended on a refused write leaves, for its error message."""
  steps = checkpoint_lib.complete_steps(workdir)
  if not steps:
    return 'no checkpoint is complete yet, so the rerun starts from step 0'
  return f'the last complete checkpoint is step {steps[-1]} in {workdir / "checkpoints"}'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       allow_config_change: bool = False, mesh=None,
                       stop_at_step: int | None = None) -> RunResult:
  """Trains `config.stage` in `workdir` (resuming if it holds a run) and evaluates the test center.

  A run in `workdir` whose saved config differs (beyond the keys a resume may change) is refused
  unless `allow_config_change`.

  `stop_at_step` behaves like a preemption at that step: a checkpoint, then an early return.
  The run holds `workdir` throughout: a second run there is refused at once, naming this one.
  A write the disk refuses ends the run with one StorageError saying what is safe.
  """
  workdir = pathlib.Path(workdir)
  validate_config(config)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # a multi-host run locks once
      stack.enter_context(locks.hold(workdir, 'the training run'))
    try:
      return _train_and_evaluate(config, workdir, allow_config_change, mesh, stop_at_step, stack)
    except Exception as error:
      refused = files.refused_write(error, 'the run\'s files', workdir)
      if refused is None or refused.safe:  # not the disk's doing, or already says what is safe
        raise
      raise refused.with_safe(_resume_point(workdir)) from error


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        allow_config_change: bool, mesh, stop_at_step: int | None,
                        cleanup: contextlib.ExitStack) -> RunResult:
  from dualseg_jax.data import pipeline  # deferred: data modules pull in grain and scipy

  started, times = time.time(), PhaseTimes()
  pipeline.resolve_data_root(config)
  resolved_config = _check_workdir(config, workdir, allow_config_change)
  _check_free_space(config, workdir)
  log.info('preset %s; stage %s; workdir %s', config.preset, config.stage, workdir)
  mesh = mesh or parallel.make_mesh()
  parallel.check_global_batch(config.data.batch_size, mesh)
  with times.phase('data'):
    data = pipeline.prepare(config, workdir)

  trained = _train(config, workdir, data, mesh, resolved_config, stop_at_step, cleanup, times)
  test_summary, stopped_early = None, trained.stopped_early
  if not stopped_early and config.train.evaluate_test_center and jax.process_index() == 0:
    with times.phase('held-out evaluation'):
      test_summary, stopped_early = _evaluate_held_out(
          config, workdir, data, finished_earlier=trained.start_step == config.train.steps)
  wall_time_s = time.time() - started
  breakdown = times.breakdown(wall_time_s)
  if jax.process_index() == 0:
    files.write_json(workdir / TIMING_FILE, breakdown)
  return RunResult(workdir=workdir, final_step=trained.final_step,
                   wall_time_s=wall_time_s, stopped_early=stopped_early,
                   best_val_dice=trained.best_val_dice, test_summary=test_summary,
                   time_breakdown=breakdown)


@dataclasses.dataclass
class _Training:
  start_step: int  # where this command began: 0, or the checkpoint it resumed from
  final_step: int
  stopped_early: bool
  best_val_dice: float | None


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, data, mesh,
           resolved_config: dict, stop_at_step: int | None,
           cleanup: contextlib.ExitStack, times: PhaseTimes) -> _Training:
  """Trains from the latest checkpoint in `workdir` (or from the start) to train.steps, validating
  and checkpointing on the way; a stop request (or `stop_at_step`) saves a checkpoint and returns."""
  from dualseg_jax.data import pipeline  # deferred: data modules pull in grain and scipy

  model, state, optimizer = step_lib.create_train_state(
      config, jax.random.PRNGKey(config.seed), tuple(config.data.patch_size))
  state = parallel.replicate(state, mesh)
  iterator = pipeline.train_iterator(config, data)
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  cleanup.callback(checkpointer.settle)  # an error leaves no save running into interpreter exit
  start_step, restored = 0, checkpointer.restore(state, iterator)
  if restored is not None:
    state, start_step = restored
    log.info('resumed from the checkpoint at step %d', start_step)
  if jax.process_index() == 0:
    files.write_json(workdir / 'config.json', resolved_config, sort_keys=True)
  metrics_log = reporting.MetricsLog(workdir / 'metrics.jsonl', resume_step=start_step,
                                     tensorboard_dir=(workdir / 'tensorboard'
                                                      if config.train.tensorboard else None),
                                     write=jax.process_index() == 0)
  best_dice = max((row['val/dice_mean'] for row in metrics_log.rows
                   if row.get('val/dice_mean') is not None), default=None)
  train_step, encoder_balance = _compiled_steps(config, model, optimizer, state, mesh)
  sharding = parallel.batch_sharding(mesh)
  validator = validate_lib.Validator(config, data.split.val)
  settings = config.train
  bar = tqdm(total=settings.steps, initial=start_step, desc=f'train {config.stage}', unit='step',
             dynamic_ncols=True, disable=jax.process_index() != 0)
  writer = _OneStepLateWriter(metrics_log, bar)
  step, stopped_early = start_step, False

  # Closing the bar on an error ends its line, so that the error's message starts a line of its own.
  with signals.StopOnSignal('saving a checkpoint, then stopping') as stop, bar:
    while step < settings.steps:
      # The command's first step compiles the step function (jit traces and compiles on call).
      with times.phase('compile' if step == start_step else 'training'):
        batch = parallel.to_global_batch(next(iterator), sharding)
        # Read before the step donates the state; logged with the row of the step it describes.
        balance = (encoder_balance(state, batch) if encoder_balance is not None
                   and (step + 1) % settings.grad_balance_every == 0 else None)
        state, metrics = train_step(state, batch)
        step += 1
        last = step == settings.steps
        logged = step % settings.log_every == 0 or last
        writer.step_done(step, ({**metrics, **balance} if balance is not None
                                else metrics if logged else None))
        # Reading the counter waits for the step; doing it only at log steps keeps the host one
        # batch ahead of the device in between. Skipped steps leave the parameters as they were,
        # so a late stop still saves the last good parameters.
        if logged and settings.max_bad_steps and int(state.bad_steps) >= settings.max_bad_steps:
          _save_and_stop_on_bad_steps(step, state, iterator, checkpointer, writer, workdir)
      if settings.eval_every and (step % settings.eval_every == 0 or last):
        with times.phase('validation'):
          writer.flush()
          best_dice = _validate(validator, step, state, writer, checkpointer, best_dice, workdir)
      stopping = stop.requested or step == stop_at_step
      checkpoint_due = step % settings.checkpoint_every == 0 or last
      if stopping or checkpoint_due:
        # The step's metrics row goes out before its checkpoint: a kill between the two must not
        # leave a checkpoint that resumes past a row metrics.jsonl never got.
        writer.flush()
      with times.phase('checkpoints'):
        if checkpoint_due:
          checkpointer.save(step, state, iterator)
        if stopping:
          checkpointer.save(step, state, iterator, force=True)
      if stopping:
        stopped_early = True
        break
    writer.flush()
  with times.phase('checkpoints'):
    checkpointer.wait()
  if jax.process_index() == 0 and metrics_log.rows:
    reporting.plot_curves(metrics_log.rows, workdir / 'curves.png')
  checkpointer.close()
  metrics_log.close()
  return _Training(start_step, step, stopped_early, best_dice)


# The jitted steps of this process's earlier runs, keyed by everything they read (`_step_config`)
# and the mesh: runs that differ only in seed, data paths or cadences (an ablation's seeds, the
# stages of a test suite) trace and compile once. Jit keys its own cache by the inputs' shapes.
_COMPILED_STEPS: collections.OrderedDict = collections.OrderedDict()
_COMPILED_STEPS_KEPT = 4


def _step_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The part of `config` that the train step and the balance probe read: the network, the
  losses, the augmentation, the optimizer with its schedule's length. The steps are built from
  this alone, so a step that starts reading another key fails loudly instead of being shared."""
  resolved = config.copy_and_resolve_references()
  return ml_collections.ConfigDict({
      'model': resolved.model.to_dict(), 'loss': resolved.loss.to_dict(),
      'augment': resolved.augment.to_dict(), 'optim': resolved.optim.to_dict(),
      'data': {'target_spacing_mm': tuple(resolved.data.target_spacing_mm)},
      'train': {'steps': resolved.train.steps,
                'grad_balance_every': resolved.train.grad_balance_every}})


def _compiled_steps(config: ml_collections.ConfigDict, model, optimizer, state, mesh):
  """The jitted training step (donating the state) and, every train.grad_balance_every steps, the
  per-term gradient norms on the encoder for the same inputs as the step that follows (else None);
  those of an earlier run in this process when they read the same settings on the same mesh."""
  from dualseg_jax.data import pipeline  # deferred: data modules pull in grain and scipy
  step_config = _step_config(config)
  key = (json.dumps(step_config.to_dict(), sort_keys=True, default=repr),
         tuple(device.id for device in mesh.devices.flat), mesh.axis_names)
  if key in _COMPILED_STEPS:
    _COMPILED_STEPS.move_to_end(key)
    return _COMPILED_STEPS[key]
  augment_fn = pipeline.device_augmentation(step_config)
  train_step = jax.jit(
      step_lib.make_train_step(model, step_config, optimizer, augment_fn=augment_fn),
      donate_argnums=0, out_shardings=(_shardings_for(state, mesh), parallel.replicated_sharding(mesh)))
  encoder_balance = (jax.jit(balance_lib.make_balance_fn(model, step_config, augment_fn),
                             out_shardings=parallel.replicated_sharding(mesh))
                     if step_config.train.grad_balance_every else None)
  _COMPILED_STEPS[key] = train_step, encoder_balance
  while len(_COMPILED_STEPS) > _COMPILED_STEPS_KEPT:
    _COMPILED_STEPS.popitem(last=False)
  return train_step, encoder_balance


class _OneStepLateWriter:
  """Writes a step's metrics row once the next step is queued: reading device values then waits
  for a step that has finished, never for the one running, so the host never stalls the device.
  Keeps the progress bar and the steps/s of each logged window."""

  def __init__(self, metrics_log: reporting.MetricsLog, bar: tqdm):
    self.metrics_log, self.bar = metrics_log, bar
    self._held = None  # (step, device metrics) not yet read
    self._window_start, self._window_steps = time.time(), 0

  def step_done(self, step: int, device_metrics: dict | None) -> None:
    """Counts a finished step, writes the row held from the step before, and holds this step's
    metrics (None: the step logs nothing)."""
    self._window_steps += 1
    self.bar.update(1)
    self.flush()
    if device_metrics is not None:
      self._held = (step, device_metrics)

  def flush(self) -> None:
    """Writes the held row now: before a checkpoint, a validation, an error, the end."""
    if self._held is None:
      return
    step, device_metrics = self._held
    host = {name: float(value) for name, value in jax.device_get(device_metrics).items()}
    elapsed = time.time() - self._window_start
    host['steps_per_s'] = self._window_steps / elapsed if elapsed > 0 else 0.0
    self._window_start, self._window_steps = time.time(), 0
    row = self.metrics_log.write(step, host)
    self._held = None
    self.bar.set_postfix(reporting.format_progress(row), refresh=False)


def _save_and_stop_on_bad_steps(step: int, state, iterator, checkpointer, writer, workdir):
  """Saves the state of the last good step (a skipped step leaves the parameters as they were)
  and ends the run with an error that says what to change."""
  bad_in_a_row = int(state.bad_steps)
  writer.flush()
  checkpointer.save(step, state, iterator, force=True)
  checkpointer.wait()
  raise FloatingPointError(
      f'{bad_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient; '
      f'the state of the last good step is saved in {workdir}/checkpoints. Lower '
      '--config.optim.learning_rate or check the data for NaN voxels.')


def _validate(validator, step: int, state, writer: _OneStepLateWriter, checkpointer,
              best_dice: float | None, workdir: pathlib.Path) -> float | None:
  """Scores the validation cases, keeps the state in best/ when its Dice is the best so far, and
  redraws the curves; returns the best Dice."""
  scores = validator.run(state.params)
  if scores:
    writer.metrics_log.write(step, {f'val/{k}': v for k, v in scores.items()})
    writer.bar.write(f'step {step}: validation ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()))
    dice = scores.get('dice_mean')
    if dice is not None and (best_dice is None or dice > best_dice):
      best_dice = dice
      checkpointer.save_best(step, state)
  if jax.process_index() == 0:
    reporting.plot_curves(writer.metrics_log.rows, workdir / 'curves.png')
  return best_dice


def _evaluate_held_out(config: ml_collections.ConfigDict, workdir: pathlib.Path, data,
                       finished_earlier: bool) -> tuple[dict | None, bool]:
  """The held-out center's report and whether a stop request cut it short. An interrupted
  report resumes with the cases it has not predicted; a finished run asked again keeps its own."""
  report_dir = workdir / 'evaluation' / data.test_tag
  finished_report = _complete_report(report_dir / 'summary.json')
  if finished_earlier and finished_report is not None:
    # A finished run asked again: its report stands (rerunning never repeats finished work).
    finished_report.update(report_dir=str(report_dir), table=(report_dir / 'summary.md').read_text())
    return finished_report, False
  try:
    with files.writing('the held-out evaluation', report_dir):
      return validate_lib.evaluate_test_center(config, workdir, data.split.test,
                                               tag=data.test_tag), False
  except held_out.HeldOutEvaluationStopped:
    return None, True  # it logged what is kept; rerunning the command finishes the report


def _complete_report(path: pathlib.Path) -> dict | None:
  """The held-out report at `path` when it scored every case; a report that skipped cases (an
  unreadable reference, say) is rewritten by the next attempt instead of standing as final."""
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  return report if report.get('complete', True) else None


def print_summary(result: RunResult) -> None:
  """Where a run's files are and how it did, printed by the first process."""
  if jax.process_index() != 0:
    return
  lines = [f'run finished at step {result.final_step} in {result.wall_time_s / 60:.1f} min'
           + (' (stopped on request; rerun the same command to resume)' if result.stopped_early else ''),
           f'  workdir:     {result.workdir}',
           f'  config:      {result.workdir / "config.json"}',
           f'  checkpoints: {result.workdir / "checkpoints"} (best: {result.workdir / "best"})',
           f'  metrics:     {result.workdir / "metrics.jsonl"}',
           f'  curves:      {result.workdir / "curves.png"}']
  if result.time_breakdown:
    lines.append(f'  time:        {format_breakdown(result.time_breakdown)} '
                 f'({result.workdir / TIMING_FILE})')
  if result.best_val_dice is not None:
    lines.append(f'  best validation Dice (mean over structures): {result.best_val_dice:.4f}')
  if result.test_summary is not None:
    lines.append(f'  held-out evaluation: {result.test_summary.get("report_dir")}')
    table = result.test_summary.get('table')
    if table:
      lines.append(table)
  print('\n'.join(lines), flush=True)


def quiet_refused_write_reports() -> None:
  """A write the disk refused ends the run with one StorageError that says it all; the reports
  Orbax's background threads, asyncio and TensorStore then make of the abandoned save (hundreds
  of tracebacks in a tiny run) are dropped. Every other report stays."""
  for logger_name in ('absl', 'asyncio'):
    logging.getLogger(logger_name).addFilter(_without_refused_writes)
  sys.unraisablehook = _drop_abandoned_write_reports(sys.unraisablehook)
  # The writes a refused save abandoned, collected at exit: part of the same failure.
  warnings.filterwarnings('ignore', message="coroutine 'async_serialize_from_host",
                          category=RuntimeWarning)


def _without_refused_writes(record: logging.LogRecord) -> bool:
  """Drops the reports of a write the disk refused that Orbax's background threads log, and
  asyncio for each of the save's abandoned tasks (over two hundred tracebacks in a tiny run): the
  run ends with one StorageError that says it all."""
  error = record.exc_info[1] if record.exc_info else None
  return (files.storage_errno(error) is None
          and files.storage_errno(Exception(record.getMessage())) is None)


def _drop_abandoned_write_reports(report_unraisable):
  """After a refused checkpoint write TensorStore still completes the writes Orbax abandoned and
  posts each result to the save's event loop, closed by then; Python reports every one as an
  unraisable "Event loop is closed" (over a hundred tracebacks in a tiny run). Those are dropped;
  any other unraisable error is reported as before."""
  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      report_unraisable(unraisable)
  return hook
