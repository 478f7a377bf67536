"""A model folder, the way to share a trained network: its parameters only (no optimizer state),
the resolved config and a model card. `export_model` writes one from a run (launch.export);
`load_params` reads it back for prediction, without the training code.

Folder layout: params.msgpack (flax.serialization of the parameter tree), config.json (the run's
resolved config), model.json (source run, step, data, held-out means, sha256 of params.msgpack)
and model_card.md (the same, for people). model.json is written last: a folder holding it is
complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pathlib
from typing import Any

from absl import logging as absl_logging
import flax.serialization
import jax
import ml_collections
import numpy as np

from dualseg_jax import files
from dualseg_jax import run_dir
from dualseg_jax.errors import ConfigError, DataError

PARAMS_FILE = 'params.msgpack'
CONFIG_FILE = run_dir.CONFIG_FILE  # named as a run's, so run_dir.load_config reads both
MODEL_FILE = 'model.json'
CARD_FILE = 'model_card.md'
FORMAT = 'dualseg-jax model'
FORMAT_VERSION = 1
# The card's held-out table shows these means when the summary has them (others stay in model.json).
CARD_METRICS = ('dice', 'nsd', 'hd95_mm', 'assd_mm')


def is_model_dir(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / MODEL_FILE).is_file()


def num_parameters(params) -> int:
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


def held_out_means(workdir: str | pathlib.Path) -> dict | None:
  """The run's held-out evaluation (evaluation/test*/summary.json) reduced to the mean of each
  metric per structure over all cases, or None without one. Read defensively: a summary in
  another layout gives a note instead of a table, never an error."""
  paths = sorted((pathlib.Path(workdir) / 'evaluation').glob('test*/summary.json'))
  if not paths:
    return None
  path = paths[-1]
  held_out = {'summary': str(path.relative_to(workdir)),
              'center': path.parent.name.removeprefix('test_'), 'means': {}}
  try:
    summary = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    held_out['note'] = f'not readable ({error})'
    return held_out
  if isinstance(summary, dict) and isinstance(summary.get('num_cases'), int):
    held_out['num_cases'] = summary['num_cases']
  # Per structure, then per metric, a dict holding 'mean': under by_center/all, or at the top.
  table = summary.get('by_center', {}).get('all') if isinstance(summary, dict) else None
  if not isinstance(table, dict):
    table = summary if isinstance(summary, dict) else {}
  for structure, metrics in table.items():
    if not isinstance(metrics, dict):
      continue
    means = {metric: float(value['mean']) for metric, value in metrics.items()
             if isinstance(value, dict) and isinstance(value.get('mean'), (int, float))
             and not isinstance(value.get('mean'), bool)}
    if means:
      held_out['means'][structure] = means
  if not held_out['means']:
    held_out['note'] = 'no per-structure means found in this summary'
  return held_out


def export_model(workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                 checkpoint: str = 'best', overwrite: bool = False) -> dict:
  """Writes the parameters of the run's `checkpoint` ('best', falling back to the latest when no
  validation has run, or 'latest') with its config and a model card to `out_dir`; returns what
  model.json holds."""
  workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
  if checkpoint not in ('best', 'latest'):
    raise ConfigError(f'checkpoint = {checkpoint!r}: choose best or latest')
  if is_model_dir(workdir):
    raise ConfigError(f'{workdir} is an exported model already (it holds {MODEL_FILE}): share '
                      'that folder as it is, or export from its training run')
  if out_dir.resolve() == workdir.resolve():
    raise ConfigError(f'--out={out_dir} is the run itself: choose a new folder for the model')
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise DataError(f'{out_dir} exists and is not empty: choose a new --out folder, or pass '
                    '--overwrite to replace the model there')
  config = run_dir.load_config(workdir)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax narrates every restore
  try:
    params, step = run_dir.restore_params(workdir, which=checkpoint)
  finally:
    absl_logging.set_verbosity(verbosity)
  params = jax.tree.map(np.asarray, flax.serialization.to_state_dict(params))
  params_bytes = flax.serialization.msgpack_serialize(params)
  source_folder = ('best' if checkpoint == 'best' and (workdir / 'best' / str(step)).is_dir()
                   else 'checkpoints')
  checkpoint_bytes = run_dir.bytes_on_disk(workdir / source_folder / str(step))
  info = {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'exported': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'source_run': str(workdir.resolve()),
      'checkpoint': f'{source_folder}/{step}',
      'step': int(step),
      'stage': config.stage,
      'preset': config.preset,
      'data': _data_summary(config),
      'target_spacing_mm': list(config.data.target_spacing_mm),
      'patch_size': list(config.data.patch_size),
      'num_parameters': num_parameters(params),
      'params_bytes': len(params_bytes),
      'checkpoint_bytes': checkpoint_bytes,
      'params_sha256': hashlib.sha256(params_bytes).hexdigest(),
      'held_out': held_out_means(workdir),
  }
  with files.writing('the exported model', out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    # An overwritten folder is no model until its new model.json is written.
    (out_dir / MODEL_FILE).unlink(missing_ok=True)
    files.write_bytes(out_dir / PARAMS_FILE, params_bytes)
    files.write_json(out_dir / CONFIG_FILE, json.loads(config.to_json_best_effort()),
                     sort_keys=True)
    files.write_bytes(out_dir / CARD_FILE, model_card(info, out_dir).encode())
    files.write_json(out_dir / MODEL_FILE, info)
  return info


def _data_summary(config: ml_collections.ConfigDict) -> dict:
  data = config.data
  centers = list(data.centers)
  if data.fold < 0:
    trained_on = [center for center in centers if center != data.test_center]
    split = f'leave-one-center-out, held out: {data.test_center}'
  else:
    trained_on = centers
    split = f'in-domain fold {data.fold} of {data.num_folds}'
  return {'source': data.source, 'centers': centers, 'trained_on': trained_on,
          'test_center': data.test_center if data.fold < 0 else None, 'split': split}


def _format_number(value: float) -> str:
  if math.isinf(value) or math.isnan(value):
    return str(value)
  return f'{value:.3f}' if abs(value) < 100 else f'{value:.1f}'


def model_card(info: dict, out_dir: pathlib.Path) -> str:
  """model.json's content as markdown: what the network is, what it saw, how it scored."""
  data = info['data']
  channels = {'joint': 'pancreas (incl. tumour), tumour'}.get(
      info['stage'], 'tumour' if info['stage'].startswith('tumour') else 'pancreas')
  spacing = ' x '.join(f'{value:g}' for value in info['target_spacing_mm'])
  patch = ' x '.join(str(value) for value in info['patch_size'])
  lines = [
      f'# Model: {info["stage"]} stage, {info["preset"] or "custom"} preset',
      '',
      f'Exported {info["exported"]} from `{info["source_run"]}`, checkpoint '
      f'`{info["checkpoint"]}` (step {info["step"]}).',
      '',
      '| | |',
      '|---|---|',
      f'| output channels | {channels} |',
      f'| data | {data["source"]}; trained on {", ".join(data["trained_on"])}; {data["split"]} |',
      f'| spacing, patch | {spacing} mm (z, y, x); {patch} voxels |',
      f'| parameters | {info["num_parameters"]:,} ({files.format_bytes(info["params_bytes"])}; '
      f'the training checkpoint: {files.format_bytes(info["checkpoint_bytes"])}) |',
      f'| params.msgpack sha256 | `{info["params_sha256"]}` |',
      '',
  ]
  held_out = info['held_out']
  if held_out is None:
    lines += ['## Held-out evaluation', '',
              'None: the run has no evaluation/test*/summary.json.', '']
  else:
    cases = f', {held_out["num_cases"]} cases' if 'num_cases' in held_out else ''
    lines += [f'## Held-out evaluation ({held_out["center"]}{cases}; means over cases)', '',
              f'From the run\'s `{held_out["summary"]}`.', '']
    if held_out.get('note'):
      lines += [f'No table: {held_out["note"]}.', '']
    else:
      metrics = [metric for metric in CARD_METRICS
                 if any(metric in means for means in held_out['means'].values())]
      metrics = metrics or sorted({m for means in held_out['means'].values() for m in means})
      lines += ['| structure | ' + ' | '.join(metrics) + ' |',
                '|---|' + '---|' * len(metrics)]
      for structure, means in held_out['means'].items():
        cells = [_format_number(means[metric]) if metric in means else '' for metric in metrics]
        lines.append(f'| {structure} | ' + ' | '.join(cells) + ' |')
      lines.append('')
  lines += ['## Use', '', '```',
            f'python -m launch.predict --model={out_dir} --input=CT --output=PREDICTIONS', '```',
            '', 'Prediction settings (inference.*) can be changed at predict time, e.g. '
            '`--override=inference.tta_flips=1`; several models, e.g. one per fold, are averaged '
            'with `--model=A,B,C`.', '']
  return '\n'.join(lines)


