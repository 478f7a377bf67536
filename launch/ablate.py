"""Runs an ablation and writes its table:
`python -m launch.ablate --config=configs/three_center.py[:preset] --ablation=paper [--workdir=DIR]
[--seeds=2022,2023] [--test_centers=center_a,center_c] [--shard=I/N] [--dry_run]`.

Each variant trains in DIR/<variant>[_seed<s>]; rerunning resumes and skips finished runs. Writes
DIR/ablation.md, ablation.csv and ablation.json. `--shard=I/N` trains every N-th run from the I-th
(N processes share one ablation); the same command without --shard then writes the tables.
"""

import logging
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import cli

config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
_ABLATION = flags.DEFINE_string('ablation', 'paper', 'Name in dualseg_jax/experiments/ablation.py::ABLATIONS.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Experiment folder (default: runs/ablation-<name>-<config>-<preset>).')
_SEEDS = flags.DEFINE_list('seeds', [], 'Seeds every variant is trained with (default: config.seed).')
_TEST_CENTERS = flags.DEFINE_list('test_centers', [], 'Held-out centers (default: config.data.test_center).')
_SHARD = flags.DEFINE_string('shard', '', 'I/N: train only runs I, I+N, I+2N, ... and write no '
                             'table (run the command again without it for the tables).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs and their overrides, then exit.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from dualseg_jax.experiments import runs
  from dualseg_jax.experiments import ablation  # deferred so --help answers without importing jax
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  config = flags.FLAGS.config
  try:
    seeds = [int(seed) for seed in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f'--seeds={",".join(_SEEDS.value)}: give integers, e.g. --seeds=2022,2023')
  try:
    print(ablation.describe(config, _ABLATION.value, seeds, _TEST_CENTERS.value), flush=True)
    if _DRY_RUN.value:
      return
    workdir = _WORKDIR.value or (pathlib.Path('runs') /
                                 f'ablation-{_ABLATION.value}-{cli.config_name()}-{config.preset}')
    shard = None
    if _SHARD.value:
      try:
        shard = tuple(int(part) for part in _SHARD.value.split('/'))
        assert len(shard) == 2
      except (ValueError, AssertionError):
        raise app.UsageError(f'--shard={_SHARD.value}: give I/N, e.g. --shard=0/2')
    table = ablation.run_ablation(config, workdir, _ABLATION.value, seeds, _TEST_CENTERS.value,
                                  shard=shard)
  except runs.ExperimentInterrupted as error:
    sys.exit(str(error))
  if table is None:
    print(f'shard {_SHARD.value} finished; run the command again without --shard for the tables',
          flush=True)
    return
  print((pathlib.Path(workdir) / 'ablation.md').read_text(), flush=True)
  print(f'tables: {workdir}/ablation.md, ablation.csv, ablation.json', flush=True)


if __name__ == '__main__':
  cli.run(main)
