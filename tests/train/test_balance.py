"""Per-term gradient norms on the encoder: each against jax.grad of that weighted term alone on the
step's own inputs, their gradients adding up to the train step's, and a run logging them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import three_center
from dualseg_jax.data import pipeline
from dualseg_jax.losses import LOSSES
from dualseg_jax.train import balance as balance_lib
from dualseg_jax.train import loop
from dualseg_jax.train import reporting
from dualseg_jax.train import step as step_lib
from tests.conftest import tiny_run_config
from tests.train.test_step import PATCH, sphere_batch

STEP = 3  # the contrastive weight ramps over RAMP_STEPS: at STEP its factor is 0.75
RAMP_STEPS = 4
ENCODER = ('stem', 'encoder0_block0', 'encoder1_downsample', 'encoder1_block0', 'encoder2_downsample',
           'encoder2_block0', 'encoder3_downsample', 'encoder3_block0', 'dilated_block0')


@pytest.fixture(scope='module')
def setup():
  config = three_center.get_config('tiny')
  config.loss.ramp_up_steps.contrastive = RAMP_STEPS
  model, state, _ = step_lib.create_train_state(config, jax.random.PRNGKey(0), PATCH)
  state = state.replace(step=jnp.asarray(STEP, jnp.int32))
  augment_fn = pipeline.device_augmentation(config)
  return config, model, state, augment_fn, sphere_batch(batch_size=2)


def _inputs_written_out(config, state, batch, augment_fn):
  """The train step's inputs at state.step, derived here as docs/design.md describes them."""
  step_key = jax.random.fold_in(state.rng, state.step)
  sampling_key = jax.random.wrap_key_data(jax.random.bits(step_key, (4,), jnp.uint32), impl='rbg')
  augment_key, view_key, dropout_key = jax.random.split(sampling_key, 3)
  batch = augment_fn(augment_key, batch)
  views = step_lib.make_views(view_key, batch['image'], config.augment, config.model.conv_impl)
  return batch, jnp.concatenate(views, axis=0), len(views), dropout_key


def _keep_gradient_optimizer():
  """Leaves the parameters as they are and keeps the step's gradient as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda gradient, state, params=None: (jax.tree.map(jnp.zeros_like, gradient),
                                                   gradient))


@pytest.fixture(scope='module')
def term_gradients(setup):
  config, model, state, augment_fn, batch = setup
  return jax.jit(balance_lib.make_term_gradients(model, config, augment_fn))(state, batch)


def test_each_norm_is_that_of_the_weighted_term_alone(setup, term_gradients):
  config, model, state, augment_fn, batch = setup
  norms = jax.jit(balance_lib.make_balance_fn(model, config, augment_fn))(state, batch)
  active = [name for name, weight in config.loss.weights.items() if weight]
  assert set(norms) == {f'grad_norm/{name}' for name in active} | {'grad_norm/encoder_ratio_max'}
  assert sorted(term_gradients) == sorted(active)

  augmented, network_input, num_views, dropout_key = _inputs_written_out(config, state, batch,
                                                                        augment_fn)

  @jax.jit
  def encoder_gradients(params):
    """Each weighted term's gradient on its own, through jax.grad over every parameter."""
    gradients = {}
    for name in active:
      def weighted_term(params, name=name):
        outputs = model.apply({'params': params}, network_input, train=True,
                              rngs={'dropout': dropout_key})
        views = step_lib.split_views(outputs, num_views)
        value, _ = LOSSES[name](views, augmented, config.loss, state.step)
        ramp = min(1.0, STEP / RAMP_STEPS) if name == 'contrastive' else 1.0
        return config.loss.weights[name] * ramp * value
      gradient = jax.grad(weighted_term)(params)
      gradients[name] = {key: gradient[key] for key in ENCODER}
    return gradients

  expected = {name: float(optax.global_norm(gradient))
              for name, gradient in encoder_gradients(state.params).items()}
  # float32 in differently fused programs; the sharp SDF->mask transform (k = 1500) differs most.
  for name in active:
    assert expected[name] > 0, name
    np.testing.assert_allclose(norms[f'grad_norm/{name}'], expected[name], rtol=1e-3,
                               err_msg=name)
    np.testing.assert_allclose(optax.global_norm(term_gradients[name]), expected[name], rtol=1e-3,
                               err_msg=name)
  np.testing.assert_allclose(norms['grad_norm/encoder_ratio_max'],
                             max(expected.values()) / expected['dice'], rtol=2e-3)


