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


def present_channels(mask: jnp.ndarray) -> jnp.ndarray:
  """(B, D, H, W, C) mask -> (B, C) float32, 1 where the channel holds any foreground voxel."""
  return (jnp.sum(mask.astype(jnp.float32), axis=_SPATIAL_AXES) > 0).astype(jnp.float32)


def dice_over_present(scores: jnp.ndarray, present: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(B, C) soft Dice scores -> (loss, score): means of 1 - score and of score over the
  (sample, channel) pairs whose mask holds foreground; (0, 0) when none does.

  An empty channel's soft Dice is smooth / (sum p + smooth), ~0 for any prediction with a small
  `smooth`: it adds a constant and no gradient, but counted in the mean it would halve the weight
  of the channels that do train (a patch without tumour). BCE trains the empty channels.
  """
  count = jnp.maximum(jnp.sum(present), 1.0)
  return jnp.sum((1.0 - scores) * present) / count, jnp.sum(scores * present) / count


def multi_view_dice(view_probabilities: list[jnp.ndarray], mask: jnp.ndarray,
                    smooth: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Each view's soft-probability map against `mask` -> (loss, score, present share): `soft_dice`,
  then `dice_over_present`, then the mean over views."""
  present = present_channels(mask)
  terms = [dice_over_present(soft_dice(probabilities, mask, smooth), present)
           for probabilities in view_probabilities]
  loss = mean_over_views([loss for loss, _ in terms])
  score = mean_over_views([score for _, score in terms])
  return loss, score, jnp.mean(present)


@register('dice')
def dice_loss(views, batch, loss_config, step):
  """1 - soft Dice of sigmoid(logits) against `mask`, averaged over the (sample, channel) pairs
  that hold foreground (see `dice_over_present`), then over views."""
  del step
  loss, score, present = multi_view_dice(
      [jax.nn.sigmoid(view['logits'].astype(jnp.float32)) for view in views], batch['mask'],
      loss_config.dice_smooth)
  return loss, {'score': score, 'present': present}


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
