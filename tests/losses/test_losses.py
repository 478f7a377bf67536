"""Every loss against a slow NumPy re-implementation; gradients, weights, jit and the registry."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dualseg_jax import config_base
from dualseg_jax import losses
from dualseg_jax.errors import ConfigError
from dualseg_jax.losses import sdf as sdf_losses

BATCH, DEPTH, HEIGHT, WIDTH, CHANNELS = 2, 8, 16, 16, 2
EMBEDDING_DIM, NUM_POSITIONS = 4, 5


def loss_config(**overrides):
  config = config_base.base_config().loss
  for key, value in overrides.items():
    if key == 'weights':
      for name in config.weights:
        config.weights[name] = value.get(name, 0.0)
    else:
      config[key] = value
  return config


def make_views(seed, num_views=2, slice_head=False):
  rng = np.random.default_rng(seed)
  views = []
  for _ in range(num_views):
    view = {
        'logits': rng.normal(0, 2, (BATCH, DEPTH, HEIGHT, WIDTH, CHANNELS)).astype(np.float32),
        'sdf': np.tanh(rng.normal(0, 1, (BATCH, DEPTH, HEIGHT, WIDTH, CHANNELS))).astype(
            np.float32),
        'embedding': rng.normal(0, 1, (BATCH, DEPTH // 8, HEIGHT // 8, WIDTH // 8,
                                       EMBEDDING_DIM)).astype(np.float32),
    }
    if slice_head:
      view['slice_logits'] = rng.normal(0, 2, (BATCH, DEPTH)).astype(np.float32)
    views.append(view)
  return views


def make_batch(seed):
  rng = np.random.default_rng(seed)
  grid = np.array([DEPTH // 8, HEIGHT // 8, WIDTH // 8])
  return {
      'mask': (rng.random((BATCH, DEPTH, HEIGHT, WIDTH, CHANNELS)) < 0.3).astype(np.float32),
      'sdf': rng.uniform(-1, 1, (BATCH, DEPTH, HEIGHT, WIDTH, CHANNELS)).astype(np.float32),
      'sdf_valid': np.array([[True, False], [True, True]]),
      'positive_positions': rng.integers(0, grid, (BATCH, NUM_POSITIONS, 3)).astype(np.int32),
      'positive_valid': np.array([[True, True, False, True, False], [False] * NUM_POSITIONS]),
      'negative_positions': rng.integers(0, grid, (BATCH, NUM_POSITIONS, 3)).astype(np.int32),
      'negative_valid': np.array([[True, False, True, True, False], [True] * NUM_POSITIONS]),
      'slice_label': (rng.random((BATCH, DEPTH)) < 0.5).astype(np.float32),
  }


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def slow_dice_loss(probability_maps, mask, smooth):
  """Mean over views of 1 - mean soft Dice over the (sample, channel) pairs holding foreground."""
  losses_per_view = []
  for probabilities in probability_maps:
    scores = []
    for sample, channel in itertools.product(range(mask.shape[0]), range(mask.shape[-1])):
      p, m = probabilities[sample, ..., channel], mask[sample, ..., channel]
      if m.sum() > 0:
        scores.append((2 * (p * m).sum() + smooth) / (p.sum() + m.sum() + smooth))
    losses_per_view.append(1 - np.mean(scores) if scores else 0.0)
  return np.mean(losses_per_view)


def slow_bce(logits, labels):
  total = 0.0
  for x, y in zip(logits.astype(np.float64).ravel(), labels.ravel()):
    total += -y * np.log(sigmoid(np.array(x))) - (1 - y) * np.log(1 - sigmoid(np.array(x)))
  return total / logits.size


def test_every_registered_loss_has_a_weight_in_the_base_config():
  assert set(losses.LOSSES) == set(config_base.base_config().loss.weights)


def test_dice_matches_numpy():
  views, batch, config = make_views(0), make_batch(1), loss_config()
  value, metrics = losses.LOSSES['dice'](views, batch, config, 0)
  expected = slow_dice_loss([sigmoid(v['logits']) for v in views], batch['mask'],
                            config.dice_smooth)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['score'], 1 - expected, rtol=1e-5)


@pytest.mark.parametrize('name', ['dice', 'sdf_to_mask_dice'])
def test_dice_terms_skip_channels_without_foreground(name):
  views, batch, config = make_views(10), make_batch(11), loss_config(transform_k=20.0)
  batch['mask'][0, ..., 1] = 0.0  # sample 0 holds no tumour
  value = losses.LOSSES[name](views, batch, config, 0)[0]
  if name == 'dice':
    maps = [sigmoid(v['logits']) for v in views]
  else:
    maps = [sigmoid(-20.0 * v['sdf']) for v in views]
  np.testing.assert_allclose(value, slow_dice_loss(maps, batch['mask'], config.dice_smooth),
                             rtol=1e-5)
  # Only 3 of the 4 (sample, channel) pairs count: not the mean with the empty pair's ~1.
  with_empty = np.mean([1 - np.mean([
      (2 * (m[b, ..., c] * batch['mask'][b, ..., c]).sum() + config.dice_smooth)
      / (m[b, ..., c].sum() + batch['mask'][b, ..., c].sum() + config.dice_smooth)
      for b in range(BATCH) for c in range(CHANNELS)]) for m in maps])
  assert abs(float(value) - with_empty) > 0.05
  batch['mask'][:] = 0.0
  assert float(losses.LOSSES[name](views, batch, config, 0)[0]) == 0.0


def test_bce_matches_numpy():
  views, batch = make_views(2), make_batch(3)
  value, _ = losses.LOSSES['bce'](views, batch, loss_config(), 0)
  expected = np.mean([slow_bce(v['logits'], batch['mask']) for v in views])
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_sdf_l1_counts_only_valid_channels():
  views, batch = make_views(4), make_batch(5)
  value, metrics = losses.LOSSES['sdf_l1'](views, batch, loss_config(), 0)
  per_view = []
  for view in views:
    terms = [np.abs(view['sdf'][b, ..., c] - batch['sdf'][b, ..., c]).mean()
             for b in range(BATCH) for c in range(CHANNELS) if batch['sdf_valid'][b, c]]
    per_view.append(np.mean(terms))
  np.testing.assert_allclose(value, np.mean(per_view), rtol=1e-5)
  assert metrics['valid_fraction'] == pytest.approx(0.75)
  batch['sdf_valid'] = np.zeros_like(batch['sdf_valid'])
  assert losses.LOSSES['sdf_l1'](views, batch, loss_config(), 0)[0] == 0.0


def test_sdf_l1_on_all_patches_regresses_empty_channels_to_the_outside():
  """sdf_l1_on='all': a channel without the structure in its patch is read too; its target is
  the cropped distance where the case has one and 1 where the crop reads 0 (no structure in the
  case); a channel the structure has a surface in keeps its target, and a skipped full patch
  stays skipped."""
  views, batch = make_views(6), make_batch(7)
  batch['mask'][0, ..., 1] = 0.0  # sample 0: no tumour voxel in the patch (sdf_valid False)
  batch['sdf'][0, ..., 1] = np.abs(batch['sdf'][0, ..., 1])
  batch['sdf'][0, :2, ..., 1] = 0.0  # where the case gives no distance
  batch['mask'][1, ..., 0] = 1.0  # sample 1: the pancreas fills the patch
  batch['sdf_valid'] = np.array([[True, False], [False, True]])
  value, metrics = losses.LOSSES['sdf_l1'](views, batch, loss_config(sdf_l1_on='all'), 0)
  target = batch['sdf'].copy()
  target[0, :2, ..., 1] = 1.0
  read = [(0, 0), (0, 1), (1, 1)]
  per_view = [np.mean([np.abs(view['sdf'][b, ..., c] - target[b, ..., c]).mean() for b, c in read])
              for view in views]
  np.testing.assert_allclose(value, np.mean(per_view), rtol=1e-5)
  assert metrics['valid_fraction'] == pytest.approx(0.75)
  surface_only, _ = losses.LOSSES['sdf_l1'](views, batch, loss_config(), 0)
  per_view = [np.mean([np.abs(view['sdf'][b, ..., c] - batch['sdf'][b, ..., c]).mean()
                       for b, c in [(0, 0), (1, 1)]]) for view in views]
  np.testing.assert_allclose(surface_only, np.mean(per_view), rtol=1e-5)
  with pytest.raises(ConfigError, match='loss.sdf_l1_on'):
    losses.LOSSES['sdf_l1'](views, batch, loss_config(sdf_l1_on='everywhere'), 0)


@pytest.mark.parametrize('transform', ['smooth', 'hard'])
def test_sdf_to_mask_dice_matches_numpy(transform):
  views, batch = make_views(6), make_batch(7)
  config = loss_config(transform=transform, transform_k=20.0)
  value, _ = losses.LOSSES['sdf_to_mask_dice'](views, batch, config, 0)
  if transform == 'smooth':
    maps = [sigmoid(-20.0 * v['sdf']) for v in views]
  else:
    maps = [(v['sdf'] <= 0).astype(np.float64) for v in views]
  np.testing.assert_allclose(value, slow_dice_loss(maps, batch['mask'], config.dice_smooth),
                             rtol=1e-5)


def test_smooth_transform_passes_gradient_where_the_hard_one_passes_none():
  views, batch = make_views(8, num_views=1), make_batch(9)

  def loss_of_sdf(signed_distance, transform):
    view = dict(views[0], sdf=signed_distance)
    config = loss_config(transform=transform, transform_k=50.0)
    return losses.LOSSES['sdf_to_mask_dice']([view], batch, config, 0)[0]

  smooth_gradient = jax.grad(loss_of_sdf)(views[0]['sdf'], 'smooth')
  hard_gradient = jax.grad(loss_of_sdf)(views[0]['sdf'], 'hard')
  assert np.all(np.asarray(hard_gradient) == 0)
  near_surface = np.abs(views[0]['sdf']) < 0.1
  assert near_surface.sum() > 100
  assert np.all(np.isfinite(smooth_gradient)) and np.all(smooth_gradient[near_surface] != 0)


@pytest.mark.parametrize('schedule,halfway', [('geometric', 100.0), ('linear', 505.0)])
def test_transform_sharpness_anneals(schedule, halfway):
  config = loss_config(transform_k=1000.0, transform_k_start=10.0, transform_anneal_steps=100,
                       transform_anneal=schedule)
  sharpness = [float(sdf_losses.transform_sharpness(config, step)) for step in (0, 50, 100, 500)]
  np.testing.assert_allclose(sharpness, [10.0, halfway, 1000.0, 1000.0], rtol=1e-5)
  assert float(sdf_losses.transform_sharpness(loss_config(transform_k=7.0), 50)) == 7.0


@pytest.mark.parametrize('on_sdf', [False, True])
def test_consistency_matches_numpy(on_sdf):
  views, batch = make_views(10), make_batch(11)
  value, metrics = losses.LOSSES['consistency'](views, batch,
                                                loss_config(consistency_on_sdf=on_sdf), 0)
  expected = np.mean((sigmoid(views[0]['logits']) - sigmoid(views[1]['logits'])) ** 2)
  if on_sdf:
    expected += np.mean((views[0]['sdf'].astype(np.float64) - views[1]['sdf']) ** 2)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  single, single_metrics = losses.LOSSES['consistency'](views[:1], batch, loss_config(), 0)
  assert single == 0.0 and set(single_metrics) == set(metrics)


def test_cosine_consistency_matches_numpy_and_ignores_the_maps_scale():
  views, batch = make_views(12), make_batch(13)
  value, _ = losses.LOSSES['consistency'](views, batch, loss_config(consistency_form='cosine'), 0)
  first, second = (sigmoid(view['logits']).reshape(len(view['logits']), -1).astype(np.float64)
                   for view in views)
  cosines = np.sum(first * second, 1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
  np.testing.assert_allclose(value, np.mean(1.0 - cosines), rtol=1e-4)
  same = [views[0], dict(views[0])]
  zero, _ = losses.LOSSES['consistency'](same, batch, loss_config(consistency_form='cosine'), 0)
  assert abs(float(zero)) < 1e-6
  with pytest.raises(ConfigError, match='loss.consistency_form'):
    losses.LOSSES['consistency'](views, batch, loss_config(consistency_form='l2'), 0)


def unit_feature(view, sample, position):
  vector = view['embedding'][sample][tuple(position)].astype(np.float64)
  return vector / np.linalg.norm(vector)


def slow_view_paired_nt_xent(views, batch, temperature):
  """Loops over samples, view pairs, anchors and negatives."""
  pairs = [(a, c) for a in range(len(views)) for c in range(len(views)) if a != c] or [(0, 0)]
  sample_losses = []
  for sample in range(BATCH):
    anchor_losses = []
    for (a, c), i in itertools.product(pairs, range(NUM_POSITIONS)):
      if not batch['positive_valid'][sample, i]:
        continue
      anchor = unit_feature(views[a], sample, batch['positive_positions'][sample, i])
      partner = unit_feature(views[c], sample, batch['positive_positions'][sample, i])
      positive = np.exp(anchor @ partner / temperature)
      denominator = positive
      for view, j in itertools.product(views, range(NUM_POSITIONS)):
        if batch['negative_valid'][sample, j]:
          negative = unit_feature(view, sample, batch['negative_positions'][sample, j])
          denominator += np.exp(anchor @ negative / temperature)
      anchor_losses.append(-np.log(positive / denominator))
    if anchor_losses:
      sample_losses.append(np.mean(anchor_losses))
  return np.mean(sample_losses) if sample_losses else 0.0


def slow_two_class_nt_xent(views, batch, temperature):
  """Per sample: list every valid feature of every view with its class, then loop over ordered
  same-class pairs; the denominator holds the pair and the anchor's other-class features."""
  sample_losses = []
  for sample in range(batch['positive_valid'].shape[0]):
    features, classes = [], []
    for view, kind in itertools.product(views, ('positive', 'negative')):
      for row, valid in enumerate(batch[f'{kind}_valid'][sample]):
        if valid:
          features.append(unit_feature(view, sample, batch[f'{kind}_positions'][sample, row]))
          classes.append(kind)
    pair_losses = []
    for i, j in itertools.permutations(range(len(features)), 2):
      if classes[i] != classes[j]:
        continue
      similarity = features[i] @ features[j] / temperature
      denominator = np.exp(similarity)
      for k in range(len(features)):
        if classes[k] != classes[i]:
          denominator += np.exp(features[i] @ features[k] / temperature)
      pair_losses.append(-similarity + np.log(denominator))
    if pair_losses and len(set(classes)) == 2:
      sample_losses.append(np.mean(pair_losses))
  return (np.mean(sample_losses) if sample_losses else 0.0), len(sample_losses)


