"""What an interrupted prediction or evaluation can leave never passes for a result: a truncated
prediction is named and not scored, hidden partial files are not cases, a report is whole or
absent, and one process at a time writes a report folder."""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from dualseg_jax import locks
from dualseg_jax.errors import DataError
from dualseg_jax.evaluation import figures
from dualseg_jax.evaluation import report
from tests.evaluation.test_report import SHAPE, _save, planted  # noqa: F401 (planted: a fixture)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _truncate_to_half(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def test_truncated_predictions_are_named_and_nothing_is_reported(planted, tmp_path):  # noqa: F811
  root, manifest = planted
  # case_b: a noisy label map, so that half its bytes end inside the voxel data; case_c: a
  # smooth one, whose half ends inside the compressed header.
  noisy = np.random.default_rng(0).integers(0, 3, SHAPE).astype(np.uint8)
  _save(noisy, root / 'pred' / 'case_b.nii.gz')
  for name in ('case_b', 'case_c'):
    _truncate_to_half(root / 'pred' / f'{name}.nii.gz')
  out = tmp_path / 'report'
  with pytest.raises(DataError) as refused:
    report.evaluate_folder(root / 'pred', root / 'gt', out, centers=manifest)
  message = str(refused.value)
  assert message.startswith(
      '2 of 3 prediction(s) cannot be read, so no report is written: bad prediction '
      f'{root / "pred" / "case_b.nii.gz"} is truncated or corrupt (EOFError: Compressed file ended '
      'before the end-of-stream marker was reached); bad prediction '
      f'{root / "pred" / "case_c.nii.gz"} is truncated or corrupt')
  assert 'case_a' not in message and 're-export' not in message
  assert message.endswith('rerun launch.predict into the same folder with --resume')
  assert [path.name for path in out.iterdir()] == ['.dualseg.lock']

  result = subprocess.run(
      [sys.executable, '-m', 'launch.evaluate', f'--pred={root / "pred"}', f'--gt={root / "gt"}',
       f'--out={tmp_path / "cli"}'],
      cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
      env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'MPLCONFIGDIR': str(tmp_path / 'mpl')})
  assert result.returncode == 1
  assert result.stderr.startswith(f'error: {message}')
  assert not (tmp_path / 'cli' / 'summary.json').exists()


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
