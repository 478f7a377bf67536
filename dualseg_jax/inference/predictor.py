"""A trained network applied to whole CT volumes: preprocessing as in training, sliding-window
prediction at the training spacing, outputs resampled back to the input's canonical grid and
post-processed into a 0/1/2 label map. `load_predictor(workdir)` rebuilds one from a run.
"""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dualseg_jax.data import preprocess as preprocess_lib
from dualseg_jax.data.volume import Volume
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.inference import postprocess
from dualseg_jax.inference import sliding_window

ApplyFn = Callable[[Any, jax.Array], dict]  # (variables, windows) -> dict(logits, sdf, ...)


def _model_apply_fn(model_config: ml_collections.ConfigDict) -> ApplyFn:
  from dualseg_jax.models import build_model  # deferred: only a real model needs flax modules
  model = build_model(model_config)
  return lambda variables, windows: model.apply(variables, windows, train=False)


class Predictor:
  """Holds the parameters and one jitted network apply; predicts volume after volume.

  `apply_fn(variables, windows)` defaults to the network of `config.model`; tests pass a stub.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any,
               apply_fn: ApplyFn | None = None):
    self.config = config
    self.params = params
    apply_fn = apply_fn or _model_apply_fn(config.model)

    @jax.jit
    def apply_window_heads(params, windows):
      outputs = apply_fn({'params': params}, windows)
      # Only the two heads are returned, so the embedding and slice head are compiled away.
      return {'logits': outputs['logits'], 'sdf': outputs['sdf']}

    self._apply = apply_window_heads
    self.window_size = tuple(int(size) for size in config.data.patch_size)

  def with_params(self, params: Any) -> 'Predictor':
    """The same network with other parameters, reusing the compiled apply (e.g. per validation)."""
    other = copy.copy(self)
    other.params = params
    return other

  def predict_windows(self, windows: jax.Array) -> dict:
    """windows (n, d, h, w, 1) -> dict(logits, sdf); params are an argument, not a constant."""
    return self._apply(self.params, windows)

  def preprocess(self, volume: Volume) -> np.ndarray:
    """Canonical HU array -> windowed [0, 1] image at the training spacing, with the training
    cache's own functions (resample the HU with data.image_interpolation, then window)."""
    data_config = self.config.data
    shape = preprocess_lib.resampled_shape(volume.array.shape, volume.spacing_mm,
                                           data_config.target_spacing_mm)
    resampled = preprocess_lib.resample(volume.array.astype(np.float32), shape,
                                        data_config.image_interpolation)
    return preprocess_lib.window(resampled, data_config.window_hu)

  def predict_volume(self, volume: Volume, tta_flips: int | None = None,
                     progress: sliding_window.ProgressFn | None = None,
                     pancreas_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Predicts one volume; every output lies on the volume's canonical grid (volume.array.shape).

    Returns dict(label uint8 (D, H, W) with 0/1/2, probabilities float32 (D, H, W, C),
    sdf float32 (D, H, W, C)). `tta_flips` overrides config.inference.tta_flips.
    `pancreas_mask` (canonical grid) restricts a tumour-only stage's tumour, as in the cascade.
    """
    inference_config = self.config.inference
    num_flips = inference_config.tta_flips if tta_flips is None else tta_flips
    image = self.preprocess(volume)
    outputs = sliding_window.sliding_window_inference(
        image, self.predict_windows, self.window_size,
        overlap=inference_config.overlap,
        windows_per_batch=inference_config.windows_per_batch,
        flips=sliding_window.flip_combinations(num_flips),
        device_buffer_max_voxels=inference_config.device_buffer_max_voxels,
        progress=progress)
    original_shape = volume.array.shape
    # Linear interpolation of probabilities, then the threshold: smoother than resampling labels.
    # Same cell-centred grids as the way in, so the two resamplings line up.
    probabilities = preprocess_lib.resample(outputs['probabilities'], original_shape, 'linear')
    sdf = preprocess_lib.resample(outputs['sdf'], original_shape, 'linear')
    label = postprocess.probabilities_to_label(
        probabilities, self.config.stage, inference_config, pancreas_mask=pancreas_mask,
        spacing_mm=volume.spacing_mm)
    return {'label': label, 'probabilities': probabilities.astype(np.float32),
            'sdf': sdf.astype(np.float32)}


def _merge_into(base: ml_collections.ConfigDict, saved: dict) -> None:
  """Overlays a saved config on the defaults, so keys added since the run keep their defaults."""
  for key, value in saved.items():
    if key in base and isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge_into(base[key], value)
    elif key in base and isinstance(base[key], tuple) and isinstance(value, list):
      base[key] = tuple(value)
    else:
      base[key] = value


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to workdir/config.json, on top of today's defaults."""
  from dualseg_jax import config_base
  path = pathlib.Path(workdir) / 'config.json'
  if not path.exists():
    raise DataError(f'{path} does not exist: --workdir must be a training run directory '
                    '(it holds config.json and checkpoints/)')
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(
        f'{path} is not readable JSON ({error}); rewrite it or use another run') from error
  config = config_base.base_config()
  try:
    # A key the run predates holds what the run computed, not today's default.
    _merge_into(config, config_base.with_earlier_values(saved))
  except TypeError as error:
    raise ConfigError(f'{path}: a value has the wrong type for its key ({error})') from error
  return config


def load_predictor(workdir: str | pathlib.Path, checkpoint: str | None = None) -> Predictor:
  """A Predictor from a run directory: workdir/config.json plus the parameters of its newest
  readable checkpoint; `checkpoint` ('best': workdir/best, else workdir/checkpoints; 'latest':
  workdir/checkpoints) defaults to config.inference.checkpoint.
  """
  from dualseg_jax.train.checkpoint import restore_params  # deferred: pulls in orbax and grain
  config = load_config(workdir)
  checkpoint = checkpoint or config.inference.checkpoint
  if checkpoint not in ('best', 'latest'):
    raise ConfigError(f'inference.checkpoint = {checkpoint!r}: choose best or latest')
  params, _ = restore_params(pathlib.Path(workdir), which=checkpoint)
  return Predictor(config, params)
