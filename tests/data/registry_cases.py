"""Stand-ins the registry's tests share: a data config with some keys set, and cases that name
files which need not exist."""

from dualseg_jax import config_base
from dualseg_jax.data import registry


def data_config(**overrides):
  data = config_base.base_config().data
  for key, value in overrides.items():
    setattr(data, key, value)
  return data


def cases(center, count):
  return [registry.Case(center, f'{center}_{i:02d}', f'/data/{center}/{i}.nii.gz',
                        f'/data/{center}/{i}_seg.nii.gz') for i in range(count)]
