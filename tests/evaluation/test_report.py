"""Folder evaluation on a tiny planted set: the CSV, JSON, Markdown and PNG carry the closed-form
numbers (a missed tumour's HD95 at the hand-computed image diagonal); the example cases are picked
on the stated criterion; unmapped centers are refused."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from dualseg_jax.errors import DataError
from dualseg_jax.evaluation import report

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (20, 20, 16)  # source (i, j, k)
AFFINE = np.diag([2.0, 1.0, 1.5, 1.0])
PANCREAS = (slice(4, 16), slice(4, 16), slice(3, 13))  # 12 x 12 x 10 voxels
TUMOUR = (slice(8, 11), slice(8, 11), slice(7, 10))
# A miss's HD95/ASSD: the field of view's diagonal, 20 x 2 mm by 20 x 1 mm by 16 x 1.5 mm.
DIAGONAL_MM = math.sqrt((20 * 2.0) ** 2 + (20 * 1.0) ** 2 + (16 * 1.5) ** 2)


def _label(pancreas_shift_k=0, tumour=True, tumour_label=2):
  label = np.zeros(SHAPE, np.uint8)
  label[PANCREAS[0], PANCREAS[1], slice(3 + pancreas_shift_k, 13 + pancreas_shift_k)] = 1
  if tumour:
    label[TUMOUR] = tumour_label
  return label


def _save(array, path, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), path)


@pytest.fixture
def planted(tmp_path):
  """case_a: pancreas shifted 2 voxels along k (1.5 mm); case_b: perfect; case_c: tumour missed."""
  gt, pred, images = tmp_path / 'gt', tmp_path / 'pred', tmp_path / 'images'
  for name in ('case_a', 'case_b', 'case_c'):
    _save(_label(), gt / f'{name}.nii.gz')
    ct = np.where(_label() > 0, 60, -80).astype(np.int16)
    _save(ct, images / f'{name}.nii.gz')
  _save(_label(pancreas_shift_k=2), pred / 'case_a.nii.gz')
  _save(_label(), pred / 'case_b.nii.gz')
  _save(_label(tumour_label=1), pred / 'case_c.nii.gz')
  _save(np.zeros(SHAPE + (2,), np.float32), pred / 'case_a_probabilities.nii.gz')  # not a label
  manifest = tmp_path / 'centers.csv'
  manifest.write_text('case,center\ncase_a,center_1\ncase_b,center_1\ncase_c,center_2\n')
  return tmp_path, manifest


def test_evaluate_folder_reports_the_planted_numbers(planted):
  root, manifest = planted
  out = root / 'report'
  summary = report.evaluate_folder(root / 'pred', root / 'gt', out, centers=manifest,
                                   images_dir=root / 'images', nsd_tolerance_mm=1.0)
  with (out / 'per_case.csv').open() as file:
    rows = {(row['case'], row['structure']): row for row in csv.DictReader(file)}
  assert len(rows) == 6
  assert float(rows['case_a', 'pancreas']['dice']) == pytest.approx(0.8)  # 8 of 10 slices overlap
  assert float(rows['case_a', 'pancreas']['hd95_mm']) == pytest.approx(3.0)  # 2 voxels x 1.5 mm
  assert float(rows['case_a', 'tumour']['dice']) == 1.0
  assert float(rows['case_b', 'pancreas']['nsd']) == 1.0
  assert rows['case_c', 'tumour']['dice'] == '0' and rows['case_c', 'tumour']['outcome'] == 'missed'
  assert float(rows['case_c', 'tumour']['hd95_mm']) == pytest.approx(DIAGONAL_MM, rel=1e-5)
  assert float(rows['case_c', 'tumour']['assd_mm']) == pytest.approx(DIAGONAL_MM, rel=1e-5)
  assert rows['case_c', 'tumour']['center'] == 'center_2'

  on_disk = json.loads((out / 'summary.json').read_text())
  assert on_disk == json.loads(json.dumps(summary))
  everything = summary['by_center']['all']
  assert everything['pancreas']['dice']['mean'] == pytest.approx((0.8 + 1 + 1) / 3)
  assert everything['pancreas']['dice']['median'] == 1.0
  assert everything['pancreas']['dice']['std'] == pytest.approx(np.std([0.8, 1, 1]))
  assert everything['tumour']['dice']['mean'] == pytest.approx(2 / 3)
  # The miss is in the mean at the penalty, not left out of it: (0 + 0 + diagonal) / 3.
  assert everything['tumour']['hd95_mm'] == {
      'mean': pytest.approx(DIAGONAL_MM / 3), 'std': pytest.approx(np.std([0, 0, DIAGONAL_MM])),
      'median': 0.0, 'n': 3, 'n_excluded': 0}
  assert DIAGONAL_MM == pytest.approx(50.7543, abs=1e-4)
  assert everything['tumour']['outcomes'] == {'found': 2, 'missed': 1, 'false positive': 0,
                                              'absent': 0}
  assert summary['by_center']['center_1']['pancreas']['dice']['mean'] == pytest.approx(0.9)
  assert summary['by_center']['center_2']['tumour']['dice']['n'] == 1
  assert summary['skipped'] == [] and summary['complete'] and summary['num_cases'] == 3
  # Ranked on pancreas Dice alone: a (0.8) < b (1.0) = c (1.0), equal Dice in case-name order.
  assert {pick: summary['examples'][pick] for pick in ('best', 'median', 'worst')} == {
      'best': 'case_c', 'median': 'case_b', 'worst': 'case_a'}
  assert summary['examples']['criterion'].startswith('pancreas (labels 1+2) Dice')

  markdown = (out / 'summary.md').read_text()
  assert '| center_1 | pancreas (labels 1+2) | 2 | 90.00 ± 10.00 (90.00)%' in markdown
  assert (f'| all | tumour (label 2) | 3 | 66.67 ± 47.14 (100.00)% | 66.67 ± 47.14 (100.00)% | '
          f'{DIAGONAL_MM / 3:.2f} ± {np.std([0, 0, DIAGONAL_MM]):.2f} (0.00) mm [1 at penalty] |'
          in markdown)
  assert '| 2 / 1 / 0 / 0 |' in markdown and 'Skipped' not in markdown
  assert 'best case_c, median case_b, worst case_a' in markdown
  figure = matplotlib.image.imread(out / 'evaluation.png')
  assert figure.ndim == 3 and figure.shape[0] > 500 and figure.shape[1] > 800


def test_evaluate_without_centers_or_images(planted):
  root, _ = planted
  summary = report.evaluate_folder(root / 'pred', root / 'gt', root / 'plain')
  assert list(summary['by_center']) == ['all']
  assert (root / 'plain' / 'evaluation.png').stat().st_size > 0


def test_examples_are_ranked_on_pancreas_dice_alone():
  def case(name, pancreas_dice, tumour_dice):
    return [{'case': name, 'structure': 'pancreas', 'dice': pancreas_dice},
            {'case': name, 'structure': 'tumour', 'dice': tumour_dice}]

  rows = (case('case_1', 0.90, 0.60) + case('case_2', 0.80, 0.70) + case('case_3', 0.60, 0.20)
          + case('case_4', 0.85, 0.80)
          # Tumour-free, pancreas below the median: ranked by its mean Dice with a tumour Dice of
          # 1 for an empty tumour it would have been 'best' (0.85).
          + case('tumour_free', 0.70, math.nan)
          + case('no_pancreas', math.nan, math.nan))  # no Dice to rank by: not ranked
  assert report.select_examples(rows) == {'best': 'case_1', 'median': 'case_2',
                                          'worst': 'case_3'}
  # An even count: the lower of the two middle cases; equal Dice in case-name order.
  assert report.select_examples(case('b', 0.5, 0.0) + case('a', 0.5, 0.0) + case('c', 0.9, 0.0)
                                + case('d', 0.1, 0.0)) == {'best': 'c', 'median': 'a',
                                                           'worst': 'd'}
  assert report.select_examples(case('no_pancreas', math.nan, math.nan)) == {}


def test_refusals(planted, tmp_path):
  root, manifest = planted
  _save(_label(), root / 'gt' / 'case_d.nii.gz')
  _save(_label(), root / 'pred' / 'case_d.nii.gz')
  with pytest.raises(DataError, match='no center.*case_d'):
    report.evaluate_folder(root / 'pred', root / 'gt', tmp_path / 'out3', centers=manifest)
  centers_json = tmp_path / 'centers.json'
  centers_json.write_text(json.dumps({name: 'x' for name in ('case_a', 'case_b', 'case_c',
                                                              'case_d')}))
  assert report.load_centers(centers_json)['case_d'] == 'x'


def test_command_line(planted):
  root, manifest = planted
  result = subprocess.run(
      [sys.executable, '-m', 'launch.evaluate', f'--pred={root / "pred"}', f'--gt={root / "gt"}',
       f'--out={root / "cli"}', f'--centers={manifest}'],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'MPLCONFIGDIR': str(root / 'mpl')})
  assert result.returncode == 0, result.stderr
  assert '| all | pancreas (labels 1+2) | 3 |' in result.stdout
  assert all((root / 'cli' / name).exists()
             for name in ('per_case.csv', 'summary.json', 'summary.md', 'evaluation.png'))
  assert not math.isnan(json.loads((root / 'cli' / 'summary.json').read_text())[
      'by_center']['all']['pancreas']['dice']['mean'])


def test_an_existing_report_is_kept_unless_told(planted, tmp_path):
  root, _ = planted
  out = tmp_path / 'report'
  report.evaluate_folder(root / 'pred', root / 'gt', out, overwrite=False)
  before = (out / 'summary.json').read_text()
  with pytest.raises(DataError, match='already holds a report.*--overwrite'):
    report.evaluate_folder(root / 'pred', root / 'gt', out, overwrite=False)
  assert (out / 'summary.json').read_text() == before
  report.evaluate_folder(root / 'pred', root / 'gt', out, overwrite=True)
