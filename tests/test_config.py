"""The experiment configs load, lock and resolve their presets."""

import pytest

from configs import msd_pancreas, three_center
from dualseg_jax import presets


@pytest.mark.parametrize('preset', ['paper', 'quick', 'tiny'])
def test_presets_keep_patch_sizes_divisible_by_eight(preset):
  config = three_center.get_config(preset)
  assert config.preset == preset
  assert all(size % 8 == 0 for size in config.data.patch_size)
  assert config.model.widths[0] % config.model.num_groups == 0


def test_auto_preset_is_quick_on_cpu():
  name, why = presets.resolve(None)
  assert name == 'quick' and 'CPU' in why


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match='huge'):
    three_center.get_config('huge')


def test_msd_config_is_in_domain():
  config = msd_pancreas.get_config('tiny')
  assert config.data.source == 'msd' and config.data.fold == 0
