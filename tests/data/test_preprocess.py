"""Preprocessing cache: resampling geometry, windowing, body crop, hashing, rebuilds, problems."""

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dualseg_jax import config_base
from dualseg_jax.data import loader
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.data import targets
from dualseg_jax.errors import DataError

SOURCE_SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm


def _write(path, array_zyx, spacing_zyx, origin_xyz=(10.0, -20.0, 30.0)):
  affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
  affine[:3, 3] = origin_xyz
  nib.save(nib.Nifti1Image(np.transpose(array_zyx, (2, 1, 0)), affine), str(path))


def _grid_mm(shape, spacing):
  return np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                              indexing='ij'), axis=-1)


def _make_case(folder, case_id='case_000', shape=(20, 60, 70), pancreas_radius_mm=9.0,
               center='center_a', tiny_pancreas_at=None):
  """Air all round a soft-tissue body box; a sphere of pancreas with a tumour inside."""
  folder.mkdir(parents=True, exist_ok=True)
  image = np.full(shape, -1000, np.int16)
  image[2:-2, 8:-6, 10:-9] = 40
  label = np.zeros(shape, np.uint8)
  grid = _grid_mm(shape, SOURCE_SPACING)
  centre = np.array([19.0, 24.0, 28.0])
  if tiny_pancreas_at is None:
    distance = np.linalg.norm(grid - centre, axis=-1)
    label[distance <= pancreas_radius_mm] = 1
    label[distance <= pancreas_radius_mm / 2.5] = 2
    image[label == 1] = 100
    image[label == 2] = 60
  else:
    label[tiny_pancreas_at] = 1
  image_path, label_path = folder / f'{case_id}.nii.gz', folder / f'{case_id}_label.nii.gz'
  _write(image_path, image, SOURCE_SPACING)
  _write(label_path, label, SOURCE_SPACING)
  return registry.Case(center=center, case_id=case_id, image_path=str(image_path),
                       label_path=str(label_path)), image, label


def _data_config(cache_dir, **overrides):
  data = config_base.base_config().data
  data.cache_dir = str(cache_dir)
  data.target_spacing_mm = (3.0, 1.5, 1.5)
  for name, value in overrides.items():
    data[name] = value
  return data


def test_linear_resampling_matches_scipy_zoom_on_the_same_grid():
  rng = np.random.default_rng(0)
  array = rng.normal(size=(7, 11, 13)).astype(np.float32)
  new_shape = (4, 17, 6)
  ours = preprocess.resample(array, new_shape, 'linear')
  reference = ndimage.zoom(array, [n / o for n, o in zip(new_shape, array.shape)], order=1,
                           mode='nearest', grid_mode=True)
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  cubic = preprocess.resample(array, new_shape, 'cubic')
  assert cubic.shape == new_shape and cubic.dtype == np.float32


