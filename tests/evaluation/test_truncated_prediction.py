"""What an interrupted prediction or evaluation can leave never passes for a result: a truncated
prediction is named and not scored (the others are), hidden partial files are not cases, a report
is whole or absent, and one process at a time writes a report folder."""

import os
import threading

import numpy as np
import pytest

from dualseg_jax import locks
from dualseg_jax.evaluation import figures
from dualseg_jax.evaluation import report
from tests.evaluation.test_report import SHAPE, _save, planted  # noqa: F401 (planted: a fixture)


def _truncate_to_half(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def test_truncated_predictions_are_named_and_not_scored(planted, tmp_path):  # noqa: F811
  root, manifest = planted
  # case_b: a noisy label map, so that half its bytes end inside the voxel data; case_c: a
  # smooth one, whose half ends inside the compressed header.
  noisy = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
  _save(noisy, root / 'pred' / 'case_b.nii.gz')
  for name in ('case_b', 'case_c'):
    _truncate_to_half(root / 'pred' / f'{name}.nii.gz')
  out = tmp_path / 'report'
  with pytest.raises(report.CasesSkipped) as skipped:
    report.evaluate_folder(root / 'pred', root / 'gt', out, centers=manifest,
                           show_progress=False)
  message = str(skipped.value)
  assert message.startswith(
      f'2 of 3 case(s) cannot be scored; the report in {out} scores the other 1 and lists these:\n'
      f'  case_b: prediction {root / "pred" / "case_b.nii.gz"} is truncated or corrupt (EOFError: '
      'Compressed file ended before the end-of-stream marker was reached): delete it, then rerun '
      'launch.predict into the same folder with --resume\n'
      f'  case_c: prediction {root / "pred" / "case_c.nii.gz"} is truncated or corrupt')
  assert '  case_a' not in message and 're-export' not in message
  assert message.endswith('rerun launch.predict into the same folder with --resume')
  # The one readable case is reported, the truncated ones listed and in no number.
  summary = skipped.value.summary
  assert summary['num_cases'] == 1 and [entry['case'] for entry in summary['skipped']] == [
      'case_b', 'case_c']
  assert summary['by_center']['center_1']['pancreas']['dice']['n'] == 1
  assert 'center_2' not in summary['by_center']  # its only case is skipped
  assert sorted(path.name for path in out.iterdir()) == sorted(
      ['.dualseg.lock', *report.REPORT_FILES])


def test_hidden_partial_files_are_not_cases(planted, tmp_path):  # noqa: F811
  root, _ = planted
  (root / 'pred' / '.case_b.nii.gz.partial').write_bytes(b'half of a file')
  (root / 'pred' / '._case_a.nii.gz').write_bytes(b'macOS resource fork')
  (root / 'gt' / '.case_c.nii.gz.partial').write_bytes(b'half of a file')
  summary = report.evaluate_folder(root / 'pred', root / 'gt', tmp_path / 'report')
  assert summary['num_cases'] == 3 and summary['unmatched_predictions'] == []


def test_an_interrupted_report_leaves_no_summary(planted, tmp_path, monkeypatch):  # noqa: F811
  root, _ = planted
  out = tmp_path / 'report'

  def interrupted_figure(rows, path, **kwargs):
    path.write_bytes(b'half a png')
    raise KeyboardInterrupt

  monkeypatch.setattr(figures, 'evaluation_figure', interrupted_figure)
  with pytest.raises(KeyboardInterrupt):
    report.evaluate_folder(root / 'pred', root / 'gt', out)
  # summary.json comes last: without it the folder holds no finished report.
  assert sorted(path.name for path in out.iterdir()) == ['.dualseg.lock', 'per_case.csv',
                                                         'summary.md']
  monkeypatch.undo()
  report.evaluate_folder(root / 'pred', root / 'gt', out)
  assert sorted(path.name for path in out.iterdir()) == sorted(
      ['.dualseg.lock', *report.REPORT_FILES])


def test_a_report_folder_in_use_is_refused(planted, tmp_path):  # noqa: F811
  root, _ = planted
  out = tmp_path / 'report'
  held, release = threading.Event(), threading.Event()

  def other_evaluation():  # another thread holds the lock as another process would
    with locks.hold(out, 'an evaluation report'):
      held.set()
      release.wait(timeout=60)

  holder = threading.Thread(target=other_evaluation)
  holder.start()
  try:
    assert held.wait(timeout=60)
    with pytest.raises(locks.FolderBusyError, match=rf'report is in use by process {os.getpid()} '
                                                    '.*for an evaluation report'):
      report.evaluate_folder(root / 'pred', root / 'gt', out)
  finally:
    release.set()
    holder.join()
  assert [path.name for path in out.iterdir()] == ['.dualseg.lock']
