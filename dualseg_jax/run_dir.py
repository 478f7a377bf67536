"""A training run's folder as its readers see it: the resolved config (config.json), the
parameters of its best or latest checkpoint, and the per-array checksums that vouch for them.
Training writes the folder (train/checkpoint.py); prediction, export and evaluation read it
from here, without the training code.

Layout: config.json; checkpoints/<step>/ (the latest few, item `state` the TrainState, item
`checksums` a CRC32 per state array); best/<step>/ (the one with the best validation Dice).
"""

from __future__ import annotations

import json
import logging
import pathlib
import zlib
from typing import Any

from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dualseg_jax import config_base
from dualseg_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'


class CorruptCheckpointError(ValueError):
  """A checkpoint that restores without error but whose arrays differ from what was saved."""


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run (or an exported model) wrote to workdir/config.json, on top of
  today's defaults."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise DataError(f'{path} does not exist: --workdir must be a training run directory '
                    '(it holds config.json and checkpoints/) or an exported model (launch.export)')
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(
        f'{path} is not readable JSON ({error}); rewrite it or use another run') from error
  try:
    # A key the run predates holds what the run computed, not today's default.
    return config_base.load_saved(saved)
  except TypeError as error:
    raise ConfigError(f'{path}: a value has the wrong type for its key ({error})') from error


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


def check_checksums(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Raises CorruptCheckpointError naming the arrays whose bytes changed since the save."""
  if not (pathlib.Path(manager.directory) / str(step) / 'checksums').exists():
    return  # saved before checksums were written
  saved = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))['checksums']
  changed = sorted(name for name, value in state_checksums(state).items() if saved.get(name) != value)
  if changed:
    raise CorruptCheckpointError(f'{len(changed)} array(s) differ from their checksum at save time: '
                                 + ', '.join(changed[:5]) + (' ...' if len(changed) > 5 else ''))


def first_line(error: Exception, limit: int = 300) -> str:
  """TensorStore errors carry a page-long spec: the first line says what is wrong."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  return text if len(text) <= limit else text[:limit] + '...'


def bytes_on_disk(folder: pathlib.Path) -> int:
  """Bytes of the files under `folder` (0 when it does not exist)."""
  return sum(path.stat().st_size for path in pathlib.Path(folder).rglob('*') if path.is_file())


def _on_this_device(manager: ocp.CheckpointManager, step: int):
  """A restore target for the saved state on this process's first device, whatever the number
  of devices that saved it (a run trained on 8 GPUs is predicted with on one)."""
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


def restore_params(workdir: str | pathlib.Path, which: str = 'best') -> tuple[Any, int]:
  """(parameters, step) of a finished or running training run, for inference: the newest
  checkpoint that restores and matches its checksums.

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
        check_checksums(manager, step, restored['state'])
      except Exception as error:
        log.warning('checkpoint %s/%d cannot be restored (%s); trying an older one', folder, step,
                    first_line(error))
        continue
      return restored['state']['params'], step
  raise DataError(f'no readable checkpoint under {workdir}/best or {workdir}/checkpoints: '
                  'train first (python -m launch.train --workdir=...) or point --workdir at a run')
