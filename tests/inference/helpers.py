"""Run directories for inference tests, written the way the training loop writes them."""

import pathlib

import ml_collections
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
