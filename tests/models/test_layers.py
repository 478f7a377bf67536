"""The network's building blocks against NumPy: weight standardisation, the weight-standardised
convolution in both implementations, grouped depth-folded convolution, the initial weights' scale,
and the residual block's output shapes and shortcut as the stride and width change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualseg_jax.models import layers


def test_standardised_kernel_filters_have_mean_zero_and_std_one():
  kernel = 3.0 + 2.5 * np.random.default_rng(0).normal(size=(3, 3, 3, 4, 5))
  standardised = np.asarray(layers.standardize_kernel(jnp.asarray(kernel)))
  per_filter = standardised.reshape(-1, 5)
  np.testing.assert_allclose(per_filter.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(per_filter.std(axis=0), 1.0, atol=1e-5)
  flat = kernel.reshape(-1, 5)
  np.testing.assert_allclose(per_filter, (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-12),
                             rtol=1e-4, atol=1e-6)


def numpy_convolution(x, kernel, stride, dilation):
  """Direct zero-padded cross-correlation, NDHWC x DHWIO, symmetric padding dilation*(k-1)/2."""
  size = kernel.shape[0]
  pad = dilation * (size - 1) // 2
  padded = np.pad(x, ((0, 0),) + ((pad, pad),) * 3 + ((0, 0),))
  out_shape = [(n + 2 * pad - dilation * (size - 1) - 1) // stride + 1 for n in x.shape[1:4]]
  out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
  for a in range(size):
    for b in range(size):
      for c in range(size):
        window = padded[:, a * dilation::stride, b * dilation::stride, c * dilation::stride]
        window = window[:, :out_shape[0], :out_shape[1], :out_shape[2]]
        out += window @ kernel[a, b, c]
  return out


@pytest.mark.parametrize('impl', layers.CONV_IMPLS)
@pytest.mark.parametrize('kernel_size, stride, dilation',
                         [(3, 1, 1), (3, 2, 1), (3, 1, 2), (1, 2, 1), (5, 2, 1)])
def test_std_conv_matches_numpy_with_standardised_kernel(kernel_size, stride, dilation, impl):
  x = np.random.default_rng(1).normal(size=(2, 8, 6, 4, 3)).astype(np.float32)
  conv = layers.StdConv3D(features=5, kernel_size=kernel_size, stride=stride, dilation=dilation,
                          conv_impl=impl)
  variables = conv.init(jax.random.PRNGKey(0), x)
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  assert set(variables['params']) == {'kernel'}  # no bias
  flat = kernel.reshape(-1, 5)
  standardised = ((flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-12)).reshape(kernel.shape)
  expected = numpy_convolution(x.astype(np.float64), standardised, stride, dilation)
  got = np.asarray(conv.apply(variables, x))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_grouped_depth_folded_conv_matches_numpy_per_group():
  """RandConv's form: one input channel per group, several outputs per group, a 7^3 kernel."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 6, 7, 5, 2)).astype(np.float32)
  kernel = rng.normal(size=(7, 7, 7, 1, 6)).astype(np.float32)
  got = np.asarray(layers.conv3d(jnp.asarray(x), jnp.asarray(kernel), impl='depth_folded',
                                 feature_group_count=2))
  for group in range(2):
    expected = numpy_convolution(x[..., group:group + 1].astype(np.float64),
                                 kernel[..., 3 * group:3 * group + 3].astype(np.float64), 1, 1)
    np.testing.assert_allclose(got[..., 3 * group:3 * group + 3], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel_init, expected_std', [
    ('torch_default', lambda fan_in: 1 / np.sqrt(3 * fan_in)),
    ('he_normal', lambda fan_in: np.sqrt(2 / fan_in))])
def test_initial_kernel_std_follows_kernel_init(kernel_init, expected_std):
  x = jnp.zeros((1, 4, 4, 4, 48))
  conv = layers.StdConv3D(features=96, kernel_init=kernel_init)
  kernel = np.asarray(conv.init(jax.random.PRNGKey(0), x)['params']['kernel'])
  fan_in = 27 * 48  # 124,416 weights
  assert abs(kernel.std() / expected_std(fan_in) - 1) < 0.1


def _standardised(kernel):
  """NumPy weight standardisation: each output filter to mean 0, variance 1."""
  flat = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  return ((flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-12)).reshape(kernel.shape)


def _group_norm_relu(x, num_groups, eps=1e-6):
  """NumPy GroupNorm at initialisation (scale 1, bias 0), then ReLU."""
  grouped = x.reshape(x.shape[:4] + (num_groups, x.shape[-1] // num_groups))
  mean = grouped.mean(axis=(1, 2, 3, 5), keepdims=True)
  variance = grouped.var(axis=(1, 2, 3, 5), keepdims=True)
  return np.maximum((grouped - mean) / np.sqrt(variance + eps), 0.0).reshape(x.shape)


@pytest.mark.parametrize('features, stride, dilation', [
    (4, 1, 1), (4, 1, 2), (8, 1, 1), (8, 2, 1), (4, 2, 1)])
def test_residual_block_output_shape_and_shortcut_follow_stride_and_width(features, stride,
                                                                         dilation):
  # Shapes are static: traced, not computed.
  x = jax.ShapeDtypeStruct((2, 8, 6, 4, 4), jnp.float32)
  block = layers.ResidualBlock(features=features, stride=stride, dilation=dilation, num_groups=2)
  params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params']
  output = jax.eval_shape(block.apply, {'params': params}, x)
  assert output.shape == (2, 8 // stride, 6 // stride, 4 // stride, features)
  assert params['conv1']['kernel'].shape == (3, 3, 3, 4, features)
  assert params['conv2']['kernel'].shape == (3, 3, 3, features, features)
  changes = stride != 1 or features != 4
  assert ('shortcut_conv' in params) == changes and ('shortcut_norm' in params) == changes
  if changes:
    assert params['shortcut_conv']['kernel'].shape == (1, 1, 1, 4, features)


@pytest.mark.parametrize('features, stride', [(4, 1), (8, 1), (8, 2)])
def test_residual_block_with_a_silent_second_conv_returns_its_shortcut(features, stride):
  """A zero kernel standardises to zero, so the block's output is the path around it: the input
  itself, or GN-ReLU and a strided 1x1 weight-standardised conv when the stride or width change."""
  x = np.random.default_rng(4).normal(size=(2, 8, 6, 4, 4)).astype(np.float32)
  block = layers.ResidualBlock(features=features, stride=stride, num_groups=2)
  params = jax.tree.map(np.asarray, block.init(jax.random.PRNGKey(0), x)['params'])
  params['conv2']['kernel'] = np.zeros_like(params['conv2']['kernel'])
  output = np.asarray(block.apply({'params': params}, x))
  if 'shortcut_conv' not in params:
    expected = x
  else:
    normalised = _group_norm_relu(x.astype(np.float64), num_groups=2)
    expected = (normalised[:, ::stride, ::stride, ::stride]
                @ _standardised(params['shortcut_conv']['kernel'])[0, 0, 0])
  np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_downsampling_unit_halves_each_side_and_sets_the_width():
  x = jax.ShapeDtypeStruct((1, 8, 6, 4, 4), jnp.float32)
  unit = layers.DownsamplingUnit(features=8, num_groups=2)
  params = jax.eval_shape(unit.init, jax.random.PRNGKey(0), x)['params']
  assert jax.eval_shape(unit.apply, {'params': params}, x).shape == (1, 4, 3, 2, 8)
  assert set(params) == {'norm', 'conv'} and params['conv']['kernel'].shape == (3, 3, 3, 4, 8)
