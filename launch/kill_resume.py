"""SIGKILLs a tiny training run at random moments, resumes it each time, and compares it with an
uninterrupted run: `python -m launch.kill_resume --kills=8 --seed=0 --workdir=DIR`.

Prints each kill's moment and the number survived; exits non-zero on any mismatch.
"""

import sys

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for both runs, their logs and the phantoms.')
_KILLS = flags.DEFINE_integer('kills', 8, 'SIGKILLs delivered to the run.')
_SEED = flags.DEFINE_integer('seed', 0, 'Draws the kill moments.')
_STEPS = flags.DEFINE_integer('steps', 12, 'Training steps (one checkpoint per step).')
_DATA_ROOT = flags.DEFINE_string('data_root', '', 'Phantom folder (default: WORKDIR/phantoms).')
_CACHE = flags.DEFINE_string('compilation_cache', '', 'XLA cache shared by the runs '
                             '(default: WORKDIR/xla_cache).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  from dualseg_jax.tools import kill_resume  # deferred so --help answers without importing jax
  report = kill_resume.check_kill_resume(
      _WORKDIR.value, kills=_KILLS.value, seed=_SEED.value, steps=_STEPS.value,
      data_root=_DATA_ROOT.value or None, compilation_cache_dir=_CACHE.value or None)
  print(report.summary(), flush=True)
  if report.mismatches:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
