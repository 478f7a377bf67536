"""RandConv views: a SciPy re-implementation of one view, the drawn kernels' sizes and statistics,
the [0, 1] range after min-max normalisation, determinism per key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from dualseg_jax.errors import ConfigError
from dualseg_jax.models import randconv


@pytest.fixture(scope='module')
def images():
  return jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 12, 10, 1))


def numpy_view(image, kernel, bias, mix):
  convolved = ndimage.correlate(image.astype(np.float64), kernel.astype(np.float64), mode='constant') + bias
  view = np.clip(mix * convolved + (1 - mix) * image, 0.0, 1.0)
  return (view - view.min()) / (view.max() - view.min())


@pytest.mark.parametrize('conv_impl', ['conv3d', 'depth_folded'])
def test_views_match_a_scipy_reimplementation(images, conv_impl):
  views, parameters = randconv.random_views_with_parameters(jax.random.PRNGKey(1), images, 2, (3, 5, 7),
                                                            conv_impl)
  assert len(views) == 2
  for view_index, view in enumerate(views):
    assert view.shape == images.shape and view.dtype == jnp.float32
    for sample in range(images.shape[0]):
      expected = numpy_view(np.asarray(images[sample, ..., 0]),
                            np.asarray(parameters['kernel'][view_index, sample]),
                            float(parameters['bias'][view_index, sample]),
                            float(parameters['mix'][view_index, sample]))
      np.testing.assert_allclose(np.asarray(view[sample, ..., 0]), expected, atol=2e-5)


def test_same_key_same_views_other_key_other_views(images):
  first = randconv.two_views(jax.random.PRNGKey(5), images)
  again = randconv.random_views(jax.random.PRNGKey(5), images, 2, (3, 5, 7))
  other = randconv.two_views(jax.random.PRNGKey(6), images)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(first[0], other[0])
  assert not np.allclose(first[0], first[1])  # the two views of one step differ too


def test_views_are_min_max_normalised_per_sample(images):
  for seed in range(3):
    for view in randconv.two_views(jax.random.PRNGKey(seed), images):
      per_sample = np.asarray(view).reshape(images.shape[0], -1)
      np.testing.assert_allclose(per_sample.min(axis=1), 0.0, atol=1e-6)
      np.testing.assert_allclose(per_sample.max(axis=1), 1.0, atol=1e-6)


def test_constant_image_stays_finite_and_in_range(images):
  constant = jnp.full_like(images, 0.25)
  for view in randconv.two_views(jax.random.PRNGKey(0), constant):
    values = np.asarray(view)
    assert np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() <= 1.0


def test_kernel_sizes_vary_and_kernels_have_kaiming_statistics():
  parameters = randconv.draw_parameters(jax.random.PRNGKey(3), batch_size=200, num_views=2)
  sizes = np.asarray(parameters['kernel_size']).ravel()
  kernels = np.asarray(parameters['kernel']).reshape(-1, 7, 7, 7)
  assert set(sizes.tolist()) == {3, 5, 7}
  # Roughly a third each.
  assert all(0.25 < np.mean(sizes == size) < 0.42 for size in (3, 5, 7))
  offsets = np.abs(np.arange(7) - 3)
  distance = np.maximum.reduce(np.meshgrid(offsets, offsets, offsets, indexing='ij'))
  for size in (3, 5, 7):
    chosen = kernels[sizes == size]
    inside = distance <= size // 2
    assert np.all(chosen[:, ~inside] == 0.0)
    # Kaiming normal with gain 1 (the reference's): std 1 / sqrt(fan_in), fan_in = k^3.
    np.testing.assert_allclose(chosen[:, inside].std(), np.sqrt(1.0 / size ** 3), rtol=0.1)
    bound = 1.0 / np.sqrt(size ** 3)
    assert np.all(np.abs(np.asarray(parameters['bias']).ravel()[sizes == size]) <= bound)
  mix = np.asarray(parameters['mix'])
  assert mix.min() >= 0.0 and mix.max() < 1.0 and 0.3 < mix.mean() < 0.7


def test_gain_scales_the_kernels_and_nothing_else():
  key = jax.random.PRNGKey(5)
  unit = randconv.draw_parameters(key, batch_size=4, num_views=2)
  relu = randconv.draw_parameters(key, batch_size=4, num_views=2, gain=float(np.sqrt(2.0)))
  np.testing.assert_allclose(np.asarray(relu['kernel']), np.sqrt(2.0) * np.asarray(unit['kernel']),
                             rtol=1e-6, atol=1e-7)
  for name in ('bias', 'mix', 'kernel_size'):
    np.testing.assert_array_equal(np.asarray(relu[name]), np.asarray(unit[name]))
  with pytest.raises(ConfigError, match='augment.randconv_gain'):
    randconv.draw_parameters(key, batch_size=4, num_views=2, gain=0.0)


def test_kernel_size_changes_with_the_key(images):
  drawn = set()
  for seed in range(20):
    _, parameters = randconv.random_views_with_parameters(jax.random.PRNGKey(seed), images, 2, (3, 5, 7))
    drawn.add(int(parameters['kernel_size'][0, 0]))
  assert drawn == {3, 5, 7}


def test_even_kernel_size_is_a_config_error(images):
  with pytest.raises(ConfigError, match='augment.randconv_kernel_sizes'):
    randconv.random_views(jax.random.PRNGKey(0), images, 2, (3, 4))
