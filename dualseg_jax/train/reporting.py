"""What a user sees of a run: metrics.jsonl, a progress bar, the curves PNG, TensorBoard if asked."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from dualseg_jax import files
from dualseg_jax.errors import ConfigError


def _scalar(value) -> float:
  value = float(np.asarray(value))
  return value


class MetricsLog:
  """Appends one JSON object per logged step; on resume, drops rows past the restored step."""

  def __init__(self, path: pathlib.Path, resume_step: int = 0,
               tensorboard_dir: pathlib.Path | None = None, write: bool = True):
    """`write=False` (every process but the first of a multi-host run) keeps rows in memory only."""
    self.path = pathlib.Path(path)
    self._write_files = write
    rows = self.read(self.path)
    kept = [row for row in rows if row.get('step', 0) <= resume_step] if resume_step else []
    if write:
      # Rewritten beside and renamed: a kill while rewriting must not lose the rows it keeps.
      temporary = self.path.with_name(self.path.name + '.tmp')
      with files.writing('the metrics log', self.path):
        try:
          with temporary.open('w') as file:
            for row in kept:
              file.write(json.dumps(row) + '\n')
          temporary.replace(self.path)
        finally:
          files.discard(temporary)
    self.rows = kept
    self._writer = None
    if tensorboard_dir is not None and write:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as error:
        raise ConfigError('train.tensorboard=True needs the tensorboardX package: '
                          'pip install tensorboardX, or set --config.train.tensorboard=False') from error
      self._writer = SummaryWriter(str(tensorboard_dir))

  @staticmethod
  def read(path: pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(path)
    if not path.exists():
      return []
    rows = []
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
    return rows

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    row = {'step': int(step)}
    row.update({name: _scalar(value) for name, value in metrics.items()})
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
    if self._write_files:
      # A row a full disk cut short is skipped by `read` and dropped by the resumed run's rewrite.
      with files.writing('the metrics log', self.path), self.path.open('a') as file:
        file.write(json.dumps(clean) + '\n')
    self.rows.append(row)
    if self._writer is not None:
      for name, value in row.items():
        if name != 'step' and isinstance(value, float) and math.isfinite(value):
          self._writer.add_scalar(name, value, step)
      self._writer.flush()
    return row

  def close(self):
    if self._writer is not None:
      self._writer.close()


# Step metrics that are not loss terms; every other top-level name a step logs is one
# (`loss` is the weighted total, `dice`, `bce`, ... its terms; `name/detail` are their details).
_NOT_LOSS_TERMS = ('step', 'learning_rate', 'grad_norm', 'nonfinite', 'steps_per_s')


def _is_loss_term(name: str) -> bool:
  return '/' not in name and name not in _NOT_LOSS_TERMS


# 'grad_norm/<term>' rows (train.grad_balance_every) hold each term's gradient norm on the
# encoder; this one is their largest over dice's, not a term.
_BALANCE_RATIO = 'grad_norm/encoder_ratio_max'


def plot_curves(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Loss terms (log scale), validation Dice and each loss term's gradient norm on the encoder
  (log scale; rows of train.grad_balance_every steps) against the step, as one PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  train_rows = [r for r in rows if 'loss' in r]
  val_rows = [r for r in rows if any(k.startswith('val/') for k in r)]
  fig, (ax_loss, ax_val, ax_balance) = plt.subplots(1, 3, figsize=(16, 4))
  loss_names = sorted({k for r in train_rows for k in r if _is_loss_term(k)})
  for name in loss_names:
    points = [(r['step'], r[name]) for r in train_rows if r.get(name) is not None and r[name] > 0]
    if points:
      steps, values = zip(*points)
      ax_loss.plot(steps, values, label=name, linewidth=2 if name == 'loss' else 1)
  ax_loss.set_yscale('log')
  ax_loss.set_xlabel('step')
  ax_loss.set_title('training loss')
  if loss_names:
    ax_loss.legend(fontsize=7)
  dice_names = sorted({k for r in val_rows for k in r if k.startswith('val/') and 'dice' in k})
  for name in dice_names:
    points = [(r['step'], r[name]) for r in val_rows if r.get(name) is not None]
    if points:
      steps, values = zip(*points)
      ax_val.plot(steps, values, marker='o', label=name.removeprefix('val/'))
  ax_val.set_ylim(0, 1)
  ax_val.set_xlabel('step')
  ax_val.set_title('validation Dice')
  if dice_names:
    ax_val.legend(fontsize=7)
  balance_names = sorted({k for r in rows for k in r
                          if k.startswith('grad_norm/') and k != _BALANCE_RATIO})
  for name in balance_names:
    points = [(r['step'], r[name]) for r in rows if r.get(name) is not None and r[name] > 0]
    if points:
      steps, values = zip(*points)
      ax_balance.plot(steps, values, marker='.', label=name.removeprefix('grad_norm/'))
  ax_balance.set_xlabel('step')
  ax_balance.set_title('gradient norm on the encoder, per term')
  if ax_balance.get_lines():
    ax_balance.set_yscale('log')
    ax_balance.legend(fontsize=7)
  elif not balance_names:
    ax_balance.text(0.5, 0.5, 'not measured\n(train.grad_balance_every = 0)', ha='center',
                    va='center', transform=ax_balance.transAxes)
  fig.tight_layout()
  tmp = pathlib.Path(path).with_suffix('.tmp.png')
  try:
    with files.writing('the training curves', path):
      fig.savefig(tmp, dpi=100)
      tmp.replace(path)
  finally:
    plt.close(fig)
    files.discard(tmp)


def format_progress(metrics: dict[str, float], keys=('loss',)) -> dict[str, str]:
  """A compact postfix for the progress bar: the total loss, each term, the learning rate."""
  shown = {}
  for name, value in metrics.items():
    if name == 'step':
      continue
    if name in keys or _is_loss_term(name) or name == 'learning_rate':
      shown[name] = f'{value:.3g}' if value is not None else 'nan'
  return shown
