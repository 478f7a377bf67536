"""A prediction killed midway leaves only complete outputs, `--resume` finishes it without
repeating a case, and one process at a time predicts into a folder."""

import errno
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from dualseg_jax import locks
from dualseg_jax.data import io
from dualseg_jax.errors import ConfigError, DataError
from dualseg_jax.evaluation import report
from dualseg_jax.inference import run
from dualseg_jax.tools import kill_resume
from tests.inference.helpers import random_params, save_params_for_test
from tests.inference.test_predictor import _stub_predictor, _write_planted_ct

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = os.environ.get('DUALSEG_TEST_COMPILATION_CACHE', '/tmp/dualseg_jax_test_xla_cache')

# launch.predict with one change: the rename that completes case_1's label waits to be killed.
_PAUSING_PREDICT = textwrap.dedent('''
    import os
    import sys
    import time

    from absl import app

    from launch import predict

    rename = os.replace

    def pausing_rename(source, target):
      if os.path.basename(target) == 'case_1.nii.gz':
        print('writing case_1', flush=True)
        time.sleep(600)
      rename(source, target)

    os.replace = pausing_rename
    app.run(predict.main)
''')


def _predict_command(*arguments):
  return [sys.executable, '-m', 'launch.predict', *arguments]


def test_killed_prediction_leaves_complete_outputs_and_resume_finishes_it(tmp_path, tiny_config):
  workdir = save_params_for_test(tmp_path / 'run', tiny_config, random_params(tiny_config, seed=0))
  inputs, output = tmp_path / 'inputs', tmp_path / 'out'
  inputs.mkdir()
  for index in range(3):
    _write_planted_ct(inputs / f'case_{index}.nii.gz')
  arguments = [f'--workdir={workdir}', f'--input={inputs}', f'--output={output}']
  driver = tmp_path / 'pausing_predict.py'
  driver.write_text(_PAUSING_PREDICT)
  environment = kill_resume.subprocess_environment(CACHE)

  killed = subprocess.Popen([sys.executable, str(driver), *arguments], cwd=PROJECT_ROOT,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  try:
    lines = []
    for line in killed.stdout:
      lines.append(line)
      if line.startswith('writing case_1'):
        break
    assert lines and lines[-1].startswith('writing case_1'), ''.join(lines)
    # While it runs, the folder is its own: a second prediction is refused, naming it.
    busy = rf'in use by process {killed.pid} .*for predictions'
    with pytest.raises(locks.FolderBusyError, match=busy):
      run.predict_cases(_stub_predictor(tiny_config), inputs, output, show_progress=False)
  finally:
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    killed.stdout.close()

  # case_1's label is complete but unnamed: hidden, and no reader takes it for a case.
  left = sorted(path.name for path in output.iterdir())
  assert left[1:] == ['.dualseg.lock', 'case_0.nii.gz']
  assert re.fullmatch(rf'\.case_1\.nii\.gz\.{killed.pid}-[0-9a-f]{{8}}\.partial', left[0])
  assert io.partial_files(output / 'case_1.nii.gz') == [output / left[0]]
  assert [case.name for case in run.find_cases(output)] == ['case_0']
  assert list(report._volume_files(output, 'pred')) == ['case_0']
  first_case = (output / 'case_0.nii.gz').stat().st_mtime_ns

  refusal = r'case_0\.nii\.gz already exists: .* --resume .* --overwrite'
  with pytest.raises(DataError, match=refusal):
    run.predict_with_run(workdir, inputs, output)
  with pytest.raises(ConfigError, match='--resume .* --overwrite .*choose one'):
    run.predict_with_run(workdir, inputs, output, resume=True, overwrite=True)

  resumed = subprocess.run(_predict_command(*arguments, '--resume'), cwd=PROJECT_ROOT,
                           env=environment, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  # The killed process's lock went with it; the next process takes the folder over.
  assert f'taking over the lock left by process {killed.pid}' in resumed.stderr
  assert (f'resuming in {output}: 1 of 3 case(s) already have all their outputs and are skipped; '
          '2 to predict') in resumed.stderr
  assert resumed.stdout.split() == [str(output / f'case_{index}.nii.gz') for index in range(3)]
  assert sorted(path.name for path in output.iterdir()) == [
      '.dualseg.lock', 'case_0.nii.gz', 'case_1.nii.gz', 'case_2.nii.gz']
  assert (output / 'case_0.nii.gz').stat().st_mtime_ns == first_case
  for index in range(3):
    label = nib.load(output / f'case_{index}.nii.gz')
    assert label.shape == nib.load(inputs / f'case_{index}.nii.gz').shape
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}


def test_resume_predicts_only_cases_missing_an_output(tmp_path, tiny_config):
  inputs, output = tmp_path / 'inputs', tmp_path / 'out'
  inputs.mkdir()
  for name in ('a', 'b', 'c'):
    _write_planted_ct(inputs / f'{name}.nii.gz')
  predictor = _stub_predictor(tiny_config)
  run.predict_cases(predictor, inputs, output, save_probabilities=True, show_progress=False)
  (output / 'b_sdf.nii.gz').unlink()  # b lacks one of its three outputs
  (output / 'c.nii.gz').unlink()
  before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
  written = run.predict_cases(predictor, inputs, output, save_probabilities=True, resume=True,
                              show_progress=False)
  assert [paths['label'].name for paths in written] == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  after = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
  assert all(after[name] == before[name] for name in before if name.startswith('a'))
  assert after['b.nii.gz'] != before['b.nii.gz'] and 'b_sdf.nii.gz' in after
  assert 'c.nii.gz' in after


def test_a_stop_request_abandons_the_current_case_and_keeps_the_finished_ones(tmp_path,
                                                                              tiny_config):
  inputs, output = tmp_path / 'inputs', tmp_path / 'out'
  inputs.mkdir()
  for name in ('a', 'b', 'c'):
    _write_planted_ct(inputs / f'{name}.nii.gz')
  windows_done = []
  predictor = _stub_predictor(tiny_config)
  original = predictor.predict_volume

  def predict_volume(volume, progress=None, **kwargs):
    def counting_progress(done, total):
      windows_done.append(done)
      progress(done, total)
    return original(volume, progress=counting_progress, **kwargs)

  predictor.predict_volume = predict_volume
  # Asked before each case and after each batch of windows (one per case here): yes after b's.
  answers = iter([False, False, False, True])
  with pytest.raises(run.PredictionStopped, match='1 of 3 case') as stopped:
    run.predict_cases(predictor, inputs, output, should_stop=lambda: next(answers),
                      show_progress=False)
  assert (stopped.value.num_complete, stopped.value.num_cases) == (1, 3)
  assert len(windows_done) == 2  # a's one batch, then b's first
  assert sorted(path.name for path in output.iterdir()) == ['.dualseg.lock', 'a.nii.gz']


def test_write_nifti_is_whole_or_absent(tmp_path, monkeypatch):
  source = tmp_path / 'source.nii.gz'
  nib.save(nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6),
                           np.diag([1.5, 2.0, 2.5, 1.0])), source)
  volume = io.read_volume(source)
  # The bytes nibabel itself would write: same compression, no time stamp.
  written = io.write_nifti(volume.array, volume.geometry, tmp_path / 'copy.nii.gz')
  nib.save(nib.load(written), tmp_path / 'by_nibabel.nii.gz')
  assert written.read_bytes() == (tmp_path / 'by_nibabel.nii.gz').read_bytes()
  plain = io.write_nifti(volume.array, volume.geometry, tmp_path / 'copy.nii')
  np.testing.assert_array_equal(np.asarray(nib.load(plain).dataobj),
                                np.asarray(nib.load(source).dataobj))

  def fail_midway(self, stream, **kwargs):
    stream.write(b'\0' * 100)
    raise KeyboardInterrupt

  monkeypatch.setattr(nib.Nifti1Image, 'to_stream', fail_midway)
  with pytest.raises(KeyboardInterrupt):
    io.write_nifti(volume.array, volume.geometry, tmp_path / 'interrupted.nii.gz')
  monkeypatch.setattr(nib.Nifti1Image, 'to_stream',
                      lambda self, stream: (_ for _ in ()).throw(OSError(errno.EIO, 'I/O error')))
  with pytest.raises(DataError, match=r'cannot write .*full\.nii\.gz .*I/O error'):
    io.write_nifti(volume.array, volume.geometry, tmp_path / 'full.nii.gz')
  assert sorted(path.name for path in tmp_path.iterdir()) == [
      'by_nibabel.nii.gz', 'copy.nii', 'copy.nii.gz', 'source.nii.gz']
