"""Output-space consistency between the views: they see the same anatomy, so should agree."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from dualseg_jax.errors import ConfigError
from dualseg_jax.losses.registry import register


CONSISTENCY_FORMS = ('mse', 'cosine')


def _one_minus_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - cosine similarity of each sample's flattened map, averaged over the batch."""
  a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  norms = jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1)
  return jnp.mean(1.0 - jnp.sum(a * b, axis=1) / jnp.maximum(norms, 1e-8))


@register('consistency', compares_views=True)
def consistency_loss(views, batch, loss_config, step):
  """Agreement of the views' sigmoid maps, averaged over view pairs: their MSE
  (`loss.consistency_form='mse'`, the reference's tumour stages) or 1 - their cosine similarity
  per sample ('cosine', the reference's coarse pancreas stage); + MSE between the views' SDF maps
  when `consistency_on_sdf`. Gradients reach both views of a pair on purpose (neither is a fixed
  teacher). One view: 0."""
  del batch, step
  form = loss_config.get('consistency_form', 'mse')
  if form not in CONSISTENCY_FORMS:
    raise ConfigError(f'loss.consistency_form={form!r}: choose one of {CONSISTENCY_FORMS}')
  pairs = list(itertools.combinations(range(len(views)), 2))
  if not pairs:
    zero = jnp.zeros((), jnp.float32)
    return zero, {'mask_mse': zero, 'sdf_mse': zero}
  probabilities = [jax.nn.sigmoid(view['logits'].astype(jnp.float32)) for view in views]
  if form == 'cosine':
    mask_term = lambda a, b: _one_minus_cosine(a, b)
  else:
    mask_term = lambda a, b: jnp.mean((a - b) ** 2)
  mask_mse = jnp.mean(jnp.stack([mask_term(probabilities[a], probabilities[b]) for a, b in pairs]))
  sdf_mse = jnp.zeros((), jnp.float32)
  if loss_config.consistency_on_sdf:
    signed_distances = [view['sdf'].astype(jnp.float32) for view in views]
    sdf_mse = jnp.mean(jnp.stack(
        [jnp.mean((signed_distances[a] - signed_distances[b]) ** 2) for a, b in pairs]))
  return mask_mse + sdf_mse, {'mask_mse': mask_mse, 'sdf_mse': sdf_mse}
