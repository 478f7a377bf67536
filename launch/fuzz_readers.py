"""Fuzzes the volume readers with damaged NIfTI, NRRD and DICOM inputs:
`python -m launch.fuzz_readers --cases=5000 --seed=0 [--formats=nifti,dicom]`.

Prints, per format, the cases tried, DataErrors, accepted volumes and any other outcome with its
exception type; exits non-zero when any outcome was unclear (see
dualseg_jax/tools/fuzz_readers.py).
"""

import sys

from absl import flags

from launch import cli

_CASES = flags.DEFINE_integer('cases', 5000, 'Damaged inputs per format.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the mutations; a case is replayable from it.')
_FORMATS = flags.DEFINE_list('formats', ['nifti', 'nifti_gz', 'nrrd', 'dicom'],
                             'Formats to fuzz, among nifti, nifti_gz, nrrd, dicom.')


def main(argv):
  del argv
  from dualseg_jax.tools import fuzz_readers  # deferred: flag errors come before heavy imports
  report = fuzz_readers.fuzz_readers(_CASES.value, seed=_SEED.value, formats=tuple(_FORMATS.value))
  print(fuzz_readers.format_report(report))
  if report['unclear']:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
