"""Adam with weight decay and the learning-rate schedule, built from `config.optim`.

Coupled (the paper, as torch Adam does): g + weight_decay * p goes through Adam. Decoupled (AdamW):
Adam sees g alone and weight_decay * p is added to Adam's direction, both scaled by the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dualseg_jax.errors import ConfigError

SCHEDULES = ('poly', 'constant')


def make_schedule(optim_config: ml_collections.ConfigDict,
                  total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """step -> learning rate: a linear warm-up over `warmup_steps` (lr * (step + 1) / warmup), then
  constant or poly decay lr * (1 - (step - warmup) / (total - warmup)) ** poly_power, 0 at the end."""
  if optim_config.schedule not in SCHEDULES:
    raise ConfigError(f'optim.schedule={optim_config.schedule!r}; choose one of {SCHEDULES}')
  learning_rate = float(optim_config.learning_rate)
  warmup_steps = int(optim_config.warmup_steps)
  decay_steps = int(total_steps) - warmup_steps
  if optim_config.schedule == 'poly' and decay_steps <= 0:
    raise ConfigError(f'optim.warmup_steps={warmup_steps} leaves no steps to decay over in '
                      f'{total_steps} total steps (train.steps); lower optim.warmup_steps')
  use_poly = optim_config.schedule == 'poly'
  power = float(optim_config.poly_power)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.ones_like(step)
    if warmup_steps > 0:
      factor = jnp.minimum(1.0, (step + 1.0) / warmup_steps)
    if use_poly:
      progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
      factor = factor * (1.0 - progress) ** power
    return learning_rate * factor

  return schedule


def make_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam (b1 0.9, b2 0.999, eps 1e-8, torch's defaults) with coupled or decoupled weight decay."""
  schedule = make_schedule(optim_config, total_steps)
  weight_decay = float(optim_config.weight_decay)
  if optim_config.decoupled:
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(schedule))
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(schedule))
