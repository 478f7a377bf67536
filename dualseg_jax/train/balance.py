"""How hard each loss term pulls on the shared encoder: the L2 norm of every active weighted
term's gradient over the encoder's parameters, for the exact inputs of one train step.

One forward pass through `jax.vjp`; each term's gradient with respect to the network outputs is
pulled back through that one vjp, one term after the other. Unrolled in the program: measured on
the quick preset (2 CPU cores), a `lax.map` over the stacked cotangents took 30 s per call and a
`vmap` 3.4 s, against 1.7 s unrolled (docs/design.md, "The step").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dualseg_jax.train import step as step_lib

# Top-level parameter collections of the encoder (dualseg_jax/models/unet.py): the stem, the
# blocks of the four resolution levels and the dilated blocks at the bottom.
_ENCODER_PREFIXES = ('stem', 'encoder', 'dilated_block')


def is_encoder(name: str) -> bool:
  """Whether a top-level parameter collection of the network belongs to the encoder."""
  return name.startswith(_ENCODER_PREFIXES)


def encoder_params(params: dict) -> dict:
  return {name: value for name, value in params.items() if is_encoder(name)}


def active_terms(loss_config: ml_collections.ConfigDict) -> list[str]:
  """The terms `total_loss` adds up: every name of `loss.weights` with a non-zero weight."""
  return [name for name, weight in loss_config.weights.items() if weight != 0]


def _only(loss_config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`loss_config` with every weight but `name`'s set to 0: total_loss then gives that term alone,
  weighted and ramped exactly as in the full loss."""
  single = loss_config.copy_and_resolve_references()
  for other in single.weights:
    if other != name:
      single.weights[other] = 0.0
  return single


def make_term_gradients(model: nn.Module, config: ml_collections.ConfigDict,
                        augment_fn: step_lib.AugmentFn | None = None
                        ) -> Callable[[step_lib.TrainState, dict], dict[str, Any]]:
  """A pure `(state, batch) -> {term: gradient over the encoder parameters}`.

  The inputs are those of the train step at `state.step` (same augmentation, views and dropout,
  through `step.step_inputs`); each gradient is that of weight x ramp factor x term, so the
  gradients add up to the encoder part of the step's gradient.
  """
  from dualseg_jax import losses  # deferred: the losses package registers its terms on import
  terms = active_terms(config.loss)
  single_configs = {name: _only(config.loss, name) for name in terms}

  def term_gradients(state: step_lib.TrainState, batch: dict) -> dict[str, Any]:
    batch, network_input, num_views, dropout_key = step_lib.step_inputs(
        state, batch, config, augment_fn)

    def forward(encoder):
      return model.apply({'params': {**state.params, **encoder}}, network_input, train=True,
                         rngs={'dropout': dropout_key})

    outputs, pullback = jax.vjp(forward, encoder_params(state.params))

    def term_loss(name):
      def loss(outputs):
        views = step_lib.split_views(outputs, num_views)
        return losses.total_loss(views, batch, single_configs[name], state.step)[0]
      return loss

    return {name: pullback(jax.grad(term_loss(name))(outputs))[0] for name in terms}

  return term_gradients


def make_balance_fn(model: nn.Module, config: ml_collections.ConfigDict,
                    augment_fn: step_lib.AugmentFn | None = None
                    ) -> Callable[[step_lib.TrainState, dict], dict[str, jax.Array]]:
  """A pure `(state, batch) -> {'grad_norm/<term>': scalar}`; jit it once, call it before the
  step consumes (donates) the state.

  Each value is the global L2 norm of one active weighted term's gradient over the encoder's
  parameters; with dice active, 'grad_norm/encoder_ratio_max' is the largest of them over
  dice's.
  """
  term_gradients = make_term_gradients(model, config, augment_fn)

  def balance(state: step_lib.TrainState, batch: dict) -> dict[str, jax.Array]:
    norms = {f'grad_norm/{name}': optax.global_norm(gradient)
             for name, gradient in term_gradients(state, batch).items()}
    if 'grad_norm/dice' in norms:
      largest = jnp.max(jnp.stack(list(norms.values())))
      norms['grad_norm/encoder_ratio_max'] = largest / norms['grad_norm/dice']
    return norms

  return balance
