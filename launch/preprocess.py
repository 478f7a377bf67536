"""Builds the preprocessing cache once: `python -m launch.preprocess --config=configs/three_center.py`."""

from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.data import preprocess  # deferred so --help answers without heavy imports
  preprocess.main_from_config(flags.FLAGS.config)


if __name__ == '__main__':
  cli.run(main)
