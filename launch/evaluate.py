"""Scores predicted label maps against references:
`python -m launch.evaluate --pred=DIR --gt=DIR --out=DIR [--centers=MANIFEST] [--images=DIR]`.

Cases are matched by file name. Writes per_case.csv, summary.md, evaluation.png and, last,
summary.json, each whole or not at all. A prediction that cannot be read (e.g. truncated) is named
and no report is written. One process at a time writes into --out.
"""

import sys

from absl import app
from absl import flags

from dualseg_jax.errors import ConfigError, DataError

_PRED = flags.DEFINE_string('pred', None, 'Folder of predicted label maps (0/1/2).')
_GT = flags.DEFINE_string('gt', None, 'Folder of reference label maps with the same file names.')
_OUT = flags.DEFINE_string('out', None, 'Folder for the CSV, JSON, Markdown and PNG reports.')
_CENTERS = flags.DEFINE_string('centers', None, 'JSON/CSV manifest mapping case -> center.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of the CT volumes (same names) for overlays.')
_NSD_TOLERANCE = flags.DEFINE_float('nsd_tolerance_mm', 2.0, 'Normalised surface Dice tolerance.')
_GT_LABEL_MAP = flags.DEFINE_string('gt_label_map', None, "Map reference labels, e.g. '7:1'.")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a report already in --out.')
flags.mark_flags_as_required(['pred', 'gt', 'out'])


def main(argv):
  del argv
  from dualseg_jax.evaluation import report  # deferred: flag errors come before heavy imports
  try:
    summary = report.evaluate_folder(
        _PRED.value, _GT.value, _OUT.value, centers=_CENTERS.value, images_dir=_IMAGES.value,
        nsd_tolerance_mm=_NSD_TOLERANCE.value, gt_label_map=_GT_LABEL_MAP.value,
        overwrite=_OVERWRITE.value)
  except (DataError, ConfigError) as error:
    sys.exit(f'error: {error}')
  print(report.markdown_table(summary))


if __name__ == '__main__':
  app.run(main)
