"""A trained network applied to whole CT volumes: preprocessing as in training, sliding-window
prediction at the training spacing, outputs resampled back to the input's canonical grid and
post-processed into a 0/1/2 label map. `load_predictor(path)` rebuilds one from a run or an
exported model; `load_ensemble(paths)` averages several.
"""

from __future__ import annotations

import copy
import logging
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from dualseg_jax import run_dir
from dualseg_jax.data import preprocess as preprocess_lib
from dualseg_jax.data.volume import Volume
from dualseg_jax.errors import ConfigError
from dualseg_jax.inference import model_dir as model_dir_lib
from dualseg_jax.inference import overrides as overrides_lib
from dualseg_jax.inference import postprocess
from dualseg_jax.inference import sliding_window
from dualseg_jax.models import build_model
# A run's or an exported model's config.json, which every Predictor is built from.
from dualseg_jax.run_dir import load_config

log = logging.getLogger(__name__)

ApplyFn = Callable[[Any, jax.Array], dict]  # (variables, windows) -> dict(logits, sdf, ...)


def _model_apply_fn(model_config: ml_collections.ConfigDict) -> ApplyFn:
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
    outputs = self.predict_probabilities(volume, tta_flips, progress)
    outputs['label'] = self.label(outputs['probabilities'], volume, pancreas_mask)
    return outputs

  def label(self, probabilities: np.ndarray, volume: Volume,
            pancreas_mask: np.ndarray | None = None) -> np.ndarray:
    """Probabilities on the volume's canonical grid -> uint8 0/1/2 label map (threshold and
    post-processing of config.inference)."""
    return postprocess.probabilities_to_label(
        probabilities, self.config.stage, self.config.inference, pancreas_mask=pancreas_mask,
        spacing_mm=volume.spacing_mm)

  def predict_probabilities(self, volume: Volume, tta_flips: int | None = None,
                            progress: sliding_window.ProgressFn | None = None
                            ) -> dict[str, np.ndarray]:
    """dict(probabilities, sdf), float32 (D, H, W, C) on the volume's canonical grid, before any
    threshold."""
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
    return {'probabilities': probabilities.astype(np.float32), 'sdf': sdf.astype(np.float32)}


# What turns averaged probabilities into labels: the first member's values are used.
_LABEL_SETTINGS = ('threshold', 'postprocess', 'component_fraction', 'min_component_mm3',
                   'tumour_inside_pancreas', 'pancreas_dilation_vox')


def check_averageable(names: Sequence[str], configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises a ConfigError naming the model whose output channels differ from the first's (stage
  or number of channels); warns where the label settings differ."""
  first_name, first = names[0], configs[0]
  for name, config in zip(names[1:], configs[1:]):
    if config.stage != first.stage:
      raise ConfigError(f'{name} predicts stage {config.stage!r} but {first_name} predicts '
                        f'{first.stage!r}: their output channels mean different structures, so '
                        'their probabilities cannot be averaged; ensemble models of one stage')
    if config.model.num_classes != first.model.num_classes:
      raise ConfigError(f'{name} has {config.model.num_classes} output channels but {first_name} '
                        f'has {first.model.num_classes}: ensemble models with the same channels')
    different = [key for key in _LABEL_SETTINGS
                 if config.inference[key] != first.inference[key]]
    if different:
      log.warning('%s differs from %s in inference.%s; the ensemble thresholds and '
                  'post-processes with the values of %s', name, first_name,
                  ', inference.'.join(different), first_name)


class EnsemblePredictor:
  """Several networks of one stage predicting as one: each predicts the volume its own way (its
  spacing, patch and flips), the probabilities and SDFs are averaged on the input's canonical
  grid, and the first member's threshold and post-processing make the label map.

  Members may differ in spacing and patch size, since each one's outputs are resampled to the
  input's grid before averaging; they must agree on what each output channel means (the stage).
  """

  def __init__(self, members: Sequence[Predictor], names: Sequence[str] | None = None):
    if not members:
      raise ConfigError('an ensemble needs at least one model')
    names = list(names) if names is not None else [f'model {i}' for i in range(len(members))]
    check_averageable(names, [member.config for member in members])
    self.members = list(members)
    self.names = names
    self.config = members[0].config

  def predict_probabilities(self, volume: Volume, tta_flips: int | None = None,
                            progress: sliding_window.ProgressFn | None = None
                            ) -> dict[str, np.ndarray]:
    totals = None
    windows_before = 0
    for member in self.members:
      member_windows = [0]

      def member_progress(done, total, offset=windows_before, seen=member_windows):
        # One bar over all members: the windows of the members before this one count as done.
        seen[0] = total
        if progress is not None:
          progress(offset + done, offset + total)

      outputs = member.predict_probabilities(volume, tta_flips, member_progress)
      windows_before += member_windows[0]
      if totals is None:
        totals = outputs
      else:
        for key in totals:
          totals[key] += outputs[key]
    return {key: value / np.float32(len(self.members)) for key, value in totals.items()}

  def label(self, probabilities: np.ndarray, volume: Volume,
            pancreas_mask: np.ndarray | None = None) -> np.ndarray:
    return self.members[0].label(probabilities, volume, pancreas_mask)

  def predict_volume(self, volume: Volume, tta_flips: int | None = None,
                     progress: sliding_window.ProgressFn | None = None,
                     pancreas_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """As Predictor.predict_volume, with every member's probabilities and SDFs averaged."""
    outputs = self.predict_probabilities(volume, tta_flips, progress)
    outputs['label'] = self.label(outputs['probabilities'], volume, pancreas_mask)
    return outputs


