"""nnU-Net's test layout: predicting imagesTs/X_0000.nii.gz writes X.nii.gz, the name of
labelsTs/X.nii.gz, and the evaluation pairs the two."""

import shutil

import nibabel as nib
import numpy as np

from dualseg_jax.evaluation import report
from dualseg_jax.inference import run

AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])


def _save(array, path):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, AFFINE), path)


def test_predictions_of_nnunet_inputs_are_named_and_matched_like_their_labels(tmp_path):
  images, labels, predictions = tmp_path / 'imagesTs', tmp_path / 'labelsTs', tmp_path / 'pred'
  for case in ('pancreas_010', 'pancreas_011'):
    image = np.full((16, 16, 8), -1000, np.int16)
    image[2:14, 2:14, 1:7] = 40
    label = np.zeros(image.shape, np.uint8)
    label[5:11, 5:11, 2:6] = 1
    label[7:9, 7:9, 3:5] = 2
    _save(image, images / f'{case}_0000.nii.gz')
    _save(label, labels / f'{case}.nii.gz')

  planned = run.plan_outputs(images, predictions)
  assert [case.name for case, _ in planned] == ['pancreas_010', 'pancreas_011']
  assert [paths['label'].name for _, paths in planned] == ['pancreas_010.nii.gz',
                                                           'pancreas_011.nii.gz']
  for case, paths in planned:  # a perfect prediction stands in for the network's
    predictions.mkdir(exist_ok=True)
    shutil.copy(labels / f'{case.name}.nii.gz', paths['label'])

  summary = report.evaluate_folder(predictions, labels, tmp_path / 'report', images_dir=images,
                                   show_progress=False)
  assert summary['num_cases'] == 2 and summary['complete']
  assert summary['unmatched_predictions'] == []
  assert summary['by_center'][report.ALL_CENTERS]['pancreas']['dice']['mean'] == 1.0
