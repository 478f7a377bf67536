"""Builds the preprocessing cache once: `python -m launch.preprocess --config=configs/three_center.py`."""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (FILE[:preset]).',
                                lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.data import preprocess  # deferred so --help answers without heavy imports
  from dualseg_jax.errors import ConfigError, DataError
  try:
    preprocess.main_from_config(flags.FLAGS.config)
  except (ConfigError, DataError) as error:  # the message says what to do: no traceback
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
