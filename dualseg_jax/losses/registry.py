"""The name -> loss-function registry and the config-weighted total loss."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from dualseg_jax.errors import ConfigError

# fn(views, batch, loss_config, step) -> (float32 scalar, metrics dict of float32 scalars)
LossFn = Callable[..., tuple[jnp.ndarray, dict]]

LOSSES: dict[str, LossFn] = {}
# Terms that compare the views with each other (consistency, contrastive): they read every view
# whatever `loss.supervised_views` says; the other terms compare a view with the label.
VIEW_PAIR_TERMS: set[str] = set()
SUPERVISED_VIEWS = ('all', 'first')  # what `config.loss.supervised_views` may name


def register(name: str, compares_views: bool = False) -> Callable[[LossFn], LossFn]:
  """Decorator adding a loss under `name`, the key it takes in `config.loss.weights`;
  `compares_views` marks a term that compares the views with each other."""
  def add(loss_fn: LossFn) -> LossFn:
    if name in LOSSES:
      raise ValueError(f'a loss named {name!r} is already registered ({LOSSES[name].__module__})')
    LOSSES[name] = loss_fn
    if compares_views:
      VIEW_PAIR_TERMS.add(name)
    return loss_fn
  return add


def views_read_by(name: str, views: list[dict], supervised_views: str) -> list[dict]:
  """The views term `name` reads: every view, except that with `supervised_views='first'`
  (`config.loss.supervised_views`) a term comparing a view with the label reads the first view
  only (with `augment.raw_view`, the CT itself), and the RandConv views reach the network only
  through the view-pair terms."""
  if supervised_views == 'first' and name not in VIEW_PAIR_TERMS:
    return views[:1]
  return views


def ramp_factor(ramp_steps: int, step) -> jnp.ndarray:
  """min(1, step / ramp_steps): a term's weight grows linearly from 0 over its first
  `ramp_steps` steps (1 throughout when ramp_steps is 0)."""
  if ramp_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / jnp.float32(ramp_steps))


def total_loss(views: list[dict], batch: dict, loss_config, step) -> tuple[jnp.ndarray, dict]:
  """Sum of weight * loss over `loss_config.weights`; a weight of 0 skips the loss entirely.
  A term named in `loss_config.ramp_up_steps` has its weight scaled by `ramp_factor`; each term
  reads the views `views_read_by` gives it.

  Metrics hold each active term unweighted under its name, the terms' own metrics as
  'name/metric', and the weighted sum as 'loss'. Unknown names fail at trace time.
  """
  ramp_up_steps = loss_config.get('ramp_up_steps', {})
  for name in ramp_up_steps:
    if name not in loss_config.weights:
      raise ConfigError(f'config.loss.ramp_up_steps.{name}: no term {name!r} in config.loss.weights '
                        f'({sorted(loss_config.weights)}); ramp one of those')
  supervised_views = loss_config.get('supervised_views', 'all')
  if supervised_views not in SUPERVISED_VIEWS:
    raise ConfigError(f'config.loss.supervised_views={supervised_views!r}: choose one of '
                      f'{SUPERVISED_VIEWS}')
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, weight in loss_config.weights.items():
    if weight == 0:
      continue
    if name not in LOSSES:
      raise ConfigError(f'config.loss.weights.{name}: no loss named {name!r} is registered; '
                        f'registered: {sorted(LOSSES)}. Register it with '
                        '@dualseg_jax.losses.register or set its weight to 0.')
    value, term_metrics = LOSSES[name](views_read_by(name, views, supervised_views), batch,
                                       loss_config, step)
    value = jnp.asarray(value, jnp.float32)
    total = total + jnp.float32(weight) * ramp_factor(ramp_up_steps.get(name, 0), step) * value
    metrics[name] = value
    metrics.update({f'{name}/{key}': metric for key, metric in term_metrics.items()})
  metrics['loss'] = total
  return total, metrics
