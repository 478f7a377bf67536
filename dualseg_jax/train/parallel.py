"""Data parallelism: one device mesh with a `data` axis, multi-host start-up, host->device batches."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dualseg_jax.errors import ConfigError

DATA_AXIS = 'data'


def maybe_initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> bool:
  """Joins a multi-host run when one is configured (explicit flags or SLURM); returns whether it did."""
  explicit = bool(coordinator_address)
  on_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not (explicit or on_slurm):
    return False
  if explicit:
    if num_processes < 1 or process_id < 0:
      raise ConfigError(
          '--coordinator_address needs --num_processes (>= 1) and --process_id (0..num_processes-1)')
    # Only CPU clients read this (GPUs use NCCL); asking for the backend here would start it
    # before initialize(), which must come first.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()  # SLURM is auto-detected
  return True


def make_mesh() -> jax.sharding.Mesh:
  """All devices of all hosts on one `data` axis (Auto axis type: Linen dropout needs it)."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch: int, mesh) -> int:
  """Returns the per-process batch; a batch the devices cannot share raises a ConfigError."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ConfigError(
        f'data.batch_size={global_batch} must be divisible by the number of devices ({devices}); '
        f'use a multiple of {devices}, e.g. --config.data.batch_size={devices * max(1, global_batch // devices)}')
  return global_batch // jax.process_count()


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """This process's NumPy batch -> global device arrays sharded along the batch axis."""
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def replicate(tree, mesh):
  return jax.device_put(tree, replicated_sharding(mesh))
