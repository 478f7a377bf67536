"""Orbax checkpoints of the whole training state and the data iterator: the latest K and the best.

`workdir/checkpoints/` keeps the last `train.keep_checkpoints` saves (item `state`: the TrainState;
item `data`: the Grain iterator; item `checksums`: a CRC32 per state array, since Orbax keeps
none of array values). `workdir/best/` keeps the one with the best validation Dice. A latest
checkpoint that cannot be read, or whose arrays no longer match their checksums, is reported and
the one before it is used.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import zlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from dualseg_jax import files

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
  """A checkpoint that restores without error but whose arrays differ from what was saved."""


def state_checksums(state) -> dict[str, str]:
  """A CRC32 of every array's bytes, keyed by its path in the tree: found after a restore,
  a difference means the files changed after the save (a bad disk, a partial copy)."""
  checksums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    # Replicated arrays: the first local copy holds the whole value, on every host.
    value = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    checksums[_path_name(path)] = f'{zlib.crc32(np.ascontiguousarray(value).tobytes()):08x}'
  return checksums


def _path_name(path) -> str:
  # Restored without a template, dataclasses and tuples come back as dicts: name every level alike.
  parts = []
  for entry in path:
    for attribute in ('name', 'key', 'idx'):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def _check_checksums(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Raises CorruptCheckpointError naming the arrays whose bytes changed since the save."""
  if not (pathlib.Path(manager.directory) / str(step) / 'checksums').exists():
    return  # saved before checksums were written
  saved = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))['checksums']
  changed = sorted(name for name, value in state_checksums(state).items() if saved.get(name) != value)
  if changed:
    raise CorruptCheckpointError(f'{len(changed)} array(s) differ from their checksum at save time: '
                                 + ', '.join(changed[:5]) + (' ...' if len(changed) > 5 else ''))


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
        _check_checksums(self.latest, step, restored['state'])
      except Exception as error:  # a partial or corrupted save: fall back to the previous one
        log.warning('checkpoint at step %d in %s cannot be restored (%s: %s); trying an older one',
                    step, self.latest.directory, type(error).__name__, _first_line(error))
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


def bytes_on_disk(folder: pathlib.Path) -> int:
  """Bytes of the files under `folder` (0 when it does not exist)."""
  return sum(path.stat().st_size for path in pathlib.Path(folder).rglob('*') if path.is_file())


def _first_line(error: Exception, limit: int = 300) -> str:
  """TensorStore errors carry a page-long spec: the first line says what is wrong."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  return text if len(text) <= limit else text[:limit] + '...'


def _on_this_device(manager: ocp.CheckpointManager, step: int):
  """A restore target for the saved state on this process's first device, whatever the number
  of devices that saved it (a run trained on 8 GPUs is predicted with on one)."""
  from absl import logging as absl_logging
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # it names every item it is not asked for
  try:
    metadata = manager.item_metadata(step)['state']
    metadata = getattr(metadata, 'tree', metadata)
  finally:
    absl_logging.set_verbosity(verbosity)
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                      metadata, is_leaf=lambda leaf: hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'))


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
    manager = ocp.CheckpointManager(directory.absolute(), item_names=('state', 'checksums'),
                                    item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                   'checksums': ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_on_this_device(manager, step))))
        _check_checksums(manager, step, restored['state'])
      except Exception as error:
        log.warning('checkpoint %s/%d cannot be restored (%s); trying an older one', folder, step,
                    _first_line(error))
        continue
      return restored['state']['params'], step
  from dualseg_jax.errors import DataError
  raise DataError(f'no readable checkpoint under {workdir}/best or {workdir}/checkpoints: '
                  'train first (python -m launch.train --workdir=...) or point --workdir at a run')
