"""The held-out evaluation of a training run survives SIGTERM: it stops keeping every finished
case, a rerun predicts only the missing ones, and predictions made with other parameters are
made again."""

import json
import logging
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.data.registry import Case
from dualseg_jax.evaluation import held_out
from dualseg_jax.evaluation import metrics as metrics_lib
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.train import validate
from tests.inference.helpers import random_params, save_params_for_test

SPACING_MM = 3.0  # the tiny preset's target spacing: no resampling
NUM_CASES = 3


def _test_cases(folder):
  folder.mkdir()
  affine = np.diag([SPACING_MM] * 3 + [1.0])
  cases = []
  for index in range(NUM_CASES):
    ct = np.full((20, 36, 36), -80, np.int16)
    label = np.zeros(ct.shape, np.uint8)
    label[6:14, 10:26, 8 + index:24] = 1
    label[9:12, 15:20, 14:18] = 2
    ct[label > 0] = 60
    image_path, label_path = folder / f'case_{index}_ct.nii.gz', folder / f'case_{index}.nii.gz'
    nib.save(nib.Nifti1Image(ct, affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    cases.append(Case('center_c', f'case_{index}', str(image_path), str(label_path)))
  return cases


@pytest.fixture
def predicted_cases(monkeypatch):
  """The case names the network predicts, in order; `on_call[n]` runs before the n-th (from 1)."""
  names, on_call = [], {}
  original = predictor_lib.Predictor.predict_volume

  def counting(self, volume, *args, **kwargs):
    names.append(os.path.basename(volume.source))
    if len(names) in on_call:
      on_call[len(names)]()
    return original(self, volume, *args, **kwargs)

  monkeypatch.setattr(predictor_lib.Predictor, 'predict_volume', counting)
  return names, on_call


def _sigterm_to_self():
  os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_the_held_out_evaluation_and_a_rerun_finishes_it(
    tmp_path, tiny_config, predicted_cases, monkeypatch, caplog):
  names, on_call = predicted_cases
  workdir = save_params_for_test(tmp_path / 'run', tiny_config, random_params(tiny_config, seed=0))
  cases = _test_cases(tmp_path / 'data')
  out_dir = workdir / 'evaluation' / 'test_center_c'
  predictions = out_dir / 'predictions'
  handler_before = signal.getsignal(signal.SIGTERM)

  # SIGTERM while the second case's windows are predicted: that case is abandoned, none after it
  # is started, the first stays.
  on_call[2] = _sigterm_to_self
  with pytest.raises(held_out.HeldOutEvaluationStopped,
                     match=r'signal 15 with 1 of 3 case\(s\) predicted.*rerun the same command'):
    validate.evaluate_test_center(tiny_config, workdir, cases, tag='test_center_c')
  assert signal.getsignal(signal.SIGTERM) is handler_before
  assert names == ['case_0.nii.gz', 'case_1.nii.gz']
  assert sorted(path.name for path in predictions.iterdir()) == [
      '.dualseg.lock', 'case_0.nii.gz', 'predicted_with.json']
  assert not (out_dir / 'summary.json').exists()
  record = json.loads((predictions / held_out.PREDICTED_WITH).read_text())
  assert record['checkpoint'] == 'best' and record['step'] == 1
  first_case = (predictions / 'case_0.nii.gz').stat().st_mtime_ns

  # SIGTERM while scoring: the two missing cases are predicted, the report is not written.
  names.clear()
  on_call.clear()
  original_case_metrics = metrics_lib.case_metrics
  calls = []

  def interrupted_case_metrics(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      _sigterm_to_self()
    return original_case_metrics(*args, **kwargs)

  monkeypatch.setattr(metrics_lib, 'case_metrics', interrupted_case_metrics)
  with pytest.raises(held_out.HeldOutEvaluationStopped, match='stopped while scoring.*rerun'):
    validate.evaluate_test_center(tiny_config, workdir, cases, tag='test_center_c')
  assert names == ['case_1.nii.gz', 'case_2.nii.gz']
  assert not any((out_dir / name).exists()
                 for name in ('summary.json', 'summary.md', 'per_case.csv'))
  monkeypatch.setattr(metrics_lib, 'case_metrics', original_case_metrics)

  # The rerun predicts nothing and writes the report.
  names.clear()
  with caplog.at_level(logging.INFO, logger='dualseg_jax'):
    summary = validate.evaluate_test_center(tiny_config, workdir, cases, tag='test_center_c')
  assert names == []
  assert ('3 of 3 case(s) already have all their outputs and are skipped; 0 to predict'
          in caplog.text)
  assert summary['num_cases'] == 3 and (out_dir / 'summary.json').exists()
  assert (predictions / 'case_0.nii.gz').stat().st_mtime_ns == first_case
  assert not [path.name for path in out_dir.rglob('.*') if path.name != '.dualseg.lock']

  # Other parameters (a later checkpoint): every case is predicted again.
  save_params_for_test(workdir, tiny_config, random_params(tiny_config, seed=1), step=2)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='dualseg_jax'):
    validate.evaluate_test_center(tiny_config, workdir, cases, tag='test_center_c')
  assert names == [f'case_{index}.nii.gz' for index in range(NUM_CASES)]
  assert 'were made with other parameters or settings (checkpoint best step 1' in caplog.text
  assert json.loads((predictions / held_out.PREDICTED_WITH).read_text())['step'] == 2
