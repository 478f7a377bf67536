"""Chooses the post-processing rule of a finished run on its validation cases:
`python -m launch.postprocess_study --workdir=RUN [--split=val,test]
[--rules=none,largest,fraction,min_volume,largest_probability_mass] [--tta=N] [--checkpoint=best]
[--head=segmentation|sdf]`.

Each case is predicted once and every rule applied to the same probabilities; validation Dice
picks the rule, test Dice (--split=val,test) is only reported. Each rule's far false-positive
volume is reported beside its Dice. Writes RUN/postprocess_study.json and RUN/postprocess_study.md
(with --head=sdf, the SDF head's sign read in place of the segmentation head's probabilities:
RUN/postprocess_study_sdf.json and .md).
"""

import pathlib

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory (config.json, checkpoints/).')
_SPLIT = flags.DEFINE_list('split', ['val'], 'val, or val,test to also report the held-out center.')
_RULES = flags.DEFINE_list('rules', None, 'Rules to compare (default: every inference.postprocess '
                           'rule).')
_TTA = flags.DEFINE_integer('tta', None, 'Test-time flip combinations, 1 (none) to 8; default: '
                            'the run config (inference.tta_flips).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', None, ['best', 'latest'],
                                'Which checkpoint; default: the run config (inference.checkpoint).')
_HEAD = flags.DEFINE_enum('head', 'segmentation', ['segmentation', 'sdf'],
                          'Output the rules read: the segmentation head\'s probabilities, or the '
                          'SDF head\'s sign (a measurement; launch.predict reads the segmentation '
                          'head).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  import logging
  from dualseg_jax.experiments import postprocess_study  # deferred: --help answers without jax
  from dualseg_jax.inference import postprocess
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  report = postprocess_study.run_study(_WORKDIR.value, splits=_SPLIT.value,
                                       rules=_RULES.value or postprocess.COMPONENT_RULES,
                                       tta_flips=_TTA.value, checkpoint=_CHECKPOINT.value,
                                       head=_HEAD.value)
  markdown_name = postprocess_study.report_names(_HEAD.value)[1]
  print(pathlib.Path(report['workdir'], markdown_name).read_text(), flush=True)


if __name__ == '__main__':
  cli.run(main)
