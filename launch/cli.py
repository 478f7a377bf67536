"""What every command shares: `run(main)` in place of absl's `app.run(main)`, and the console
scripts (`dualseg-train` runs `python -m launch.train`, and so on).

`run` finds an installed config by name (`--config=three_center:quick`) as well as by path, sets
center roots from the command line (`--config.data.center_roots.NAME=PATH`), and ends a command
whose flags, config or data are wrong with one `error:` line that names the flag, key or file and
says what to do, exit status 2 and no traceback; `--debug` shows the traceback instead.
"""

import difflib
import importlib.util
import pathlib
import re
import runpy
import sys
from typing import NoReturn

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from dualseg_jax.errors import ConfigError, DataError

USAGE_ERROR_STATUS = 2
CONFIG_HELP = ('Experiment config: a file or the name of an installed config (three_center, '
               'msd_pancreas), then :preset if wanted, e.g. three_center:quick.')

_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of an error as well as its message.')

_CONFIG_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')
_CENTER_ROOT = re.compile(r'^--?config\.data\.center_roots\.([^=]+)(?:=(.*))?$', re.DOTALL)
_HELP_FLAGS = ('-?', '--help', '--helpshort', '--helpfull', '--helpxml')
_KIND_NAMES = {int: 'integers', float: 'numbers', str: 'strings', bool: 'booleans'}


class CommandLineError(Exception):
  """A command line that cannot run; the message names the flag and says what to do."""


def run(main) -> None:
  """Parses the flags and calls `main(argv)`, like absl's `app.run(main)`."""
  given = list(sys.argv)
  debug = _debug_asked(given)
  try:
    argv, center_roots = _take_center_roots(_with_config_files(given))
  except CommandLineError as error:
    _fail(error, debug)
  # ml_collections reads the --config.KEY overrides from sys.argv while the flags are parsed;
  # main and the library then see the command line as it was typed (e.g. for repeat commands).
  sys.argv = argv
  flags.FLAGS.register_key_flag_for_module(argv[0], flags.FLAGS['debug'])

  def parse(arguments):
    try:
      return flags.FLAGS(arguments)
    except SystemExit as exit_request:
      if exit_request.code == 1 and any(argument in _HELP_FLAGS for argument in arguments):
        sys.exit(0)  # absl ends --help with status 1: asking for help is not an error
      raise
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
      _fail(CommandLineError(_flag_error_message(error, arguments)), debug, error)

  def checked_main(arguments):
    sys.argv = given
    try:
      _check_tuple_overrides(argv)
      if center_roots:
        _set_center_roots(center_roots)
      return main(arguments)
    except (CommandLineError, ConfigError, DataError, app.UsageError) as error:
      _fail(error, flags.FLAGS.debug)

  app.run(checked_main, argv=argv, flags_parser=parse)


def _fail(error: Exception, debug: bool, cause: Exception | None = None) -> NoReturn:
  if debug:
    raise cause or error
  print(f'error: {error}', file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR_STATUS)


def _debug_asked(argv: list[str]) -> bool:
  """--debug as typed: a command line whose flags do not parse still shows its traceback."""
  return any(argument in ('--debug', '--debug=true', '--debug=True', '--debug=1')
             for argument in argv)


# ----------------------------------------------------------------------------------------------
# Configs by name.


def installed_configs() -> dict[str, pathlib.Path]:
  """The experiment configs shipped with the package, by name (`three_center`, ...)."""
  spec = importlib.util.find_spec('configs')
  if spec is None or not spec.submodule_search_locations:
    return {}
  folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
  return {path.stem: path for path in sorted(folder.glob('*.py')) if not path.stem.startswith('_')}


def config_name() -> str:
  """The name of the parsed --config file, e.g. `three_center` for --config=three_center:quick:
  it names a command's default output folder."""
  file = config_flags.get_config_filename(flags.FLAGS['config']).partition(':')[0]
  return pathlib.Path(file).stem


def resolve_config(value: str) -> str:
  """`FILE[:preset]` as given when FILE exists, else the installed config named FILE."""
  file, colon, preset = value.partition(':')
  if pathlib.Path(file).is_file():
    return value
  name = file.removesuffix('.py')
  configs = installed_configs()
  if name in configs:
    return f'{configs[name]}{colon}{preset}'
  raise CommandLineError(
      f'--config={value}: there is no file {file} and no installed config named {name!r}; give '
      f'a config file or one of {", ".join(configs) or "(none installed)"}, e.g. '
      f'--config=three_center:quick')


def _with_config_files(argv: list[str]) -> list[str]:
  argv = list(argv)
  for index, argument in enumerate(argv):
    if argument.startswith('--config='):
      argv[index] = '--config=' + resolve_config(argument.split('=', 1)[1])
    elif argument == '--config' and index + 1 < len(argv):
      argv[index + 1] = resolve_config(argv[index + 1])
  return argv


# ----------------------------------------------------------------------------------------------
# Center roots: the locked config holds no key for a center it does not know, so they are taken
# from the command line before absl sees it and set once the config is loaded.


