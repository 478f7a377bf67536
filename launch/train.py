"""Trains one stage: `python -m launch.train --config=three_center[:preset] [--workdir=DIR]`
(or `dualseg-train ...`); `--config` takes a config file or the name of an installed config."""

import logging
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
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from absl import logging as absl_logging
  from dualseg_jax import presets  # deferred so --help answers without importing jax
  from dualseg_jax.train import loop
  from dualseg_jax.train import parallel
  if FLAGS.overwrite:
    print('note: launch.train\'s --overwrite is now --allow_config_change (in the other commands '
          '--overwrite replaces outputs)', file=sys.stderr, flush=True)
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain narrate every save at INFO
  loop.quiet_refused_write_reports()
  log = logging.getLogger('dualseg_jax')
  log.setLevel(logging.INFO)
  parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  config, config_file = FLAGS.config, config_flags.get_config_filename(FLAGS['config'])
  why = f'named in --config={config_file}' if ':' in config_file else presets.resolve(None)[1]
  log.info('preset %s (%s)', config.preset, why)
  workdir = FLAGS.workdir or loop.default_workdir(config, cli.config_name())
  result = loop.train_and_evaluate(config, workdir,
                                   allow_config_change=FLAGS.allow_config_change or FLAGS.overwrite)
  loop.print_summary(result)


if __name__ == '__main__':
  cli.run(main)