T, F = True, False
VALIDITY_CASES = {  # (positive_valid, negative_valid) of the two samples, 5 rows each
    'some rows of each': ([[T, T, F, T, F], [F, T, T, F, F]], [[T, F, T, T, F], [T] * 5]),
    'no positive in sample 1': ([[T, T, F, T, F], [F] * 5], [[T, F, T, T, F], [T] * 5]),
    'one positive, one negative': ([[F, F, T, F, F], [T, F, F, F, F]],
                                   [[F, T, F, F, F], [T, T, T, T, T]]),
    'no negative in sample 0': ([[T, T, T, T, T], [T, F, T, F, T]], [[F] * 5, [F, F, F, F, T]]),
    'nothing valid': ([[F] * 5, [F] * 5], [[F] * 5, [F] * 5]),
}


@pytest.mark.parametrize('case', list(VALIDITY_CASES))
@pytest.mark.parametrize('num_views', [1, 2])
def test_two_class_contrastive_matches_numpy(num_views, case):
  views, batch = make_views(30, num_views), make_batch(31)
  positive_valid, negative_valid = VALIDITY_CASES[case]
  batch['positive_valid'] = np.array(positive_valid)
  batch['negative_valid'] = np.array(negative_valid)
  for temperature in (0.5, 0.05):
    config = loss_config(temperature=temperature, contrastive_form='two_class')
    value, metrics = jax.jit(lambda v, b: losses.LOSSES['contrastive'](v, b, config, 0))(
        views, batch)
    expected, num_samples = slow_two_class_nt_xent(views, batch, temperature)
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6)
    assert metrics['samples'] == num_samples