def load_model_config(path: str | pathlib.Path, checkpoint: str | None = None,
                      inference_overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a Predictor of `path` (a run directory or an exported model) predicts with:
  config.json with `inference_overrides` ('inference.KEY=VALUE' texts) applied and checked;
  refuses a `checkpoint` choice for an exported model, which holds one set of parameters."""
  config = load_config(path)
  overrides = overrides_lib.parse(inference_overrides, config.inference)
  if overrides:
    config = overrides_lib.apply(config, overrides)
  if model_dir_lib.is_model_dir(path) and (checkpoint is not None or 'checkpoint' in overrides):
    given = '--checkpoint' if checkpoint is not None else 'inference.checkpoint'
    raise ConfigError(f'{path} is an exported model: it holds the parameters of one checkpoint '
                      f'({model_dir_lib.read_info(path).get("checkpoint")}); drop {given}, or '
                      'export the other one')
  if checkpoint is not None:
    if checkpoint not in ('best', 'latest'):
      raise ConfigError(f'checkpoint = {checkpoint!r}: choose best or latest')
  elif config.inference.checkpoint not in ('best', 'latest'):
    raise ConfigError(f'inference.checkpoint = {config.inference.checkpoint!r}: choose best or '
                      'latest')
  return config


def load_predictor(workdir: str | pathlib.Path, checkpoint: str | None = None,
                   inference_overrides: Sequence[str] = ()) -> Predictor:
  """A Predictor from a run directory or an exported model (launch.export).

  A run gives workdir/config.json plus the parameters of its newest readable checkpoint;
  `checkpoint` ('best': workdir/best, else workdir/checkpoints; 'latest': workdir/checkpoints)
  defaults to config.inference.checkpoint. An exported model gives its config.json and
  params.msgpack, checked against its sha256. `inference_overrides` as in load_model_config.
  """
  config = load_model_config(workdir, checkpoint, inference_overrides)
  if model_dir_lib.is_model_dir(workdir):
    params, _ = model_dir_lib.load_params(workdir)
    # On the device once: the jitted apply takes the parameters as an argument at every batch.
    return Predictor(config, jax.device_put(params))
  params, _ = run_dir.restore_params(workdir, which=checkpoint or config.inference.checkpoint)
  return Predictor(config, params)


def load_ensemble(paths: Sequence[str | pathlib.Path], checkpoint: str | None = None,
                  inference_overrides: Sequence[str] = ()) -> Predictor | EnsemblePredictor:
  """One path: its Predictor; several (e.g. one model per fold): an EnsemblePredictor averaging
  their probabilities. Every config is read and checked before any network is restored."""
  if not paths:
    raise ConfigError('no model given: name at least one exported model or run directory')
  if len(paths) == 1:
    return load_predictor(paths[0], checkpoint, inference_overrides)
  names = [str(path) for path in paths]
  check_averageable(names, [load_model_config(path, checkpoint, inference_overrides)
                            for path in paths])
  members = [load_predictor(path, checkpoint, inference_overrides) for path in paths]
  return EnsemblePredictor(members, names=names)
