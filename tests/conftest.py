"""Test set-up shared by every test: two fake CPU devices, parsed absl flags, shared paths."""

import os
import pathlib

# Two fake CPU devices so data-parallel code is exercised; must precede the first jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags.

import jax  # noqa: E402

# Many tests build the same tiny networks: compiled programs are reused across tests and runs.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('DUALSEG_TEST_COMPILATION_CACHE', '/tmp/dualseg_jax_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_CT_DIR = PROJECT_ROOT.parent / 'shared' / 'data' / 'real-ct'


@pytest.fixture
def real_ct_dir():
  if not (REAL_CT_DIR / 'example_ct.nii.gz').exists():
    pytest.skip(f'real CT folder {REAL_CT_DIR} is absent (it lives in ../shared beside the project)')
  return REAL_CT_DIR


@pytest.fixture
def tiny_config():
  from configs import three_center
  return three_center.get_config('tiny')


@pytest.fixture(scope='module')
def phantom_root(tmp_path_factory):
  """A data root shared by one test module; the first run generates a small phantom set there."""
  return tmp_path_factory.mktemp('phantoms')


def tiny_run_config(root, steps, **overrides):
  """The tiny preset training on 2 phantom cases per center in `root`, global batch 2, without
  validation or held-out evaluation (they dominate a tiny run's time); `overrides` maps dotted
  config keys ('train.checkpoint_every', 'seed') to values. The config stays unlocked."""
  from configs import three_center
  from dualseg_jax import config_base
  return config_base.with_overrides(three_center.get_config('tiny'), {
      'data.root': str(root), 'data.synthetic_cases_per_center': 2,
      'data.cache_dir': str(pathlib.Path(root) / 'cache'), 'data.batch_size': 2,
      'train.steps': steps, 'train.eval_every': 0, 'train.evaluate_test_center': False,
      **overrides}, lock=False)


# The files that take a minute or more on 2 cores (measured with --durations), longest first. The
# two workers take whole files in collection order: starting these first keeps one worker from
# running the last long file alone while the other has finished.
_LONGEST_FILES = ('train/test_learning.py', 'train/test_crash_safety.py', 'train/test_loop.py',
                  'train/test_balance.py', 'train/test_storage_faults.py',
                  'experiments/test_cascade_end_to_end.py', 'tools/test_bench.py',
                  'train/test_multihost.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.path.relative_to(PROJECT_ROOT / 'tests').as_posix()
    return _LONGEST_FILES.index(path) if path in _LONGEST_FILES else len(_LONGEST_FILES)
  items.sort(key=rank)  # stable: tests keep their order within a file and among the others
