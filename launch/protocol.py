"""Runs the evaluation protocol and writes one report:
`python -m launch.protocol --config=configs/three_center.py[:preset] [--workdir=DIR] [--folds=0,1]
[--noleave_one_out] [--dry_run]`.

Leave-one-center-out for every center of data.centers (DIR/test_<center>) and in-domain folds
(DIR/fold<k>); rerunning resumes and skips finished runs. Writes DIR/protocol.md, protocol.csv,
protocol.json and protocol.png.
"""

import logging
import pathlib
import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Experiment folder (default: runs/protocol-<config>-<preset>).')
_FOLDS = flags.DEFINE_list('folds', None, 'In-domain folds to run (default: all data.num_folds; '
                           '"none" for none).')
_LEAVE_ONE_OUT = flags.DEFINE_bool('leave_one_out', True, 'Hold out each center in turn.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs and their overrides, then exit.')
flags.mark_flags_as_required(['config'])


def _train_command() -> str:
  """The launch.train command that repeats one run with this command's config flags as typed."""
  arguments = [a for a in sys.argv[1:] if a.startswith('--config')]
  return ' '.join(['python -m launch.train'] + [shlex.quote(a) for a in arguments])


def main(argv):
  del argv
  from dualseg_jax.experiments import runs
  from dualseg_jax.experiments import protocol  # deferred so --help answers without importing jax
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  config = flags.FLAGS.config
  folds = None
  if _FOLDS.value is not None:
    try:
      folds = [] if _FOLDS.value == ['none'] else [int(fold) for fold in _FOLDS.value]
    except ValueError:
      raise app.UsageError(f'--folds={",".join(_FOLDS.value)}: give integers, e.g. --folds=0,1')
  command = _train_command()
  try:
    specs = protocol.plan(config, folds, _LEAVE_ONE_OUT.value)
    print(protocol.describe(config, specs), flush=True)
    if _DRY_RUN.value:
      return
    workdir = pathlib.Path(_WORKDIR.value or
                           pathlib.Path('runs') / f'protocol-{cli.config_name()}-{config.preset}')
    protocol.run_protocol(config, workdir, folds, _LEAVE_ONE_OUT.value, base_command=command)
  except runs.ExperimentInterrupted as error:
    sys.exit(str(error))
  print((workdir / 'protocol.md').read_text(), flush=True)
  print(f'report: {workdir}/protocol.md, protocol.csv, protocol.json, protocol.png', flush=True)


if __name__ == '__main__':
  cli.run(main)
