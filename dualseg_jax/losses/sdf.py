"""Losses on the signed-distance head: L1 regression and Dice of the SDF turned into a mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualseg_jax.errors import ConfigError
from dualseg_jax.losses.registry import ramp_factor, register
from dualseg_jax.losses.segmentation import mean_over_views, multi_view_dice, present_channels

TRANSFORMS = ('smooth', 'hard')
ANNEALS = ('geometric', 'linear')
TRAIN_SDF_ON = ('surface', 'all')  # what `config.loss.sdf_l1_on` may name


def l1_target(batch, loss_config) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(target SDF (B, D, H, W, C), valid (B, C) bool) that `sdf_l1` regresses to.

  loss.sdf_l1_on='surface' (the method): only a (sample, channel) whose patch holds the
  structure's surface (`sdf_valid`). 'all': also a channel whose patch holds none of the
  structure, where every voxel lies outside: its target is the case's distance to the structure
  beyond the patch, normalised per patch (what the loader crops), or 1 where the case holds no
  such structure (no distance: the crop reads 0). A patch the structure fills stays skipped.
  """
  on = loss_config.get('sdf_l1_on', 'surface')
  if on not in TRAIN_SDF_ON:
    raise ConfigError(f'config.loss.sdf_l1_on={on!r}; choose one of {TRAIN_SDF_ON}')
  valid = batch['sdf_valid']
  target = batch['sdf'].astype(jnp.float32)
  if on == 'all':
    empty = present_channels(batch['mask']) == 0  # (B, C)
    outside = empty[:, None, None, None, :]
    target = jnp.where(outside & (target <= 0), 1.0, target)
    valid = valid | empty
  return target, valid


@register('sdf_l1')
def sdf_l1_loss(views, batch, loss_config, step):
  """Mean |sdf - target| over voxels of each (sample, channel) whose target is valid
  (`l1_target`); the mean over the valid (sample, channel) pairs, 0 when none is; averaged over
  views."""
  del step
  target, valid = l1_target(batch, loss_config)
  valid = valid.astype(jnp.float32)  # (B, C)
  num_valid = jnp.sum(valid)
  values = []
  for view in views:
    per_channel = jnp.mean(jnp.abs(view['sdf'].astype(jnp.float32) - target), axis=(1, 2, 3))
    values.append(jnp.sum(per_channel * valid) / jnp.maximum(num_valid, 1.0))
  return mean_over_views(values), {'valid_fraction': num_valid / valid.size}


def transform_sharpness(loss_config, step) -> jnp.ndarray:
  """k of the smooth transform at `step`.

  Constant `transform_k` unless `transform_k_start` > 0 and `transform_anneal_steps` > 0; then it
  goes from transform_k_start at step 0 to transform_k at transform_anneal_steps and stays there:
  'geometric': k = k_start * (k / k_start) ** t (each factor of sharpening gets equal steps),
  'linear':    k = k_start + (k - k_start) * t,   with t = min(step / anneal_steps, 1).
  """
  k_end = jnp.float32(loss_config.transform_k)
  k_start, anneal_steps = loss_config.transform_k_start, loss_config.transform_anneal_steps
  if k_start <= 0 or anneal_steps <= 0:
    return k_end
  progress = ramp_factor(anneal_steps, step)
  k_start = jnp.float32(k_start)
  if loss_config.transform_anneal == 'geometric':
    return k_start * (k_end / k_start) ** progress
  if loss_config.transform_anneal == 'linear':
    return k_start + (k_end - k_start) * progress
  raise ConfigError(f'config.loss.transform_anneal={loss_config.transform_anneal!r}; '
                    f'choose one of {ANNEALS}')


def sdf_to_mask(signed_distance: jnp.ndarray, transform: str, sharpness) -> jnp.ndarray:
  """SDF (negative inside) -> soft mask.

  'smooth': sigmoid(-k * sdf), differentiable everywhere (Luo et al., DTC).
  'hard': 1 where sdf <= 0, a plain comparison whose gradient is exactly zero; kept only to
  reproduce the reference, where this term trains nothing.
  """
  signed_distance = signed_distance.astype(jnp.float32)
  if transform == 'smooth':
    return jax.nn.sigmoid(-sharpness * signed_distance)
  if transform == 'hard':
    return (signed_distance <= 0).astype(jnp.float32)
  raise ConfigError(f'config.loss.transform={transform!r}; choose one of {TRANSFORMS}')


@register('sdf_to_mask_dice')
def sdf_to_mask_dice_loss(views, batch, loss_config, step):
  """1 - soft Dice of sdf_to_mask(view sdf) against `mask`, averaged over the (sample, channel)
  pairs that hold foreground (as the `dice` term), then over views."""
  sharpness = transform_sharpness(loss_config, step)
  loss, score, _ = multi_view_dice(
      [sdf_to_mask(view['sdf'], loss_config.transform, sharpness) for view in views],
      batch['mask'], loss_config.dice_smooth)
  return loss, {'score': score, 'k': jnp.asarray(sharpness, jnp.float32)}
