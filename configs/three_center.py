"""Synthetic three-center CT, leave-one-center-out: the default experiment.

`--config=configs/three_center.py` (or `--config=three_center`) picks the paper preset on an
accelerator and the quick preset on CPU; `:paper`, `:quick` or `:tiny` force one. The held-out
center is `--config.data.test_center`.
"""

from dualseg_jax import config_base
from dualseg_jax import presets


def get_config(preset: str | None = None):
  config = config_base.base_config()
  config.data.source = 'synthetic'
  config.data.centers = config_base.SYNTHETIC_CENTERS
  config.data.test_center = 'center_c'
  return presets.apply(config, preset)
