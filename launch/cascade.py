"""Trains the four cascade stages in order, then predicts and scores the held-out cases with the
whole cascade: `python -m launch.cascade --config=configs/three_center.py[:preset] [--workdir=DIR]`.

Each stage trains `experiments.cascade_epochs` epochs over the training cases (the paper preset:
150 for the pancreas stages, 800 for the tumour stages, as the reference), or `train.steps` when
they are `()` (the CPU presets). Stages train in DIR/<stage> (rerunning resumes and skips finished
stages) and DIR/cascade.json
names them with the margins, so `python -m launch.predict --cascade=DIR` segments new CT with the
cascade; the cascade's evaluation lands in DIR/evaluation/ (predictions/, notes.json,
summary.json, summary.md).
"""

import logging
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Experiment folder (default: runs/cascade-<config>-<preset>).')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.experiments import runs
  from dualseg_jax.experiments import cascade  # deferred so --help answers without importing jax
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  config = flags.FLAGS.config
  workdir = pathlib.Path(_WORKDIR.value or
                         pathlib.Path('runs') / f'cascade-{cli.config_name()}-{config.preset}')
  try:
    stage_dirs = cascade.train_stages(config, workdir)
    summary = cascade.evaluate(config, workdir, stage_dirs)
  except runs.ExperimentInterrupted as error:
    sys.exit(str(error))
  if summary is not None:
    print((workdir / 'evaluation' / 'summary.md').read_text(), flush=True)


if __name__ == '__main__':
  cli.run(main)