def test_two_class_contrastive_takes_differently_many_negative_rows():
  views, batch = make_views(32), make_batch(33)
  batch['positive_valid'][1, 0] = True
  for name in ('negative_positions', 'negative_valid'):
    batch[name] = batch[name][:, :3]
  value, metrics = losses.LOSSES['contrastive'](views, batch, loss_config(temperature=0.5), 0)
  expected, num_samples = slow_two_class_nt_xent(views, batch, 0.5)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert metrics['samples'] == num_samples == 2


def test_two_class_pairs_leave_the_anchors_other_positives_out_of_the_denominator():
  # One view, three positives at unit vectors a, a, b and one negative at c: each of the six
  # ordered positive pairs' denominators holds exp s(pair) and exp s(anchor, c) only.
  embedding = np.zeros((1, 1, 1, 4, 3), np.float32)
  embedding[0, 0, 0] = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]]
  views = [{'embedding': embedding}]
  batch = {'positive_positions': np.array([[[0, 0, 0], [0, 0, 1], [0, 0, 2]]], np.int32),
           'positive_valid': np.ones((1, 3), bool),
           'negative_positions': np.array([[[0, 0, 3]]], np.int32),
           'negative_valid': np.ones((1, 1), bool)}
  value, _ = losses.LOSSES['contrastive'](views, batch, loss_config(temperature=1.0), 0)
  term = lambda s_pair, s_negative: -s_pair + np.log(np.exp(s_pair) + np.exp(s_negative))
  # Pairs (a, a') twice; (a, b), (a', b) with anchor a: s = 0; (b, a), (b, a') with anchor b.
  expected = (2 * term(1.0, 0.6) + 2 * term(0.0, 0.6) + 2 * term(0.0, 0.8)) / 6
  np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize('num_views', [1, 2])
