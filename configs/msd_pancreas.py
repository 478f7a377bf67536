"""Real data: the Medical Segmentation Decathlon's Task07 Pancreas at `--config.data.root`:
`python -m launch.train --config=msd_pancreas --config.data.root=/data/Task07_Pancreas`.

MSD is one center, so the split is in-domain k-fold (`--config.data.fold`, default 0). More
centers, each a folder in MSD layout or a CSV/JSON manifest, make it leave-one-center-out:
`--config.data.centers=msd,center_b --config.data.center_roots.center_b=/data/center_b
--config.data.fold=-1 --config.data.test_center=center_b`.
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
