"""Grain training loader over the cache: batch contract, crops, determinism, resumption, sharding,
and that the held-out center never reaches training."""

import numpy as np
import orbax.checkpoint as ocp
import grain
import pytest

from configs import three_center
from dualseg_jax.data import loader
from dualseg_jax.data import phantoms
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.data import targets
from dualseg_jax.errors import ConfigError

KEYS = {  # docs/design.md, per example (no batch axis); C = 2 for the joint stage
    'image': (np.float32, (16, 32, 32, 1)), 'label': (np.int32, (16, 32, 32)),
    'mask': (np.float32, (16, 32, 32, 2)), 'sdf': (np.float32, (16, 32, 32, 2)),
    'sdf_scale_mm': (np.float32, (2, 2)), 'sdf_valid': (np.bool_, (2,)),
    # data.contrastive_sampling 'per_slice': one row per 1/8 slice of the 16-slice patch.
    'positive_positions': (np.int32, (2, 3)), 'positive_valid': (np.bool_, (2,)),
    'negative_positions': (np.int32, (2, 3)), 'negative_valid': (np.bool_, (2,)),
    'slice_label': (np.float32, (16,)),
    'case_index': (np.int32, ()), 'center_index': (np.int32, ()), 'patch_start': (np.int32, (3,)),
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Two phantom cases per center at the tiny preset's 3 mm spacing, cached once."""
  root = tmp_path_factory.mktemp('phantoms')
  config = three_center.get_config('tiny')
  config.data.root = str(root)
  config.data.synthetic_cases_per_center = 2
  config.data.val_fraction = 0.0
  phantoms.write_dataset(root, cases_per_center=2, seed=0, centers=config.data.centers)
  cache = preprocess.ensure_cache(config, progress=False)
  split = registry.split_cases(config.data, registry.list_cases(config.data), config.seed)
  return config, cache, split


def _config(setup, **data_overrides):
  config = setup[0].copy_and_resolve_references()
  for name, value in data_overrides.items():
    config.data[name] = value
  return config


def _reference_window(array, start, size, fill):
  """Independent crop: pad the whole case generously, then slice."""
  pad = int(max(size)) + 1
  if fill is None:
    padded = np.pad(np.asarray(array), pad, mode='edge')
  else:
    padded = np.pad(np.asarray(array), pad, mode='constant', constant_values=fill)
  return padded[tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))]


def test_read_window_matches_padding_reference():
  array = np.random.default_rng(0).normal(size=(5, 9, 7)).astype(np.float32)
  for start in [(0, 0, 0), (-3, 2, 4), (2, -4, -8), (-2, -2, -2)]:
    for fill in (0.0, None):
      np.testing.assert_array_equal(loader.read_window(array, start, (8, 6, 10), fill),
                                    _reference_window(array, start, (8, 6, 10), fill))