def test_view_paired_contrastive_matches_numpy(num_views):
  views, batch = make_views(12, num_views), make_batch(13)
  batch['positive_valid'][1, 3] = True  # both samples take part
  temperature = 0.5  # keeps the NumPy exponentials in range
  config = loss_config(temperature=temperature, contrastive_form='view_paired')
  value, metrics = losses.LOSSES['contrastive'](views, batch, config, 0)
  np.testing.assert_allclose(value, slow_view_paired_nt_xent(views, batch, temperature), rtol=1e-5)
  assert metrics['samples'] == 2


def test_view_paired_contrastive_skips_samples_without_positives():
  views, batch = make_views(14), make_batch(15)  # sample 1 has no valid positive
  config = loss_config(temperature=0.5, contrastive_form='view_paired')
  value, metrics = losses.LOSSES['contrastive'](views, batch, config, 0)
  np.testing.assert_allclose(value, slow_view_paired_nt_xent(views, batch, 0.5), rtol=1e-5)
  assert metrics['samples'] == 1
  batch['positive_valid'][:] = False
  value, metrics = losses.LOSSES['contrastive'](views, batch, config, 0)
  assert value == 0.0 and metrics['samples'] == 0


def test_two_class_is_the_default_and_an_unknown_form_names_the_key():
  assert config_base.base_config().loss.contrastive_form == 'two_class'
  with pytest.raises(ConfigError, match='loss.contrastive_form'):
    losses.LOSSES['contrastive'](make_views(0), make_batch(0),
                                 loss_config(contrastive_form='simclr'), 0)


