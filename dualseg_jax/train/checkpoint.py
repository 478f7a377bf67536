"""Orbax checkpoints of the whole training state and the data iterator: the latest K and the best.

`workdir/checkpoints/` keeps the last `train.keep_checkpoints` saves (item `state`: the TrainState;
item `data`: the Grain iterator). `workdir/best/` keeps the one with the best validation Dice.
A latest checkpoint that cannot be read is reported and the one before it is used.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(directory: pathlib.Path, max_to_keep: int, with_data: bool) -> ocp.CheckpointManager:
  items = ('state', 'data') if with_data else ('state',)
  handlers = {'state': ocp.StandardCheckpointHandler()}
  if with_data:
    handlers['data'] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True),
      item_names=items, item_handlers=handlers)


class Checkpointer:
  """Saves and restores (state, data iterator); saves are asynchronous until `wait`."""

  def __init__(self, workdir: pathlib.Path, keep: int = 2):
    self.latest = _manager(pathlib.Path(workdir) / 'checkpoints', keep, with_data=True)
    self.best = _manager(pathlib.Path(workdir) / 'best', 1, with_data=False)
    self.unreadable_steps: set[int] = set()  # found by `restore`; replaced when saved again

  def save(self, step: int, state, iterator=None, force: bool = False) -> bool:
    args = {'state': ocp.args.StandardSave(state)}
    if iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(iterator)
    if step in self.unreadable_steps:
      # Resuming before an unreadable checkpoint comes back to its step: the new save replaces it,
      # or the run would end with a final checkpoint that cannot be read.
      self.latest.delete(step)
      self.unreadable_steps.discard(step)
    if step in self.latest.all_steps():
      return False
    return self.latest.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state) -> None:
    for old in self.best.all_steps():
      if old != step:
        self.best.delete(old)
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, template_state, iterator=None) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint into the template's structure and shardings.

    Returns (state, step) or None when there is no checkpoint. An unreadable checkpoint is
    reported and skipped in favour of the one before it.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
    for step in sorted(self.latest.all_steps(), reverse=True):
      args = {'state': ocp.args.StandardRestore(abstract)}
      if iterator is not None:
        args['data'] = grain.checkpoint.CheckpointRestore(iterator)
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(**args))
      except Exception as error:  # a partial or corrupted save: fall back to the previous one
        log.warning('checkpoint at step %d in %s cannot be restored (%s: %s); trying an older one',
                    step, self.latest.directory, type(error).__name__, _first_line(error))
        self.unreadable_steps.add(step)
        continue
      return restored['state'], step
    return None

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def _first_line(error: Exception, limit: int = 300) -> str:
  """TensorStore errors carry a page-long spec: the first line says what is wrong."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  return text if len(text) <= limit else text[:limit] + '...'


def restore_params(workdir: pathlib.Path, which: str = 'best') -> tuple[Any, int]:
  """The parameters of a finished or running training run, for inference.

  `which` is 'best' (falling back to the latest when no validation has run) or 'latest'.
  """
  workdir = pathlib.Path(workdir)
  order = ['best', 'checkpoints'] if which == 'best' else ['checkpoints']
  for folder in order:
    directory = workdir / folder
    if not directory.exists():
      continue
    manager = ocp.CheckpointManager(directory.absolute(), item_names=('state',),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      except Exception as error:
        log.warning('checkpoint %s/%d cannot be restored (%s); trying an older one', folder, step,
                    _first_line(error))
        continue
      return restored['state']['params'], step
  from dualseg_jax.errors import DataError
  raise DataError(f'no readable checkpoint under {workdir}/best or {workdir}/checkpoints: '
                  'train first (python -m launch.train --workdir=...) or point --workdir at a run')
