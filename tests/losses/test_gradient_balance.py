"""At initialisation the contrastive term must not swamp the Dice term on the shared encoder."""

import jax
import jax.numpy as jnp
import numpy as np

from dualseg_jax import losses
from dualseg_jax import models
from dualseg_jax.tools.bench import train as train_bench

ENCODER_LEVELS = ('stem', 'encoder0', 'encoder1', 'encoder2', 'encoder3', 'dilated')
# Measured on this test's set-up (tiny network as the tiny preset builds it: separate downsampling
# units, he-normal kernels; means over 3 initialisations): the weighted contrastive term's
# gradient norm per encoder level is 76-165x the Dice term's. With PyTorch's default kernels (the
# paper preset's) it is 755-1406x, with strided first blocks 294-447x (he-normal) and 420-579x
# (PyTorch's); with a 1x1 fusion conv in place of the method's 3x3x3 one the deepest two levels
# of the strided layout read 1460x and 1750x (docs/design.md, "Short schedules").
MAX_CONTRASTIVE_TO_DICE = 400.0


def phantom_sample(config, seed):
  """An ellipsoid pancreas holding a tumour, with every target of the config's sampling."""
  return {name: jnp.asarray(value)
          for name, value in train_bench.synthetic_batch(config, 1, seed).items()}


def level_norms(gradient):
  return np.array([np.sqrt(sum(float(jnp.sum(leaf ** 2))
                               for name, subtree in gradient.items() if name.startswith(level)
                               for leaf in jax.tree.leaves(subtree)))
                   for level in ENCODER_LEVELS])


def test_contrastive_gradient_on_the_encoder_stays_within_a_measured_factor_of_dice(tiny_config):
  config = tiny_config
  assert config.loss.contrastive_form == 'two_class'
  assert config.data.contrastive_sampling == 'per_slice'
  model = models.build_model(config.model)

  @jax.jit
  def term_gradients(params, batch):
    # Two fixed views (the image and its square) in one batch, as the train step feeds them.
    images = jnp.concatenate([batch['image'], batch['image'] ** 2])

    def weighted_term(name, params):
      outputs = model.apply({'params': params}, images, train=False)
      views = [{key: value[index:index + 1] for key, value in outputs.items()}
               for index in range(2)]
      value, _ = losses.LOSSES[name](views, batch, config.loss, 0)
      return config.loss.weights[name] * value

    return [jax.grad(lambda p, name=name: weighted_term(name, p))(params)
            for name in ('dice', 'contrastive')]

  dice_norms, contrastive_norms = [], []
  for seed in range(3):
    batch = phantom_sample(config, seed)
    assert batch['positive_valid'].any() and batch['negative_valid'].any()
    params = models.init_variables(model, jax.random.key(seed),
                                   (2, *config.data.patch_size, 1))['params']
    dice, contrastive = term_gradients(params, batch)
    dice_norms.append(level_norms(dice))
    contrastive_norms.append(level_norms(contrastive))
  ratios = np.mean(contrastive_norms, axis=0) / np.mean(dice_norms, axis=0)
  assert np.all(np.asarray(dice_norms) > 0) and np.all(np.asarray(contrastive_norms) > 0)
  assert np.all(ratios < MAX_CONTRASTIVE_TO_DICE), dict(zip(ENCODER_LEVELS, ratios.round()))
