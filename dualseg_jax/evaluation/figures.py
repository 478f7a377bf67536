"""The evaluation figure: per-center box plots of Dice, NSD and HD95 for each structure, and axial
overlays of the best, median and worst case on one stated criterion (reference and predicted
contours, over the CT when available).
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
_VOLUME_SUFFIXES = io.VOLUME_SUFFIXES


# metric -> (axis label, y range or None for one from the data); HD95 of a miss is the penalty.
BOX_PLOT_METRICS = {'dice': ('Dice', (-0.05, 1.05)), 'nsd': ('NSD', (-0.05, 1.05)),
                    'hd95_mm': ('HD95 (mm)', None)}


def _box_plots(axis, rows: list[dict], structure: str, metric: str) -> None:
  """One box per center (and 'all' when there are several) over the cases with a value; missed
  and false-positive cases are drawn as crosses (their HD95 is the penalty)."""
  structure_rows = [row for row in rows if row['structure'] == structure
                    and np.isfinite(row[metric])]
  centers = sorted({row['center'] for row in rows})
  groups = [[row for row in structure_rows if row['center'] == center] for center in centers]
  if len(centers) > 1:
    centers = ['all'] + centers
    groups = [structure_rows] + groups
  # A structure absent from every case gets a NaN placeholder box, so the axes still line up.
  axis.boxplot([[row[metric] for row in group] or [np.nan] for group in groups], showmeans=True,
               showfliers=False)  # every case is drawn as a point below
  axis.set_xticks(range(1, len(centers) + 1), centers)
  for position, group in enumerate(groups, start=1):
    jitter = np.linspace(-0.08, 0.08, len(group)) if len(group) > 1 else np.zeros(len(group))
    penalised = np.array([row['outcome'] in metrics_lib.PENALISED_OUTCOMES for row in group],
                         bool)
    values = np.array([row[metric] for row in group], np.float64)
    axis.scatter(position + jitter[~penalised], values[~penalised], s=10,
                 color=STRUCTURE_COLOURS[structure], zorder=3)
    axis.scatter(position + jitter[penalised], values[penalised], s=24, marker='x',
                 color='black', zorder=3)
  label, limits = BOX_PLOT_METRICS[metric]
  if limits is not None:
    axis.set_ylim(*limits)
  else:
    axis.set_ylim(bottom=0)
  axis.set_ylabel(label)
  absent = sum(row['outcome'] == 'absent' for row in rows if row['structure'] == structure)
  title = f'{metrics_lib.display_name(structure)}: {label.split()[0]} per center'
  if absent:
    title += f'\n({absent} case(s) without it in either mask not shown)'
  axis.set_title(title, fontsize=9)
  axis.grid(axis='y', alpha=0.3)


def _example_title(pick: str, case: str, rows: list[dict]) -> str:
  dice = {row['structure']: row['dice'] for row in rows if row['case'] == case}
  scores = ', '.join(f'{structure} {value:.3f}' if np.isfinite(value) else f'{structure} n/a'
                     for structure, value in dice.items())
  return f'{pick}: {case}\nDice {scores}'


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
  for name in (case, case + io.CHANNEL_SUFFIX):  # nnU-Net's imagesTs/ name: `X_0000`
    for suffix in _VOLUME_SUFFIXES:
      candidate = images_dir / f'{name}{suffix}'
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


def evaluation_figure(rows: list[dict], path: pathlib.Path, examples: dict[str, str],
                      criterion: str, case_paths: dict[str, tuple[pathlib.Path, pathlib.Path]],
                      images_dir: pathlib.Path | None = None, gt_label_map=None,
                      num_skipped: int = 0) -> pathlib.Path:
  """Box plots of Dice, NSD and HD95 per center for each structure over overlays of the
  `examples` ({'best', 'median', 'worst'} -> case), which were ranked by `criterion`.

  `case_paths` maps case -> (prediction path, reference path); `images_dir` holds the CT under
  the same names (without it, or for a case it lacks, the overlays are drawn on black).
  """
  structures = list(metrics_lib.STRUCTURES)
  figure = plt.figure(figsize=(14, 4.0 * len(structures) + 5.5))
  grid = figure.add_gridspec(len(structures) + 1, 6,
                             height_ratios=(1.0,) * len(structures) + (1.4,))
  for row_index, structure in enumerate(structures):
    for column, metric in enumerate(BOX_PLOT_METRICS):
      _box_plots(figure.add_subplot(grid[row_index, 2 * column:2 * column + 2]), rows, structure,
                 metric)
  for column, pick in enumerate(pick for pick in ('best', 'median', 'worst') if pick in examples):
    case = examples[pick]
    prediction_path, reference_path = case_paths[case]
    prediction = io.read_volume(prediction_path)
    reference = io.read_volume(reference_path)
    reference.array = io.map_labels(reference.array, gt_label_map, str(reference_path))
    image_path = _find_image(images_dir, case)
    image = io.read_volume(image_path) if image_path is not None else None
    if image is not None and not io.same_canonical_grid(image, reference):
      raise DataError(f'image {image_path} is not on the voxel grid of reference {reference_path}:'
                      ' --images must hold the CT the references were drawn on')
    _overlay(figure.add_subplot(grid[-1, 2 * column:2 * column + 2]),
             _example_title(pick, case, rows), prediction, reference, image)
  handles = [mlines.Line2D([], [], color=colour, linestyle=style,
                           label=f'{metrics_lib.display_name(structure)} {source}')
             for structure, colour in STRUCTURE_COLOURS.items()
             for source, style in (('reference', 'solid'), ('prediction', 'dashed'))]
  handles.append(mlines.Line2D([], [], color='black', marker='x', linestyle='none',
                               label='missed or false positive (HD95: image diagonal)'))
  figure.legend(handles=handles, loc='lower center', ncol=5, frameon=False, fontsize=8)
  note = f'Examples ranked by {criterion}.'
  if num_skipped:
    note += f' {num_skipped} case(s) skipped, not shown: see summary.md.'
  figure.text(0.5, 0.035, note, ha='center', fontsize=8)
  figure.tight_layout(rect=(0, 0.05, 1, 1))
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
