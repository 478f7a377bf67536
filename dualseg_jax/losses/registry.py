"""The name -> loss-function registry and the config-weighted total loss."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from dualseg_jax.errors import ConfigError

# fn(views, batch, loss_config, step) -> (float32 scalar, metrics dict of float32 scalars)
LossFn = Callable[..., tuple[jnp.ndarray, dict]]

LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
  """Decorator adding a loss under `name`, the key it takes in `config.loss.weights`."""
  def add(loss_fn: LossFn) -> LossFn:
    if name in LOSSES:
      raise ValueError(f'a loss named {name!r} is already registered ({LOSSES[name].__module__})')
    LOSSES[name] = loss_fn
    return loss_fn
  return add


def total_loss(views: list[dict], batch: dict, loss_config, step) -> tuple[jnp.ndarray, dict]:
  """Sum of weight * loss over `loss_config.weights`; a weight of 0 skips the loss entirely.

  Metrics hold each active term unweighted under its name, the terms' own metrics as
  'name/metric', and the weighted sum as 'loss'. Unknown names fail at trace time.
  """
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, weight in loss_config.weights.items():
    if weight == 0:
      continue
    if name not in LOSSES:
      raise ConfigError(f'config.loss.weights.{name}: no loss named {name!r} is registered; '
                        f'registered: {sorted(LOSSES)}. Register it with '
                        '@dualseg_jax.losses.register or set its weight to 0.')
    value, term_metrics = LOSSES[name](views, batch, loss_config, step)
    value = jnp.asarray(value, jnp.float32)
    total = total + jnp.float32(weight) * value
    metrics[name] = value
    metrics.update({f'{name}/{key}': metric for key, metric in term_metrics.items()})
  metrics['loss'] = total
  return total, metrics
