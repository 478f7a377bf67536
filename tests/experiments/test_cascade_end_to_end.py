"""The four cascade stages trained for real (tiny, one step each), then `launch.predict --cascade`
on a held-out synthetic case: label maps in the input's exact geometry, the stages' regions
recomputed independently, and a pancreas stage that finds nothing giving an empty map and a note."""

import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndimage

from dualseg_jax.data import io
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.experiments import cascade as cascade_training
from dualseg_jax.inference import cascade
from dualseg_jax.inference import run
from tests.conftest import tiny_run_config


@pytest.fixture(scope='module')
def experiment(phantom_root, tmp_path_factory):
  """The cascade experiment folder, its four stages trained one step each on the phantoms."""
  config = tiny_run_config(phantom_root, steps=1, **{
      # Coarse voxels and no window overlap keep the whole-volume predictions short; one RandConv
      # kernel size and no spatial augmentation keep the three distinct train steps quick to compile.
      'data.target_spacing_mm': (6.0, 6.0, 6.0), 'inference.overlap': 0.0,
      'inference.windows_per_batch': 16, 'augment.randconv_kernel_sizes': (3,),
      'augment.spatial': False,
      # One step leaves the logits near their initial bias: at a prior of 0.5 about half the voxels
      # are foreground, so every stage finds something and the whole chain runs.
      'model.foreground_prior': 0.5})
  workdir = tmp_path_factory.mktemp('cascade') / 'experiment'
  cascade_training.train_stages(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def held_out_image(phantom_root, experiment):
  """A case of the held-out center (center_c), which no stage trained on."""
  del experiment  # the phantoms exist once the stages have trained
  return phantom_root / 'center_c' / 'imagesTr' / 'center_c_000.nii.gz'


@pytest.fixture(scope='module')
def stage_predictors(experiment):
  return cascade.load_predictors(cascade.read_spec(experiment))


def _box(mask, margin_vox):
  """Bounding box of a mask grown by a margin and clipped, as [[start, stop], ...]."""
  indices = np.nonzero(mask)
  return [[max(0, int(index.min()) - margin), min(size, int(index.max()) + 1 + margin)]
          for index, margin, size in zip(indices, margin_vox, mask.shape)]


def _slices(box):
  return tuple(slice(start, stop) for start, stop in box)


def test_cascade_spec_predicts_a_held_out_case_in_its_geometry(
    experiment, held_out_image, stage_predictors, tmp_path):
  written = run.predict_with_cascade(experiment, held_out_image, tmp_path / 'out')
  assert [paths['label'] for paths in written] == [tmp_path / 'out' / 'center_c_000.nii.gz']
  source, output = nib.load(held_out_image), nib.load(written[0]['label'])
  assert output.shape == source.shape and output.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(output.affine, source.affine)
  saved = np.asarray(output.dataobj)
  assert set(np.unique(saved)) <= {0, 1, 2}
  notes = json.loads(written[0]['notes'].read_text())
  assert notes['case'] == 'center_c_000'

  # The stages again, one by one, with the regions of interest computed here.
  spec = cascade.read_spec(experiment)
  volume = io.read_volume(held_out_image)
  label = volume_lib.to_canonical(saved, volume.geometry)
  coarse = stage_predictors['pancreas_coarse'].predict_volume(volume)['label'] >= 1
  assert coarse.any(), 'the one-step pancreas_coarse stage found nothing: the chain is not tested'
  pancreas_box = _box(coarse, spec.pancreas_margin_vox)
  assert notes['stage_boxes_zyx']['pancreas_fine'] == pancreas_box
  crop = volume_lib.Volume(volume.array[_slices(pancreas_box)].copy(), volume.spacing_mm,
                           volume.geometry)
  pancreas = np.zeros(label.shape, bool)
  pancreas[_slices(pancreas_box)] = stage_predictors['pancreas_fine'].predict_volume(crop)['label'] == 1
  assert pancreas.any(), 'the one-step pancreas_fine stage found nothing: the chain is not tested'
  tumour = label == 2
  np.testing.assert_array_equal(label >= 1, pancreas | tumour)
  # Tumour only within inference.pancreas_dilation_vox of the pancreas, inside the fine box.
  dilation_vox = stage_predictors['tumour_fine'].config.inference.pancreas_dilation_vox
  distance_to_pancreas = ndimage.distance_transform_edt(~pancreas)
  assert np.all(distance_to_pancreas[tumour] <= dilation_vox)
  tumour_box = notes['stage_boxes_zyx']['tumour_fine']
  inside = np.zeros(label.shape, bool)
  inside[_slices(tumour_box)] = True
  assert not (tumour & ~inside).any()
  # Tumour coarse looked at the pancreas grown by its margin; tumour fine's last box is what the
  # stage before it found (the tumour coarse find, else the pancreas) grown by the tumour margin.
  assert notes['stage_boxes_zyx']['tumour_coarse'] == _box(pancreas, spec.tumour_coarse_margin_vox)
  tumour_coarse = np.zeros(label.shape, bool)
  coarse_box = _slices(notes['stage_boxes_zyx']['tumour_coarse'])
  tumour_coarse[coarse_box] = stage_predictors['tumour_coarse'].predict_volume(
      volume_lib.Volume(volume.array[coarse_box].copy(), volume.spacing_mm, volume.geometry),
      pancreas_mask=pancreas[coarse_box])['label'] == 2
  first_box = _box(tumour_coarse if tumour_coarse.any() else pancreas, spec.tumour_margin_vox)
  if spec.tumour_rounds == 1 or not tumour.any():
    assert tumour_box == first_box


def test_a_pancreas_stage_that_finds_nothing_gives_an_empty_map_and_a_note(
    stage_predictors, held_out_image, tmp_path):
  predictors = dict(stage_predictors)
  silent = predictors['pancreas_coarse'].with_params(predictors['pancreas_coarse'].params)
  silent.config = ml_collections.ConfigDict(silent.config.to_dict())
  silent.config.inference.threshold = 1.0  # no probability lies above 1
  predictors['pancreas_coarse'] = silent
  written = run.predict_cases_with_cascade(
      lambda volume: cascade.cascade_predict(volume, predictors, (2, 4, 4), (1, 2, 2)),
      held_out_image, tmp_path / 'out')
  source, output = nib.load(held_out_image), nib.load(written[0]['label'])
  assert output.shape == source.shape
  np.testing.assert_array_equal(output.affine, source.affine)
  assert not np.asarray(output.dataobj).any()
  notes = json.loads(written[0]['notes'].read_text())
  assert notes['notes'] == ['pancreas_coarse found no pancreas: pancreas and tumour are left empty']
  assert notes['stage_boxes_zyx'] == {'pancreas_fine': None, 'tumour_coarse': None, 'tumour_fine': None}
