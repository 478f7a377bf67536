"""Whole-volume inference timing: seconds per case for the configured network in the sliding
window, with and without test-time flips, on whatever device JAX runs on.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualseg_jax.inference import sliding_window
from dualseg_jax.inference.predictor import Predictor


def _random_params(config: ml_collections.ConfigDict, seed: int = 0):
  """Parameters of the right shapes (timing does not depend on their values; no init compile)."""
  from dualseg_jax.models import build_model
  model = build_model(config.model)
  windows = jnp.zeros((1,) + tuple(config.data.patch_size) + (1,), jnp.float32)
  shapes = jax.eval_shape(lambda key: model.init(key, windows, train=False), jax.random.key(seed))
  leaves, structure = jax.tree.flatten(shapes['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      structure, [jnp.asarray(rng.normal(0.0, 0.05, leaf.shape), jnp.float32) for leaf in leaves])


def benchmark_inference(config: ml_collections.ConfigDict, shape: Sequence[int] = (100, 512, 512),
                        tta_flips: Sequence[int] = (1, 8), repeats: int = 1) -> list[dict]:
  """Times `sliding_window_inference` on a random image of `shape` (already at the training
  spacing, so no resampling or post-processing is counted), once per entry of `tta_flips`.

  Compilation is excluded: each flip count runs once untimed on the same shape first.
  Returns one row per flip count: seconds per case (best of `repeats`), windows, device, shapes.
  """
  predictor = Predictor(config, _random_params(config))
  inference_config = config.inference
  image = np.random.default_rng(0).uniform(0.0, 1.0, tuple(shape)).astype(np.float32)
  window_size = tuple(int(size) for size in config.data.patch_size)
  num_windows = sliding_window.count_windows(image.shape, window_size, inference_config.overlap)
  buffers = ('device' if int(np.prod(shape)) <= inference_config.device_buffer_max_voxels
             else 'host')
  rows = []
  for num_flips in tta_flips:
    def run_once():
      outputs = sliding_window.sliding_window_inference(
          image, predictor.predict_windows, window_size,
          overlap=inference_config.overlap,
          windows_per_batch=inference_config.windows_per_batch,
          flips=sliding_window.flip_combinations(num_flips),
          device_buffer_max_voxels=inference_config.device_buffer_max_voxels)
      return outputs['probabilities']  # already on the host: the timing includes the transfer

    run_once()  # compiles
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run_once()
      times.append(time.perf_counter() - start)
    rows.append({
        'what': 'inference', 'preset': config.preset, 'shape': list(shape),
        'window': list(window_size), 'overlap': inference_config.overlap,
        'windows_per_batch': inference_config.windows_per_batch, 'windows': num_windows,
        'tta_flips': num_flips, 'buffers': buffers, 'dtype': config.model.dtype,
        'seconds_per_case': min(times), 'device': jax.devices()[0].device_kind,
        'backend': jax.default_backend()})
  return rows
