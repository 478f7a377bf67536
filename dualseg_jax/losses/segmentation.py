"""Segmentation losses on the logits head: soft Dice, voxel BCE and the per-slice tumour BCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dualseg_jax.errors import ConfigError
from dualseg_jax.losses.registry import register

_SPATIAL_AXES = (1, 2, 3)


def soft_dice(probabilities: jnp.ndarray, mask: jnp.ndarray, smooth: float) -> jnp.ndarray:
  """(B, D, H, W, C) maps -> (B, C) soft Dice (2 sum(p m) + s) / (sum p + sum m + s)."""
  probabilities = probabilities.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  overlap = jnp.sum(probabilities * mask, axis=_SPATIAL_AXES)
  total = jnp.sum(probabilities, axis=_SPATIAL_AXES) + jnp.sum(mask, axis=_SPATIAL_AXES)
  return (2.0 * overlap + smooth) / (total + smooth)


def mean_over_views(values: list[jnp.ndarray]) -> jnp.ndarray:
  return jnp.mean(jnp.stack(values))


@register('dice')
def dice_loss(views, batch, loss_config, step):
  """1 - soft Dice of sigmoid(logits) against `mask`, averaged over samples, channels, views."""
  del step
  scores = [soft_dice(jax.nn.sigmoid(view['logits'].astype(jnp.float32)), batch['mask'],
                      loss_config.dice_smooth) for view in views]
  mean_score = mean_over_views([jnp.mean(score) for score in scores])
  return 1.0 - mean_score, {'score': mean_score}


@register('bce')
def bce_loss(views, batch, loss_config, step):
  """Binary cross-entropy of logits against `mask`, averaged over voxels, channels, views."""
  del loss_config, step
  mask = batch['mask'].astype(jnp.float32)
  values = [jnp.mean(optax.sigmoid_binary_cross_entropy(view['logits'].astype(jnp.float32), mask))
            for view in views]
  return mean_over_views(values), {}


@register('slice_bce')
def slice_bce_loss(views, batch, loss_config, step):
  """BCE of the slice head's (B, D) logits against `slice_label` (slice holds the structure)."""
  del loss_config, step
  if 'slice_label' not in batch or any('slice_logits' not in view for view in views):
    raise ConfigError('config.loss.weights.slice_bce is non-zero but the model gives no '
                      "'slice_logits' (or the batch no 'slice_label'): set model.slice_head=True "
                      'or loss.weights.slice_bce=0')
  labels = batch['slice_label'].astype(jnp.float32)
  values = [jnp.mean(optax.sigmoid_binary_cross_entropy(
      view['slice_logits'].astype(jnp.float32), labels)) for view in views]
  return mean_over_views(values), {}
