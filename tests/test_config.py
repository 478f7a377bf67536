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



def _train_command_line(*arguments):
  import subprocess
  import sys
  from tests.conftest import PROJECT_ROOT
  return subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/three_center.py:tiny',
                         '--workdir=/nonexistent/never_written', *arguments],
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('argument, message', [
    ('--config.data.not_a_key=1', 'not_a_key'),
    ('--config.optim.learning_rate=fast', 'learning_rate'),
])
def test_command_line_overrides_are_checked_before_any_work(argument, message):
  result = _train_command_line(argument)
  assert result.returncode != 0
  assert message in result.stderr


def test_a_run_saved_before_a_key_existed_loads_with_what_it_ran(tmp_path):
  """Prediction rebuilds an old run's network and views as they were: strided first blocks,
  he-normal kernels, RandConv gain sqrt(2), every augmentation drawn; a key the run did save wins."""
  import json
  import math

  from dualseg_jax import config_base
  from dualseg_jax.inference import predictor

  saved = json.loads(three_center.get_config('tiny').to_json_best_effort())
  for section, key in (('model', 'downsample'), ('model', 'kernel_init'),
                       ('augment', 'randconv_gain'), ('augment', 'gamma_prob'),
                       ('experiments', 'cascade_recipe')):
    del saved[section][key]
  saved['augment']['rotation_prob'] = 1.0  # present in the file: kept as is
  saved['augment'].pop('noise_prob')
  saved['augment']['scale_prob'] = 0.25
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = predictor.load_config(tmp_path)
  assert (config.model.downsample, config.model.kernel_init) == ('strided_block', 'he_normal')
  assert config.augment.randconv_gain == math.sqrt(2.0)
  assert (config.augment.gamma_prob, config.augment.noise_prob) == (1.0, 1.0)
  assert config.augment.scale_prob == 0.25 and config.experiments.cascade_recipe == 'uniform'
  # Today's defaults are the reference's.
  base = config_base.base_config()
  assert (base.model.downsample, base.model.kernel_init, base.augment.randconv_gain) == (
      'separate', 'torch_default', 1.0)