@pytest.mark.parametrize('form', ['two_class', 'view_paired'])
@pytest.mark.parametrize('anything_valid', [True, False])
def test_contrastive_at_the_paper_temperature_is_finite_with_its_gradient(form, anything_valid):
  views, batch = make_views(16), make_batch(17)
  views[0]['embedding'][0, 0, 0, 0] = 0.0  # a dead (all-zero after ReLU) feature
  if not anything_valid:
    batch['positive_valid'][:] = False
    batch['negative_valid'][:] = False

  def loss_of(embeddings):
    new_views = [dict(view, embedding=e) for view, e in zip(views, embeddings)]
    return losses.LOSSES['contrastive'](new_views, batch,
                                        loss_config(contrastive_form=form), 0)[0]

  value, gradient = jax.jit(jax.value_and_grad(loss_of))([v['embedding'] for v in views])
  assert np.isfinite(value) and (anything_valid or value == 0.0)
  assert all(np.all(np.isfinite(g)) for g in gradient)
  assert anything_valid == any(np.any(g != 0) for g in gradient)


def test_slice_bce_matches_numpy_and_needs_the_slice_head():
  views, batch = make_views(18, slice_head=True), make_batch(19)
  value, _ = losses.LOSSES['slice_bce'](views, batch, loss_config(), 0)
  expected = np.mean([slow_bce(v['slice_logits'], batch['slice_label']) for v in views])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  with pytest.raises(ConfigError, match='model.slice_head'):
    losses.LOSSES['slice_bce'](make_views(18), batch, loss_config(), 0)


