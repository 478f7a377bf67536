"""Device-side augmentation: identities, agreement with NumPy/SciPy references, target consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualseg_jax import config_base
from dualseg_jax.data import augment
from dualseg_jax.data import targets

SHAPE = (16, 32, 32)
SLICE_MIN_VOXELS = 10


def _augment_config(**overrides):
  config = config_base.base_config().augment
  for name, value in overrides.items():
    config[name] = value
  return config


def _phantom_label(shape=SHAPE, pancreas_radii=(5.0, 9.0, 12.0), tumour_radius=4.0,
                   centre=None):
  grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij'), -1)
  centre = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape])
  pancreas = (((grid - centre) / np.asarray(pancreas_radii)) ** 2).sum(-1) <= 1.0
  tumour = ((grid - (centre + [0.5, 2.5, 3.5])) ** 2).sum(-1) <= tumour_radius ** 2
  label = np.zeros(shape, np.int32)
  label[pancreas] = 1
  label[tumour & pancreas] = 2
  return label


def _sample(seed=0, num_positions=16, contrastive_sampling='per_slice'):
  label = _phantom_label()
  rng = np.random.default_rng(seed)
  sample = targets.make_targets(label, 'joint', (1.0, 1.0, 1.0), rng, num_positions,
                                SLICE_MIN_VOXELS, ring_sides=(6, 10),
                                contrastive_sampling=contrastive_sampling)
  image = np.where(label > 0, 0.4 + 0.2 * label, 0.1).astype(np.float32)
  image += rng.uniform(0.0, 0.05, SHAPE).astype(np.float32)
  sample['image'] = image[..., None]
  sample['label'] = label
  return sample


def _batch(*samples):
  return {name: jnp.asarray(np.stack([s[name] for s in samples])) for name in samples[0]}


def _stack_params(*params):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)


def _params_with_matrix(matrix, config, shape=SHAPE):
  params = augment.identity_transform(shape, config)
  params['matrix'] = jnp.asarray(matrix, jnp.float32)
  return params


DEFAULT_CONFIG = _augment_config()
# Every sample rotated, zoomed, gamma-corrected and noised (the defaults draw each with p 0.5).
ALWAYS_ON = dict(rotation_prob=1.0, scale_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
# One compiled function for every test that applies explicit parameters with the default config.
_apply_default = jax.jit(
    lambda p, b: augment.augment_with_params(p, b, DEFAULT_CONFIG, SLICE_MIN_VOXELS))


def _apply(params, batch, config):
  if config is DEFAULT_CONFIG:
    return _apply_default(params, batch)
  return jax.jit(lambda p, b: augment.augment_with_params(p, b, config, SLICE_MIN_VOXELS))(
      params, batch)


def _assert_same(name, actual, expected):
  """Exact, except the SDF: the warp multiplies it back to mm and divides again (float32 rounding)."""
  if name in ('sdf', 'sdf_scale_mm'):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-6,
                               err_msg=name)
  else:
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=name)


def test_identity_parameters_give_identity_output():
  config = DEFAULT_CONFIG
  batch = _batch(_sample(0))
  params = _stack_params(augment.identity_transform(SHAPE, config))
  out = _apply(params, batch, config)
  assert out['positive_valid'].any() and out['negative_valid'].any()
  for name, value in batch.items():
    _assert_same(name, out[name], value)


def test_augment_batch_with_degenerate_ranges_is_identity():
  config = _augment_config(spatial=False, gamma=(1.0, 1.0), noise_std=(0.0, 0.0))
  batch = _batch(_sample(0))
  out = jax.jit(lambda k, b: augment.augment_batch(k, b, config))(jax.random.key(3), batch)
  for name, value in batch.items():
    _assert_same(name, out[name], value)


def test_flip_matches_numpy_and_twice_is_identity():
  for axis in range(3):
    _check_flip(axis)


def _check_flip(axis):
  config = DEFAULT_CONFIG
  sample = _sample(0)
  batch = _batch(sample)
  flip = np.eye(3)
  flip[axis, axis] = -1.0
  params = _stack_params(_params_with_matrix(flip, config))
  once = _apply(params, batch, config)
  np.testing.assert_array_equal(np.asarray(once['image'][0]), np.flip(sample['image'], axis))
  np.testing.assert_array_equal(np.asarray(once['label'][0]), np.flip(sample['label'], axis))
  _assert_same('sdf', once['sdf'][0], np.flip(sample['sdf'], axis))
  cells = SHAPE[axis] // augment.EMBEDDING_STRIDE
  expected_positions = sample['positive_positions'].copy()
  expected_positions[:, axis] = cells - 1 - expected_positions[:, axis]
  expected_positions[~sample['positive_valid']] = 0  # invalid rows stay invalid and read zeros
  np.testing.assert_array_equal(np.asarray(once['positive_valid'][0]), sample['positive_valid'])
  np.testing.assert_array_equal(np.asarray(once['positive_positions'][0]), expected_positions)
  twice = _apply(params, once, config)
  for name, value in batch.items():
    _assert_same(name, twice[name], value)


def test_quarter_turn_moves_image_labels_and_positions_together():
  config = DEFAULT_CONFIG
  sample = _sample(2)
  # Sampling map of a quarter turn in the (y, x) plane: source = (z, x, W-1-y) about the centre.
  quarter = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
  out = _apply(_stack_params(_params_with_matrix(quarter, config)), _batch(sample), config)
  expected_label = np.rot90(sample['label'], k=1, axes=(1, 2))
  np.testing.assert_array_equal(np.asarray(out['label'][0]), expected_label)
  np.testing.assert_allclose(np.asarray(out['image'][0]),
                             np.rot90(sample['image'], k=1, axes=(1, 2)), atol=1e-6)
  # The same quarter turn on the 1/8 grid, by NumPy: a marked cell moves where rot90 moves it.
  grid_shape = [s // augment.EMBEDDING_STRIDE for s in SHAPE]
  for kind in ('positive', 'negative'):
    valid = np.asarray(out[f'{kind}_valid'][0])
    np.testing.assert_array_equal(valid, sample[f'{kind}_valid'])
    assert valid.any()
    expected = set()
    for position in sample[f'{kind}_positions'][sample[f'{kind}_valid']]:
      marker = np.zeros(grid_shape, bool)
      marker[tuple(position)] = True
      expected.add(tuple(np.argwhere(np.rot90(marker, k=1, axes=(1, 2)))[0]))
    assert {tuple(p) for p in np.asarray(out[f'{kind}_positions'][0])[valid]} == expected


def _cell_contents(structure):
  stride = augment.EMBEDDING_STRIDE
  d, h, w = (s // stride for s in structure.shape)
  blocks = structure.reshape(d, stride, h, stride, w, stride)
  return blocks.any(axis=(1, 3, 5))


@pytest.mark.parametrize('contrastive_sampling', ['per_slice', 'uniform'])
def test_random_augmentation_keeps_labels_masks_and_positions_consistent(contrastive_sampling):
  config = _augment_config(elastic_prob=0.5, elastic_magnitude_vox=2.0, **ALWAYS_ON)
  samples = [_sample(seed, contrastive_sampling=contrastive_sampling) for seed in range(4)]
  batch = _batch(*samples)
  total_valid = 0
  augment_fn = jax.jit(lambda k, b: augment.augment_batch(k, b, config, None, SLICE_MIN_VOXELS))
  for step in range(3):
    out = augment_fn(jax.random.key(step), batch)
    labels = np.asarray(out['label'])
    assert set(np.unique(labels)) <= {0, 1, 2}
    image = np.asarray(out['image'])
    assert image.min() >= 0.0 and image.max() <= 1.0
    for index in range(len(samples)):
      label = labels[index]
      masks = np.asarray(out['mask'][index]) > 0.5
      np.testing.assert_array_equal(masks, np.asarray(out['sdf'][index]) < 0)
      # The label is the nearest-neighbour warp, the masks the sign of the trilinear SDF warp:
      # they differ only where the two samplings round the surface differently.
      label_masks = targets.stage_channel_masks(label, 'joint') > 0
      assert (masks != label_masks).mean() < 0.02
      tumour = masks[..., 1]
      np.testing.assert_array_equal(np.asarray(out['slice_label'][index]),
                                    targets.slice_labels(tumour, SLICE_MIN_VOXELS))
      expected_sdf_valid = [mask.any() and not mask.all() for mask in (masks[..., 0], tumour)]
      np.testing.assert_array_equal(np.asarray(out['sdf_valid'][index]), expected_sdf_valid)
      holds_tumour = _cell_contents(tumour)
      # A positive cell holds tumour; a negative cell holds none (never both kinds in one cell).
      for kind, cells in (('positive', holds_tumour), ('negative', ~holds_tumour)):
        positions = np.asarray(out[f'{kind}_positions'][index])
        valid = np.asarray(out[f'{kind}_valid'][index])
        total_valid += int(valid.sum())
        for position in positions[valid]:
          assert cells[tuple(position)], (kind, position)
  assert total_valid > 0


def test_forward_map_inverts_the_sampling_map_with_elastic_offsets():
  config = _augment_config(elastic_prob=1.0, elastic_magnitude_vox=1.0, **ALWAYS_ON)
  params = augment.sample_transform(jax.random.key(7), SHAPE, config)
  points = jnp.asarray(np.random.default_rng(0).uniform(4, 12, (50, 3)), jnp.float32)
  source = augment._source_points(params, points, SHAPE, config.elastic_sigma_vox)
  recovered = augment._forward_points(params, source, SHAPE, config.elastic_sigma_vox)
  assert np.abs(np.asarray(params['elastic_grid'])).max() > 0.5
  np.testing.assert_allclose(np.asarray(recovered), np.asarray(points), atol=0.1)


def _soft_dice(prediction, mask):
  return 2 * (prediction * mask).sum() / (prediction.sum() + mask.sum())


@pytest.mark.parametrize('zoom', [0.85, 1.2])
def test_warped_masks_are_the_sign_of_the_warped_sdf(zoom):
  """After any warp the masks the Dice and BCE terms read and the SDF the L1 and SDF->mask terms
  read describe one shape: mask == (sdf < 0) exactly, and each valid channel's SDF is normalised
  per patch to [-1, 1]. The mask is the zoomed structure: against the analytic zoomed ellipsoid
  and sphere it scores Dice >= 0.95, at least as well as the label's nearest-neighbour warp."""
  config = DEFAULT_CONFIG
  sample = _sample()
  params = _stack_params(_params_with_matrix(np.eye(3) / zoom, config))
  out = _apply(params, _batch(sample), config)
  sdf = np.asarray(out['sdf'][0])
  mask = np.asarray(out['mask'][0])
  np.testing.assert_array_equal(mask > 0.5, sdf < 0)
  label = np.asarray(out['label'][0])
  # Output voxel p shows source point centre + (p - centre) / zoom (see _phantom_label).
  centre = (np.asarray(SHAPE) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing='ij'), -1)
  source = centre + (grid - centre) / zoom
  pancreas = (((source - centre) / np.array([5.0, 9.0, 12.0])) ** 2).sum(-1) <= 1.0
  tumour = pancreas & (((source - (centre + [0.5, 2.5, 3.5])) ** 2).sum(-1) <= 16.0)
  for channel, (truth, nearest) in enumerate(((pancreas, label >= 1), (tumour, label == 2))):
    assert out['sdf_valid'][0, channel]
    np.testing.assert_allclose([sdf[..., channel].min(), sdf[..., channel].max()], [-1, 1],
                               atol=1e-6)
    dice = _soft_dice(mask[..., channel], truth)
    assert dice >= 0.95 and dice >= _soft_dice(nearest, truth), (channel, dice)


