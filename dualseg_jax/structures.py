"""What the labels mean and what each stage predicts: the label values, the two structures and
their masks, the stages and the structure of each output channel, and the stride of the
embedding grid. Data, losses, inference and evaluation all read these from here."""

from __future__ import annotations

from typing import Callable

import numpy as np

from dualseg_jax.errors import ConfigError

BACKGROUND, PANCREAS, TUMOUR = 0, 1, 2
LABEL_VALUES = (BACKGROUND, PANCREAS, TUMOUR)

# 'pancreas' is the gland including its tumour (labels 1+2), 'tumour' is label 2.
NAMES = ('pancreas', 'tumour')
MASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'pancreas': lambda label: np.asarray(label) >= PANCREAS,
    'tumour': lambda label: np.asarray(label) == TUMOUR,
}
# The label value a structure's voxels get in a predicted label map.
LABELS = {'pancreas': PANCREAS, 'tumour': TUMOUR}

CASCADE_STAGES = ('pancreas_coarse', 'pancreas_fine', 'tumour_coarse', 'tumour_fine')
# `joint` predicts both structures in one network; the cascade stages one each.
STAGES = ('joint',) + CASCADE_STAGES
# The structure of each output channel (docs/design.md channel order); the last one is the
# structure the contrastive positions are drawn from.
STAGE_STRUCTURES = {
    'joint': ('pancreas', 'tumour'),
    'pancreas_coarse': ('pancreas',), 'pancreas_fine': ('pancreas',),
    'tumour_coarse': ('tumour',), 'tumour_fine': ('tumour',),
}

# The embedding comes out of three stride-2 convolutions: contrastive positions live on a grid
# this many voxels apart, and patch sizes are multiples of it.
EMBEDDING_STRIDE = 8


def stage_structures(stage: str) -> tuple[str, ...]:
  """The structure of each output channel of `stage`; an unknown stage is a ConfigError."""
  if stage not in STAGE_STRUCTURES:
    raise ConfigError(f'stage={stage!r}: choose one of {STAGES}')
  return STAGE_STRUCTURES[stage]


def stage_labels(stage: str) -> tuple[int, ...]:
  """The label value each output channel of `stage` stands for (see docs/design.md)."""
  return tuple(LABELS[name] for name in stage_structures(stage))
