"""Each preset resolves to the config it always has: tests/preset_configs.json holds, per experiment
config and preset, every key whose value differs from config_base's (as Python reprs, so a tuple
that became a list or an int that became a float shows)."""

import json
import pathlib

import pytest

from configs import msd_pancreas, three_center
from dualseg_jax import config_base
from dualseg_jax import presets

EXPECTED = json.loads((pathlib.Path(__file__).parent / 'preset_configs.json').read_text())
EXPERIMENT_CONFIGS = {'three_center': three_center, 'msd_pancreas': msd_pancreas}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_every_preset_resolves_to_its_recorded_config(name):
  experiment, preset = name.split(':')
  config = EXPERIMENT_CONFIGS[experiment].get_config(preset)
  base = config_base.flatten(config_base.base_config())
  resolved = config_base.flatten(config)
  assert sorted(resolved) == sorted(base)  # a preset sets keys, it never adds one
  assert {key: repr(value) for key, value in resolved.items()
          if repr(value) != repr(base[key])} == EXPECTED[name]


def test_presets_name_only_keys_of_the_config():
  keys = set(config_base.flatten(config_base.base_config()))
  for name, overrides in presets.OVERRIDES.items():
    assert set(overrides) <= keys, name


def test_a_preset_leaves_the_config_unlocked_for_the_command_line():
  config = three_center.get_config('tiny')
  assert not config.is_locked
  config.data.center_roots['center_d'] = '/data/center_d'