def test_a_perfect_sdf_through_the_sharp_transform_reproduces_the_augmented_mask():
  """The SDF->mask Dice term must be satisfiable together with the Dice term: for a prediction
  equal to the SDF target, sigmoid(-1500 sdf) scores Dice >= 0.98 against the mask, for the
  pancreas and the tumour, on patches under random rotation and zoom on every sample, flips and
  elastic. With the zero level on the boundary voxels this was 0.81 / 0.62."""
  config = _augment_config(elastic_prob=0.5, **ALWAYS_ON)
  samples = [_sample(seed) for seed in range(4)]
  keys = jax.random.split(jax.random.key(3), len(samples))
  params = _stack_params(*[augment.sample_transform(key, SHAPE, config) for key in keys])
  out = _apply(params, _batch(*samples), config)
  sdf, mask = np.asarray(out['sdf'], np.float64), np.asarray(out['mask'], np.float64)
  for channel in range(2):
    for index in range(len(samples)):
      if not out['sdf_valid'][index, channel]:
        continue
      transformed = 1.0 / (1.0 + np.exp(np.clip(1500.0 * sdf[index, ..., channel], -50, 50)))
      assert _soft_dice(transformed, mask[index, ..., channel]) >= 0.98, (channel, index)


# --- How often each transform happens ---------------------------------------------------------