def test_batches_follow_the_contract_and_the_cache(setup):
  config, cache, split = setup
  config = _config(setup, batch_size=2)
  cases = loader.cached_cases(cache, split.train, config.stage, config.data.centers)
  by_index = {case.case_index: case for case in cases}
  iterator = loader.make_train_iterator(config, split.train, cache, seed=1, process_index=0,
                                        process_count=1)
  valid_seen = {'positive': 0, 'negative': 0}
  for _ in range(3):
    batch = next(iterator)
    assert set(batch) == set(KEYS)
    for name, (dtype, shape) in KEYS.items():
      assert batch[name].dtype == dtype and batch[name].shape == (2,) + shape, name
    for i in range(2):
      case = by_index[int(batch['case_index'][i])]
      start = batch['patch_start'][i]
      arrays = preprocess.load_arrays(cache, case.center, case.case_id,
                                      ['image', 'label', 'sdf_pancreas', 'sdf_tumour'])
      size = (16, 32, 32)
      np.testing.assert_array_equal(batch['image'][i, ..., 0],
                                    _reference_window(arrays['image'], start, size, 0.0))
      label = _reference_window(arrays['label'], start, size, 0)
      np.testing.assert_array_equal(batch['label'][i], label)
      np.testing.assert_array_equal(batch['mask'][i], targets.stage_channel_masks(label, 'joint'))
      for channel, name in enumerate(('sdf_pancreas', 'sdf_tumour')):
        channel_mask = batch['mask'][i, ..., channel] > 0
        # The case's distances in mm, cropped, the label's sign, normalised per patch.
        cropped = np.abs(_reference_window(arrays[name], start, size, None))
        signed = np.where(channel_mask, -cropped, cropped)
        expected = np.where(signed > 0, signed / max(signed.max(), 1e-6),
                            signed / max(-signed.min(), 1e-6))
        np.testing.assert_allclose(batch['sdf'][i, ..., channel], expected, rtol=1e-6)
        if channel_mask.any() and not channel_mask.all():
          np.testing.assert_array_equal(batch['sdf'][i, ..., channel] < 0, channel_mask)
          assert batch['sdf'][i, ..., channel].min() == -1 and batch['sdf'][i, ..., channel].max() == 1
        assert batch['sdf_valid'][i, channel] == (channel_mask.any() and not channel_mask.all())
      tumour = label == 2
      np.testing.assert_array_equal(batch['slice_label'][i],
                                    targets.slice_labels(tumour, config.loss.slice_min_voxels))
      # Row z of the positions is 1/8 slice z. Positives sit on the case's tumour skeleton inside
      # the patch, in cells holding tumour; negatives near the tumour, in cells holding none.
      skeleton = preprocess.load_arrays(cache, case.center, case.case_id,
                                        ['skeleton_tumour'])['skeleton_tumour']
      cells = {tuple((voxel - start) // 8) for voxel in skeleton
               if np.all((voxel - start >= 0) & (voxel - start < size))}
      holds_tumour = tumour.reshape(2, 8, 4, 8, 4, 8).any(axis=(1, 3, 5))
      holds_near_tumour = targets.cube_dilation(tumour, 21).reshape(2, 8, 4, 8, 4, 8).any(
          axis=(1, 3, 5))
      chosen = {}
      for kind in ('positive', 'negative'):
        valid = batch[f'{kind}_valid'][i]
        positions = batch[f'{kind}_positions'][i]
        np.testing.assert_array_equal(positions[valid, 0], np.flatnonzero(valid))
        assert not positions[~valid].any()
        chosen[kind] = {tuple(position) for position in positions[valid]}
        valid_seen[kind] += int(valid.sum())
      for position in chosen['positive']:
        assert position in cells and holds_tumour[position]
      for position in chosen['negative']:
        assert not holds_tumour[position] and holds_near_tumour[position]
      if not tumour.any():
        assert not chosen['positive'] and not chosen['negative']
  assert valid_seen['positive'] > 0 and valid_seen['negative'] > 0


def test_uniform_sampling_draws_num_positions_and_an_unknown_sampling_names_the_key(setup):
  config, cache, split = setup
  cases = [case for case in loader.cached_cases(cache, split.train, 'joint', config.data.centers)
           if case.tumour_box is not None]
  settings = loader.PatchSettings.from_config(
      _config(setup, contrastive_sampling='uniform', joint_tumour_fraction=1.0,
              random_patch_fraction=0.0))
  example = loader.sample_patch(cases[0], settings, np.random.default_rng(0))
  for kind in ('positive', 'negative'):
    assert example[f'{kind}_positions'].shape == (config.data.num_positions, 3)
    assert example[f'{kind}_valid'].shape == (config.data.num_positions,)
    assert example[f'{kind}_valid'].all()  # centred on tumour: skeleton and ring both present
  with pytest.raises(ConfigError, match='data.contrastive_sampling'):
    loader.PatchSettings.from_config(_config(setup, contrastive_sampling='random'))


def test_patch_lies_in_the_pancreas_roi_and_tumour_stages_centre_on_tumour(setup):
  config, cache, split = setup
  config = _config(setup, foreground_fraction=1.0, random_patch_fraction=0.0)
  config.stage = 'tumour_fine'
  settings = loader.PatchSettings.from_config(config)
  cases = loader.cached_cases(cache, split.train, config.stage, config.data.centers)
  rng = np.random.default_rng(0)
  for case in cases:
    example = loader.sample_patch(case, settings, rng)
    assert example['mask'].shape == (16, 32, 32, 1)
    if case.tumour_box is not None:
      assert example['label'][8, 16, 16] == 2  # the patch centre is a tumour voxel
  config.stage = 'pancreas_coarse'
  settings = loader.PatchSettings.from_config(config)
  for case in cases:
    low, high = (np.asarray(c) for c in case.pancreas_box)
    z_margin = int(np.ceil(0.1 * case.shape[0]))
    for _ in range(3):
      start = loader.sample_patch(case, settings, rng)['patch_start']
      end = start + np.array(settings.patch_size)
      roi_low = np.maximum(low - [z_margin, 30, 30], 0)
      roi_high = np.minimum(high + [z_margin, 30, 30], case.shape)
      for axis in range(3):
        if roi_high[axis] - roi_low[axis] >= settings.patch_size[axis]:
          assert roi_low[axis] <= start[axis] and end[axis] <= roi_high[axis]
        else:  # a patch larger than the ROI covers all of the pancreas along that axis
          assert start[axis] <= low[axis] and high[axis] <= end[axis]


def test_tumour_roi_with_negative_margins_keeps_patches_on_the_tumour_box(setup):
  """The reference's fine tumour crops: the tumour box grown by -5..40 voxels in-plane. A patch
  larger than that region covers it; a shrinking margin never empties it."""
  config, cache, split = setup
  config = _config(setup, foreground_fraction=0.0, random_patch_fraction=0.0,
                   roi_structure='tumour', crop_margin_xy=(-5, 40))
  config.stage = 'tumour_fine'
  settings = loader.PatchSettings.from_config(config)
  cases = [case for case in loader.cached_cases(cache, split.train, config.stage, config.data.centers)
           if case.tumour_box is not None]
  assert cases, 'the tiny phantom set has tumours'
  rng = np.random.default_rng(2)
  for case in cases:
    low, high = (np.asarray(c) for c in case.tumour_box)
    for _ in range(5):
      roi_low, roi_high = loader._roi(case, settings, rng)
      assert np.all(roi_high > roi_low)
      # In-plane at most 40 voxels beyond the tumour box (a -5 margin may cut into it, as the
      # reference's crops do).
      assert np.all(roi_low[1:] >= np.maximum(low[1:] - 40, 0))
      assert np.all(roi_high[1:] <= np.minimum(high[1:] + 40, case.shape[1:]))
      start = loader.sample_patch(case, settings, rng)['patch_start']
      end = start + np.array(settings.patch_size)
      # The patch lies in the region (or covers it where the region is the smaller).
      assert np.all((start[1:] < high[1:] + 40) & (end[1:] > low[1:] - 40))
  with pytest.raises(ConfigError, match='data.roi_structure'):
    loader.PatchSettings.from_config(_config(setup, roi_structure='liver'))
  with pytest.raises(ConfigError, match=r'data.crop_margin_xy=\(10, 5\)'):
    loader.PatchSettings.from_config(_config(setup, crop_margin_xy=(10, 5)))


def test_random_and_joint_tumour_patches(setup):
  config, cache, split = setup
  cases = [case for case in loader.cached_cases(cache, split.train, 'joint', config.data.centers)
           if case.tumour_box is not None]
  assert cases, 'the tiny phantom set has tumours'
  anywhere = _config(setup, random_patch_fraction=1.0)
  settings = loader.PatchSettings.from_config(anywhere)
  rng = np.random.default_rng(1)
  starts = np.array([loader.sample_patch(cases[0], settings, rng)['patch_start'] for _ in range(40)])
  shape, size = np.array(cases[0].shape), np.array(settings.patch_size)
  for axis in range(3):
    if shape[axis] >= size[axis]:
      assert starts[:, axis].min() >= 0 and (starts[:, axis] + size[axis]).max() <= shape[axis]
      assert len(np.unique(starts[:, axis])) > 5  # spread over the case, not around the pancreas
  tumour = _config(setup, random_patch_fraction=0.0, joint_tumour_fraction=1.0)
  settings = loader.PatchSettings.from_config(tumour)
  for case in cases:
    example = loader.sample_patch(case, settings, rng)
    assert example['label'][8, 16, 16] == 2  # joint patches centred on tumour
    assert example['mask'].shape == (16, 32, 32, 2)


def test_same_seed_same_batches_with_zero_and_two_workers(setup):
  config, cache, split = setup
  batches = {}
  for workers in (0, 2):
    iterator = loader.make_train_iterator(_config(setup, num_workers=workers), split.train, cache,
                                          seed=5, process_index=0, process_count=1)
    batches[workers] = [next(iterator) for _ in range(3)]
  for first, second in zip(batches[0], batches[2]):
    for name in first:
      np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  other = next(loader.make_train_iterator(_config(setup), split.train, cache, seed=6,
                                          process_index=0, process_count=1))
  assert not np.array_equal(other['image'], batches[0][0]['image'])


def _assert_same(first, second):
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_restored_iterator_continues_the_sequence(setup, tmp_path):
  config, cache, split = setup
  make = lambda: loader.make_train_iterator(config, split.train, cache, seed=3, process_index=0,
                                            process_count=1)
  iterator = make()
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(2)]

  resumed = make()
  resumed.set_state(state)
  for want in expected:
    _assert_same(want, next(resumed))

  restored = make()
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  manager.close()
  for want in expected:
    _assert_same(want, next(restored))


