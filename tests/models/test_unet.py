"""The dual-task network: output shapes and dtypes, the paper-scale and reference parameter counts
against a hand count in both downsampling layouts, the initial weights and outputs, bfloat16
against float32, the convolution implementations against each other (its building blocks:
test_layers.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import three_center
from dualseg_jax import models
from dualseg_jax.errors import ConfigError


@pytest.fixture(scope='module')
def tiny_model_config():
  config = three_center.get_config('tiny')
  config.model.slice_head = True
  return config.model


@pytest.fixture(scope='module')
def tiny_variables(tiny_model_config):
  model = models.build_model(tiny_model_config)
  return models.init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 8, 1))


@pytest.mark.parametrize('spatial', [(16, 32, 32), (24, 32, 16), (32, 32, 32)])
def test_outputs_have_the_documented_shapes_and_dtypes(tiny_model_config, tiny_variables, spatial):
  model = models.build_model(tiny_model_config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, *spatial, 1))
  outputs = jax.jit(functools.partial(model.apply, train=False))(tiny_variables, images)
  depth, height, width = spatial
  classes, embedding_dim = tiny_model_config.num_classes, tiny_model_config.embedding_dim
  assert {k: v.shape for k, v in outputs.items()} == {
      'logits': (2, depth, height, width, classes),
      'sdf': (2, depth, height, width, classes),
      'embedding': (2, depth // 8, height // 8, width // 8, embedding_dim),
      'slice_logits': (2, depth),
  }
  assert all(value.dtype == jnp.float32 for value in outputs.values())
  sdf = np.asarray(outputs['sdf'])
  assert np.all(np.abs(sdf) <= 1.0)
  assert np.all(np.asarray(outputs['embedding']) >= 0.0)  # through a ReLU
  # Every full-resolution slice reads its bottleneck slice z // 8.
  slice_logits = np.asarray(outputs['slice_logits'])
  np.testing.assert_array_equal(slice_logits, np.repeat(slice_logits[:, ::8], 8, axis=1))
  assert not np.allclose(slice_logits[0], slice_logits[0, 0])  # slices do differ


def hand_parameter_count(widths, blocks, dilated_blocks, fusion_width, embedding_dim, decoder_widths,
                         num_classes, slice_hidden, slice_head, downsample, head_norm):
  def conv3(cin, cout):
    return 27 * cin * cout  # weight-standardised, no bias

  def norm(channels):
    return 2 * channels

  def block(cin, cout, projected):
    count = norm(cin) + conv3(cin, cout) + norm(cout) + conv3(cout, cout)
    return count + (norm(cin) + cin * cout if projected else 0)

  total = conv3(1, widths[0])
  total += blocks[0] * block(widths[0], widths[0], False)
  for level in (1, 2, 3):
    if downsample == 'separate':
      # The downsampling unit: GN-ReLU-3x3x3 conv with stride 2.
      total += norm(widths[level - 1]) + conv3(widths[level - 1], widths[level])
      total += blocks[level] * block(widths[level], widths[level], False)
    else:
      total += block(widths[level - 1], widths[level], True)  # strided first block
      total += (blocks[level] - 1) * block(widths[level], widths[level], False)
  total += dilated_blocks * block(widths[3], widths[3], False)
  total += widths[3] * embedding_dim + embedding_dim  # projection, with bias
  total += norm(widths[3]) + conv3(widths[3], fusion_width)  # fusion: GN + 3x3x3 conv, no bias
  decoder_inputs = (fusion_width,) + tuple(decoder_widths[:-1])
  for cin, cout in zip(decoder_inputs, decoder_widths):
    total += block(cin, cout, cin != cout)
  if head_norm:
    total += norm(decoder_widths[-1])  # the heads' GN
  total += 2 * (decoder_widths[-1] * num_classes + num_classes)  # segmentation and SDF heads
  if slice_head:
    total += norm(widths[3]) + widths[3] * slice_hidden + slice_hidden + slice_hidden + 1
  return total


def parameter_shapes(model_config):
  model = models.build_model(model_config)
  return jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 8, 8, 8, 1))),
                        jax.random.PRNGKey(0))['params']


def count_and_hand_count(model_config):
  shapes = parameter_shapes(model_config)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  m = model_config
  expected = hand_parameter_count(m.widths, m.blocks, m.dilated_blocks, m.fusion_width, m.embedding_dim,
                                  m.decoder_widths, m.num_classes, m.slice_hidden, m.slice_head,
                                  m.downsample, m.head_norm)
  return count, expected


@pytest.mark.parametrize('preset', ['quick', 'paper'])
@pytest.mark.parametrize('downsample', ['separate', 'strided_block'])
@pytest.mark.parametrize('slice_head, head_norm', [(False, True), (True, True), (False, False)])
def test_parameter_count_equals_hand_count(preset, downsample, slice_head, head_norm):
  model_config = three_center.get_config(preset).model
  model_config.downsample, model_config.slice_head = downsample, slice_head
  model_config.head_norm = head_norm
  count, expected = count_and_hand_count(model_config)
  assert count == expected


def test_reference_coarse_model_has_the_reference_parameter_count():
  """The method's coarse network: one output channel, separate downsampling units, no GN-ReLU
  before the heads; 18,966,082 parameters counted by instantiating the reference."""
  model_config = three_center.get_config('paper').model
  model_config.num_classes, model_config.head_norm, model_config.downsample = 1, False, 'separate'
  count, expected = count_and_hand_count(model_config)
  assert count == expected == 18_966_082


def test_strided_block_layout_keeps_its_parameter_count_and_names():
  """downsample='strided_block' with the heads' group norm and the joint stage's 2 channels: the
  layout whose checkpoints must keep restoring, 16,686,340 parameters, levels 1-3 striding inside
  their first block (with its 1x1 shortcut), no downsampling units."""
  model_config = three_center.get_config('paper').model
  model_config.downsample, model_config.head_norm = 'strided_block', True
  model_config.num_classes = 2
  count, expected = count_and_hand_count(model_config)
  assert count == expected == 16_686_340
  shapes = parameter_shapes(model_config)
  assert not any(name.endswith('_downsample') for name in shapes)
  for level in (1, 2, 3):
    assert set(shapes[f'encoder{level}_block0']) == {'norm1', 'conv1', 'norm2', 'conv2',
                                                      'shortcut_norm', 'shortcut_conv'}
    assert 'shortcut_conv' not in shapes[f'encoder{level}_block1']
  assert 'head_norm' in shapes


def test_separate_layout_downsamples_in_its_own_unit():
  model_config = three_center.get_config('paper').model
  shapes = parameter_shapes(model_config)
  widths = model_config.widths
  for level in (1, 2, 3):
    unit = shapes[f'encoder{level}_downsample']
    assert unit['conv']['kernel'].shape == (3, 3, 3, widths[level - 1], widths[level])
    assert set(unit['norm']) == {'scale', 'bias'}
    for index in range(model_config.blocks[level]):
      assert 'shortcut_conv' not in shapes[f'encoder{level}_block{index}']  # identity blocks
  assert 'encoder1_block2' not in shapes


def test_separate_layout_allows_levels_without_blocks():
  model_config = three_center.get_config('tiny').model
  model_config.blocks = (1, 0, 1, 0)
  count, expected = count_and_hand_count(model_config)
  assert count == expected


@pytest.mark.parametrize('key, value', [('downsample', 'pooling'), ('kernel_init', 'xavier'),
                                        ('head_activation', 'gelu')])
def test_unknown_layout_or_initialiser_is_a_config_error(key, value):
  model_config = three_center.get_config('tiny').model
  model_config[key] = value
  with pytest.raises(ConfigError, match=f'model.{key}'):
    models.build_model(model_config)


@pytest.mark.parametrize('activation', ['none', 'relu'])
def test_heads_read_the_normalised_features_signed_unless_a_relu_follows(tiny_model_config,
                                                                       tiny_variables, activation):
  """A segmentation head reading one channel with no bias returns that channel: signed with
  'none' (the default, docs/design.md "Heads"), clipped at 0 with 'relu'; the SDF head reads the
  same channels."""
  assert three_center.get_config('tiny').model.head_activation == 'none'
  model_config = ml_collections.ConfigDict(tiny_model_config.to_dict())
  model_config.head_activation = activation
  model = models.build_model(model_config)
  params = jax.tree.map(lambda x: x, tiny_variables['params'])
  for head in ('segmentation_head', 'sdf_head'):
    kernel = np.zeros(params[head]['kernel'].shape, np.float32)
    kernel[..., 0, :] = 1.0  # every output reads channel 0 of the head's input
    params[head] = {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros_like(params[head]['bias'])}
  images = jax.random.uniform(jax.random.PRNGKey(3), (1, 16, 32, 32, 1))
  outputs = model.apply({'params': params}, images, train=False)
  logits, sdf = np.asarray(outputs['logits']), np.asarray(outputs['sdf'])
  np.testing.assert_allclose(sdf, np.tanh(logits), atol=1e-5)
  # The group norm centres each channel: about half of a channel is negative before any ReLU.
  negative_share = float(np.mean(logits < 0))
  if activation == 'none':
    assert 0.2 < negative_share < 0.8
  else:
    assert negative_share == 0.0 and float(np.mean(logits > 0)) > 0.2


def test_strided_block_levels_without_blocks_are_a_config_error():
  model_config = three_center.get_config('tiny').model
  model_config.downsample, model_config.blocks = 'strided_block', (1, 1, 0, 1)
  with pytest.raises(ConfigError, match='model.blocks'):
    models.build_model(model_config)


def test_torch_default_init_reaches_every_kernel_and_bias(tiny_model_config):
  """PyTorch's default (the paper preset's) draws kernels and biases from
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)): no weight beyond the bound (about half of a he_normal
  kernel's weights lie beyond it), the largest near it."""
  assert three_center.get_config('paper').model.kernel_init == 'torch_default'
  tiny_model_config = ml_collections.ConfigDict(tiny_model_config.to_dict())
  tiny_model_config.kernel_init = 'torch_default'
  model = models.build_model(tiny_model_config)
  params = models.init_variables(model, jax.random.PRNGKey(0), (1, 8, 8, 8, 1))['params']
  checked = []
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    names = [key.key for key in path]
    if names[-1] != 'kernel':
      continue
    value = np.asarray(value)
    bound = 1 / np.sqrt(np.prod(value.shape[:-1]))
    assert np.abs(value).max() <= bound * (1 + 1e-6), names
    if value.size >= 64:
      assert np.abs(value).max() > 0.8 * bound, names
    checked.append(names[0])
    if names[0] in ('projection', 'sdf_head', 'slice_hidden', 'slice_output'):
      bias = np.asarray(params[names[0]]['bias'])
      assert np.abs(bias).max() <= bound * (1 + 1e-6) and np.any(bias != 0), names
  assert {'stem', 'encoder1_downsample', 'projection', 'fusion_conv', 'segmentation_head',
          'sdf_head', 'slice_hidden', 'slice_output'} <= set(checked)
  prior_logit = np.log(tiny_model_config.foreground_prior / (1 - tiny_model_config.foreground_prior))
  np.testing.assert_allclose(params['segmentation_head']['bias'], prior_logit, rtol=1e-6)


@pytest.mark.parametrize('preset', ['quick', 'paper'])
def test_outputs_start_near_the_foreground_prior_and_the_sdf_unsaturated(preset):
  # Without the heads' group norm the un-normalised decoder sums give logits of standard deviation
  # ~18 at initialisation (models/unet.py): a saturated tanh (no SDF gradient) and confident
  # wrong masks.
  config = three_center.get_config(preset)
  model = models.build_model(config.model)
  shape = (1, 16, 32, 32, 1)
  variables = models.init_variables(model, jax.random.key(0), shape)
  images = jax.random.uniform(jax.random.key(1), shape)
  outputs = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  probabilities = jax.nn.sigmoid(outputs['logits'])
  assert float(jnp.std(outputs['logits'])) < 2.0
  assert abs(float(jnp.median(probabilities)) - config.model.foreground_prior) < 0.03
  assert float(jnp.mean(jnp.abs(outputs['sdf']) > 0.9)) < 0.1


def test_foreground_prior_outside_zero_one_is_a_config_error():
  config = three_center.get_config('tiny')
  config.model.foreground_prior = 1.0
  with pytest.raises(ConfigError, match='model.foreground_prior'):
    models.build_model(config.model)


def test_bfloat16_forward_matches_float32(tiny_model_config, tiny_variables):
  images = jax.random.uniform(jax.random.PRNGKey(2), (1, 16, 16, 16, 1))
  outputs = {}
  for dtype in ('float32', 'bfloat16'):
    model_config = tiny_model_config.copy_and_resolve_references()
    model_config.dtype = dtype
    model = models.build_model(model_config)
    outputs[dtype] = jax.jit(model.apply)(tiny_variables, images)
  low, reference = outputs['bfloat16'], outputs['float32']
  assert all(value.dtype == jnp.float32 for value in low.values())

  def error(name):
    return jnp.abs(low[name] - reference[name])

  # bfloat16 rounds to 2^-8 relative; over ~20 layers of a randomly initialised net the error
  # grows to ~2% of the activation scale (measured: logits 2.1% max, 1.8% mean).
  for name in ('logits', 'embedding'):
    assert float(jnp.max(error(name))) < 0.05 * float(jnp.max(jnp.abs(reference[name]))), name
    assert float(jnp.mean(error(name))) < 0.05 * float(jnp.mean(jnp.abs(reference[name]))), name
  # tanh saturates most voxels here, so the SDF is compared on its own [-1, 1] scale.
  assert float(jnp.mean(error('sdf'))) < 0.03
  # The slice logit is a sum of 128 terms that nearly cancel at initialisation (|logit| ~ 0.1):
  # judged on the scale of a logit, where 0.05 moves a probability by at most 1.25%.
  assert float(jnp.max(error('slice_logits'))) < 0.05


def test_remat_keeps_parameters_and_outputs(tiny_model_config, tiny_variables):
  model_config = tiny_model_config.copy_and_resolve_references()
  model_config.remat = True
  model = models.build_model(model_config)
  images = jax.random.uniform(jax.random.PRNGKey(3), (1, 8, 8, 8, 1))
  plain = jax.jit(models.build_model(tiny_model_config).apply)(tiny_variables, images)
  rematerialised = jax.jit(model.apply)(tiny_variables, images)  # same parameter tree
  for name in plain:
    np.testing.assert_allclose(rematerialised[name], plain[name], rtol=1e-5, atol=1e-5)


def test_mismatched_widths_name_the_keys(tiny_model_config):
  model_config = tiny_model_config.copy_and_resolve_references()
  model_config.fusion_width = 16
  with pytest.raises(ConfigError, match='model.fusion_width'):
    models.build_model(model_config)


def test_unknown_conv_impl_is_a_config_error(tiny_model_config):
  model_config = tiny_model_config.copy_and_resolve_references()
  model_config.conv_impl = 'winograd'
  with pytest.raises(ConfigError, match='model.conv_impl'):
    models.build_model(model_config)


@pytest.mark.parametrize('subsample_stride, conv_impl, downsample',
                         [(True, 'conv3d', 'separate'), (False, 'depth_folded', 'separate'),
                          (True, 'depth_folded', 'strided_block')])
def test_conv_impls_compute_the_same_network_and_gradients(subsample_stride, conv_impl, downsample):
  """Stride-1-then-subsample and depth-folded convs give the strided 3D network's outputs and
  parameter gradients."""
  from dualseg_jax import config_base
  model_config = config_base.base_config().model
  model_config.downsample = downsample
  model_config.widths, model_config.blocks = (4, 8, 8, 8), (1, 1, 1, 1)
  model_config.dilated_blocks, model_config.fusion_width = 1, 8
  model_config.embedding_dim, model_config.decoder_widths, model_config.num_groups = 4, (8, 4, 4), 2
  model_config.conv_impl = 'conv3d'
  images = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 32, 24, 1))
  reference = models.build_model(model_config)
  variables = models.init_variables(reference, jax.random.PRNGKey(0), images.shape)
  model_config.subsample_stride, model_config.conv_impl = subsample_stride, conv_impl
  other = models.build_model(model_config)

  def outputs_and_gradients(model):
    def loss(params):
      outputs = model.apply({**variables, 'params': params}, images, train=False)
      return jnp.mean(outputs['logits'] ** 2) + jnp.mean(outputs['sdf']), outputs
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  expected_gradients, expected = outputs_and_gradients(reference)
  got_gradients, got = outputs_and_gradients(other)
  for name in ('logits', 'sdf', 'embedding'):
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(expected[name]), rtol=1e-4, atol=1e-5)
  for path, value in jax.tree_util.tree_leaves_with_path(expected_gradients):
    scale = float(jnp.max(jnp.abs(value))) + 1e-6
    difference = float(jnp.max(jnp.abs(_leaf(got_gradients, path) - value)))
    assert difference <= 1e-3 * scale, (jax.tree_util.keystr(path), difference, scale)


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