def _take_center_roots(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  kept, center_roots = [], {}
  for argument in argv:
    match = _CENTER_ROOT.match(argument)
    if match is None:
      kept.append(argument)
      continue
    name, path = match.groups()
    if path is None or '.' in name:
      raise CommandLineError(f'{argument}: give one center and its folder or manifest, e.g. '
                             '--config.data.center_roots.center_d=/data/center_d')
    center_roots[name] = path
  return kept, center_roots


def _set_center_roots(center_roots: dict[str, str]) -> None:
  if 'config' not in flags.FLAGS:
    raise CommandLineError('--config.data.center_roots.' + next(iter(center_roots)) +
                           ': this command takes no --config; drop the flag')
  config = flags.FLAGS.config
  with config.unlocked():
    for name, path in center_roots.items():
      config.data.center_roots[name] = path


# ----------------------------------------------------------------------------------------------
# Flags that do not parse, named by their full key.


def _override_keys(argv: list[str]) -> list[str]:
  return [match.group(1) for match in map(_CONFIG_OVERRIDE.match, argv) if match]


def _config_argument(argv: list[str]) -> str | None:
  for index, argument in enumerate(argv):
    if argument.startswith('--config='):
      return argument.split('=', 1)[1]
    if argument == '--config' and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _load_config(argument: str) -> ml_collections.ConfigDict:
  """The config a `--config=FILE[:preset]` value names, without the command line's overrides."""
  file, _, preset = argument.partition(':')
  spec = importlib.util.spec_from_file_location('_config_without_overrides', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _flag_error_message(error: Exception, argv: list[str]) -> str:
  if isinstance(error, (AttributeError, KeyError)):
    argument = _config_argument(argv)
    if argument is not None:
      try:
        return _unknown_key_message(_load_config(argument), _override_keys(argv))
      except Exception:  # the config itself does not load: absl's message below says why
        pass
  message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  if 'Error whilst parsing config file' in message:  # ml_collections puts the traceback here
    message = message.strip().splitlines()[-1]
  message = message.removeprefix('flag ')
  name = message.split('=', 1)[0].removeprefix('--')
  if (isinstance(error, flags.IllegalFlagValueError) and name in flags.FLAGS
      and flags.FLAGS[name].flag_type() in ('float', 'int', 'bool')):
    message += f' (--{name} takes {_with_article(flags.FLAGS[name].flag_type())})'
  if isinstance(error, flags.UnrecognizedFlagError):
    message += ' (--helpfull lists every flag)'
  return message


def _with_article(noun: str) -> str:
  return f'{"an" if noun[:1] in "aeiou" else "a"} {noun}'


def _unknown_key_message(config: ml_collections.ConfigDict, keys: list[str]) -> str:
  for key in keys:
    node, found = config, []
    for part in key.split('.'):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node, found = node[part], found + [part]
        continue
      where = '.'.join(found) or 'the config'
      if not isinstance(node, ml_collections.ConfigDict):
        return f'--config.{key}: {where} is a value, not a section; give --config.{where}=VALUE'
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      rest = key.split('.')[len(found) + 1:]
      advice = (f'did you mean --config.{".".join(found + close + rest)}?' if close else
                'every key is in dualseg_jax/config_base.py')
      return f'--config.{key}: {where} has no key {part!r}; {advice}'
  return f'a --config.KEY override names no key of the config ({", ".join(keys)})'


def _check_tuple_overrides(argv: list[str]) -> None:
  """Tuple overrides hold the kind of item the config's default holds (e.g. no string among
  the voxels of data.patch_size): ml_collections takes any tuple. Names are split at commas as
  numbers are (`--config.data.centers=msd,B` is two centers, not one called 'msd,B')."""
  argument = _config_argument(argv)
  if 'config' not in flags.FLAGS or argument is None:
    return
  config, defaults = flags.FLAGS.config, None
  for key in _override_keys(argv):
    value = _value_at(config, key)
    if not isinstance(value, tuple):
      continue
    if defaults is None:
      defaults = _load_config(argument)
    default = _value_at(defaults, key)
    kinds = {type(item) for item in default or ()}
    if len(kinds) != 1:
      continue
    kind = kinds.pop()
    if kind is str and any(',' in item for item in value):
      value = tuple(name.strip() for item in value for name in item.split(','))
      section, _, leaf = key.rpartition('.')
      (_value_at(config, section) if section else config)[leaf] = value
    wrong = [item for item in value if not (
        type(item) is kind or (kind is float and type(item) is int))]
    if wrong:
      raise CommandLineError(
          f'--config.{key}: {key} holds {_KIND_NAMES.get(kind, kind.__name__)}, e.g. '
          f'--config.{key}={",".join(map(str, default))}; {wrong[0]!r} is not one')


def _value_at(config, key: str):
  for part in key.split('.'):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return None
    config = config[part]
  return config


# ----------------------------------------------------------------------------------------------
# Console scripts: each runs its module as `python -m launch.NAME` does.


def _command(module: str):
  def command() -> None:
    runpy.run_module(f'launch.{module}', run_name='__main__', alter_sys=True)
  command.__doc__ = f'`python -m launch.{module}`.'
  return command


ablate = _command('ablate')
bench = _command('bench')
cascade = _command('cascade')
evaluate = _command('evaluate')
export = _command('export')
faults = _command('faults')
fuzz_readers = _command('fuzz_readers')
kill_resume = _command('kill_resume')
make_phantoms = _command('make_phantoms')
postprocess_study = _command('postprocess_study')
predict = _command('predict')
preprocess = _command('preprocess')
protocol = _command('protocol')
train = _command('train')
