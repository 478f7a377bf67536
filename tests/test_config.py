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
