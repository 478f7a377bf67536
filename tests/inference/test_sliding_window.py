"""Sliding-window inference against independent NumPy references: identity reconstruction,
coverage of uneven and small volumes, Gaussian blending, device/host buffers, flip averaging."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualseg_jax.errors import ConfigError
from dualseg_jax.inference import sliding_window

WINDOW = (8, 16, 16)
HOST_ONLY = 0  # device_buffer_max_voxels that forces host-side accumulation
DEVICE_ALWAYS = 10 ** 9


def _logit(probability):
  return jnp.log(probability) - jnp.log1p(-probability)


@jax.jit
def identity_predict(windows):
  """Logits whose sigmoid is the input; the SDF is the input itself."""
  return {'logits': _logit(jnp.clip(windows, 1e-6, 1 - 1e-6)), 'sdf': windows}


@jax.jit
def window_mean_predict(windows):
  """Each window predicts one constant (its mean), so the output shows how windows are blended."""
  means = windows.mean(axis=(1, 2, 3, 4), keepdims=True)
  constant = jnp.broadcast_to(means, windows.shape)
  return {'logits': _logit(constant), 'sdf': 2.0 * constant}


def _random_image(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.05, 0.95, shape).astype(np.float32)


def _run(image, predict_fn, **kwargs):
  options = dict(overlap=0.5, windows_per_batch=3, device_buffer_max_voxels=DEVICE_ALWAYS)
  options.update(kwargs)
  return sliding_window.sliding_window_inference(image, predict_fn, WINDOW, **options)


@pytest.mark.parametrize('shape', [(13, 37, 20), (8, 16, 16), (5, 9, 30), (3, 4, 5)])
@pytest.mark.parametrize('buffer_voxels', [DEVICE_ALWAYS, HOST_ONLY])
def test_identity_is_reconstructed_on_uneven_and_small_volumes(shape, buffer_voxels):
  image = _random_image(shape)
  outputs = _run(image, identity_predict, device_buffer_max_voxels=buffer_voxels,
                 return_weights=True)
  assert outputs['probabilities'].shape == shape + (1,)
  assert outputs['probabilities'].dtype == np.float32 and outputs['sdf'].dtype == np.float32
  np.testing.assert_allclose(outputs['probabilities'][..., 0], image, atol=2e-5)
  np.testing.assert_allclose(outputs['sdf'][..., 0], image, atol=2e-6)
  assert np.all(outputs['weights'] > 0)  # every voxel covered


def test_window_starts_cover_the_axis_with_the_requested_overlap():
  for size, window, overlap in itertools.product((16, 17, 31, 40, 100), (8, 16), (0.0, 0.25, 0.5)):
    if size < window:
      continue
    starts = sliding_window.window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == size - window
    assert all(b > a for a, b in zip(starts, starts[1:]))
    # Neighbours share at least the requested overlap: no step exceeds window * (1 - overlap).
    assert all(b - a <= window * (1 - overlap) + 1e-9 for a, b in zip(starts, starts[1:]))


def test_gaussian_importance_map_matches_its_definition():
  weights = sliding_window.gaussian_importance_map(WINDOW)
  expected = np.ones(WINDOW)
  for axis, size in enumerate(WINDOW):
    offsets = np.arange(size) - (size - 1) / 2
    profile = np.exp(-offsets ** 2 / (2 * (size / 8) ** 2))
    shape = [1, 1, 1]
    shape[axis] = size
    expected = expected * profile.reshape(shape)
  expected /= expected.max()
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  assert weights.min() > 0 and weights.max() == pytest.approx(1.0)


def _numpy_blend(image, window, overlap):
  """Independent reference: every window start listed by hand, weights and values summed."""
  weights_map = sliding_window.gaussian_importance_map(window).astype(np.float64)
  per_axis = []
  for size, width in zip(image.shape, window):
    count = int(np.ceil((size - width) / (width * (1 - overlap)))) + 1
    step = (size - width) / max(count - 1, 1)
    per_axis.append(sorted({int(round(i * step)) for i in range(count)}))
  values = np.zeros(image.shape)
  weights = np.zeros(image.shape)
  for d, h, w in itertools.product(*per_axis):
    box = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
    values[box] += weights_map * image[box].mean()
    weights[box] += weights_map
  return values / weights, weights


@pytest.mark.parametrize('buffer_voxels', [DEVICE_ALWAYS, HOST_ONLY])
def test_gaussian_blending_matches_numpy(buffer_voxels):
  image = _random_image((14, 30, 27), seed=1)
  outputs = _run(image, window_mean_predict, device_buffer_max_voxels=buffer_voxels,
                 return_weights=True, windows_per_batch=4)
  expected_values, expected_weights = _numpy_blend(image, WINDOW, 0.5)
  np.testing.assert_allclose(outputs['weights'], expected_weights, rtol=1e-5)
  np.testing.assert_allclose(outputs['probabilities'][..., 0], expected_values, atol=2e-5)
  np.testing.assert_allclose(outputs['sdf'][..., 0], 2 * expected_values, atol=2e-5)


def test_device_and_host_buffers_agree():
  image = _random_image((17, 35, 22), seed=2)
  on_device = _run(image, window_mean_predict, device_buffer_max_voxels=DEVICE_ALWAYS)
  on_host = _run(image, window_mean_predict, device_buffer_max_voxels=HOST_ONLY)
  for key in ('probabilities', 'sdf'):
    np.testing.assert_allclose(on_device[key], on_host[key], atol=1e-6)


@jax.jit
def _mirror_symmetric_predict(windows):
  """Flip-equivariant: a symmetric 3x3x3 box filter (zero padding) commutes with every flip."""
  summed = jax.lax.reduce_window(windows, 0.0, jax.lax.add, (1, 3, 3, 3, 1), (1, 1, 1, 1, 1),
                                 'SAME')
  probability = jax.nn.sigmoid(4.0 * (summed / 27.0 - 0.5))
  return {'logits': _logit(probability), 'sdf': summed / 27.0}


@pytest.mark.parametrize('num_flips', [2, 8])
def test_flips_of_an_equivariant_function_change_nothing(num_flips):
  image = _random_image((11, 20, 19), seed=3)
  plain = _run(image, _mirror_symmetric_predict)
  flipped = _run(image, _mirror_symmetric_predict,
                 flips=sliding_window.flip_combinations(num_flips))
  for key in ('probabilities', 'sdf'):
    np.testing.assert_allclose(flipped[key], plain[key], atol=1e-5)


def test_flips_average_flipped_back_predictions():
  # A position-dependent function is not flip-equivariant; the average must equal the mean over
  # flips of flip(f(flip(x))), computed here window by window with NumPy.
  @jax.jit
  def ramp_predict(windows):
    ramp = jnp.arange(windows.shape[3], dtype=jnp.float32)[None, None, None, :, None] / 100.0
    return {'logits': windows + ramp, 'sdf': windows * 0 + ramp}

  image = _random_image(WINDOW, seed=4)  # exactly one window: no blending involved
  outputs = _run(image, ramp_predict, flips=sliding_window.flip_combinations(2))
  ramp = np.arange(WINDOW[2]) / 100.0
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  expected_probability = (sigmoid(image + ramp) + sigmoid(image + ramp[::-1])) / 2
  np.testing.assert_allclose(outputs['probabilities'][..., 0], expected_probability, atol=1e-6)
  np.testing.assert_allclose(outputs['sdf'][..., 0],
                             np.broadcast_to((ramp + ramp[::-1]) / 2, WINDOW), atol=1e-6)


def test_flip_combinations_start_with_no_flip_and_are_distinct():
  combinations = sliding_window.flip_combinations(8)
  assert combinations[0] == ()
  assert len(set(combinations)) == 8
  assert sliding_window.flip_combinations(1) == ((),)
  with pytest.raises(ConfigError, match='tta_flips'):
    sliding_window.flip_combinations(9)


def test_region_of_interest_only_is_predicted():
  image = _random_image((20, 40, 40), seed=5)
  region = (slice(3, 15), slice(10, 30), slice(5, 39))
  outputs = _run(image, identity_predict, region=region)
  np.testing.assert_allclose(outputs['probabilities'][region][..., 0], image[region], atol=2e-5)
  outside = np.ones(image.shape, bool)
  outside[region] = False
  assert np.all(outputs['probabilities'][outside] == 0)
  assert np.all(outputs['sdf'][outside] == 1)


def test_progress_reports_every_window():
  calls = []
  image = _random_image((13, 37, 20))
  _run(image, identity_predict, progress=lambda done, total: calls.append((done, total)))
  total = sliding_window.count_windows(image.shape, WINDOW, 0.5)
  assert calls[-1] == (total, total)
  assert [done for done, _ in calls] == sorted(done for done, _ in calls)
