"""Benchmarks that print one JSON line per measurement:
`python -m launch.bench --what=step|train|loader|targets|balance|views|inference|all [--config=FILE[:preset]] [--config.key=value]`.
"""

import json

from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', cli.resolve_config('three_center'), cli.CONFIG_HELP,
                                lock_config=True)
flags.DEFINE_enum('what', 'step', ['step', 'train', 'loader', 'targets', 'balance', 'views', 'inference', 'all'],
                  'What to measure: the bare train step, a training run against it (train), the '
                  'input pipeline, the SDF/mask target agreement on augmented patches (targets), '
                  'each loss term\'s gradient norm on the encoder (balance), the pancreas contrast '
                  'RandConv views keep (views), '
                  'whole-volume inference, or all.')
flags.DEFINE_integer('repeats', 10, 'Timed repetitions (after warm-up).')
flags.DEFINE_string('inference_shape', '', 'Volume (D,H,W) for --what=inference, e.g. 100,512,512.')
flags.DEFINE_integer('loader_batches', 20, 'Batches for --what=loader, targets, balance and views.')
flags.DEFINE_string('workdir', '', '--what=balance: a run whose latest checkpoint gives the '
                    'parameters (default: initialisation).')
flags.DEFINE_integer('step', 0, '--what=balance: the train step the ramps and anneals are read at.')
flags.DEFINE_integer('train_steps', 60, 'Steps of the training run for --what=train.')


def main(argv):
  del argv
  from dualseg_jax.tools import bench
  config = flags.FLAGS.config
  what = (['step', 'train', 'loader', 'targets', 'balance', 'views', 'inference'] if flags.FLAGS.what == 'all'
          else [flags.FLAGS.what])
  shape = tuple(int(n) for n in flags.FLAGS.inference_shape.split(',')) if flags.FLAGS.inference_shape else None
  for name in what:
    for row in bench.run(name, config, repeats=flags.FLAGS.repeats, inference_shape=shape,
                         loader_batches=flags.FLAGS.loader_batches,
                         train_steps=flags.FLAGS.train_steps, workdir=flags.FLAGS.workdir or None,
                         step=flags.FLAGS.step):
      print(json.dumps(row), flush=True)


if __name__ == '__main__':
  cli.run(main)
