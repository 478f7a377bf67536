"""Feature-space contrastive loss (NT-Xent) on embeddings gathered at fixed-size position sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualseg_jax.losses.registry import register

# Keeps the normalisation's gradient finite for an all-zero (post-ReLU) embedding.
_NORM_EPS = 1e-12


def gather_embeddings(embedding: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  """(B, d, h, w, E) embedding, (B, N, 3) int (d, h, w) positions -> (B, N, E), one fixed-size
  gather (indices are clipped into the grid; invalid rows are masked by the caller)."""
  def gather_one(sample_embedding, sample_positions):
    return sample_embedding.at[sample_positions[:, 0], sample_positions[:, 1],
                               sample_positions[:, 2]].get(mode='clip')
  return jax.vmap(gather_one)(embedding, positions)


def l2_normalize(features: jnp.ndarray) -> jnp.ndarray:
  features = features.astype(jnp.float32)
  return features * jax.lax.rsqrt(jnp.sum(features ** 2, axis=-1, keepdims=True) + _NORM_EPS)


def nt_xent(positives: jnp.ndarray, negatives: jnp.ndarray, positive_valid: jnp.ndarray,
            negative_valid: jnp.ndarray, temperature: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """NT-Xent over view-paired positives against ring negatives.

  positives, negatives: (V, B, N, E) L2-normalised features of V views at the sample's N positive
  (skeleton) and N negative (ring) positions; positive_valid, negative_valid: (B, N) bool.
  With s(x, y) = <x, y> / temperature, for each sample b, each ordered view pair (a, c) with
  a != c (the pair (0, 0) when V = 1) and each valid positive i:
    l(b, a, c, i) = -s(P[a,b,i], P[c,b,i])
                    + log( exp s(P[a,b,i], P[c,b,i]) + sum_{v, valid j} exp s(P[a,b,i], Q[v,b,j]) )
  i.e. the anchor's partner is the same position in the other view and its negatives are the
  valid ring features of every view. L(b) = mean of l over pairs and valid i, for samples with
  at least one valid positive; the loss is the mean of L(b) over those samples (0 if none).
  Returns (loss, number of samples that took part).
  """
  num_views = positives.shape[0]
  view_pairs = [(a, c) for a in range(num_views) for c in range(num_views) if a != c] or [(0, 0)]
  batch_size, num_negatives = negative_valid.shape
  # (B, V*N) negatives of all views, in the same order as the logits below.
  all_negative_valid = jnp.tile(negative_valid, (1, num_views))
  anchor_losses = []
  for anchor_view, partner_view in view_pairs:
    anchors = positives[anchor_view]
    positive_logit = jnp.sum(anchors * positives[partner_view], axis=-1) / temperature  # (B, N)
    negative_logits = jnp.einsum('bie,vbje->bivj', anchors, negatives) / temperature
    negative_logits = negative_logits.reshape(batch_size, anchors.shape[1],
                                              num_views * num_negatives)
    negative_logits = jnp.where(all_negative_valid[:, None, :], negative_logits, -jnp.inf)
    logits = jnp.concatenate([positive_logit[..., None], negative_logits], axis=-1)
    anchor_losses.append(jax.nn.logsumexp(logits, axis=-1) - positive_logit)
  anchor_losses = jnp.stack(anchor_losses)  # (pairs, B, N)
  weights = jnp.broadcast_to(positive_valid.astype(jnp.float32), anchor_losses.shape)
  anchor_counts = jnp.sum(weights, axis=(0, 2))  # (B,)
  sample_losses = (jnp.sum(jnp.where(weights > 0, anchor_losses, 0.0), axis=(0, 2))
                   / jnp.maximum(anchor_counts, 1.0))
  has_positives = (anchor_counts > 0).astype(jnp.float32)
  num_samples = jnp.sum(has_positives)
  return jnp.sum(sample_losses * has_positives) / jnp.maximum(num_samples, 1.0), num_samples


@register('contrastive')
def contrastive_loss(views, batch, loss_config, step):
  """`nt_xent` with `loss_config.temperature` on the views' embeddings at the batch's
  positive_positions / negative_positions (the contrastive structure: the last channel)."""
  del step
  positives = jnp.stack([l2_normalize(gather_embeddings(view['embedding'],
                                                        batch['positive_positions']))
                         for view in views])
  negatives = jnp.stack([l2_normalize(gather_embeddings(view['embedding'],
                                                        batch['negative_positions']))
                         for view in views])
  loss, num_samples = nt_xent(positives, negatives, batch['positive_valid'],
                              batch['negative_valid'], loss_config.temperature)
  return loss, {'samples': num_samples}