def test_case_keeps_extent_position_and_label_volume(tmp_path):
  case, image_hu, label = _make_case(tmp_path / 'src')
  settings = preprocess.Settings.from_config(_data_config(tmp_path / 'cache'))
  arrays, metadata = preprocess.preprocess_case(case, settings)
  low, high = (np.asarray(c) for c in metadata['source_crop'])
  # Cropped extent is kept exactly, and the spacing is within a voxel's rounding of the target.
  extent = (high - low) * np.asarray(SOURCE_SPACING)
  np.testing.assert_allclose(np.asarray(metadata['shape']) * metadata['spacing_mm'], extent)
  assert np.all(np.abs(np.asarray(metadata['spacing_mm']) - settings.target_spacing_mm)
                <= np.asarray(settings.target_spacing_mm) / np.asarray(metadata['shape']) * 2)
  # The body crop keeps the body plus about body_margin_mm, not the air around it.
  body_low = np.array([2, 8, 10]) - np.ceil(10.0 / np.asarray(SOURCE_SPACING))
  np.testing.assert_array_equal(low, np.maximum(body_low, 0))
  # Label volume in mm^3 within a voxel layer of the surface (area * half the coarsest spacing).
  radius = 9.0
  source_volume = (label >= 1).sum() * np.prod(SOURCE_SPACING)
  cached_volume = (arrays['label'] >= 1).sum() * np.prod(metadata['spacing_mm'])
  assert abs(cached_volume - source_volume) < 4 * np.pi * radius ** 2 * 1.5
  assert abs(cached_volume - source_volume) < 0.1 * source_volume
  # World position: the pancreas centroid maps to the same millimetres through both affines.
  source_affine = nib.load(case.label_path).affine
  source_centroid_xyz = np.argwhere(np.transpose(label, (2, 1, 0)) >= 1).mean(axis=0)
  source_world = source_affine[:3, :3] @ source_centroid_xyz + source_affine[:3, 3]
  cached_affine = np.asarray(metadata['cached_affine'])
  cached_centroid = np.argwhere(arrays['label'] >= 1).mean(axis=0)
  cached_world = cached_affine[:3, :3] @ cached_centroid + cached_affine[:3, 3]
  assert np.linalg.norm(cached_world - source_world) < 0.5 * max(settings.target_spacing_mm)
  # Window, SDFs and skeletons agree with their definitions.
  assert arrays['image'].dtype == np.float32
  assert arrays['image'].min() == 0.0 and 0.0 < arrays['image'].max() <= 1.0
  # Soft tissue at 40 HU through the (-100, 240) window, away from any edge.
  assert np.isclose(arrays['image'], (40 + 100) / 340, atol=1e-6).mean() > 0.3
  for structure, mask in (('pancreas', arrays['label'] >= 1), ('tumour', arrays['label'] == 2)):
    expected, valid = targets.signed_distance_mm(mask, metadata['spacing_mm'])
    assert valid and metadata[f'{structure}_sdf_valid']
    np.testing.assert_array_equal(arrays[f'sdf_{structure}'], expected)
    skeleton = arrays[f'skeleton_{structure}']
    assert len(skeleton) > 0 and mask[tuple(skeleton.T)].all()
    box_low, box_high = metadata[f'{structure}_box']
    occupied = np.argwhere(mask)
    assert box_low == occupied.min(0).tolist() and box_high == (occupied.max(0) + 1).tolist()
  assert metadata['problems'] == []


def test_same_settings_same_hash_and_arrays_changed_setting_rebuilds(tmp_path):
  case, _, _ = _make_case(tmp_path / 'src')
  first = preprocess.build_cache(_data_config(tmp_path / 'cache_one'), [case], progress=False)
  second = preprocess.build_cache(_data_config(tmp_path / 'cache_two'), [case], progress=False)
  assert first.directory.name == second.directory.name == first.settings.hash
  names = ('image', 'label', 'sdf_pancreas', 'sdf_tumour', 'skeleton_pancreas', 'skeleton_tumour')
  one = preprocess.load_arrays(first, case.center, case.case_id, names)
  two = preprocess.load_arrays(second, case.center, case.case_id, names)
  for name in names:
    assert open(first.case_directory(case.center, case.case_id) / f'{name}.npy', 'rb').read() == \
        open(second.case_directory(case.center, case.case_id) / f'{name}.npy', 'rb').read(), name
    assert isinstance(one[name], np.memmap)
    np.testing.assert_array_equal(one[name], two[name])

  # Up to date: a second build writes nothing.
  image_file = first.case_directory(case.center, case.case_id) / 'image.npy'
  written = image_file.stat().st_mtime_ns
  again = preprocess.build_cache(_data_config(tmp_path / 'cache_one'), [case], progress=False)
  assert image_file.stat().st_mtime_ns == written and again.cases == first.cases

  # A changed setting -> another hash -> a fresh build with other arrays.
  changed = preprocess.build_cache(_data_config(tmp_path / 'cache_one', window_hu=(-200.0, 300.0)),
                                   [case], progress=False)
  assert changed.directory != first.directory and changed.directory.parent == first.directory.parent
  new_image = preprocess.load_arrays(changed, case.center, case.case_id, ['image'])['image']
  assert not np.array_equal(new_image, one['image'])
  manifest = json.loads((changed.directory / preprocess.MANIFEST_FILE).read_text())
  assert manifest['settings_hash'] == changed.directory.name
  assert manifest['settings']['window_hu'] == [-200.0, 300.0]

  # A changed source file -> that case is rebuilt in place.
  os.utime(case.image_path, ns=(written + 10**9, written + 10**9))
  rebuilt = preprocess.build_cache(_data_config(tmp_path / 'cache_one'), [case], progress=False)
  assert image_file.stat().st_mtime_ns != written
  assert rebuilt.cases[f'{case.center}/{case.case_id}']['source'] != first.cases[
      f'{case.center}/{case.case_id}']['source']


