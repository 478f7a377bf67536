"""A PNG montage of the synthetic centers: one axial slice and one coronal reformat per center,
with the pancreas and tumour outlined."""

from __future__ import annotations

import os
import textwrap

import numpy as np

from dualseg_jax.data.phantoms.protocols import CENTER_PROTOCOLS


SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)  # level 40, width 400


def _radiological(axial: np.ndarray) -> np.ndarray:
  """Canonical (y anterior, x right) slice -> display: anterior up, patient's right on the left."""
  return axial[::-1, ::-1]


def write_preview(path, cases: dict) -> None:
  """PNG montage: per center an axial slice through the tumour (else the pancreas) and a coronal
  reformat, soft-tissue window, pancreas contour in yellow and tumour in red."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(4.6 * len(cases), 9.6))
  FigureCanvasAgg(figure)
  for column, (center, case) in enumerate(cases.items()):
    protocol = CENTER_PROTOCOLS[center]
    target = case.label == 2 if case.has_tumour else case.label >= 1
    slice_index = int(np.argmax(target.sum(axis=(1, 2))))
    axial = figure.add_subplot(2, len(cases), column + 1)
    _show(axial, _radiological(case.image_hu[slice_index]),
          _radiological(case.label[slice_index]), aspect=1.0)
    axial.set_title(f'{center}, slice {slice_index}' +
                    (' (tumour)' if case.has_tumour else ' (no tumour)'), fontsize=10)
    row_index = int(np.argmax(target.sum(axis=(0, 2))))
    coronal = figure.add_subplot(2, len(cases), len(cases) + column + 1)
    _show(coronal, case.image_hu[::-1, row_index, ::-1], case.label[::-1, row_index, ::-1],
          aspect=case.spacing_mm[0] / case.spacing_mm[2])
    coronal.set_xlabel('\n'.join(textwrap.wrap(protocol.description().replace('\n', '; '), 52)),
                       fontsize=7.5)
  figure.suptitle('Synthetic abdominal CT (W400 L40); yellow: pancreas, red: tumour', fontsize=12)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=90)


def _show(axes, image, label, aspect: float) -> None:
  axes.imshow(image, cmap='gray', vmin=SOFT_TISSUE_WINDOW_HU[0], vmax=SOFT_TISSUE_WINDOW_HU[1],
              aspect=aspect, interpolation='nearest')
  if (label >= 1).any():
    axes.contour(label >= 1, levels=[0.5], colors='yellow', linewidths=0.8)
  if (label == 2).any():
    axes.contour(label == 2, levels=[0.5], colors='red', linewidths=0.8)
  axes.set_xticks([])
  axes.set_yticks([])
