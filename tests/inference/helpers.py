"""Run directories for inference tests, written the way the training loop writes them."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def save_params_for_test(workdir, config: ml_collections.ConfigDict, params, step: int = 1):
  """Writes workdir/config.json and a CheckpointManager checkpoint whose item 'state' holds
  {'step', 'params'} under workdir/checkpoints, so inference tests need no training."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  manager = ocp.CheckpointManager((workdir / 'checkpoints').absolute(), item_names=('state',))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'step': step, 'params': params})))
  manager.wait_until_finished()
  manager.close()
  return workdir


def random_params(config: ml_collections.ConfigDict, seed: int = 0):
  """Normal(0, 0.2) parameters of the shapes config.model needs, drawn with NumPy: compiling the
  real initialiser costs seconds on CPU."""
  from dualseg_jax.models import build_model
  model = build_model(config.model)
  windows = jnp.zeros((1,) + tuple(config.data.patch_size) + (1,))
  shapes = jax.eval_shape(lambda key: model.init(key, windows, train=False), jax.random.key(0))
  leaves, structure = jax.tree.flatten(shapes['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      structure, [rng.normal(0.0, 0.2, leaf.shape).astype(np.float32) for leaf in leaves])
