"""Trains one stage: `python -m launch.train --config=three_center[:preset] [--workdir=DIR]`
(or `dualseg-train ...`); `--config` takes a config file or the name of an installed config."""

import sys

from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config>-<stage>-<preset>-test_<center>).')
flags.DEFINE_bool('allow_config_change', False, 'Resume the run in --workdir although its saved '
                  'config differs from this one (the refusal lists the differing keys).')
flags.DEFINE_bool('overwrite', False, 'Deprecated: the old name of --allow_config_change.')
flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0 (SLURM is auto-detected).')
flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.train import loop  # deferred so --help answers without importing jax
  if flags.FLAGS.overwrite:
    print('note: launch.train\'s --overwrite is now --allow_config_change (in the other commands '
          '--overwrite replaces outputs)', file=sys.stderr, flush=True)
  loop.main_from_flags(flags.FLAGS)


if __name__ == '__main__':
  cli.run(main)
