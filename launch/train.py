"""Trains one stage: `python -m launch.train --config=configs/three_center.py [--workdir=DIR]`."""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (FILE[:preset]).',
                                lock_config=True)
flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config>-<stage>-<preset>-test_<center>).')
flags.DEFINE_bool('overwrite', False, 'Resume into a workdir whose saved config differs from this one.')
flags.DEFINE_string('coordinator_address', '', 'Multi-host: host:port of process 0 (SLURM is auto-detected).')
flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.train import loop  # deferred so --help answers without importing jax
  from dualseg_jax.errors import ConfigError, DataError
  try:
    loop.main_from_flags(flags.FLAGS)
  except (ConfigError, DataError) as error:  # the message says what to do: no traceback
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
