"""Whole-volume prediction: outputs written in the input's exact geometry (oblique LPS NIfTI, a
real DICOM series), a run directory restored into a tiny network, and the refusals
(existing outputs, unreadable inputs)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.data import io
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.errors import DataError
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.inference import run
from tests.inference.helpers import save_params_for_test

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
BRIGHT_HU, DARK_HU = 200.0, -60.0  # 70 HU, the stub's threshold, lies halfway


def _threshold_stub(variables, windows):
  """Both channels say 'foreground' where the windowed CT is above 0.5 (about 70 HU)."""
  del variables
  logits = jnp.concatenate([12.0 * (windows - 0.5)] * 2, axis=-1)
  return {'logits': logits, 'sdf': jnp.tanh(0.5 - logits)}


def _stub_predictor(config):
  config.inference.postprocess = 'none'
  return predictor_lib.Predictor(config, {}, apply_fn=_threshold_stub)


def _oblique_lps_affine(spacing=(1.6, 2.1, 2.7), origin=(40.0, -12.0, 7.0)):
  angle_z, angle_x = np.deg2rad(20.0), np.deg2rad(10.0)
  rotate_z = np.array([[np.cos(angle_z), -np.sin(angle_z), 0],
                       [np.sin(angle_z), np.cos(angle_z), 0], [0, 0, 1]])
  rotate_x = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)],
                       [0, np.sin(angle_x), np.cos(angle_x)]])
  affine = np.eye(4)
  # Voxel axes run towards patient left and posterior (LPS, as DICOM stores them), tilted.
  affine[:3, :3] = rotate_x @ rotate_z @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


def _write_planted_ct(path, shape=(22, 18, 15), box=(slice(5, 15), slice(4, 12), slice(3, 10))):
  source = np.full(shape, DARK_HU, np.float32)
  source[box] = BRIGHT_HU
  nib.save(nib.Nifti1Image(source.astype(np.int16), _oblique_lps_affine()), path)
  return source > 0


def _dice(first, second):
  return 2 * np.logical_and(first, second).sum() / (first.sum() + second.sum())


def test_oblique_lps_prediction_keeps_the_input_geometry(tmp_path, tiny_config):
  input_path = tmp_path / 'inputs' / 'oblique.nii.gz'
  input_path.parent.mkdir()
  planted = _write_planted_ct(input_path)
  written = run.predict_cases(_stub_predictor(tiny_config), input_path, tmp_path / 'out',
                              save_probabilities=True, show_progress=False)
  source = nib.load(input_path)
  label_image = nib.load(written[0]['label'])
  assert label_image.shape == source.shape
  np.testing.assert_allclose(label_image.affine, source.affine, atol=1e-6)
  assert label_image.get_data_dtype() == np.uint8
  label = np.asarray(label_image.dataobj)
  assert set(np.unique(label)) <= {0, 2}  # both channels agree: tumour inside the pancreas
  # The planted box comes back where it was, in the source's own voxel order.
  assert _dice(label > 0, planted) > 0.8
  for axis in range(3):
    assert _dice(np.flip(label > 0, axis), planted) < _dice(label > 0, planted) - 0.1
  probabilities = nib.load(written[0]['probabilities'])
  assert probabilities.shape == source.shape + (2,)
  assert probabilities.get_data_dtype() == np.float32
  np.testing.assert_allclose(probabilities.affine, source.affine, atol=1e-6)
  assert nib.load(written[0]['sdf']).shape == source.shape + (2,)


def test_dicom_series_prediction_has_the_series_geometry(tmp_path, tiny_config, real_ct_dir):
  series = real_ct_dir / 'example_ct_dicom'
  written = run.predict_cases(_stub_predictor(tiny_config), series, tmp_path,
                              show_progress=False)
  assert written[0]['label'] == tmp_path / 'example_ct_dicom.nii.gz'
  volume = io.read_volume(series)
  output = nib.load(written[0]['label'])
  assert output.shape == volume.geometry.shape == (512, 512, 20)
  np.testing.assert_allclose(output.affine, volume.geometry.affine, atol=1e-4)
  predicted = np.asarray(output.dataobj) > 0
  bright = volume_lib.from_canonical(volume.array, volume.geometry) > 70  # ~0.5 after windowing
  assert _dice(predicted, bright) > 0.8


def test_run_directory_restores_a_tiny_network(tmp_path, tiny_config):
  from dualseg_jax.models import build_model
  model = build_model(tiny_config.model)
  windows = jnp.zeros((1,) + tuple(tiny_config.data.patch_size) + (1,))
  # Random parameters of the right shapes: compiling the real initialiser costs seconds on CPU.
  shapes = jax.eval_shape(lambda key: model.init(key, windows, train=False), jax.random.key(0))
  leaves, structure = jax.tree.flatten(shapes['params'])
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(
      structure, [rng.normal(0.0, 0.2, leaf.shape).astype(np.float32) for leaf in leaves])
  workdir = save_params_for_test(tmp_path / 'run', tiny_config, params)
  input_path = tmp_path / 'case_7.nii.gz'
  _write_planted_ct(input_path)

  restored = predictor_lib.load_predictor(workdir)
  assert restored.config.data.patch_size == tuple(tiny_config.data.patch_size)
  assert jax.tree.structure(restored.params) == jax.tree.structure(params)
  for restored_leaf, leaf in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(restored_leaf), np.asarray(leaf))

  written = run.predict_with_run(workdir, input_path, tmp_path / 'out', tta_flips=2,
                                 save_probabilities=True)
  source = nib.load(input_path)
  output = nib.load(written[0]['label'])
  assert output.shape == source.shape
  np.testing.assert_allclose(output.affine, source.affine, atol=1e-6)
  assert set(np.unique(np.asarray(output.dataobj))) <= {0, 1, 2}
  probabilities = np.asarray(nib.load(written[0]['probabilities']).dataobj)
  assert probabilities.shape == source.shape + (2,)
  assert np.all((probabilities >= 0) & (probabilities <= 1))
  assert np.all(np.abs(np.asarray(nib.load(written[0]['sdf']).dataobj)) <= 1)


def test_folder_input_overwrite_refusal_and_unreadable_input(tmp_path, tiny_config):
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  _write_planted_ct(inputs / 'a.nii.gz')
  _write_planted_ct(inputs / 'b.nii')
  predictor = _stub_predictor(tiny_config)
  output = tmp_path / 'out'
  written = run.predict_cases(predictor, inputs, output, show_progress=False)
  assert [paths['label'].name for paths in written] == ['a.nii.gz', 'b.nii.gz']
  before = (output / 'a.nii.gz').stat().st_mtime_ns
  with pytest.raises(DataError, match=r'a\.nii\.gz already exists.*--overwrite'):
    run.predict_cases(predictor, inputs, output, show_progress=False)
  assert (output / 'a.nii.gz').stat().st_mtime_ns == before
  run.predict_cases(predictor, inputs, output, overwrite=True, show_progress=False)

  broken = tmp_path / 'broken' / 'c.nii.gz'
  broken.parent.mkdir()
  broken.write_bytes(b'not a nifti file')
  with pytest.raises(DataError, match='c.nii.gz'):
    run.predict_cases(predictor, broken, tmp_path / 'out_broken', show_progress=False)


def test_command_line_refuses_to_overwrite(tmp_path):
  input_path = tmp_path / 'case.nii.gz'
  _write_planted_ct(input_path)
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'case.nii.gz').write_bytes(b'earlier result')
  result = subprocess.run(
      [sys.executable, '-m', 'launch.predict', f'--workdir={tmp_path / "no_run"}',
       f'--input={input_path}', f'--output={tmp_path / "out"}'],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 2
  assert f'{tmp_path / "out" / "case.nii.gz"} already exists' in result.stderr
  assert (tmp_path / 'out' / 'case.nii.gz').read_bytes() == b'earlier result'


def test_saved_config_overlays_the_defaults(tmp_path, tiny_config):
  saved = json.loads(tiny_config.to_json_best_effort())
  del saved['inference']['threshold']  # a key added after the run was made
  saved['inference']['overlap'] = 0.25
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = predictor_lib.load_config(tmp_path)
  assert config.inference.overlap == 0.25 and config.inference.threshold == 0.5
  assert config.data.patch_size == tuple(tiny_config.data.patch_size)
  with pytest.raises(DataError, match='config.json does not exist'):
    predictor_lib.load_config(tmp_path / 'elsewhere')
