"""The training state and the pure train/eval steps: spatial augmentation, RandConv views, the
network on all views in one batch, the config-weighted loss and an Adam update that a
non-finite loss or gradient skips."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dualseg_jax import models
from dualseg_jax.models import randconv
from dualseg_jax.train import optimizer as optimizer_lib

# (views, batch, loss_config, step) -> (scalar loss, metrics)
LossFn = Callable[[list[dict], dict, ml_collections.ConfigDict, jax.Array], tuple[jax.Array, dict]]
# (key, batch) -> batch
AugmentFn = Callable[[jax.Array, dict], dict]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as arrays only, so Orbax saves and restores it as is."""

  step: jax.Array  # int32 scalar: batches consumed, including skipped ones
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; each step folds the step number in
  bad_steps: jax.Array  # int32 scalar: non-finite steps in a row
  total_bad_steps: jax.Array  # int32 scalar: non-finite steps in the whole run


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       patch_size: tuple[int, int, int]
                       ) -> tuple[nn.Module, TrainState, optax.GradientTransformation]:
  """The model, its initial state for (D, H, W) patches, and the optimizer of `config.optim`."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  model = models.build_model(config.model)
  init_key, state_key = jax.random.split(rng)
  params = models.init_variables(model, init_key, (1, *patch_size, 1))['params']
  optimizer = optimizer_lib.make_optimizer(config.optim, config.train.steps)
  # Separate buffers per counter: the step donates the state, and XLA refuses a buffer twice.
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                     rng=state_key, bad_steps=jnp.zeros((), jnp.int32),
                     total_bad_steps=jnp.zeros((), jnp.int32))
  return model, state, optimizer


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_views(key: jax.Array, images: jax.Array, augment_config: ml_collections.ConfigDict,
               conv_impl: str = 'auto') -> list[jax.Array]:
  """RandConv views when `augment.num_views` > 1, else the image itself as the only view; with
  `augment.raw_view` the image itself is the first of the views."""
  if augment_config.num_views == 1:
    return [images]
  raw = [images] if augment_config.raw_view else []
  return raw + randconv.random_views(key, images, augment_config.num_views - len(raw),
                                     tuple(augment_config.randconv_kernel_sizes), conv_impl,
                                     augment_config.randconv_gain)


def split_views(outputs: dict[str, jax.Array], num_views: int) -> list[dict[str, jax.Array]]:
  """Outputs of the network on `num_views` views concatenated on the batch axis -> one dict per view."""
  batch_size = next(iter(outputs.values())).shape[0] // num_views
  return [{name: value[index * batch_size:(index + 1) * batch_size] for name, value in outputs.items()}
          for index in range(num_views)]


def step_keys(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (augmentation, RandConv view, dropout) keys of the train step that starts at `step`."""
  step_key = jax.random.fold_in(rng, step)
  # The step's samplers draw from an 'rbg' key derived from the threefry step key: XLA on CPU
  # spends ~10 s compiling each threefry sampler (dropout, RandConv), rbg compiles at once.
  sampling_key = jax.random.wrap_key_data(jax.random.bits(step_key, (4,), jnp.uint32), impl='rbg')
  augment_key, view_key, dropout_key = jax.random.split(sampling_key, 3)
  return augment_key, view_key, dropout_key


def step_inputs(state: TrainState, batch: dict, config: ml_collections.ConfigDict,
                augment_fn: AugmentFn | None = None) -> tuple[dict, jax.Array, int, jax.Array]:
  """What the train step at `state.step` feeds the network: (augmented batch, every view
  concatenated on the batch axis, number of views, dropout key)."""
  augment_key, view_key, dropout_key = step_keys(state.rng, state.step)
  if augment_fn is not None:
    batch = augment_fn(augment_key, batch)
  view_images = make_views(view_key, batch['image'], config.augment, config.model.conv_impl)
  # All views share one forward pass: a batch of V * B.
  return batch, jnp.concatenate(view_images, axis=0), len(view_images), dropout_key


def make_train_step(model: nn.Module, config: ml_collections.ConfigDict,
                    optimizer: optax.GradientTransformation, loss_fn: LossFn | None = None,
                    augment_fn: AugmentFn | None = None, total_steps: int | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """A pure `train_step(state, batch) -> (state, metrics)`; jit it with donate_argnums=0.

  `loss_fn` defaults to `dualseg_jax.losses.total_loss`; `augment_fn(key, batch) -> batch` runs
  first when given (device-side spatial augmentation). `total_steps` (default train.steps) must
  be what `optimizer` was built with: the logged learning rate comes from the same schedule.
  """
  if loss_fn is None:
    from dualseg_jax import losses  # deferred: the losses package registers its terms on import
    loss_fn = losses.total_loss
  schedule = optimizer_lib.make_schedule(
      config.optim, config.train.steps if total_steps is None else total_steps)
  loss_config = config.loss

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    batch, network_input, num_views, dropout_key = step_inputs(state, batch, config, augment_fn)

    def compute_loss(params):
      outputs = model.apply({'params': params}, network_input, train=True,
                            rngs={'dropout': dropout_key})
      return loss_fn(split_views(outputs, num_views), batch, loss_config, state.step)

    (loss, loss_metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    finite = jnp.isfinite(loss) & _all_finite(grads)

    def apply_update():
      updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), new_opt_state

    # A non-finite loss or gradient leaves parameters and optimizer state as they were. A
    # conditional instead of a select per leaf: XLA's CPU backend compiles the selects over every
    # parameter and Adam moment in about as long as the whole network's gradient.
    new_params, new_opt_state = jax.lax.cond(finite, apply_update,
                                             lambda: (state.params, state.opt_state))
    bad = jnp.logical_not(finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        bad_steps=(state.bad_steps + 1) * bad,
        total_bad_steps=state.total_bad_steps + bad)
    metrics = dict(loss_metrics)
    metrics['loss'] = loss
    # The optimizer's own step counter only moves on applied updates.
    metrics['learning_rate'] = schedule(state.step - state.total_bad_steps)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['nonfinite'] = bad.astype(jnp.float32)
    return new_state, metrics

  return train_step
