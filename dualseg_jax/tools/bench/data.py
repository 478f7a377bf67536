"""Loader benchmark: host time per training example, iterator throughput with the configured
workers, and the device-side augmentation time per batch (`python -m launch.bench --what=loader`)."""

from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np

from dualseg_jax import structures as structures_lib
from dualseg_jax.data import loader
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry


def benchmark_loader(config: ml_collections.ConfigDict, num_batches: int = 20,
                     augment: bool = True) -> dict[str, Any]:
  """Measure the input pipeline of `config` (phantoms and cache are built when missing).

  Returns the cache build time, host seconds per example in one thread (`sample_patch` alone),
  samples/s that one worker can deliver, batches/s of the real iterator (data.num_workers
  processes) and, with `augment`, the jitted device augmentation's seconds per batch.
  """
  import jax  # deferred: the host part needs no accelerator
  from dualseg_jax.data import augment as augment_lib
  from dualseg_jax.data import pipeline  # deferred: pulls in jax

  config = config.copy_and_resolve_references()
  if config.data.source == 'synthetic' and not config.data.root:
    pipeline.resolve_data_root(config)
  started = time.perf_counter()
  cache = preprocess.ensure_cache(config, progress=False)
  cache_seconds = time.perf_counter() - started
  split = registry.split_cases(config.data, registry.list_cases(config.data), config.seed)
  cases = loader.cached_cases(cache, split.train, config.stage, config.data.centers)
  settings = loader.PatchSettings.from_config(config)
  batch_size = loader.local_batch_size(int(config.data.batch_size), jax.process_count())

  # One thread, no prefetch: what a single worker costs per example (after one warm read).
  rng = np.random.default_rng(0)
  loader.sample_patch(cases[0], settings, rng)
  num_samples = max(num_batches * batch_size, 5)
  started = time.perf_counter()
  for index in range(num_samples):
    loader.sample_patch(cases[index % len(cases)], settings, rng)
  host_seconds = (time.perf_counter() - started) / num_samples

  iterator = loader.make_train_iterator(config, split.train, cache, config.seed)
  batch = next(iterator)  # starts workers and fills the prefetch buffers
  started = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  iterator_seconds = (time.perf_counter() - started) / num_batches

  result = {
      'benchmark': 'loader',
      'stage': config.stage,
      'patch_size': list(settings.patch_size),
      'batch_size_per_process': batch_size,
      'num_workers': int(config.data.num_workers),
      'train_cases': len(cases),
      'cache_build_or_check_s': round(cache_seconds, 3),
      'host_ms_per_example_one_thread': round(1000 * host_seconds, 2),
      'samples_per_s_per_worker': round(1.0 / host_seconds, 2),
      'host_ms_per_batch': round(1000 * iterator_seconds, 2),
      'batches_per_s': round(1.0 / iterator_seconds, 2),
  }
  if augment:
    device_batch = jax.device_put({name: value for name, value in batch.items()})
    augment_fn = jax.jit(lambda key, b: augment_lib.augment_batch(
        key, b, config.augment, cache.settings.target_spacing_mm, config.loss.slice_min_voxels))
    jax.block_until_ready(augment_fn(jax.random.key(0), device_batch))
    repeats = max(3, num_batches // 4)
    started = time.perf_counter()
    for step in range(repeats):
      out = augment_fn(jax.random.key(step + 1), device_batch)
    jax.block_until_ready(out)
    result['device_augment_ms_per_batch'] = round(1000 * (time.perf_counter() - started) / repeats, 2)
    result['device'] = str(jax.devices()[0].device_kind)
  return result


def training_batches(config: ml_collections.ConfigDict
                     ) -> tuple[ml_collections.ConfigDict, preprocess.Cache, Any]:
  """(a resolved copy of `config`, its cache, its training iterator on this process alone), with
  the synthetic data generated and the cache built when missing."""
  from dualseg_jax.data import pipeline  # deferred: pulls in jax
  config = config.copy_and_resolve_references()
  pipeline.resolve_data_root(config)
  _, split = pipeline.list_and_split(config)
  cache = preprocess.ensure_cache(config, progress=False)
  iterator = loader.make_train_iterator(config, split.train, cache, config.seed,
                                        process_index=0, process_count=1)
  return config, cache, iterator


def target_agreement(config: ml_collections.ConfigDict, num_batches: int = 20,
                     sharpness: tuple[float, ...] = (50.0, 1500.0)) -> dict[str, Any]:
  """How well a perfect SDF prediction, pushed through sigmoid(-k sdf), reproduces the mask the
  Dice terms read, on augmented training patches of `config` (docs/design.md, "Signed
  distances"): soft Dice per structure and k, mean and minimum over the patches holding it."""
  import jax  # deferred: the host part needs no accelerator
  from dualseg_jax.data import augment as augment_lib

  config, cache, iterator = training_batches(config)
  augment_fn = jax.jit(lambda key, b: augment_lib.augment_batch(
      key, b, config.augment, cache.settings.target_spacing_mm, config.loss.slice_min_voxels))
  structures = structures_lib.STAGE_STRUCTURES[config.stage]
  scores = {(name, k): [] for name in structures for k in sharpness}
  for index in range(num_batches):
    out = jax.device_get(augment_fn(jax.random.key(index), next(iterator)))
    for sample in range(out['sdf'].shape[0]):
      for channel, name in enumerate(structures):
        if not out['sdf_valid'][sample, channel]:
          continue
        mask = out['mask'][sample, ..., channel].astype(np.float64)
        signed_distance = out['sdf'][sample, ..., channel].astype(np.float64)
        for k in sharpness:
          transformed = 1.0 / (1.0 + np.exp(np.clip(k * signed_distance, -60.0, 60.0)))
          scores[(name, k)].append(
              2.0 * (transformed * mask).sum() / (transformed.sum() + mask.sum()))
  result: dict[str, Any] = {'benchmark': 'targets', 'stage': config.stage,
                            'patch_size': list(config.data.patch_size), 'batches': num_batches}
  for (name, k), values in scores.items():
    if values:
      result[f'{name}_k{k:g}_dice_mean'] = round(float(np.mean(values)), 4)
      result[f'{name}_k{k:g}_dice_min'] = round(float(np.min(values)), 4)
      result[f'{name}_patches'] = len(values)
  return result


def _separability(image: np.ndarray, inside: np.ndarray, around: np.ndarray) -> float:
  """d' of the voxels `inside` against those `around`: mean difference over the pooled std."""
  a, b = image[inside], image[around]
  return float((a.mean() - b.mean()) / np.sqrt(0.5 * (a.var() + b.var()) + 1e-12))


def view_contrast(config: ml_collections.ConfigDict, num_batches: int = 8,
                  views_per_patch: int = 32, shell_voxels: int = 3) -> dict[str, Any]:
  """How much of the pancreas's contrast a RandConv view keeps, on augmented training patches:
  the d' of the pancreas against a `shell_voxels` shell around it in each view, over the same d'
  in the patch itself; quantiles, and the share of views that keep under a quarter of it or
  invert it; the same for the tumour (keys `tumour_*`) in patches holding one. Measured at the
  reference's kernel scale (gain 1, std 1 / sqrt(k^3), the default
  `augment.randconv_gain`) and at the ReLU gain sqrt(2) that runs before that key used."""
  import jax  # deferred: the host part needs no accelerator
  from scipy import ndimage
  from dualseg_jax.data import augment as augment_lib
  from dualseg_jax.models import randconv

  config, cache, iterator = training_batches(config)
  augment_fn = jax.jit(lambda key, b: augment_lib.augment_batch(
      key, b, config.augment, cache.settings.target_spacing_mm, config.loss.slice_min_voxels))
  draw = jax.jit(randconv.draw_parameters, static_argnums=(1, 2, 3, 4))
  apply = jax.jit(randconv.apply_parameters)
  kernel_sizes = tuple(config.augment.randconv_kernel_sizes)
  # Per structure (the stage's mask channels: joint 0 pancreas, 1 tumour) and kernel scale.
  structures = {'joint': (('pancreas', 0), ('tumour', 1))}.get(
      config.stage, ((config.stage.split('_')[0], 0),))
  relative = {(name, scale): [] for name, _ in structures for scale in ('gain_1', 'gain_sqrt2')}
  key = jax.random.key(0)
  for index in range(num_batches):
    batch = jax.device_get(augment_fn(jax.random.key(index), next(iterator)))
    for sample in range(batch['image'].shape[0]):
      image = batch['image'][sample:sample + 1]
      measured = []
      for name, channel in structures:
        inside = batch['mask'][sample, ..., channel] > 0.5
        if inside.sum() < 20:
          continue
        around = ndimage.binary_dilation(inside, iterations=shell_voxels) & ~inside
        raw = _separability(image[0, ..., 0], inside, around)
        if abs(raw) >= 0.1:
          measured.append((name, inside, around, raw))
      for _ in range(views_per_patch if measured else 0):
        key, view_key = jax.random.split(key)
        parameters = draw(view_key, 1, 1, kernel_sizes, 1.0)
        for scale_name, scale in (('gain_1', 1.0), ('gain_sqrt2', np.sqrt(2.0))):
          scaled = dict(parameters, kernel=parameters['kernel'] * scale)
          view = np.asarray(apply(image, scaled))[0, 0, ..., 0]
          for name, inside, around, raw in measured:
            relative[(name, scale_name)].append(_separability(view, inside, around) / raw)
  result: dict[str, Any] = {'benchmark': 'views', 'patch_size': list(config.data.patch_size),
                            'views_per_patch': views_per_patch}
  for (name, scale_name), values in relative.items():
    result[f'{name}_patches'] = len(values) // views_per_patch
    if not values:
      continue
    values = np.asarray(values)
    prefix = f'{scale_name}' if name == 'pancreas' else f'{name}_{scale_name}'
    for q in (10, 25, 50, 75, 90):
      result[f'{prefix}_kept_q{q}'] = round(float(np.percentile(values, q)), 3)
    result[f'{prefix}_under_quarter'] = round(float(np.mean(np.abs(values) < 0.25)), 3)
    result[f'{prefix}_inverted'] = round(float(np.mean(values < 0)), 3)
  result['patches'] = result[f'{structures[0][0]}_patches']
  return result