def read_info(model_dir: str | pathlib.Path) -> dict:
  """model.json of an exported model, checked for its format."""
  path = pathlib.Path(model_dir) / MODEL_FILE
  try:
    info = json.loads(path.read_text())
  except FileNotFoundError:
    raise DataError(f'{path} does not exist: {model_dir} is not an exported model (launch.export '
                    'writes one)') from None
  except (OSError, ValueError) as error:
    raise DataError(f'{path} is not readable JSON ({error}): export the model again') from error
  if not isinstance(info, dict) or info.get('format') != FORMAT:
    raise DataError(f'{path} is not a {FORMAT} description: export the model again')
  if info.get('format_version', 0) > FORMAT_VERSION:
    raise DataError(f'{model_dir} has model format {info["format_version"]}, newer than this '
                    f'code reads ({FORMAT_VERSION}): update dualseg-jax')
  return info


def load_params(model_dir: str | pathlib.Path) -> tuple[Any, dict]:
  """(parameters as NumPy arrays, model.json) of an exported model; the parameters' bytes are
  checked against the sha256 written at export."""
  model_dir = pathlib.Path(model_dir)
  info = read_info(model_dir)
  path = model_dir / PARAMS_FILE
  try:
    params_bytes = path.read_bytes()
  except OSError as error:
    raise DataError(f'cannot read {path} ({error}): copy the model folder again') from error
  if hashlib.sha256(params_bytes).hexdigest() != info.get('params_sha256'):
    raise DataError(f'{path} differs from the file exported (its sha256 is not the one in '
                    f'{MODEL_FILE}): copy the model folder again, or export it again')
  return flax.serialization.msgpack_restore(params_bytes), info
