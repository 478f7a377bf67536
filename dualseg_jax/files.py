"""Atomic file writes: a killed run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from dualseg_jax.errors import DataError


def write_bytes(path: str | pathlib.Path, data: bytes) -> None:
  """Writes `data` to a hidden sibling, then renames it over `path`; a DataError names the path
  when the folder cannot be written."""
  path = pathlib.Path(path)
  partial = path.with_name(f'.{path.name}.partial')
  try:
    partial.write_bytes(data)
    os.replace(partial, path)
  except OSError as error:
    partial.unlink(missing_ok=True)
    raise DataError(f'cannot write {path} ({error}): check that the folder exists, is writable '
                    'and has free space') from error


def write_json(path: str | pathlib.Path, content: Any, sort_keys: bool = False) -> None:
  """`content` as indented JSON (values JSON cannot hold are written as their str)."""
  text = json.dumps(content, indent=2, sort_keys=sort_keys, default=str) + '\n'
  write_bytes(path, text.encode())
