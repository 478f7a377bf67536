"""Segments CT with a trained run:
`python -m launch.predict --workdir=RUN --input=PATH --output=DIR`.

PATH is a NIfTI/NRRD file, a folder of them, or a DICOM series folder. Writes DIR/<case>.nii.gz
(uint8: 0 background, 1 pancreas, 2 tumour) in the input's geometry; with --save_probabilities
also <case>_probabilities.nii.gz and <case>_sdf.nii.gz.
"""

import sys

from absl import app
from absl import flags

from dualseg_jax.errors import ConfigError, DataError

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Training run directory (config.json, checkpoints/).')
_INPUT = flags.DEFINE_string('input', None,
                             'NIfTI/NRRD file, folder of them, or DICOM series folder.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the predicted label maps.')
_TTA = flags.DEFINE_integer('tta', None, 'Test-time flip combinations, 1 (none) to 8; default: '
                            'the run config (inference.tta_flips).')
_SAVE_PROBABILITIES = flags.DEFINE_bool('save_probabilities', False,
                                        'Also write 4D float32 probabilities and SDF volumes.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', None, ['best', 'latest'],
                                'Which checkpoint; default: the run config (inference.checkpoint).')
flags.mark_flags_as_required(['workdir', 'input', 'output'])


def main(argv):
  del argv
  from dualseg_jax.inference import run  # deferred: flag errors come before the jax import
  try:
    written = run.predict_with_run(
        _WORKDIR.value, _INPUT.value, _OUTPUT.value, tta_flips=_TTA.value,
        save_probabilities=_SAVE_PROBABILITIES.value, overwrite=_OVERWRITE.value,
        checkpoint=_CHECKPOINT.value)
  except (DataError, ConfigError) as error:
    sys.exit(f'error: {error}')
  for paths in written:
    print(paths['label'])


if __name__ == '__main__':
  app.run(main)