def _sampled_transforms(config, count, seed=0):
  keys = jax.random.split(jax.random.key(seed), count)
  sample = jax.jit(jax.vmap(lambda key: augment.sample_transform(key, SHAPE, config)))
  params = sample(keys)
  del params['noise_key']  # a key array, no NumPy form
  return jax.tree.map(np.asarray, params)


def _which_transforms_happened(params):
  """Per sample and transform, read back from the parameters alone (flips and elastic off, so the
  matrix is rotation / zoom with an orthogonal rotation at unit spacing)."""
  matrix = params['matrix'].astype(np.float64)
  off_diagonal = matrix - np.eye(3) * np.diagonal(matrix, axis1=-2, axis2=-1)[..., None, :]
  return {
      'rotation': np.abs(off_diagonal).max(axis=(-2, -1)) > 1e-6,
      'scale': np.abs(np.abs(np.linalg.det(matrix)) - 1.0) > 1e-4,
      'gamma': params['gamma'] != 1.0,
      'noise': params['noise_std'] != 0.0,
  }


def test_the_reference_probabilities_and_noise_range_are_the_defaults():
  config = DEFAULT_CONFIG
  for name in ('rotation', 'scale', 'gamma', 'noise', 'flip'):
    assert config[f'{name}_prob'] == 0.5, name
  assert tuple(config.noise_std) == (0.0, 0.1)