def test_total_loss_is_the_weighted_sum_and_weight_zero_disables_a_term():
  views, batch = make_views(20), make_batch(21)
  config = loss_config(weights={'dice': 2.0, 'bce': 0.5, 'sdf_l1': 0.0})
  total, metrics = losses.total_loss(views, batch, config, 0)
  dice = losses.LOSSES['dice'](views, batch, config, 0)[0]
  bce = losses.LOSSES['bce'](views, batch, config, 0)[0]
  np.testing.assert_allclose(total, 2.0 * dice + 0.5 * bce, rtol=1e-6)
  assert metrics['loss'] == total and metrics['dice'] == dice and 'dice/score' in metrics
  assert 'sdf_l1' not in metrics and 'consistency' not in metrics


@pytest.mark.parametrize('step, factor', [(0, 0.0), (3, 0.25), (12, 1.0), (40, 1.0)])
def test_ramp_up_scales_a_terms_weight_linearly_then_holds_it(step, factor):
  views, batch = make_views(24, 2), make_batch(25)
  config = loss_config(weights={'dice': 1.0, 'contrastive': 0.1})
  config.ramp_up_steps = ml_collections.ConfigDict({'contrastive': 12, 'dice': 0})
  total, metrics = jax.jit(lambda v, b, s: losses.total_loss(v, b, config, s))(views, batch, step)
  dice = losses.LOSSES['dice'](views, batch, config, step)[0]
  contrastive = losses.LOSSES['contrastive'](views, batch, config, step)[0]
  assert contrastive > 0.1  # the ramp has something to scale
  np.testing.assert_allclose(total, dice + factor * 0.1 * contrastive, rtol=1e-5)
  # The logged term stays unweighted, so curves compare across the ramp.
  np.testing.assert_allclose(metrics['contrastive'], contrastive, rtol=1e-6)


def test_ramp_up_of_a_term_without_a_weight_is_a_config_error():
  config = loss_config()
  config.ramp_up_steps = ml_collections.ConfigDict({'contrastiv': 100})
  with pytest.raises(ConfigError, match='ramp_up_steps.contrastiv'):
    losses.total_loss(make_views(0), make_batch(0), config, 0)


def test_unknown_loss_name_lists_the_registered_ones():
  config = loss_config()
  config.weights.tversky = 1.0
  with pytest.raises(ConfigError, match=r"tversky.*'bce'.*'dice'"):
    jax.jit(lambda v, b: losses.total_loss(v, b, config, 0)).trace(make_views(0), make_batch(0))


