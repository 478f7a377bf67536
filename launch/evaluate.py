"""Scores predicted label maps against references:
`python -m launch.evaluate --pred=DIR --gt=DIR --out=DIR [--centers=MANIFEST] [--images=DIR]`.

Cases are matched by file name. Writes per_case.csv, summary.md, evaluation.png and, last,
summary.json, each whole or not at all. Every case that can be scored is; a case that cannot (no
prediction, an unreadable file, labels outside 0/1/2 or --gt_label_map, another voxel grid) is
listed in the report, and the command then names every such case and reason and exits with an
error. A missed structure's HD95/ASSD is the image diagonal (summary.md states the conventions).
One process at a time writes into --out.
"""

from absl import flags

from launch import cli

_PRED = flags.DEFINE_string('pred', None, 'Folder of predicted label maps (0/1/2).')
_GT = flags.DEFINE_string('gt', None, 'Folder of reference label maps with the same file names.')
_OUT = flags.DEFINE_string('out', None, 'Folder for the CSV, JSON, Markdown and PNG reports.')
_CENTERS = flags.DEFINE_string('centers', None, 'JSON/CSV manifest mapping case -> center.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of the CT volumes (same names) for overlays.')
_NSD_TOLERANCE = flags.DEFINE_float('nsd_tolerance_mm', 2.0, 'Normalised surface Dice tolerance.')
_GT_LABEL_MAP = flags.DEFINE_string(
    'gt_label_map', None, "Map reference label values SOURCE:TARGET[,...] to 0/1/2, e.g. '7:1'; "
    'values not listed become background.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a report already in --out.')
flags.mark_flags_as_required(['pred', 'gt', 'out'])


def main(argv):
  del argv
  from dualseg_jax.evaluation import report  # deferred: flag errors come before heavy imports
  try:
    summary = report.evaluate_folder(
        _PRED.value, _GT.value, _OUT.value, centers=_CENTERS.value, images_dir=_IMAGES.value,
        nsd_tolerance_mm=_NSD_TOLERANCE.value, gt_label_map=_GT_LABEL_MAP.value,
        overwrite=_OVERWRITE.value, label_map_setting='--gt_label_map')
  except report.CasesSkipped as skipped:
    print(report.markdown_table(skipped.summary))  # the scored cases; the error names the rest
    raise
  print(report.markdown_table(summary))


if __name__ == '__main__':
  cli.run(main)