@pytest.mark.parametrize('transform', ['rotation', 'scale', 'gamma', 'noise'])
def test_a_transform_with_probability_0_never_happens(transform):
  config = _augment_config(**{**ALWAYS_ON, f'{transform}_prob': 0.0}, flip_prob=0.0,
                           elastic_prob=0.0)
  params = _sampled_transforms(config, 256)
  happened = _which_transforms_happened(params)
  assert not happened[transform].any()
  assert all(happened[other].all() for other in happened if other != transform)
  if transform == 'gamma':
    np.testing.assert_array_equal(params['gamma'], 1.0)
  elif transform == 'noise':
    np.testing.assert_array_equal(params['noise_std'], 0.0)
  elif transform == 'rotation':
    # Zoom alone: the matrix is exactly diagonal (1/zoom on the diagonal).
    np.testing.assert_array_equal(params['matrix'] * (1 - np.eye(3)), 0.0)
  else:
    # Rotation alone: an exact rotation matrix (orthonormal columns at unit spacing).
    products = np.einsum('nij,nik->njk', params['matrix'], params['matrix'])
    np.testing.assert_allclose(products, np.broadcast_to(np.eye(3), products.shape), atol=1e-6)


def test_with_every_probability_1_every_transform_happens_on_every_sample():
  config = _augment_config(**ALWAYS_ON, flip_prob=0.0, elastic_prob=0.0)
  for transform, happened in _which_transforms_happened(_sampled_transforms(config, 256)).items():
    assert happened.all(), transform


def test_at_probability_half_each_transform_happens_on_about_half_the_samples_independently():
  """512 samples: the share of each transform lies in [0.4, 0.6] (4.5 binomial standard
  deviations of 0.022 around 0.5), and of each pair in [0.15, 0.35] (independent draws give 0.25;
  one shared draw would give 0.5)."""
  config = _augment_config(flip_prob=0.0, elastic_prob=0.0)
  happened = _which_transforms_happened(_sampled_transforms(config, 512))
  for transform, on in happened.items():
    assert 0.4 <= on.mean() <= 0.6, (transform, on.mean())
  names = sorted(happened)
  for first in names:
    for second in names:
      if first < second:
        both = (happened[first] & happened[second]).mean()
        assert 0.15 <= both <= 0.35, (first, second, both)


def test_noise_std_is_drawn_from_the_reference_range():
  params = _sampled_transforms(_augment_config(noise_prob=1.0), 256)
  noise_std = params['noise_std']
  assert noise_std.min() >= 0.0 and noise_std.max() <= 0.1
  # U(0, 0.1): 256 draws all below 0.09 would happen with probability 0.9^256 (~2e-12).
  assert noise_std.max() > 0.09


def test_augment_batch_with_every_probability_0_is_identity():
  """The spatial path on, every transform switched off by its probability: the output is the
  input, exactly."""
  config = _augment_config(rotation_prob=0.0, scale_prob=0.0, gamma_prob=0.0, noise_prob=0.0,
                           flip_prob=0.0, elastic_prob=0.0)
  batch = _batch(_sample(0), _sample(1))
  out = jax.jit(lambda k, b: augment.augment_batch(k, b, config, (3.0, 0.7, 0.7),
                                                   SLICE_MIN_VOXELS))(jax.random.key(5), batch)
  for name, value in batch.items():
    _assert_same(name, out[name], value)
