"""The preprocessing cache under concurrent builders and a full disk: never a corrupt cache, and
the next build finishes what the failed one started."""

import json
import os
import subprocess
import sys

import pytest

from dualseg_jax.data import phantoms
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.errors import StorageError
from tests import faults
from tests.conftest import PROJECT_ROOT, tiny_run_config

# Builds the cache of center_a's phantoms (data root argv[1], cache argv[2]) once stdin says go.
_BUILDER = '''
import json
import logging
import sys
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from tests.conftest import tiny_run_config

logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
config = tiny_run_config(sys.argv[1], steps=1)
config.data.cache_dir = sys.argv[2]
cases = registry.list_cases(config.data)['center_a']
print('ready', flush=True)
sys.stdin.readline()
cache = preprocess.build_cache(config.data, cases, num_workers=0, progress=False)
print(json.dumps(sorted(cache.cases)), flush=True)
'''


def _data_config(root, cache_dir):
  config = tiny_run_config(root, steps=1)
  config.data.cache_dir = str(cache_dir)
  phantoms.ensure_synthetic_data(config.data)
  return config.data


def _assert_complete(data_config, keys):
  """The manifest lists `keys`, and every array of every case loads."""
  cache = preprocess.load_cache(data_config)
  assert sorted(cache.cases) == sorted(keys)
  for key in keys:
    center, case_id = key.split('/')
    arrays = preprocess.load_arrays(cache, center, case_id, ('image', 'label', 'sdf_pancreas'))
    assert arrays['image'].shape == arrays['label'].shape == tuple(cache.cases[key]['shape'])
  assert not list(cache.directory.rglob('*.partial'))


def test_two_processes_building_one_cache_at_once_both_get_it_whole(phantom_root, tmp_path):
  data_config = _data_config(phantom_root, tmp_path / 'cache')
  command = [sys.executable, '-c', _BUILDER, str(phantom_root), str(tmp_path / 'cache')]
  builders = [subprocess.Popen(command, cwd=PROJECT_ROOT, text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  for builder in builders:
    assert builder.stdout.readline().strip() == 'ready'
  for builder in builders:  # both start building together
    builder.stdin.write('go\n')
    builder.stdin.flush()
  outputs = [builder.communicate(timeout=600) for builder in builders]
  for builder, (_, stderr) in zip(builders, outputs):
    assert builder.returncode == 0, stderr[-3000:]
  keys = [f'center_a/{case.case_id}' for case in registry.list_cases(data_config)['center_a']]
  assert [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs] == [sorted(keys)] * 2
  # One built every case; the other waited for it and then only checked them.
  built = ['preprocessing 2 of 2 cases' in stderr for _, stderr in outputs]
  waited = ['waiting for it to finish' in stderr for _, stderr in outputs]
  assert sorted(built) == [False, True] and waited == [not b for b in built], outputs
  _assert_complete(data_config, keys)


def test_a_disk_that_fills_while_caching_keeps_whole_cases_and_the_rebuild_finishes(phantom_root,
                                                                                   tmp_path):
  # About 6-8 MB a tiny phantom case: 9 MB free holds one at most, the workers write two at once.
  with faults.tmpfs(tmp_path / 'small', 'size=40m') as folder:
    data_config = _data_config(phantom_root, folder / 'cache')
    cases = [case for center in ('center_a', 'center_b') for case in
             registry.list_cases(data_config)[center]]
    ballast = faults.fill(folder, leave_bytes=9 * 2**20)
    with pytest.raises(StorageError) as raised:
      preprocess.build_cache(data_config, cases, num_workers=2, progress=False)
    directory = folder / 'cache' / preprocess.Settings.from_config(data_config).hash
    assert not list(directory.rglob('*.partial'))
    written = preprocess.Cache(directory, None, {})
    for case_json in directory.glob('*/*/case.json'):  # the cases written are whole
      arrays = preprocess.load_arrays(written, case_json.parent.parent.name, case_json.parent.name,
                                      ('image', 'label', 'sdf_tumour'))
      assert arrays['image'].shape == tuple(json.loads(case_json.read_text())['shape'])
    os.remove(ballast)
    preprocess.build_cache(data_config, cases, num_workers=0, progress=False)
    _assert_complete(data_config, [f'{case.center}/{case.case_id}' for case in cases])
  message = str(raised.value)
  assert message.startswith(f'cannot write the preprocessing cache ({directory}): No space left on '
                            'device (ENOSPC), ')
  assert message.endswith('free on that filesystem. The cases already cached are complete and '
                          'kept; free space there (or raise the quota) and rerun the same command')
