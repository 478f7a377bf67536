"""Output-space consistency between the views: they see the same anatomy, so should agree."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from dualseg_jax.losses.registry import register


@register('consistency')
def consistency_loss(views, batch, loss_config, step):
  """MSE between the views' sigmoid maps (+ MSE between their SDF maps when
  `consistency_on_sdf`), averaged over view pairs; gradients reach both views of a pair on
  purpose (neither is a fixed teacher). One view: 0."""
  del batch, step
  pairs = list(itertools.combinations(range(len(views)), 2))
  if not pairs:
    zero = jnp.zeros((), jnp.float32)
    return zero, {'mask_mse': zero, 'sdf_mse': zero}
  probabilities = [jax.nn.sigmoid(view['logits'].astype(jnp.float32)) for view in views]
  mask_mse = jnp.mean(jnp.stack(
      [jnp.mean((probabilities[a] - probabilities[b]) ** 2) for a, b in pairs]))
  sdf_mse = jnp.zeros((), jnp.float32)
  if loss_config.consistency_on_sdf:
    signed_distances = [view['sdf'].astype(jnp.float32) for view in views]
    sdf_mse = jnp.mean(jnp.stack(
        [jnp.mean((signed_distances[a] - signed_distances[b]) ** 2) for a, b in pairs]))
  return mask_mse + sdf_mse, {'mask_mse': mask_mse, 'sdf_mse': sdf_mse}
