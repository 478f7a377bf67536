"""The commands as a user meets them: a wrong flag, config key, config or data ends in one
`error:` line naming it, exit status 2 and no traceback (`--debug` shows it); a failed run leaves
no config.json behind; configs are found by name; center roots are set from the command line."""

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT


def _command(module, *arguments, cwd=PROJECT_ROOT):
  # One CPU device, as on a user's machine (the suite's two fake devices would refuse batch 1).
  environment = {key: value for key, value in os.environ.items() if key != 'XLA_FLAGS'}
  environment['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, '-m', f'launch.{module}', *arguments], cwd=cwd,
                        env=environment, capture_output=True, text=True, timeout=120)


def _error_lines(result):
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = result.stderr[result.stderr.index('error: '):].strip().splitlines()
  assert 1 <= len(lines) <= 2, result.stderr
  return '\n'.join(lines)


@pytest.mark.parametrize('argument, message', [
    ('--config.data.not_a_key=1', "error: --config.data.not_a_key: data has no key 'not_a_key'"),
    ('--config.datta.root=/x', 'did you mean --config.data.root?'),
    ('--config.optim.learning_rate=fast',
     'error: --config.optim.learning_rate=fast: could not convert string to float'),
    ('--config.data.patch_size=16,a,16', 'error: --config.data.patch_size: data.patch_size holds '
                                         'integers'),
    ('--config.seed.value=1', 'error: --config.seed.value: seed is a value, not a section'),
    ('--no_such_flag', "error: Unknown command line flag 'no_such_flag'"),
])
def test_a_wrong_config_key_or_flag_is_one_line_naming_it(argument, message):
  result = _command('train', '--config=three_center:tiny', argument)
  assert message in _error_lines(result)


def test_an_unknown_config_name_lists_the_installed_ones():
  lines = _error_lines(_command('train', '--config=three_centre:quick'))
  assert "no installed config named 'three_centre'" in lines
  assert 'msd_pancreas, three_center' in lines


def test_debug_shows_the_traceback():
  plain = _command('train', '--config=three_center:tiny', '--config.data.not_a_key=1')
  assert 'Traceback' not in plain.stderr
  shown = _command('train', '--config=three_center:tiny', '--config.data.not_a_key=1', '--debug')
  assert shown.returncode != 0 and 'Traceback' in shown.stderr
  # An error raised once the flags are parsed, in the command itself.
  assert 'Traceback' not in _command('faults', '--workdir=/nonexistent', '--parts=floods').stderr
  shown = _command('faults', '--workdir=/nonexistent', '--parts=floods', '--debug')
  assert shown.returncode != 0 and 'Traceback' in shown.stderr
  assert "CommandLineError: --parts=floods: ['floods'] unknown" in shown.stderr


def test_a_config_error_is_one_line_and_the_old_overwrite_flag_a_notice(tmp_path):
  result = _command('train', '--config=three_center:tiny', '--config.data.test_center=center_x',
                    f'--workdir={tmp_path / "run"}', '--overwrite')
  assert "error: data.test_center='center_x' is not one of data.centers" in _error_lines(result)
  assert 'note: launch.train\'s --overwrite is now --allow_config_change' in result.stderr
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_a_run_that_failed_on_its_data_leaves_no_config_and_the_corrected_command_runs(tmp_path):
  workdir = tmp_path / 'run'
  first = _command('train', '--config=msd_pancreas:tiny', f'--config.data.root={tmp_path / "wrong"}',
                   f'--workdir={workdir}')
  assert f'error: data folder {tmp_path / "wrong"} for center \'msd\' does not exist' in (
      _error_lines(first))
  assert not (workdir / 'config.json').exists()
  # Another data.root in the same workdir: its own data error, not a refusal of a changed config.
  second = _command('train', '--config=msd_pancreas:tiny', f'--config.data.root={tmp_path / "other"}',
                    f'--workdir={workdir}')
  assert f'error: data folder {tmp_path / "other"}' in _error_lines(second)


def test_center_roots_are_set_from_the_command_line(tmp_path):
  roots = [f'--config.data.center_roots.{center}={tmp_path / center}'
           for center in ('center_a', 'center_b', 'center_c')]
  result = _command('preprocess', '--config=three_center:tiny', '--config.data.source=folders',
                    *roots)
  # Every center has its root (none is reported without data); the first is read and is missing.
  assert (f'error: data folder {tmp_path / "center_a"} for center \'center_a\' does not exist'
          in _error_lines(result))


def test_names_in_a_tuple_are_split_at_commas(tmp_path):
  result = _command('preprocess', '--config=msd_pancreas:tiny', f'--config.data.root={tmp_path}',
                    '--config.data.centers=msd,center_b')
  # Two centers, so the MSD source asks for the second one's root.
  assert "data.centers also names ['center_b'] without data.center_roots entries" in (
      _error_lines(result))
