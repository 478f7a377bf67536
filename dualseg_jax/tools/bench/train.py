"""Benchmark of the full training step (augmentation, RandConv views, all losses, Adam)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualseg_jax.data import targets
from dualseg_jax.models import layers
from dualseg_jax.train import step as step_lib


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """A batch with a pancreas-like ellipsoid and a tumour inside it, and every target key."""
  depth, height, width = config.data.patch_size
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (depth, height, width)),
                              indexing='ij'), axis=-1)
  pancreas = ((grid / np.array([0.6, 0.35, 0.7])) ** 2).sum(-1) < 1
  tumour = (((grid - np.array([0.1, 0.0, 0.2])) / np.array([0.25, 0.15, 0.2])) ** 2).sum(-1) < 1
  label = np.where(tumour & pancreas, 2, np.where(pancreas, 1, 0)).astype(np.int32)
  image = np.clip(0.4 + 0.2 * pancreas - 0.1 * tumour + 0.05 * rng.standard_normal(label.shape), 0, 1)
  sample = targets.make_targets(label, config.stage, config.data.target_spacing_mm, rng,
                                config.data.num_positions, config.loss.slice_min_voxels,
                                tuple(config.data.ring_side_vox), config.data.contrastive_sampling)
  sample['image'] = image[..., None].astype(np.float32)
  sample['label'] = label
  return {name: np.repeat(value[None], batch_size, axis=0) for name, value in sample.items()}


def _peak_memory_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # CPU backends may not report memory
    return None
  return None if not stats else stats.get('peak_bytes_in_use')


def benchmark_step(config: ml_collections.ConfigDict, repeats: int = 10, warmup: int = 2
                   ) -> dict[str, Any]:
  """Median wall time of the jitted train step (warm-up and compile excluded)."""
  from dualseg_jax.data import pipeline
  device = jax.devices()[0]
  patch_size = tuple(config.data.patch_size)
  model, state, optimizer = step_lib.create_train_state(config, jax.random.PRNGKey(0), patch_size)
  augment_fn = pipeline.device_augmentation(config)
  train_step = jax.jit(step_lib.make_train_step(model, config, optimizer, augment_fn=augment_fn),
                       donate_argnums=0)
  batch = jax.device_put(synthetic_batch(config, config.data.batch_size))
  compile_started = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - compile_started
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times_ms = []
  for _ in range(repeats):
    started = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state.params, metrics))
    times_ms.append((time.perf_counter() - started) * 1e3)
  median_ms = statistics.median(times_ms)
  views = config.augment.num_views
  voxels = int(np.prod(patch_size)) * config.data.batch_size * views
  peak = _peak_memory_bytes(device)
  return {
      'what': 'step', 'device': device.device_kind, 'platform': device.platform,
      'preset': config.preset, 'patch_size': list(patch_size), 'batch_size': config.data.batch_size,
      'views': views, 'dtype': config.model.dtype,
      'conv_impl': layers.resolve_conv_impl(config.model.conv_impl),
      'subsample_stride': bool(config.model.subsample_stride), 'remat': bool(config.model.remat),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'step_time_ms': round(median_ms, 2),
      'step_time_ms_min': round(min(times_ms), 2), 'repeats': repeats,
      'voxels_per_s': round(voxels / (median_ms / 1e3)), 'compile_s': round(compile_s, 1),
      'peak_memory_gb': None if peak is None else round(peak / 1e9, 2),
      'loss_finite': bool(jnp.isfinite(metrics['loss'])),
  }


def benchmark_training(config: ml_collections.ConfigDict, steps: int = 60, repeats: int = 10
                       ) -> dict[str, Any]:
  """Steady-state steps/s of a real training run against the bare step on the same config.

  The run is `train.loop.train_and_evaluate` as a user starts it (loader workers, device
  augmentation, metrics one step late, the progress bar, a log row every `train.log_every` steps)
  without validation and with one checkpoint at the end, in a temporary folder. Its rate is the
  median of the logged windows after the first one (which holds the compile). The bare step is
  `benchmark_step` on one device, so the two compare on a one-device machine.
  """
  from dualseg_jax.train import loop
  from dualseg_jax.train import reporting
  config = config.copy_and_resolve_references()
  log_every = int(config.train.log_every)
  if steps < 3 * log_every:
    raise ValueError(f'--train_steps={steps}: need at least 3 log windows of train.log_every='
                     f'{log_every} steps (the first one holds the compile)')
  config.train.steps = steps
  config.train.eval_every = 0
  config.train.checkpoint_every = steps
  config.train.evaluate_test_center = False
  with tempfile.TemporaryDirectory(prefix='dualseg_bench_') as workdir:
    # The run's own summary goes to stderr: stdout carries only the benchmark's JSON rows.
    with contextlib.redirect_stdout(sys.stderr):
      result = loop.train_and_evaluate(config, workdir)
    rows = [row for row in reporting.MetricsLog.read(pathlib.Path(workdir) / 'metrics.jsonl')
            if 'steps_per_s' in row]
  rates = [row['steps_per_s'] for row in rows[1:]]
  train_rate = statistics.median(rates)
  bare = benchmark_step(config, repeats=repeats)
  bare_rate = 1e3 / bare['step_time_ms']
  return {
      'what': 'train', 'device': bare['device'], 'platform': bare['platform'],
      'preset': config.preset, 'patch_size': bare['patch_size'], 'batch_size': bare['batch_size'],
      'views': bare['views'], 'dtype': config.model.dtype, 'steps': result.final_step,
      'log_every': log_every, 'num_workers': int(config.data.num_workers),
      'train_steps_per_s': round(train_rate, 3),
      'train_steps_per_s_windows': [round(rate, 3) for rate in rates],
      'bare_steps_per_s': round(bare_rate, 3), 'bare_step_time_ms': bare['step_time_ms'],
      'train_over_bare': round(train_rate / bare_rate, 3),
      'within_10_percent': bool(train_rate >= 0.9 * bare_rate),
  }


def benchmark_balance(config: ml_collections.ConfigDict, num_batches: int = 4,
                      workdir: str | None = None, step: int = 0) -> dict[str, Any]:
  """Each active weighted term's gradient norm over the encoder (`train.balance`), mean over
  `num_batches` real training batches of `config` at train step `step` (ramps and anneals as
  there), from initialisation or, with `workdir`, from that run's latest checkpoint; with the
  per-call time against the bare step's."""
  from dualseg_jax import run_dir
  from dualseg_jax.data import pipeline
  from dualseg_jax.tools.bench import data as data_bench
  from dualseg_jax.train import balance as balance_lib

  config, _, iterator = data_bench.training_batches(config)
  patch_size = tuple(config.data.patch_size)
  model, state, _ = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed), patch_size)
  source = 'initialisation'
  if workdir:
    params, restored_step = run_dir.restore_params(workdir, 'latest')
    state = state.replace(params=params)
    source = f'{workdir} step {restored_step}'
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  balance_fn = jax.jit(balance_lib.make_balance_fn(model, config,
                                                   pipeline.device_augmentation(config)))
  rows, times_ms = [], []
  for index in range(num_batches):
    batch = jax.device_put(next(iterator))
    started = time.perf_counter()
    # A fresh augmentation and view draw per batch.
    rows.append(jax.device_get(balance_fn(state.replace(rng=jax.random.PRNGKey(index)), batch)))
    times_ms.append((time.perf_counter() - started) * 1e3)
  names = sorted(rows[0])
  result = {'what': 'balance', 'device': jax.devices()[0].device_kind, 'preset': config.preset,
            'params_from': source, 'step': step, 'batches': num_batches,
            'call_time_ms': round(statistics.median(times_ms[1:] or times_ms), 1)}
  for name in names:
    values = [float(row[name]) for row in rows if np.isfinite(row[name])]
    result[name] = round(float(np.mean(values)), 5) if values else None
  return result
