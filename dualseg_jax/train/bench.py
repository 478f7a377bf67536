"""Benchmark of the full training step (augmentation, RandConv views, all losses, Adam)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualseg_jax.data import targets
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
                                config.data.num_positions, config.loss.slice_min_voxels)
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
      'views': views, 'dtype': config.model.dtype, 'step_time_ms': round(median_ms, 2),
      'step_time_ms_min': round(min(times_ms), 2), 'repeats': repeats,
      'voxels_per_s': round(voxels / (median_ms / 1e3)), 'compile_s': round(compile_s, 1),
      'peak_memory_gb': None if peak is None else round(peak / 1e9, 2),
      'loss_finite': bool(jnp.isfinite(metrics['loss'])),
  }
