"""Segments CT with a trained run, exported models or a four-stage cascade:
`python -m launch.predict --workdir=RUN --input=PATH --output=DIR`,
`python -m launch.predict --model=MODEL_DIR[,MODEL_DIR...] --input=PATH --output=DIR`, or
`python -m launch.predict --cascade=SPEC --input=PATH --output=DIR`.

MODEL_DIR is a folder launch.export wrote (or a run directory); several are an ensemble: each
model predicts with its own flips, their probabilities are averaged, then the first model's
threshold and post-processing make the label map. `--override=inference.KEY=VALUE` (repeatable)
changes a prediction setting of every model, e.g. inference.overlap, inference.threshold,
inference.postprocess, inference.tta_flips, inference.windows_per_batch.

PATH is a NIfTI/NRRD file, a folder of them, or a DICOM series folder. Writes DIR/<case>.nii.gz
(uint8: 0 background, 1 pancreas, 2 tumour) in the input's geometry; with --save_probabilities
also <case>_probabilities.nii.gz and <case>_sdf.nii.gz. SPEC is the folder launch.cascade trained
in, or a JSON file naming the runs pancreas_coarse, pancreas_fine, tumour_coarse, tumour_fine
(paths relative to the file) with optional pancreas_margin_vox / tumour_margin_vox (z, y, x);
the cascade also writes DIR/<case>_notes.json (e.g. no pancreas found).

Each output is written whole or not at all; a prediction that was stopped or killed is finished by
the same command with --resume. One process at a time predicts into DIR.
"""

from absl import flags

from dualseg_jax.errors import ConfigError
from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Training run directory (config.json, checkpoints/).')
_CASCADE = flags.DEFINE_string('cascade', None,
                               'Cascade experiment folder (from launch.cascade) or cascade JSON '
                               'file naming the four stage runs; instead of --workdir.')
_MODEL = flags.DEFINE_list('model', None,
                           'Exported model folder(s) (launch.export) or run directories, comma '
                           'separated; several are averaged (ensemble); instead of --workdir.')
_OVERRIDE = flags.DEFINE_multi_string('override', [],
                                      'inference.KEY=VALUE, repeatable: a prediction setting '
                                      'instead of the model config\'s (not with --cascade).')
_INPUT = flags.DEFINE_string('input', None,
                             'NIfTI/NRRD file, folder of them, or DICOM series folder.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the predicted label maps.')
_TTA = flags.DEFINE_integer('tta', None, 'Test-time flip combinations, 1 (none) to 8; default: '
                            'the run config (inference.tta_flips).')
_SAVE_PROBABILITIES = flags.DEFINE_bool('save_probabilities', False,
                                        'Also write 4D float32 probabilities and SDF volumes '
                                        '(not with --cascade).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.')
_RESUME = flags.DEFINE_bool('resume', False,
                            'Predict only the cases whose outputs are not all in --output yet '
                            '(finishes an interrupted prediction; give the same run and flags).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', None, ['best', 'latest'],
                                'Which checkpoint; default: the run config (inference.checkpoint).')
flags.mark_flags_as_required(['input', 'output'])
flags.mark_flags_as_mutual_exclusive(['workdir', 'cascade', 'model'], required=True)


def main(argv):
  del argv
  from dualseg_jax.inference import run  # deferred: flag errors come before the jax import
  if _CASCADE.value is not None:
    if _SAVE_PROBABILITIES.value:
      raise ConfigError('--save_probabilities writes one run\'s outputs; the cascade combines '
                        'four runs: drop it, or predict with one stage via --workdir')
    if _OVERRIDE.value:
      raise ConfigError('--override changes the settings of one model or an ensemble; the '
                        'cascade\'s four stages keep their own: drop --override, or predict '
                        'with one stage via --model')
    written = run.predict_with_cascade(
        _CASCADE.value, _INPUT.value, _OUTPUT.value, tta_flips=_TTA.value,
        overwrite=_OVERWRITE.value, checkpoint=_CHECKPOINT.value, resume=_RESUME.value)
  else:
    written = run.predict_with_models(
        _MODEL.value or [_WORKDIR.value], _INPUT.value, _OUTPUT.value, tta_flips=_TTA.value,
        save_probabilities=_SAVE_PROBABILITIES.value, overwrite=_OVERWRITE.value,
        checkpoint=_CHECKPOINT.value, resume=_RESUME.value,
        inference_overrides=_OVERRIDE.value)
  for paths in written:
    print(paths['label'])


if __name__ == '__main__':
  cli.run(main)
