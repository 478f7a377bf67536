"""From per-channel probabilities to a 0/1/2 label map: threshold, connected-component
filtering, tumour restricted to (a margin around) the pancreas, channels combined.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np
import scipy.ndimage as ndimage

from dualseg_jax import structures
from dualseg_jax.errors import ConfigError
from dualseg_jax.structures import PANCREAS, TUMOUR

COMPONENT_RULES = ('none', 'largest', 'fraction', 'min_volume', 'largest_probability_mass')
# 26-connectivity: voxels touching at a face, an edge or a corner belong to one component.
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def check_rule(rule: str) -> None:
  """An unknown component rule fails here, named by its config key."""
  if rule not in COMPONENT_RULES:
    raise ConfigError(f'inference.postprocess = {rule!r}: choose one of {COMPONENT_RULES}')


def keep_components(mask: np.ndarray, rule: str, fraction: float = 0.5,
                    spacing_mm: Sequence[float] | None = None, min_volume_mm3: float = 0.0,
                    probabilities: np.ndarray | None = None) -> np.ndarray:
  """Filters the 26-connected components of a boolean mask.

  'none' keeps every component; 'largest' keeps only the largest (the first labelled on a tie);
  'fraction' keeps the largest and every component with more than `fraction` times its voxels.
  These two delete a true organ beside a false-positive blob more than 1 / `fraction` its size.
  'min_volume' keeps every component of at least `min_volume_mm3` (voxels of `spacing_mm`), so
  nothing if none is that large; 'largest_probability_mass' keeps the component whose
  `probabilities` (same shape as the mask) sum highest, and every one above `fraction` times that
  mass: a confident organ outweighs a larger blob of borderline voxels.
  """
  check_rule(rule)
  if rule == 'min_volume' and spacing_mm is None:
    raise ValueError("keep_components(rule='min_volume') needs the voxel spacing_mm")
  if rule == 'largest_probability_mass' and probabilities is None:
    raise ValueError("keep_components(rule='largest_probability_mass') needs the probabilities")
  mask = np.asarray(mask, dtype=bool)
  if rule == 'none' or not mask.any():
    return mask
  components, num_components = ndimage.label(mask, structure=FULL_CONNECTIVITY)
  sizes = np.bincount(components.ravel(), minlength=num_components + 1)
  sizes[0] = 0  # background
  if rule == 'min_volume':
    keep = sizes * float(np.prod(spacing_mm)) >= min_volume_mm3
    keep[0] = False
    return keep[components]
  if rule == 'largest_probability_mass':
    # The mass takes the place of the size: float64 sums, so many voxels lose no precision.
    sizes = np.bincount(components.ravel(), weights=np.asarray(probabilities, np.float64).ravel(),
                        minlength=num_components + 1)
    sizes[0] = 0
  largest = int(np.argmax(sizes))
  if rule == 'largest':
    keep = np.zeros(num_components + 1, dtype=bool)
    keep[largest] = True
  else:
    keep = sizes > fraction * sizes[largest]
    keep[largest] = True
    keep[0] = False
  return keep[components]


def dilate_voxels(mask: np.ndarray, radius_vox: float) -> np.ndarray:
  """The mask grown by a ball of `radius_vox` voxels (voxel units, whatever the spacing)."""
  mask = np.asarray(mask, dtype=bool)
  if radius_vox <= 0 or not mask.any():
    return mask
  # The distance transform only needs the mask's bounding box grown by the radius.
  margin = int(np.ceil(radius_vox))
  box = tuple(slice(max(int(indices.min()) - margin, 0), int(indices.max()) + margin + 1)
              for indices in np.nonzero(mask))
  dilated = np.zeros_like(mask)
  dilated[box] = ndimage.distance_transform_edt(~mask[box]) <= radius_vox
  return dilated


def probabilities_to_label(probabilities: np.ndarray, stage: str,
                           inference_config: ml_collections.ConfigDict,
                           pancreas_mask: np.ndarray | None = None,
                           spacing_mm: Sequence[float] | None = None) -> np.ndarray:
  """(D, H, W, C) probabilities of one stage -> uint8 label map (D, H, W) with 0/1/2.

  Each structure's components are filtered by `inference_config.postprocess` (the 'min_volume'
  rule needs the grid's `spacing_mm`). The pancreas is filtered first; the tumour is then kept
  only inside the pancreas grown by `pancreas_dilation_vox` (when `tumour_inside_pancreas`; an
  empty pancreas then removes every tumour), filtered, and written over the pancreas: tumour
  voxels are labelled 2 and count as pancreas. A tumour-only stage restricts to `pancreas_mask` when one is given (the cascade).
  """
  channel_labels = structures.stage_labels(stage)
  if probabilities.shape[-1] != len(channel_labels):
    raise ConfigError(f'stage {stage!r} expects {len(channel_labels)} output channels but the '
                      f'model gives {probabilities.shape[-1]}: check model.num_classes')
  rule = inference_config.postprocess
  if rule == 'min_volume' and spacing_mm is None:
    raise ConfigError("inference.postprocess = 'min_volume' needs the voxel spacing of the "
                      "probabilities: pass spacing_mm, or choose another rule")

  def keep(mask, channel):
    return keep_components(mask, rule, inference_config.component_fraction, spacing_mm,
                           inference_config.min_component_mm3, probabilities[..., channel])

  foreground = probabilities > inference_config.threshold
  label = np.zeros(probabilities.shape[:3], dtype=np.uint8)

  pancreas = None
  if PANCREAS in channel_labels:
    channel = channel_labels.index(PANCREAS)
    pancreas = keep(foreground[..., channel], channel)
    label[pancreas] = PANCREAS
  elif pancreas_mask is not None:
    pancreas = np.asarray(pancreas_mask, dtype=bool)
  if TUMOUR in channel_labels:
    channel = channel_labels.index(TUMOUR)
    tumour = foreground[..., channel]
    if inference_config.tumour_inside_pancreas and pancreas is not None:
      tumour = tumour & dilate_voxels(pancreas, inference_config.pancreas_dilation_vox)
    tumour = keep(tumour, channel)
    label[tumour] = TUMOUR
  return label
