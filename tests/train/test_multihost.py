"""Two processes joined by jax.distributed (gloo collectives on CPU) train the tiny config."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_two_processes_complete_two_steps(tmp_path):
  port = _free_port()
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ.get('DUALSEG_TEST_COMPILATION_CACHE',
                                                    '/tmp/dualseg_jax_test_xla_cache')
  workdir = tmp_path / 'run'
  common = [sys.executable, '-m', 'launch.train', '--config=configs/three_center.py:tiny',
            f'--workdir={workdir}', f'--config.data.root={tmp_path / "data"}',
            '--config.data.synthetic_cases_per_center=2', '--config.data.batch_size=2',
            '--config.train.steps=2', '--config.train.eval_every=0',
            '--config.train.evaluate_test_center=False',
            # The distributed mechanics are under test: a lighter step compiles faster.
            '--config.augment.spatial=False', '--config.augment.num_views=1',
            '--config.loss.weights.consistency=0', '--config.loss.weights.contrastive=0',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  # Process 0 generates the data first, so the two processes never write the same files.
  from configs import three_center
  from dualseg_jax.data import phantoms
  config = three_center.get_config('tiny')
  config.data.root = str(tmp_path / 'data')
  config.data.synthetic_cases_per_center = 2
  phantoms.ensure_synthetic_data(config.data)
  processes = [subprocess.Popen(common + [f'--process_id={index}'], cwd=PROJECT_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index in range(2)]
  outputs = []
  for process in processes:
    try:
      output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      pytest.fail('the two-process run did not finish within 300 s')
    outputs.append(output)
  for index, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f'process {index} failed:\n{output[-3000:]}'
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [row['step'] for row in rows if 'loss' in row] == [1, 2]
  assert (workdir / 'checkpoints' / '2').exists()
  assert 'run finished at step 2' in outputs[0]