def test_processes_split_the_examples_of_one_global_batch(setup):
  config, cache, split = setup
  config = _config(setup, batch_size=2)
  whole = loader.make_train_dataset(config, split.train, cache, 7, process_index=0,
                                    process_count=1)
  halves = [loader.make_train_dataset(config, split.train, cache, 7, process_index=p,
                                      process_count=2) for p in range(2)]
  for step in range(2):
    global_batch = whole[step]
    for process, half in enumerate(halves):
      local = half[step]  # process p's step s is example 2s + p: the global batch's p-th row
      for name in global_batch:
        np.testing.assert_array_equal(local[name][0], global_batch[name][process], err_msg=name)


def test_test_center_never_reaches_training(setup):
  config, cache, split = setup
  centers = list(config.data.centers)
  test_index = centers.index(config.data.test_center)
  allowed = {case.case_index for case in
             loader.cached_cases(cache, split.train, config.stage, centers)}
  dataset = loader.make_train_dataset(_config(setup, batch_size=2), split.train, cache, 0,
                                      process_index=0, process_count=1)
  for step in range(8):
    batch = dataset[step]
    assert test_index not in batch['center_index']
    assert set(batch['case_index'].tolist()) <= allowed
  with pytest.raises(ConfigError, match='test_center'):
    loader.make_train_dataset(config, split.train + split.test, cache, 0, process_index=0,
                              process_count=1)


def test_eval_dataset_yields_whole_cached_cases(setup):
  config, cache, split = setup
  cases = loader.cached_cases(cache, split.test, config.stage, config.data.centers)
  dataset = loader.make_eval_dataset(cases)
  assert len(dataset) == len(cases) == 2
  for case, element in zip(cases, dataset):
    arrays = preprocess.load_arrays(cache, case.center, case.case_id, ['image', 'label'])
    np.testing.assert_array_equal(element['image'], arrays['image'])
    np.testing.assert_array_equal(element['label'], arrays['label'])
    assert element['case_id'] == case.case_id and element['image'].shape == tuple(case.shape)
