"""The evaluation figure: per-center box plots of Dice, and axial overlays of the best, median
and worst case by mean Dice (reference and predicted contours, over the CT when available).
"""

from __future__ import annotations

import logging
import pathlib

import matplotlib

matplotlib.use('Agg')  # files only; no display on training machines
import matplotlib.lines as mlines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dualseg_jax.data import io  # noqa: E402
from dualseg_jax.errors import DataError  # noqa: E402
from dualseg_jax.evaluation import metrics as metrics_lib  # noqa: E402

log = logging.getLogger(__name__)

STRUCTURE_COLOURS = {'pancreas': 'tab:green', 'tumour': 'tab:orange'}
DISPLAY_WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window
_VOLUME_SUFFIXES = io.NIFTI_SUFFIXES + io.NRRD_SUFFIXES


def _dice_box_plots(axis, rows: list[dict], structure: str) -> None:
  centers = sorted({row['center'] for row in rows})
  groups = [[row['dice'] for row in rows if row['structure'] == structure and row['center'] == c]
            for c in centers]
  if len(centers) > 1:
    centers = ['all'] + centers
    groups = [[value for group in groups for value in group]] + groups
  axis.boxplot(groups, showmeans=True)
  axis.set_xticks(range(1, len(centers) + 1), centers)
  for position, group in enumerate(groups, start=1):
    jitter = np.linspace(-0.08, 0.08, len(group)) if len(group) > 1 else np.zeros(1)
    axis.scatter(position + jitter, group, s=10, color=STRUCTURE_COLOURS[structure], zorder=3)
  axis.set_ylim(-0.05, 1.05)
  axis.set_ylabel('Dice')
  axis.set_title(f'{structure} Dice per center')
  axis.grid(axis='y', alpha=0.3)


def _ranked_cases(rows: list[dict]) -> list[tuple[str, str]]:
  """(title, case) for the best, median and worst case by Dice averaged over the structures."""
  dice = {}
  for row in rows:
    dice.setdefault(row['case'], {})[row['structure']] = row['dice']
  scored = sorted(((np.mean(list(values.values())), case) for case, values in dice.items()),
                  reverse=True)
  picks = [('best', scored[0][1]), ('median', scored[len(scored) // 2][1]),
           ('worst', scored[-1][1])]
  titles = []
  for title, case in picks:
    scores = ', '.join(f'{structure} {value:.3f}' for structure, value in dice[case].items())
    titles.append((f'{title}: {case}\nDice {scores}', case))
  return titles


def _display_slice(reference, prediction) -> int:
  """The axial slice showing most reference tumour, else most pancreas (reference, then
  prediction); the middle one among equals."""
  for label_volume in (reference, prediction):
    for structure in ('tumour', 'pancreas'):
      areas = metrics_lib.STRUCTURES[structure](label_volume.array).sum(axis=(1, 2))
      if areas.any():
        best = np.flatnonzero(areas == areas.max())
        return int(best[len(best) // 2])
  return reference.array.shape[0] // 2


def _find_image(images_dir: pathlib.Path | None, case: str) -> pathlib.Path | None:
  if images_dir is None:
    return None
  for suffix in _VOLUME_SUFFIXES:
    candidate = images_dir / f'{case}{suffix}'
    if candidate.exists():
      return candidate
  log.warning('no image for case %s in %s; drawing its labels only', case, images_dir)
  return None


def _radiological(axial_slice: np.ndarray) -> np.ndarray:
  # Canonical (y, x) run posterior->anterior and left->right: show anterior up, patient right on
  # the viewer's left, as radiologists read axial CT.
  return axial_slice[::-1, ::-1]


def _overlay(axis, title: str, prediction, reference, image) -> None:
  slice_index = _display_slice(reference, prediction)
  spacing_y, spacing_x = reference.spacing_mm[1], reference.spacing_mm[2]
  if image is not None:
    low, high = DISPLAY_WINDOW_HU
    background = np.clip((image.array[slice_index].astype(np.float32) - low) / (high - low), 0, 1)
  else:
    background = np.zeros(reference.array.shape[1:], np.float32)
  axis.imshow(_radiological(background), cmap='gray', vmin=0, vmax=1,
              aspect=spacing_y / spacing_x, interpolation='nearest')
  for structure, select in metrics_lib.STRUCTURES.items():
    for label_volume, style in ((reference, 'solid'), (prediction, 'dashed')):
      mask = _radiological(select(label_volume.array[slice_index])).astype(np.float32)
      if mask.any():
        axis.contour(mask, levels=[0.5], colors=[STRUCTURE_COLOURS[structure]],
                     linestyles=style, linewidths=1.2)
  axis.set_title(f'{title}\naxial slice {slice_index}', fontsize=8)
  axis.set_axis_off()


def evaluation_figure(rows: list[dict], path: pathlib.Path,
                      case_paths: dict[str, tuple[pathlib.Path, pathlib.Path]],
                      images_dir: pathlib.Path | None = None, gt_label_map=None) -> pathlib.Path:
  """Box plots of Dice per center (pancreas, tumour) over overlays of three ranked cases.

  `case_paths` maps case -> (prediction path, reference path); `images_dir` holds the CT under
  the same names (without it, or for a case it lacks, the overlays are drawn on black).
  """
  figure = plt.figure(figsize=(13, 8.5))
  grid = figure.add_gridspec(2, 6, height_ratios=(1.0, 1.3))
  for column, structure in enumerate(metrics_lib.STRUCTURES):
    _dice_box_plots(figure.add_subplot(grid[0, 3 * column:3 * column + 3]), rows, structure)
  for column, (title, case) in enumerate(_ranked_cases(rows)):
    prediction_path, reference_path = case_paths[case]
    prediction = io.read_volume(prediction_path)
    reference = io.read_volume(reference_path)
    reference.array = io.map_labels(reference.array, gt_label_map, str(reference_path))
    image_path = _find_image(images_dir, case)
    image = io.read_volume(image_path) if image_path is not None else None
    if image is not None and not io.same_canonical_grid(image, reference):
      raise DataError(f'image {image_path} is not on the voxel grid of reference {reference_path}:'
                      ' --images must hold the CT the references were drawn on')
    _overlay(figure.add_subplot(grid[1, 2 * column:2 * column + 2]), title, prediction, reference,
             image)
  handles = [mlines.Line2D([], [], color=colour, linestyle=style, label=f'{structure} {source}')
             for structure, colour in STRUCTURE_COLOURS.items()
             for source, style in (('reference', 'solid'), ('prediction', 'dashed'))]
  figure.legend(handles=handles, loc='lower center', ncol=4, frameon=False)
  figure.tight_layout(rect=(0, 0.04, 1, 1))
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path
