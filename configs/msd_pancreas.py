"""Real data: the Medical Segmentation Decathlon's Task07 Pancreas at `--config.data.root`.

MSD is one center, so the split is in-domain k-fold (`--config.data.fold`, default 0); add
more centers through `--config.data.centers` and `--config.data.center_roots` (MSD layout or a
manifest per center) for leave-one-center-out.
"""

from dualseg_jax import config_base
from dualseg_jax import presets


def get_config(preset: str | None = None):
  config = config_base.base_config()
  config.data.source = 'msd'
  config.data.root = ''  # required: the folder holding imagesTr/, labelsTr/, dataset.json
  config.data.centers = ('msd',)
  config.data.test_center = ''
  config.data.fold = 0
  return presets.apply(config, preset)
