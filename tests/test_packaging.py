"""The package as pip installs it: the dependencies of requirements.txt, one console script per
command, and a wheel that installs into a fresh environment and runs from any folder."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv

from tests.conftest import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / 'pyproject.toml').read_text())


def _requirements(name: str) -> set[str]:
  lines = (PROJECT_ROOT / name).read_text().splitlines()
  return {line.split('#')[0].strip() for line in lines
          if line.split('#')[0].strip() and not line.startswith('-r')}


def _normalized(requirements) -> set[str]:
  return {re.sub(r'\s+', '', requirement) for requirement in requirements}


def test_pyproject_declares_the_ranges_of_the_requirements_files():
  project = PYPROJECT['project']
  extras = project['optional-dependencies']
  assert _normalized(project['dependencies']) | _normalized(extras['dev']) == _normalized(
      _requirements('requirements.txt'))
  assert _normalized(extras['cuda12']) == _normalized(_requirements('requirements-cuda12.txt'))
  assert not {'pytest', 'hypothesis'} & {re.split(r'[<>=\[]', requirement)[0]
                                         for requirement in project['dependencies']}


def test_every_command_has_a_console_script():
  commands = sorted(path.stem for path in (PROJECT_ROOT / 'launch').glob('*.py')
                    if any(isinstance(node, ast.FunctionDef) and node.name == 'main'
                           for node in ast.parse(path.read_text()).body))
  scripts = PYPROJECT['project']['scripts']
  assert scripts == {f'dualseg-{command.replace("_", "-")}': f'launch.cli:{command}'
                     for command in commands}


def test_the_wheel_installs_into_a_fresh_environment_and_its_commands_run(tmp_path):
  # The wheel is built from a copy, so the build leaves nothing in the repository.
  source = tmp_path / 'source'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(PROJECT_ROOT / name, source / name)
  for package in ('dualseg_jax', 'launch', 'configs'):
    shutil.copytree(PROJECT_ROOT / package, source / package,
                    ignore=shutil.ignore_patterns('__pycache__'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                  '--no-build-isolation', '--wheel-dir', str(tmp_path / 'wheels'), str(source)],
                 check=True, capture_output=True, timeout=300)
  (wheel,) = (tmp_path / 'wheels').glob('dualseg_jax-*.whl')

  # A fresh environment that sees this one's packages (jax, absl, ...) but not the repository.
  environment = tmp_path / 'environment'
  venv.create(environment, with_pip=False)
  python = environment / 'bin' / 'python'
  site_packages = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                 check=True, capture_output=True, text=True).stdout.strip()
  (pathlib.Path(site_packages) / 'dependencies.pth').write_text(
      f'import site; site.addsitedir({sysconfig.get_paths()["purelib"]!r})\n')
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index', str(wheel)],
                 check=True, capture_output=True, timeout=300)

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  shown = subprocess.run([environment / 'bin' / 'dualseg-train', '--help'], cwd=elsewhere,
                         capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0, shown.stderr
  assert 'Trains one stage' in shown.stdout and '--allow_config_change' in shown.stdout
  assert str(site_packages) in shown.stdout  # the installed module, not the repository's
  # The installed configs are found by name from any folder.
  refused = subprocess.run([environment / 'bin' / 'dualseg-train', '--config=three_center:tiny',
                            '--config.data.not_a_key=1'], cwd=elsewhere, capture_output=True,
                           text=True, timeout=120)
  assert refused.returncode == 2
  assert refused.stderr.strip() == ("error: --config.data.not_a_key: data has no key 'not_a_key'; "
                                    'every key is in dualseg_jax/config_base.py')
  assert sorted(path.name for path in (environment / 'bin').glob('dualseg-*')) == sorted(
      PYPROJECT['project']['scripts'])
