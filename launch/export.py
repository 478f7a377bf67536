"""Exports a trained run as a model to share:
`python -m launch.export --workdir=RUN --out=MODEL_DIR`.

Writes MODEL_DIR/params.msgpack (the parameters of the best checkpoint, or --checkpoint=latest;
no optimizer state), config.json (the run's resolved config), model.json and model_card.md
(source run, step, data, preset, the held-out evaluation's means when the run has one). Predict
with `python -m launch.predict --model=MODEL_DIR --input=PATH --output=DIR`.
"""

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Training run directory (config.json, checkpoints/, best/).')
_OUT = flags.DEFINE_string('out', None, 'Folder for the exported model.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Which checkpoint: best (falls back to the latest when the run '
                                'has not validated) or latest.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a model already in --out.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  from dualseg_jax import files  # deferred: flag errors come before the jax import
  from dualseg_jax.inference import model_dir
  info = model_dir.export_model(_WORKDIR.value, _OUT.value, checkpoint=_CHECKPOINT.value,
                                overwrite=_OVERWRITE.value)
  print(f'exported {info["checkpoint"]} of {info["source_run"]} to {_OUT.value}: '
        f'{info["num_parameters"]:,} parameters, {files.format_bytes(info["params_bytes"])} '
        f'(the training checkpoint: {files.format_bytes(info["checkpoint_bytes"])})')
  print(f'model card: {_OUT.value}/{model_dir.CARD_FILE}')


if __name__ == '__main__':
  cli.run(main)