def test_pancreas_lost_to_resampling_is_reported_and_left_out(tmp_path, caplog):
  # One pancreas voxel where no voxel centre of the 3 x 1.5 x 1.5 mm grid lands (nearest).
  lost, _, _ = _make_case(tmp_path / 'src', 'lost', tiny_pancreas_at=(1, 30, 31))
  kept, _, _ = _make_case(tmp_path / 'src', 'kept')
  data_config = _data_config(tmp_path / 'cache')
  with caplog.at_level(logging.WARNING, logger='dualseg_jax'):
    cache = preprocess.build_cache(data_config, [lost, kept], progress=False)
  entry = cache.cases['center_a/lost']
  assert entry['pancreas_source_voxels'] == 1 and entry['pancreas_voxels'] == 0
  assert not entry['has_pancreas']
  assert any('pancreas' in problem and 'vanished' in problem for problem in entry['problems'])
  manifest = json.loads((cache.directory / preprocess.MANIFEST_FILE).read_text())
  assert manifest['cases']['center_a/lost']['problems'] == entry['problems']
  assert 'vanished' in caplog.text
  with caplog.at_level(logging.WARNING, logger='dualseg_jax'):
    usable = loader.cached_cases(cache, [lost, kept], 'joint', ['center_a'])
  assert [case.case_id for case in usable] == ['kept']
  assert 'left out of stage joint: center_a/lost' in caplog.text


def test_unreadable_case_fails_with_its_name_unless_skipped(tmp_path):
  good, _, _ = _make_case(tmp_path / 'src', 'good')
  broken_path = tmp_path / 'src' / 'broken.nii.gz'
  broken_path.write_bytes(b'not a nifti file')
  broken = registry.Case('center_a', 'broken', str(broken_path), good.label_path)
  with pytest.raises(DataError, match='broken'):
    preprocess.build_cache(_data_config(tmp_path / 'cache'), [good, broken], progress=False)
  cache = preprocess.build_cache(_data_config(tmp_path / 'cache', skip_bad_cases=True),
                                 [good, broken], progress=False)
  assert cache.cases['center_a/broken']['failed'] and cache.cases['center_a/good']['has_pancreas']


def test_skeleton_positions_never_leave_a_component_empty():
  grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing='ij'), axis=-1)
  # A ball of radius 3.5 centred between voxels: Lee thinning (skimage) leaves nothing of it.
  ball = ((grid - 9.5) ** 2).sum(-1) <= 3.5 ** 2
  bar = np.zeros((20, 20, 20), bool)
  bar[2:5, 2:5, 2:18] = True  # thinning keeps a line through this one
  positions = preprocess.skeleton_positions(ball | bar)
  assert ball[tuple(positions.T)].any() and bar[tuple(positions.T)].any()
  assert (ball | bar)[tuple(positions.T)].all()
  depth = ndimage.distance_transform_edt(ball)
  in_ball = positions[ball[tuple(positions.T)]]
  assert np.all(depth[tuple(in_ball.T)] == depth.max())
  assert len(preprocess.skeleton_positions(np.zeros((5, 5, 5), bool))) == 0


def test_real_ct_pancreas_survives_preprocessing(real_ct_dir, tmp_path):
  case = registry.Case('real', 'example', str(real_ct_dir / 'example_ct.nii.gz'),
                       str(real_ct_dir / 'example_seg_fast_force_split.nii.gz'))
  data_config = _data_config(tmp_path / 'cache', label_map='7:1', target_spacing_mm=(2.5, 2.0, 2.0))
  arrays, metadata = preprocess.preprocess_case(case, preprocess.Settings.from_config(data_config))
  assert metadata['pancreas_source_voxels'] == 695 and metadata['problems'] == []
  source_ml = 695 * 27.0 / 1000
  cached_ml = metadata['pancreas_voxels'] * np.prod(metadata['spacing_mm']) / 1000
  assert abs(cached_ml - source_ml) < 0.1 * source_ml
  assert set(np.unique(arrays['label'])) == {0, 1}
