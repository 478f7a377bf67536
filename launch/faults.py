"""Causes the operational faults on tiny real runs and shows what a user sees:
`python -m launch.faults --workdir=DIR [--parts=concurrent,disk,prediction]`.

concurrent: a run is started, then three more on its workdir while it trains (each must be
refused at once, naming the running one). disk: a run whose disk is too small, fills while the
cache is built, or fills after a checkpoint (each must end with one error line, and the same
command must finish once space is free; mounts small tmpfs filesystems, so it needs root).
prediction: a folder prediction SIGKILLed after its first case, then rerun with --resume (the
labels must equal an uninterrupted prediction). Crash safety of training itself is
`python -m launch.kill_resume`. Exits non-zero when anything was lost.
"""

import sys

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for the runs, logs and phantoms.')
_PARTS = flags.DEFINE_list('parts', ['concurrent', 'disk', 'prediction'],
                           'Which faults to cause: concurrent, disk, prediction.')
_DATA_ROOT = flags.DEFINE_string('data_root', '', 'Phantom folder (default: WORKDIR/phantoms).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  unknown = sorted(set(_PARTS.value) - {'concurrent', 'disk', 'prediction'})
  if unknown:
    raise cli.CommandLineError(f'--parts={",".join(_PARTS.value)}: {unknown} unknown; choose '
                               'among concurrent, disk, prediction')
  from dualseg_jax.tools import faults  # deferred so --help answers without importing jax
  results = faults.check_faults(_WORKDIR.value, data_root=_DATA_ROOT.value or None,
                                parts=tuple(_PARTS.value))
  for result in results:
    print(result.summary(), flush=True)
  if any(result.problems for result in results):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
