"""Checkpoints on a tiny state: CRC32 checksums against zlib, a checkpoint whose array files changed
after the save refused by its checksums, restoring falling back to the previous step when the
newest is damaged, and the parameters-only restore that inference uses."""

import pathlib
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dualseg_jax import run_dir
from dualseg_jax.errors import DataError
from dualseg_jax.train import checkpoint as checkpoint_lib


def _state(value: float) -> dict:
  """A TrainState-shaped tree whose every array is filled from `value`."""
  return {
      'step': jnp.asarray(int(value), jnp.int32),
      'params': {'conv': {'kernel': jnp.full((3, 3, 3, 1, 2), value, jnp.float32)},
                 'head': {'bias': jnp.arange(2, dtype=jnp.float32) + value}},
      'opt_state': {'mu': jnp.full((4,), -value, jnp.float32)},
  }


def _save(workdir: pathlib.Path, states: dict[int, float], best: int | None = None) -> None:
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=len(states))
  for step, value in states.items():
    assert checkpointer.save(step, _state(value), force=True)
    if step == best:
      checkpointer.save_best(step, _state(value))
  checkpointer.close()


def _assert_tree_equal(got, expected) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for have, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def _replace_state_files(workdir: pathlib.Path, step: int, donor: pathlib.Path) -> None:
  """The state item of `workdir`'s checkpoint `step` becomes `donor`'s: valid array files holding
  other values, as a bad disk or a partial copy leaves them, beside the original checksums."""
  target = workdir / 'checkpoints' / str(step) / 'state'
  shutil.rmtree(target)
  shutil.copytree(donor / 'checkpoints' / str(step) / 'state', target)


def test_checksums_are_the_crc32_of_each_arrays_bytes_keyed_by_its_path():
  state = _state(1.5)
  expected = {
      'step': np.int32(1).tobytes(),
      'params/conv/kernel': np.full((3, 3, 3, 1, 2), 1.5, np.float32).tobytes(),
      'params/head/bias': np.array([1.5, 2.5], np.float32).tobytes(),
      'opt_state/mu': np.full((4,), -1.5, np.float32).tobytes(),
  }
  assert run_dir.state_checksums(state) == {
      name: f'{zlib.crc32(data):08x}' for name, data in expected.items()}
  assert run_dir.state_checksums(_state(2.5)) != run_dir.state_checksums(state)


def test_checksums_refuse_a_checkpoint_whose_array_files_changed_after_the_save(tmp_path):
  _save(tmp_path / 'run', {1: 1.0})
  _save(tmp_path / 'other', {1: 7.0})
  _replace_state_files(tmp_path / 'run', 1, tmp_path / 'other')
  manager = ocp.CheckpointManager(
      (tmp_path / 'run' / 'checkpoints').absolute(), item_names=('state', 'checksums'),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'checksums': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(0.0))
  restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  _assert_tree_equal(restored['state'], _state(7.0))  # the files read back without an error
  with pytest.raises(run_dir.CorruptCheckpointError, match=r'4 array\(s\) differ') as raised:
    run_dir.check_checksums(manager, 1, restored['state'])
  assert 'params/conv/kernel' in str(raised.value) and 'opt_state/mu' in str(raised.value)


@pytest.mark.parametrize('damage', ['changed files', 'missing files'])
def test_restore_falls_back_to_the_previous_step_when_the_newest_is_damaged(tmp_path, damage):
  workdir = tmp_path / 'run'
  _save(workdir, {1: 1.0, 2: 2.0})
  if damage == 'changed files':
    _save(tmp_path / 'other', {1: 5.0, 2: 5.0})
    _replace_state_files(workdir, 2, tmp_path / 'other')
  else:
    shutil.rmtree(workdir / 'checkpoints' / '2' / 'state')

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=2)
  state, step = checkpointer.restore(_state(0.0))
  assert step == 1
  _assert_tree_equal(state, _state(1.0))
  assert checkpointer.unreadable_steps == {2}  # the next save of step 2 replaces it
  checkpointer.close()
  params, params_step = run_dir.restore_params(workdir, 'latest')
  assert params_step == 1
  _assert_tree_equal(params, _state(1.0)['params'])


def test_restore_without_a_checkpoint_returns_none(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / 'run')
  assert checkpointer.restore(_state(0.0)) is None
  checkpointer.close()


def test_parameters_only_restore_returns_the_params_tree_of_the_best_or_latest(tmp_path):
  workdir = tmp_path / 'run'
  _save(workdir, {1: 1.0, 2: 2.0}, best=1)
  params, step = run_dir.restore_params(workdir, 'best')
  assert step == 1
  _assert_tree_equal(params, _state(1.0)['params'])  # the parameters alone: no step, no optimiser
  # On this process's first device, however many devices saved them.
  assert all(leaf.sharding.device_set == {jax.local_devices()[0]}
             for leaf in jax.tree.leaves(params))
  params, step = run_dir.restore_params(workdir, 'latest')
  assert step == 2
  _assert_tree_equal(params, _state(2.0)['params'])


def test_parameters_only_restore_falls_back_to_the_latest_without_a_best_and_names_the_folders(
    tmp_path):
  workdir = tmp_path / 'run'
  _save(workdir, {3: 3.0})
  params, step = run_dir.restore_params(workdir, 'best')
  assert step == 3
  _assert_tree_equal(params, _state(3.0)['params'])
  with pytest.raises(DataError, match='no readable checkpoint under .*empty/best or .*empty/checkpoints'):
    run_dir.restore_params(tmp_path / 'empty', 'best')
