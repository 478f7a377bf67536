"""The post-processing study on a tiny trained run: each case predicted once, every rule scored,
one rule's Dice equal to the Dice of the label maps launch.predict writes, and validation alone
choosing the rule."""

import json
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndimage

from dualseg_jax.data import io
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import postprocess_study
from dualseg_jax.inference import postprocess
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.inference import run
from dualseg_jax.train import loop
from tests.conftest import PROJECT_ROOT, tiny_run_config


@pytest.fixture(scope='module')
def trained_run(phantom_root, tmp_path_factory):
  config = tiny_run_config(phantom_root, steps=3, **{
      # Coarse voxels and no window overlap keep the whole-volume predictions short; a foreground
      # prior of 0.5 leaves a three-step network with many components, so the rules differ.
      'data.target_spacing_mm': (6.0, 6.0, 6.0), 'inference.overlap': 0.0,
      'inference.windows_per_batch': 16, 'model.foreground_prior': 0.5})
  workdir = tmp_path_factory.mktemp('study') / 'run'
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def study(trained_run):
  calls = []
  original = predictor_lib.Predictor.predict_probabilities

  def counted(self, volume, *args, **kwargs):
    calls.append(volume.array.shape)
    return original(self, volume, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(predictor_lib.Predictor, 'predict_probabilities', counted)
    report = postprocess_study.run_study(trained_run, splits=('val', 'test'), show_progress=False)
  return report, len(calls)


def _dice(prediction, reference):
  total = prediction.sum() + reference.sum()
  return 1.0 if total == 0 else 2.0 * np.logical_and(prediction, reference).sum() / total


def test_each_case_is_predicted_once_and_every_rule_is_scored(trained_run, study):
  report, num_predictions = study
  config = predictor_lib.load_config(trained_run)
  cases = postprocess_study.split_cases(config, trained_run)
  assert report['splits']['val']['cases'] == sorted(case.case_id for case in cases['val'])
  assert report['splits']['test']['cases'] == sorted(case.case_id for case in cases['test'])
  assert all(case.center == 'center_c' for case in cases['test'])
  assert num_predictions == len(cases['val']) + len(cases['test']) > 2
  assert report['rules'] == list(postprocess.COMPONENT_RULES)
  saved = json.loads((trained_run / 'postprocess_study.json').read_text())
  assert saved['preferred_rule'] == report['preferred_rule']
  markdown = (trained_run / 'postprocess_study.md').read_text()
  assert f'**{report["preferred_rule"]}** (preferred)' in markdown
  for split in ('val', 'test'):
    summary = report['splits'][split]['summary']
    for rule in postprocess.COMPONENT_RULES:
      for structure in ('pancreas', 'tumour'):
        values = [scores[rule][structure] for scores in report['splits'][split]['per_case'].values()]
        assert summary[rule][structure]['mean'] == pytest.approx(np.mean(values))
        assert summary[rule][structure]['std'] == pytest.approx(np.std(values))
      far = [scores[rule][postprocess_study.FAR_FP]
             for scores in report['splits'][split]['per_case'].values()]
      assert summary[rule][postprocess_study.FAR_FP]['mean'] == pytest.approx(np.mean(far))
  # The rules really differ on this network, so the choice means something.
  validation = report['splits']['val']['summary']
  assert len({round(validation[rule]['mean_dice'], 6) for rule in report['rules']}) > 1
  best = max(validation[rule]['mean_dice'] for rule in report['rules'])
  assert validation[report['preferred_rule']]['mean_dice'] == best


def test_the_runs_rule_scores_what_launch_predict_writes(trained_run, study, tmp_path):
  report, _ = study
  config = predictor_lib.load_config(trained_run)
  rule = config.inference.postprocess
  for split, cases in postprocess_study.split_cases(config, trained_run).items():
    for case in cases:
      written = run.predict_with_run(trained_run, case.image_path, tmp_path / split / case.case_id)
      predicted = np.asarray(nib.load(written[0]['label']).dataobj)
      reference = np.asarray(nib.load(case.label_path).dataobj)
      scores = report['splits'][split]['per_case'][case.case_id][rule]
      assert scores['pancreas'] == pytest.approx(_dice(predicted >= 1, reference >= 1), abs=1e-12)
      assert scores['tumour'] == pytest.approx(_dice(predicted == 2, reference == 2), abs=1e-12)


def test_the_bound_is_the_best_single_component_and_no_one_component_rule_beats_it():
  config = ml_collections.ConfigDict({'stage': 'joint', 'inference': {'threshold': 0.5}})
  probabilities = np.zeros((12, 12, 12, 2), np.float32)
  probabilities[0:4, 0:4, 0:4, 0] = 0.9  # a false-positive blob of 64 voxels, the largest
  probabilities[8:11, 8:11, 8:10, 0] = 0.6  # the pancreas's component, 18 voxels
  probabilities[8, 0, 0, 1] = 0.7  # a tumour component away from the tumour
  reference = np.zeros((12, 12, 12), np.int32)
  reference[8:11, 8:12, 8:10] = 1  # 24 voxels, 18 of them predicted
  reference[10, 11, 9] = 2
  bound = postprocess_study.best_single_component(probabilities, reference, config)
  assert bound['pancreas'] == pytest.approx(2 * 18 / (18 + 24))
  assert bound['tumour'] == 0.0  # no component touches the tumour
  largest = postprocess.keep_components(probabilities[..., 0] > 0.5, 'largest')
  assert _dice(largest, reference >= 1) == 0.0
  empty = postprocess_study.best_single_component(np.zeros_like(probabilities),
                                                  np.zeros_like(reference), config)
  assert empty == {'pancreas': 1.0, 'tumour': 1.0}
  # Against every single component, found by brute force, on random blobs.
  rng = np.random.default_rng(0)
  for _ in range(5):
    probabilities = rng.random((10, 10, 10, 2)).astype(np.float32) ** 3
    reference = (rng.random((10, 10, 10)) < 0.2).astype(np.int32)
    bound = postprocess_study.best_single_component(probabilities, reference, config)
    foreground = probabilities[..., 0] > 0.5
    components, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    brute = max([_dice(components == index, reference >= 1) for index in range(1, count + 1)]
                + [0.0])
    assert count > 1 and bound['pancreas'] == pytest.approx(brute)
    kept = postprocess.keep_components(foreground, 'largest')
    assert _dice(kept, reference >= 1) <= bound['pancreas'] + 1e-12


def test_far_false_positives_count_predicted_voxels_beyond_the_margin():
  reference = np.zeros((20, 20, 20), bool)
  reference[5:8, 5:8, 5:8] = True
  prediction = reference.copy()
  prediction[5, 5, 7 + postprocess_study.FAR_MARGIN_VOX] = True  # at the margin: near
  prediction[5, 5, 8 + postprocess_study.FAR_MARGIN_VOX] = True  # one voxel beyond: far
  prediction[15:17, 15:17, 15:17] = True  # a far blob of 8 voxels
  assert postprocess_study.far_false_positive_ml(prediction, reference, (2.0, 1.0, 1.0)) == (
      pytest.approx(9 * 2.0 / 1000.0))
  # Nothing to be near: every predicted voxel is far.
  assert postprocess_study.far_false_positive_ml(prediction, np.zeros_like(reference),
                                                 (1.0, 1.0, 1.0)) == pytest.approx(
                                                     prediction.sum() / 1000.0)


def test_the_sdf_head_study_reads_the_sign_of_the_sdf_and_keeps_the_segmentation_report(
    trained_run, study):
  before = (trained_run / 'postprocess_study.json').read_text()
  report = postprocess_study.run_study(trained_run, splits=('val',), rules=('none', 'largest'),
                                       show_progress=False, head='sdf')
  assert report['head'] == 'sdf'
  assert (trained_run / 'postprocess_study.json').read_text() == before
  saved = json.loads((trained_run / 'postprocess_study_sdf.json').read_text())
  assert saved['splits']['val']['per_case'] == report['splits']['val']['per_case']
  assert 'SDF head' in (trained_run / 'postprocess_study_sdf.md').read_text()
  config = predictor_lib.load_config(trained_run)
  case = postprocess_study.split_cases(config, trained_run)['val'][0]
  predictor = predictor_lib.load_predictor(trained_run)
  image, reference = io.read_case(case.image_path, case.label_path, None)
  sdf = predictor.predict_probabilities(image)['sdf']
  expected = postprocess_study.score_case((sdf < 0).astype(np.float32), reference.array,
                                          image.spacing_mm, config, ['none', 'largest'])
  for rule, scores in expected.items():
    assert report['splits']['val']['per_case'][case.case_id][rule] == pytest.approx(scores)
  with pytest.raises(ConfigError, match='--head'):
    postprocess_study.run_study(trained_run, head='logits')


def test_the_bound_is_reported_beside_the_rules(trained_run, study):
  report, _ = study
  markdown = (trained_run / 'postprocess_study.md').read_text()
  assert postprocess_study.BOUND in markdown
  assert postprocess_study.BOUND not in report['rules']
  for split in ('val', 'test'):
    content = report['splits'][split]
    assert sorted(content['bound']['per_case']) == content['cases']
    values = [scores['pancreas'] for scores in content['bound']['per_case'].values()]
    assert content['bound']['summary']['pancreas']['mean'] == pytest.approx(np.mean(values))
    assert all(0.0 <= value <= 1.0 for value in values)


def test_only_validation_chooses_the_rule():
  validation = {'none': {'mean_dice': 0.4}, 'largest': {'mean_dice': 0.6},
                'min_volume': {'mean_dice': 0.6}}
  # A tie goes to the rule listed first; there is no way to hand in test scores.
  assert postprocess_study.preferred_rule(validation, ['none', 'largest', 'min_volume']) == 'largest'
  assert postprocess_study.preferred_rule(validation, ['none', 'min_volume', 'largest']) == 'min_volume'
  with pytest.raises(ConfigError, match='validation chooses the rule'):
    postprocess_study.run_study('/nonexistent', splits=('test',))
  with pytest.raises(ConfigError, match='--rules'):
    postprocess_study.run_study('/nonexistent', rules=('largest', 'biggest'))


def test_the_command_refuses_a_test_only_study(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'launch.postprocess_study', f'--workdir={tmp_path}', '--split=test'],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 2
  assert 'validation chooses the rule' in result.stderr
