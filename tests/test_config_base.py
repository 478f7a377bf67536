"""The config toolkit: dotted keys in and out, overrides that name a wrong key, saved configs."""

import math

import ml_collections
import pytest

from dualseg_jax import config_base
from dualseg_jax.errors import ConfigError


def test_flatten_names_every_value_by_its_dotted_key():
  tree = {'seed': 1, 'loss': {'weights': {'dice': 1.0, 'bce': 0.5}}, 'data': {'center_roots': {}}}
  assert config_base.flatten(tree) == {'seed': 1, 'loss.weights.dice': 1.0, 'loss.weights.bce': 0.5}
  assert config_base.flatten(ml_collections.ConfigDict(tree)) == config_base.flatten(tree)


def test_differences_are_the_overrides_that_make_the_other_config():
  base = config_base.base_config()
  overrides = {'seed': 7, 'loss.weights.dice': 0.5, 'data.patch_size': (16, 32, 32)}
  other = config_base.with_overrides(base, overrides)
  assert config_base.differences(base, other) == overrides
  assert config_base.with_overrides(base, config_base.differences(base, other)) == other


def test_overrides_copy_lock_and_refuse_unknown_keys():
  base = config_base.base_config()
  variant = config_base.with_overrides(base, {'optim.learning_rate': 3e-4})
  assert variant.optim.learning_rate == 3e-4 and base.optim.learning_rate == 1e-4
  assert variant.is_locked
  assert not config_base.with_overrides(base, {}, lock=False).is_locked
  with pytest.raises(ConfigError, match="'loss.weight.dice'.*no section 'weight'"):
    config_base.with_overrides(base, {'loss.weight.dice': 1.0})
  with pytest.raises(ConfigError, match="'loss.weights.sdf'.*no key 'sdf'"):
    config_base.with_overrides(base, {'loss.weights.sdf': 1.0})


def test_a_saved_config_loads_on_todays_defaults_with_the_values_it_ran():
  saved = {'seed': 3, 'data': {'patch_size': [16, 32, 32]}, 'augment': {'num_views': 1}}
  config = config_base.load_saved(saved)
  assert config.seed == 3 and config.data.patch_size == (16, 32, 32)  # lists back to tuples
  # A key the run predates holds what the run computed; one it has no section for, today's default.
  assert config.augment.randconv_gain == math.sqrt(2.0)
  assert config.model.kernel_init == config_base.base_config().model.kernel_init
  with_model = config_base.load_saved({'model': {'widths': [8, 16, 32, 64]}})
  assert with_model.model.head_activation == 'relu' and with_model.model.kernel_init == 'he_normal'
