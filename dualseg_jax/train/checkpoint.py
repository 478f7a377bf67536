"""Orbax checkpoints of the whole training state and the data iterator: the latest K and the best.

`workdir/checkpoints/` keeps the last `train.keep_checkpoints` saves (item `state`: the TrainState;
item `data`: the Grain iterator; item `checksums`: a CRC32 per state array, since Orbax keeps
none of array values). `workdir/best/` keeps the one with the best validation Dice. A latest
checkpoint that cannot be read, or whose arrays no longer match their checksums, is reported and
the one before it is used. Reading a run's parameters back for inference is `run_dir`'s.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dualseg_jax import files
from dualseg_jax import run_dir
from dualseg_jax.run_dir import state_checksums
# Training's own callers (the loop, its checks) read a run's disk use and parameters from here.

log = logging.getLogger(__name__)


def _manager(directory: pathlib.Path, max_to_keep: int, with_data: bool) -> ocp.CheckpointManager:
  items = ('state', 'checksums', 'data') if with_data else ('state', 'checksums')
  handlers = {'state': ocp.StandardCheckpointHandler(), 'checksums': ocp.JsonCheckpointHandler()}
  if with_data:
    handlers['data'] = grain.checkpoint.CheckpointHandler()
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True),
      item_names=items, item_handlers=handlers)


class Checkpointer:
  """Saves and restores (state, data iterator); saves are asynchronous until `wait`.

  A full or read-only disk therefore surfaces at the next save or at `wait`, from a background
  thread, as an Orbax or TensorStore error that only quotes the OSError; each becomes one
  StorageError. The failed save stays an `N.orbax-checkpoint-tmp` folder, which restoring never
  reads and the next manager deletes, so the earlier checkpoints stay usable.
  """

  def __init__(self, workdir: pathlib.Path, keep: int = 2):
    self.directory = pathlib.Path(workdir) / 'checkpoints'
    self.best_directory = pathlib.Path(workdir) / 'best'
    with files.writing('the checkpoint folders', workdir):
      self.latest = _manager(self.directory, keep, with_data=True)
      self.best = _manager(self.best_directory, 1, with_data=False)
    self.unreadable_steps: set[int] = set()  # found by `restore`; replaced when saved again

  def save(self, step: int, state, iterator=None, force: bool = False) -> bool:
    args = {'state': ocp.args.StandardSave(state),
            'checksums': ocp.args.JsonSave(state_checksums(state))}
    if iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(iterator)
    with files.writing('a checkpoint', self.directory):
      if step in self.unreadable_steps:
        # Resuming before an unreadable checkpoint comes back to its step: the new save replaces
        # it, or the run would end with a final checkpoint that cannot be read.
        self.latest.delete(step)
        self.unreadable_steps.discard(step)
      if step in self.latest.all_steps():
        return False
      return self.latest.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state) -> None:
    # max_to_keep=1: the manager drops the previous best only once the new one is complete.
    with files.writing('the best checkpoint', self.best_directory):
      if step not in self.best.all_steps():
        checksums = ocp.args.JsonSave(state_checksums(state))
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     checksums=checksums), force=True)

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
        run_dir.check_checksums(self.latest, step, restored['state'])
      except Exception as error:  # a partial or corrupted save: fall back to the previous one
        log.warning('checkpoint at step %d in %s cannot be restored (%s: %s); trying an older one',
                    step, self.latest.directory, type(error).__name__, run_dir.first_line(error))
        self.unreadable_steps.add(step)
        continue
      return restored['state'], step
    return None

  def wait(self) -> None:
    with files.writing('a checkpoint', self.directory):
      self.latest.wait_until_finished()
    with files.writing('the best checkpoint', self.best_directory):
      self.best.wait_until_finished()

  def settle(self) -> None:
    """Waits for saves still in flight and ignores their failures: on a run's error path, so that
    no background save reports from a half-shut interpreter after the run's one message."""
    for manager in (self.latest, self.best):
      with contextlib.suppress(Exception):
        manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()


def complete_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the finalised checkpoints in `workdir/checkpoints`, oldest first (an unfinished save
  is an `N.orbax-checkpoint-tmp` folder until renamed to `N`)."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())
