"""Feature-space contrastive loss (NT-Xent) on embeddings gathered at fixed-size position sets.

Two forms (`loss.contrastive_form`): 'two_class', the method's label-based NT-Xent where every
skeleton embedding pairs with every other skeleton embedding and every ring embedding with every
other ring embedding; and 'view_paired', where a skeleton position's only partner is the same
position in the other view.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dualseg_jax.errors import ConfigError
from dualseg_jax.losses.registry import register

CONTRASTIVE_FORMS = ('two_class', 'view_paired')
# Keeps the normalisation's gradient finite for an all-zero (post-ReLU) embedding.
_NORM_EPS = 1e-12
# Stands in for log(0) in masked log-sum-exps: finite, so an anchor without any valid negative
# still has a finite gradient (exp of it underflows to exactly 0 beside any real logit).
_MASKED_LOGIT = -1e4


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
  """NT-Xent over view-paired positives against ring negatives (the 'view_paired' form).

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


def two_class_nt_xent(positives: jnp.ndarray, negatives: jnp.ndarray, positive_valid: jnp.ndarray,
                      negative_valid: jnp.ndarray, temperature: float
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Label-based NT-Xent: two classes, skeleton (positive) and ring (negative) embeddings.

  positives: (V, B, N, E), negatives: (V, B, M, E) L2-normalised features of V views;
  positive_valid (B, N), negative_valid (B, M) bool. Per sample b, the valid features of every
  view form one set x_1..x_K, each labelled skeleton or ring. With s_ij = <x_i, x_j> / temperature,
  each ordered pair (i, j), i != j, of the same label gives
    l_ij = -s_ij + log( exp s_ij + sum_{valid k of the other label} exp s_ik ),
  so the anchor i's other same-label features stay out of its denominator. L(b) = mean of l_ij
  over those pairs (both labels anchor). The loss is the mean of L(b) over the samples with at
  least one such pair and at least one skeleton-ring pair; 0 when there is none.
  Returns (loss, number of samples that took part).
  """
  num_views, batch_size, num_positives, _ = positives.shape
  num_negatives = negatives.shape[2]
  # (B, K, E) with K = V * (N + M): per view its positives, then its negatives.
  features = jnp.concatenate([positives, negatives], axis=2)
  features = jnp.moveaxis(features, 0, 1).reshape(batch_size, -1, features.shape[-1])
  is_positive = jnp.tile(jnp.concatenate([jnp.ones(num_positives, bool),
                                          jnp.zeros(num_negatives, bool)]), num_views)  # (K,)
  valid = jnp.tile(jnp.concatenate([positive_valid, negative_valid], axis=1), (1, num_views))
  logits = jnp.einsum('bie,bje->bij', features, features) / temperature  # (B, K, K)

  same_label = is_positive[:, None] == is_positive[None, :]
  both_valid = valid[:, :, None] & valid[:, None, :]
  not_self = ~jnp.eye(valid.shape[1], dtype=bool)
  pair_mask = same_label[None] & both_valid & not_self[None]  # (B, K, K)
  other_label_mask = ~same_label[None] & both_valid
  # log sum_k exp s_ik over the anchor's valid other-label features.
  other_label_logsumexp = jax.nn.logsumexp(
      jnp.where(other_label_mask, logits, _MASKED_LOGIT), axis=-1)  # (B, K)
  # l_ij = log(1 + sum_k exp(s_ik - s_ij)) = softplus(logsumexp_k s_ik - s_ij).
  pair_losses = jax.nn.softplus(other_label_logsumexp[:, :, None] - logits)

  pair_counts = jnp.sum(pair_mask, axis=(1, 2)).astype(jnp.float32)  # (B,)
  sample_losses = (jnp.sum(jnp.where(pair_mask, pair_losses, 0.0), axis=(1, 2))
                   / jnp.maximum(pair_counts, 1.0))
  has_negative_pair = jnp.any(other_label_mask, axis=(1, 2))
  takes_part = ((pair_counts > 0) & has_negative_pair).astype(jnp.float32)
  num_samples = jnp.sum(takes_part)
  return jnp.sum(sample_losses * takes_part) / jnp.maximum(num_samples, 1.0), num_samples


@register('contrastive', compares_views=True)
def contrastive_loss(views, batch, loss_config, step):
  """NT-Xent of `loss_config.contrastive_form` with `loss_config.temperature` on the views'
  embeddings at the batch's positive_positions / negative_positions (the contrastive structure:
  the last channel)."""
  del step
  form = loss_config.contrastive_form
  if form not in CONTRASTIVE_FORMS:
    raise ConfigError(f'config.loss.contrastive_form={form!r}: choose one of {CONTRASTIVE_FORMS}')
  positives = jnp.stack([l2_normalize(gather_embeddings(view['embedding'],
                                                        batch['positive_positions']))
                         for view in views])
  negatives = jnp.stack([l2_normalize(gather_embeddings(view['embedding'],
                                                        batch['negative_positions']))
                         for view in views])
  nt_xent_of_form = two_class_nt_xent if form == 'two_class' else nt_xent
  loss, num_samples = nt_xent_of_form(positives, negatives, batch['positive_valid'],
                                      batch['negative_valid'], loss_config.temperature)
  return loss, {'samples': num_samples}
