"""Prediction settings changed at predict time: `inference.KEY=VALUE` texts (launch.predict's
--override) applied to a loaded config, each value parsed as the type the key already holds and
checked before any network is restored.
"""

from __future__ import annotations

import copy
import difflib
from typing import Sequence

import ml_collections

from dualseg_jax.errors import ConfigError
from dualseg_jax.inference import postprocess
from dualseg_jax.inference import sliding_window

SECTION = 'inference'
_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')
_KIND_NAMES = {int: 'an integer', float: 'a number'}


def parse(texts: Sequence[str], inference_config: ml_collections.ConfigDict) -> dict:
  """`['inference.overlap=0.25', ...]` -> {'overlap': 0.25, ...}: each key must exist under
  `inference_config`, each value is parsed as the type of its current value."""
  overrides = {}
  for text in texts:
    dotted_key, separator, value = text.partition('=')
    dotted_key = dotted_key.strip()
    if not separator or not dotted_key:
      raise ConfigError(f'--override {text!r}: write inference.KEY=VALUE '
                        '(e.g. inference.overlap=0.25)')
    section, _, key = dotted_key.partition('.')
    if section != SECTION or not key or '.' in key:
      raise ConfigError(f'--override {dotted_key}: only inference.* settings can change at '
                        'predict time (the network, its data settings and its training are fixed '
                        f'by the model); inference keys: {", ".join(sorted(inference_config))}')
    if key not in inference_config:
      close = difflib.get_close_matches(key, list(inference_config), n=1)
      advice = f'did you mean {SECTION}.{close[0]}? ' if close else ''
      raise ConfigError(f'--override {dotted_key}: no such key; {advice}inference keys: '
                        f'{", ".join(sorted(inference_config))}')
    overrides[key] = _parse_value(dotted_key, value.strip(), inference_config[key])
  return overrides


def _parse_value(dotted_key: str, text: str, current):
  if isinstance(current, bool):  # before int: a bool is an int
    if text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise ConfigError(f'--override {dotted_key}={text}: give true or false')
  try:
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError:
    raise ConfigError(f'--override {dotted_key}={text}: give {_KIND_NAMES[type(current)]} '
                      f'(the model has {current!r})') from None
  return text


def apply(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` (from `parse`) set under config.inference, checked."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    config.inference[key] = value
  check(config.inference)
  return config


def check(inference_config: ml_collections.ConfigDict) -> None:
  """Impossible prediction settings fail here, naming the key: before a network is restored
  (launch.predict) or before any data is read (training, whose validation predicts)."""
  settings = inference_config
  sliding_window.check_settings(settings.overlap, settings.windows_per_batch)
  sliding_window.flip_combinations(settings.tta_flips)
  postprocess.check_rule(settings.postprocess)
  if not 0.0 < settings.threshold < 1.0:
    raise ConfigError(f'inference.threshold = {settings.threshold}: choose a probability in (0, 1)')
  if settings.checkpoint not in ('best', 'latest'):
    raise ConfigError(f'inference.checkpoint = {settings.checkpoint!r}: choose best or latest')