ABLATIONS = {
    'segmentation': ({'dice': 1.0, 'bce': 1.0}, 1),
    '+sdf_l1': ({'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0}, 1),
    '+sdf_to_mask_dice': ({'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0, 'sdf_to_mask_dice': 1.0}, 1),
    '+consistency': ({'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0, 'sdf_to_mask_dice': 1.0,
                      'consistency': 1.0}, 2),
    '+contrastive': ({'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0, 'sdf_to_mask_dice': 1.0,
                      'consistency': 1.0, 'contrastive': 0.1}, 2),
    '+slice_bce': ({'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0, 'sdf_to_mask_dice': 1.0,
                    'consistency': 1.0, 'contrastive': 0.1, 'slice_bce': 1.0}, 2),
}


@pytest.mark.parametrize('ablation', list(ABLATIONS))
def test_total_loss_gradient_is_finite_under_jit_for_every_ablation(ablation):
  weights, num_views = ABLATIONS[ablation]
  config = loss_config(weights=weights, transform_k_start=10.0, transform_anneal_steps=100,
                       consistency_on_sdf=True)
  views, batch = make_views(22, num_views, slice_head=True), make_batch(23)

  @jax.jit
  def loss_and_gradient(views, batch, step):
    return jax.value_and_grad(lambda v: losses.total_loss(v, batch, config, step), has_aux=True)(
        views)

  (total, metrics), gradient = loss_and_gradient(views, batch, jnp.int32(7))
  assert np.isfinite(total) and set(weights) <= set(metrics)
  for leaf in jax.tree.leaves(gradient):
    assert np.all(np.isfinite(leaf))
  trained = {'logits'} | ({'sdf'} if 'sdf_l1' in weights else set())
  trained |= {'embedding'} if 'contrastive' in weights else set()
  for key in trained:
    assert np.any(gradient[0][key] != 0)
  eager_total, _ = losses.total_loss(views, batch, config, 7)
  np.testing.assert_allclose(total, eager_total, rtol=1e-5)


def focal_loss(views, batch, loss_config, step):
  """The example of docs/adding-a-loss.md."""
  del step
  mask = batch['mask'].astype(jnp.float32)
  values = []
  for view in views:
    logits = view['logits'].astype(jnp.float32)
    probabilities = jax.nn.sigmoid(logits)
    probability_of_truth = mask * probabilities + (1.0 - mask) * (1.0 - probabilities)
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, mask)
    values.append(jnp.mean((1.0 - probability_of_truth) ** loss_config.focal_gamma * cross_entropy))
  return jnp.mean(jnp.stack(values)), {}


@pytest.fixture
def registered_focal():
  losses.register('focal')(focal_loss)
  yield
  del losses.LOSSES['focal']


def test_the_documented_focal_loss_example(registered_focal):
  config = config_base.base_config()
  config.loss.weights.focal = 0.0  # the keys the user adds to their config file
  config.loss.focal_gamma = 2.0
  config.lock()
  # What `--config.loss.weights.focal=1.0 --config.loss.weights.dice=0 ...` does when locked.
  for name in config.loss.weights:
    config.loss.weights[name] = 0.0
  config.loss.weights.focal = 1.0
  with pytest.raises(AttributeError):
    config.loss.weights.tversky = 1.0  # a key missing from the config cannot be added
  views, batch = make_views(24), make_batch(25)
  total, metrics = jax.jit(lambda v, b: losses.total_loss(v, b, config.loss, 0))(views, batch)
  expected = np.mean([np.mean(optax.sigmoid_focal_loss(v['logits'], batch['mask'], gamma=2.0))
                      for v in views])
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert set(metrics) == {'focal', 'loss'}
  with pytest.raises(ValueError, match='already registered'):
    losses.register('focal')(focal_loss)


def test_supervised_views_first_keeps_the_label_terms_on_the_first_view_and_the_pairs_on_all():
  views, batch = make_views(26, 2), make_batch(27)
  weights = {'dice': 1.0, 'bce': 1.0, 'sdf_l1': 1.0, 'sdf_to_mask_dice': 1.0, 'consistency': 1.0,
             'contrastive': 0.1}
  config = loss_config(weights=weights)
  config.supervised_views = 'first'
  _, metrics = jax.jit(lambda v, b: losses.total_loss(v, b, config, 0))(views, batch)
  all_views = loss_config(weights=weights)
  for name in ('dice', 'bce', 'sdf_l1', 'sdf_to_mask_dice'):
    first_only = losses.LOSSES[name](views[:1], batch, all_views, 0)[0]
    both = losses.LOSSES[name](views, batch, all_views, 0)[0]
    assert abs(float(first_only) - float(both)) > 1e-6  # the views differ for this term
    np.testing.assert_allclose(metrics[name], first_only, rtol=1e-5)
  for name in ('consistency', 'contrastive'):
    np.testing.assert_allclose(metrics[name], losses.LOSSES[name](views, batch, all_views, 0)[0],
                               rtol=1e-5)
  config.supervised_views = 'raw'
  with pytest.raises(ConfigError, match='loss.supervised_views'):
    losses.total_loss(views, batch, config, 0)
