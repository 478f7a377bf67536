"""A folder with bad predictions: every good case is scored, every bad file is named with its reason
in one message and listed in the report, the command exits with an error; reference labels
outside the map are named with the command's own flag, --gt_label_map."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.evaluation import report
from tests.evaluation.test_report import SHAPE, _label, _save

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
WRONG_GRID = np.diag([2.0, 1.0, 3.0, 1.0])  # slices twice as thick as the references'


@pytest.fixture
def mixed(tmp_path):
  """good: a perfect prediction; wrong_grid: another slice thickness; truncated: half a file;
  stray_label: a value 3 where the tumour is."""
  gt, pred = tmp_path / 'gt', tmp_path / 'pred'
  for name in ('good', 'stray_label', 'truncated', 'wrong_grid'):
    _save(_label(), gt / f'{name}.nii.gz')
  _save(_label(), pred / 'good.nii.gz')
  _save(_label(), pred / 'wrong_grid.nii.gz', affine=WRONG_GRID)
  _save(_label(tumour_label=3), pred / 'stray_label.nii.gz')
  noisy = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
  _save(noisy, pred / 'truncated.nii.gz')
  data = (pred / 'truncated.nii.gz').read_bytes()
  (pred / 'truncated.nii.gz').write_bytes(data[:len(data) // 2])
  return tmp_path


def _expected_reasons(root):
  pred, gt = root / 'pred', root / 'gt'
  return [
      f'  stray_label: prediction {pred / "stray_label.nii.gz"} has label values [3] outside '
      '(0, 1, 2) (0 background, 1 pancreas, 2 tumour): give the label map launch.predict writes',
      f'  truncated: prediction {pred / "truncated.nii.gz"} is truncated or corrupt (EOFError: '
      'Compressed file ended before the end-of-stream marker was reached): delete it, then rerun '
      'launch.predict into the same folder with --resume',
      f'  wrong_grid: prediction {pred / "wrong_grid.nii.gz"} (shape (20, 20, 16), spacing (2.0, '
      '1.0, 3.0) mm, origin (0.0, 0.0, 0.0) mm, axes RAS) is not on the voxel grid of reference '
      f'{gt / "wrong_grid.nii.gz"} (shape (20, 20, 16), spacing (2.0, 1.0, 1.5) mm, origin (0.0, '
      "0.0, 0.0) mm, axes RAS): predict on the reference's image",
  ]


def test_every_bad_file_is_named_and_the_good_case_is_scored(mixed):
  out = mixed / 'report'
  with pytest.raises(report.CasesSkipped) as skipped:
    report.evaluate_folder(mixed / 'pred', mixed / 'gt', out, show_progress=False)
  assert str(skipped.value) == '\n'.join(
      [f'3 of 4 case(s) cannot be scored; the report in {out} scores the other 1 and lists these:']
      + _expected_reasons(mixed))

  summary = json.loads((out / 'summary.json').read_text())
  assert summary == json.loads(json.dumps(skipped.value.summary))
  assert summary['num_cases'] == 1 and summary['num_references'] == 4
  assert not summary['complete']
  assert [entry['case'] for entry in summary['skipped']] == ['stray_label', 'truncated',
                                                             'wrong_grid']
  assert summary['skipped'][1]['prediction'] == str(mixed / 'pred' / 'truncated.nii.gz')
  assert summary['by_center']['all']['pancreas']['dice'] == {
      'mean': 1.0, 'std': 0.0, 'median': 1.0, 'n': 1, 'n_excluded': 0}
  with (out / 'per_case.csv').open() as file:
    assert {row['case'] for row in csv.DictReader(file)} == {'good'}

  markdown = (out / 'summary.md').read_text()
  assert markdown.startswith('# Evaluation of 1 of 4 case(s): 3 skipped (listed below)\n')
  assert '## Skipped cases (3 of 4)' in markdown
  for line in _expected_reasons(mixed):
    case, reason = line.strip().split(': ', 1)
    assert f'| {case} | {reason} |' in markdown
  assert (out / 'evaluation.png').stat().st_size > 0


def test_a_case_with_two_problems_names_both_and_nothing_scorable_writes_nothing(tmp_path):
  _save(_label(), tmp_path / 'gt' / 'case_a.nii.gz')
  (tmp_path / 'gt' / 'case_b.nii.gz').write_bytes(b'not a volume')
  _save(_label(), tmp_path / 'pred' / 'case_a.nii.gz', affine=WRONG_GRID)
  (tmp_path / 'pred' / 'case_b.nii.gz').write_bytes(b'not a volume either')
  _save(_label(), tmp_path / 'gt' / 'case_c.nii.gz')  # and no prediction
  with pytest.raises(DataError) as refused:
    report.evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', tmp_path / 'report',
                           show_progress=False)
  lines = str(refused.value).split('\n')
  assert lines[0] == 'none of the 3 case(s) can be scored, so no report is written:'
  assert [line.split(':')[0] for line in lines[1:]] == ['  case_a', '  case_b', '  case_b',
                                                        '  case_c']
  assert 'not on the voxel grid' in lines[1]
  assert lines[2].startswith(f'  case_b: prediction {tmp_path / "pred" / "case_b.nii.gz"} ')
  assert lines[3].startswith(f'  case_b: reference {tmp_path / "gt" / "case_b.nii.gz"} ')
  assert lines[4] == (f'  case_c: no prediction in {tmp_path / "pred"}: predict it (file names '
                      'must match the references)')
  assert not isinstance(refused.value, report.CasesSkipped)
  assert [path.name for path in (tmp_path / 'report').iterdir()] == ['.dualseg.lock']


def test_reference_labels_outside_the_map_name_the_label_map_setting(tmp_path):
  reference = _label()
  reference[reference == 1] = 7  # TotalSegmentator's pancreas value
  _save(reference, tmp_path / 'gt' / 'case_a.nii.gz')
  _save(_label(), tmp_path / 'pred' / 'case_a.nii.gz')
  with pytest.raises(DataError, match=r"values \[7\] outside .*set data\.label_map to map them, "
                                      r"e\.g\. data\.label_map='7:1'"):
    report.evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', tmp_path / 'report',
                           show_progress=False)
  with pytest.raises(ConfigError, match=r"^--gt_label_map '7' cannot be read"):
    report.evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', tmp_path / 'report',
                           gt_label_map='7', label_map_setting='--gt_label_map')
  summary = report.evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', tmp_path / 'report',
                                   gt_label_map='7:1,2:2', show_progress=False)
  assert summary['by_center']['all']['pancreas']['dice']['mean'] == 1.0


def _evaluate_command(root, out, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'launch.evaluate', f'--pred={root / "pred"}', f'--gt={root / "gt"}',
       f'--out={out}', *flags],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'MPLCONFIGDIR': str(root / 'mpl')})


def test_command_line_reports_the_scored_cases_and_exits_with_an_error(mixed):
  result = _evaluate_command(mixed, mixed / 'cli')
  assert result.returncode != 0
  assert '| all | pancreas (labels 1+2) | 1 | 100.00 ± 0.00 (100.00)%' in result.stdout
  assert '## Skipped cases (3 of 4)' in result.stdout
  message = '\n'.join(
      [f'error: 3 of 4 case(s) cannot be scored; the report in {mixed / "cli"} scores the other 1 '
       'and lists these:'] + _expected_reasons(mixed))
  assert message in result.stderr
  assert 'evaluate: 100%' in result.stderr  # the progress bar
  assert json.loads((mixed / 'cli' / 'summary.json').read_text())['num_cases'] == 1

  # A reference with TotalSegmentator's pancreas value: the advice names the command's flag.
  reference = _label()
  reference[reference == 1] = 7
  _save(reference, mixed / 'gt' / 'good.nii.gz')
  result = _evaluate_command(mixed, mixed / 'cli', '--overwrite')
  assert result.returncode != 0
  assert (f'  good: reference {mixed / "gt" / "good.nii.gz"} has label values [7] outside (0, 1, '
          '2) (0 background, 1 pancreas, 2 tumour): set --gt_label_map to map them, e.g. '
          "--gt_label_map='7:1' for TotalSegmentator's pancreas") in result.stderr
  assert 'data.label_map' not in result.stderr
