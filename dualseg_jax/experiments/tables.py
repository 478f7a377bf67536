"""Writing experiment tables: rows of named cells as Markdown (numbers as mean ± std) and CSV."""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any, Sequence

import numpy as np


def mean_and_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
  """Mean and population std over the finite values, and how many there were."""
  finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not finite:
    return None, None, 0
  return float(np.mean(finite)), float(np.std(finite)), len(finite)


def format_cell(mean: float | None, std: float | None = None, scale: float = 1.0,
                digits: int = 4, signed: bool = False) -> str:
  if mean is None:
    return 'n/a'
  sign = '+' if signed else ''
  text = f'{mean * scale:{sign}.{digits}f}'
  if std is not None:
    text += f' ± {std * scale:.{digits}f}'
  return text


def markdown(columns: list[str], rows: list[list[Any]]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with path.open('w', newline='') as file:
    writer = csv.DictWriter(file, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({key: _csv_value(value) for key, value in row.items()})


def _csv_value(value: Any) -> Any:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.6g}'
  return value