def test_the_terms_gradients_add_up_to_the_train_steps(setup, term_gradients):
  config, model, state, augment_fn, batch = setup
  optimizer = _keep_gradient_optimizer()
  state = state.replace(opt_state=optimizer.init(state.params))
  train_step = jax.jit(step_lib.make_train_step(model, config, optimizer, augment_fn=augment_fn))
  new_state, metrics = train_step(state, batch)
  assert float(metrics['nonfinite']) == 0.0
  step_gradient = {key: new_state.opt_state[key] for key in ENCODER}
  summed = jax.tree.map(lambda *gradients: sum(gradients), *term_gradients.values())
  assert sorted(summed) == sorted(ENCODER)
  # float32 sums in another order: per block, equal up to 4e-4 of the summed terms' sizes (the
  # terms partly cancel, so their sizes, not the sum's, set the rounding). Measured: 0.5-1.3e-4
  # with the heads reading signed features (every channel carries the SDF path that the
  # transform multiplies by k), 0.3-1.0e-5 with a ReLU before the heads; the difference is
  # uncorrelated with each term's gradient (|cosine| <= 0.32), i.e. rounding. The smallest term,
  # consistency, is 1.5-3.3e-3 of the sizes: a term missing from the step still fails here.
  for key in ENCODER:
    difference = jax.tree.map(jnp.subtract, summed[key], step_gradient[key])
    terms_size = sum(float(optax.global_norm(gradient[key])) for gradient in term_gradients.values())
    smallest = min(float(optax.global_norm(gradient[key])) for gradient in term_gradients.values())
    assert smallest > 3 * 4e-4 * terms_size, key  # the bound below tells every term apart
    assert float(optax.global_norm(difference)) <= 4e-4 * terms_size, key
    assert float(optax.global_norm(step_gradient[key])) > 100 * 1e-4 * terms_size, key


def test_a_run_logs_the_norms_with_the_step_they_describe(phantom_root, tmp_path):
  # The bce weight ramps from 0: the step that starts at step 0 (row 1) has no bce pull at all.
  config = tiny_run_config(phantom_root, steps=2, **{'train.grad_balance_every': 1})
  config.loss.ramp_up_steps.bce = 2
  loop.train_and_evaluate(config, tmp_path / 'run')
  rows = [row for row in reporting.MetricsLog.read(tmp_path / 'run' / 'metrics.jsonl')
          if 'loss' in row]
  assert [row['step'] for row in rows] == [1, 2]
  active = [name for name, weight in config.loss.weights.items() if weight]
  for row in rows:
    for name in active:
      assert row[f'grad_norm/{name}'] is not None and row[f'grad_norm/{name}'] >= 0, (row, name)
    # null (JSON) when the dice gradient is 0, e.g. a patch without foreground
    assert 'grad_norm/encoder_ratio_max' in row
  assert rows[0]['grad_norm/bce'] == 0.0 and rows[1]['grad_norm/bce'] > 0
  assert (tmp_path / 'run' / 'curves.png').stat().st_size > 1000


def test_curves_take_rows_with_and_without_the_norms(tmp_path):
  rows = [{'step': 1, 'loss': 2.0, 'dice': 0.9},  # a run from before the norms were logged
          {'step': 2, 'loss': 1.5, 'dice': 0.8, 'grad_norm/dice': 0.07,
           'grad_norm/contrastive': 8.0, 'grad_norm/encoder_ratio_max': 114.0},
          {'step': 2, 'val/dice_mean': 0.3},
          {'step': 3, 'loss': 1.2, 'dice': 0.7, 'grad_norm/dice': None}]
  reporting.plot_curves(rows, tmp_path / 'curves.png')
  reporting.plot_curves(rows[:1], tmp_path / 'old.png')
  assert (tmp_path / 'curves.png').stat().st_size > 1000
  assert (tmp_path / 'old.png').stat().st_size > 1000
