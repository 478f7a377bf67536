"""The cascade's regions of interest and stage order with stand-in stage predictors: what each
fine stage sees, where its result lands, and an empty pancreas giving an empty result and a note."""

import json

import numpy as np

from dualseg_jax.data.volume import Geometry, Volume
from dualseg_jax.experiments import cascade
from tests.experiments import fakes


class ThresholdStage:
  """Labels voxels above `level` with `label`; records the shape of every volume it is given."""

  def __init__(self, level, label):
    self.level, self.label, self.seen = level, label, []

  def predict_volume(self, volume, tta_flips=None, progress=None, pancreas_mask=None):
    self.seen.append((volume.array.shape, None if pancreas_mask is None else int(pancreas_mask.sum())))
    label = np.where(volume.array > self.level, self.label, 0).astype(np.uint8)
    return {'label': label}


def _volume(array):
  return Volume(array=array.astype(np.float32), spacing_mm=(1.0, 1.0, 1.0),
                geometry=Geometry(affine=np.eye(4), shape=array.shape[::-1]))


def test_region_of_interest_against_explicit_bounds():
  mask = np.zeros((10, 20, 30), bool)
  mask[3:5, 4:9, 10:12] = True
  assert cascade.region_of_interest(mask, (1, 2, 25)) == (slice(2, 6), slice(2, 11), slice(0, 30))
  assert cascade.region_of_interest(np.zeros((4, 4, 4), bool), (1, 1, 1)) is None


def test_four_stages_in_their_regions_and_labels_on_the_input_grid():
  image = np.zeros((12, 24, 24))
  image[4:8, 6:14, 8:16] = 1.0  # pancreas
  image[5:7, 8:10, 9:11] = 2.0  # tumour inside it
  stages = {'pancreas_coarse': ThresholdStage(0.5, 1), 'pancreas_fine': ThresholdStage(0.5, 1),
            'tumour_coarse': ThresholdStage(1.5, 2), 'tumour_fine': ThresholdStage(1.5, 2)}
  output = cascade.cascade_predict(_volume(image), stages, (1, 2, 2), (0, 1, 1))
  assert stages['pancreas_coarse'].seen == [((12, 24, 24), None)]
  assert stages['pancreas_fine'].seen == [((6, 12, 12), None)]  # box 3:9, 4:16, 6:18
  assert output.boxes['pancreas_fine'] == (slice(3, 9), slice(4, 16), slice(6, 18))
  assert stages['tumour_coarse'].seen == [((12, 24, 24), 4 * 8 * 8)]
  assert output.boxes['tumour_fine'] == (slice(4, 8), slice(5, 15), slice(7, 17))
  assert stages['tumour_fine'].seen == [((4, 10, 10), 4 * 8 * 8)]
  expected = np.where(image >= 2, 2, np.where(image >= 1, 1, 0))
  np.testing.assert_array_equal(output.label, expected)
  assert output.label.shape == image.shape and output.notes == []


def test_empty_pancreas_gives_an_empty_label_and_a_note():
  image = np.zeros((8, 16, 16))
  stages = {name: ThresholdStage(0.5, 1 if name.startswith('pancreas') else 2)
            for name in cascade.CASCADE_STAGES}
  output = cascade.cascade_predict(_volume(image), stages, (1, 1, 1), (1, 1, 1))
  assert not output.label.any() and output.label.shape == image.shape
  assert output.notes and 'no pancreas' in output.notes[0]
  assert stages['pancreas_fine'].seen == [] and stages['tumour_fine'].seen == []
  # A coarse pancreas the fine stage rejects: also empty, with a note naming the region.
  image[2:4, 5:8, 5:8] = 1.0
  stages['pancreas_fine'] = ThresholdStage(5.0, 1)
  output = cascade.cascade_predict(_volume(image), stages, (0, 0, 0), (1, 1, 1))
  assert not output.label.any() and 'pancreas_fine found no pancreas in the region [2:4, 5:8, 5:8]' in output.notes[0]


def test_stage_configs(tiny_config):
  fine = cascade.stage_config(tiny_config, 'tumour_fine')
  assert (fine.stage, fine.model.num_classes, fine.model.slice_head) == ('tumour_fine', 1, True)
  assert fine.loss.weights.slice_bce == 1.0 and fine.loss.consistency_on_sdf
  coarse = cascade.stage_config(tiny_config, 'pancreas_coarse')
  assert (coarse.model.num_classes, coarse.model.slice_head) == (1, False)
  assert tuple(coarse.data.patch_size) == tuple(tiny_config.data.patch_size)


def test_stages_train_in_order_once(tmp_path, tiny_config):
  tiny_config.data.root = str(tmp_path / 'data')
  tiny_config.experiments.cascade_fine_patch_size = (16, 24, 24)
  training = fakes.FakeTraining()
  folders = cascade.train_stages(tiny_config, tmp_path / 'exp', train_fn=training)
  assert training.calls == list(cascade.CASCADE_STAGES) == list(folders)
  saved = {stage: json.loads((tmp_path / 'exp' / stage / 'config.json').read_text())
           for stage in cascade.CASCADE_STAGES}
  assert [saved[s]['stage'] for s in cascade.CASCADE_STAGES] == list(cascade.CASCADE_STAGES)
  assert all(saved[s]['model']['num_classes'] == 1 for s in cascade.CASCADE_STAGES)
  assert [saved[s]['data']['patch_size'] for s in cascade.CASCADE_STAGES] == [
      [16, 32, 32], [16, 24, 24], [16, 32, 32], [16, 24, 24]]
  assert [saved[s]['model']['slice_head'] for s in cascade.CASCADE_STAGES] == [False, False, False, True]
  again = fakes.FakeTraining()
  cascade.train_stages(tiny_config, tmp_path / 'exp', train_fn=again)
  assert again.calls == []
