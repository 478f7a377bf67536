"""Builds the preprocessing cache once: `python -m launch.preprocess --config=configs/three_center.py`."""

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (FILE[:preset]).',
                                lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.data import preprocess  # deferred so --help answers without heavy imports
  preprocess.main_from_config(flags.FLAGS.config)


if __name__ == '__main__':
  app.run(main)
