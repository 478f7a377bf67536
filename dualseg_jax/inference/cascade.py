"""The coarse-to-fine cascade at prediction time: pancreas coarse on the whole volume, pancreas
fine in its region of interest, tumour coarse inside the pancreas region, tumour fine re-cropped
to its own result; the cascade spec (cascade.json) naming the four stage runs and their margins,
and the stage predictors it restores. Training the stages is experiments/cascade.py's."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Protocol, Sequence

import ml_collections
import numpy as np

from dualseg_jax import files
from dualseg_jax import run_dir
from dualseg_jax.data.volume import Volume
from dualseg_jax.errors import ConfigError
from dualseg_jax.inference import predictor as predictor_lib
from dualseg_jax.structures import CASCADE_STAGES, PANCREAS, TUMOUR

# Written by experiments.cascade.train_stages into the experiment folder; read by
# `launch.predict --cascade`.
SPEC_FILE = 'cascade.json'
MARGIN_KEYS = ('pancreas_margin_vox', 'tumour_coarse_margin_vox', 'tumour_margin_vox')
ROUNDS_KEY = 'tumour_rounds'


class StagePredictor(Protocol):
  def predict_volume(self, volume: Volume, tta_flips: int | None = None, progress=None,
                     pancreas_mask: np.ndarray | None = None) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class CascadeOutput:
  label: np.ndarray  # uint8 (D, H, W) 0/1/2 on the input's canonical grid
  notes: list[str]  # what the cascade could not do for this case (e.g. no pancreas found)
  boxes: dict[str, tuple[slice, slice, slice] | None]  # region each fine stage predicted in


def region_of_interest(mask: np.ndarray, margin_vox: Sequence[int]
                       ) -> tuple[slice, slice, slice] | None:
  """The bounding box of `mask` grown by `margin_vox` per axis, clipped to the array; None when
  the mask is empty."""
  if not mask.any():
    return None
  box = []
  for axis, margin in enumerate(margin_vox):
    other_axes = tuple(a for a in range(mask.ndim) if a != axis)
    present = np.flatnonzero(mask.any(axis=other_axes))
    box.append(slice(max(0, int(present[0]) - int(margin)),
                     min(mask.shape[axis], int(present[-1]) + 1 + int(margin))))
  return tuple(box)


def union_box(first, second):
  if first is None or second is None:
    return first or second
  return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second))


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
  """The box of a volume as a volume of its own (same spacing; geometry stays the source's: the
  crop is only predicted, never written)."""
  return dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[box]))


def _in_box(volume: Volume, predictor: StagePredictor, box, structure: int, tta_flips,
            pancreas_mask: np.ndarray | None = None) -> np.ndarray:
  """Boolean mask on the whole grid of `structure` predicted inside `box` only."""
  cropped_pancreas = None if pancreas_mask is None else pancreas_mask[box]
  label = predictor.predict_volume(crop(volume, box), tta_flips=tta_flips,
                                   pancreas_mask=cropped_pancreas)['label']
  full = np.zeros(volume.array.shape, dtype=bool)
  full[box] = label == structure
  return full


def cascade_predict(volume: Volume, predictors: dict[str, StagePredictor],
                    pancreas_margin_vox: Sequence[int], tumour_margin_vox: Sequence[int],
                    tta_flips: int | None = None,
                    tumour_coarse_margin_vox: Sequence[int] | None = None,
                    tumour_rounds: int = 1) -> CascadeOutput:
  """Runs the four stages on one canonical volume, as the reference does: pancreas coarse on the
  whole volume; pancreas fine inside its box + `pancreas_margin_vox`; tumour coarse inside the
  fine pancreas's box + `tumour_coarse_margin_vox` (default `tumour_margin_vox`); tumour fine
  inside the box of the tumour found so far + `tumour_margin_vox` (the pancreas box when the
  coarse stage found none), re-cropped to its own result for up to `tumour_rounds` rounds
  (fewer when the box stops changing or the tumour vanishes). An empty pancreas at any stage
  gives an empty pancreas and tumour and a note, never an error."""
  missing = [stage for stage in CASCADE_STAGES if stage not in predictors]
  if missing:
    raise ConfigError(f'the cascade needs a run for every stage; missing {missing}')
  if tumour_coarse_margin_vox is None:
    tumour_coarse_margin_vox = tumour_margin_vox
  notes = []
  boxes: dict[str, Any] = {'pancreas_fine': None, 'tumour_coarse': None, 'tumour_fine': None}
  empty = np.zeros(volume.array.shape, dtype=np.uint8)

  coarse = predictors['pancreas_coarse'].predict_volume(volume, tta_flips=tta_flips)['label'] >= PANCREAS
  pancreas_box = region_of_interest(coarse, pancreas_margin_vox)
  if pancreas_box is None:
    notes.append('pancreas_coarse found no pancreas: pancreas and tumour are left empty')
    return CascadeOutput(empty, notes, boxes)
  boxes['pancreas_fine'] = pancreas_box
  pancreas = _in_box(volume, predictors['pancreas_fine'], pancreas_box, PANCREAS, tta_flips)
  if not pancreas.any():
    notes.append(f'pancreas_fine found no pancreas in the region {_describe(pancreas_box)} of '
                 'pancreas_coarse: pancreas and tumour are left empty')
    return CascadeOutput(empty, notes, boxes)

  tumour_coarse_box = region_of_interest(pancreas, tumour_coarse_margin_vox)
  boxes['tumour_coarse'] = tumour_coarse_box
  tumour_coarse = _in_box(volume, predictors['tumour_coarse'], tumour_coarse_box, TUMOUR, tta_flips,
                          pancreas_mask=pancreas)
  # Tumour fine zooms onto what was found so far; with nothing found it looks at the pancreas.
  tumour_box = region_of_interest(tumour_coarse if tumour_coarse.any() else pancreas,
                                  tumour_margin_vox)
  tumour = np.zeros(volume.array.shape, dtype=bool)
  for _ in range(max(1, int(tumour_rounds))):
    boxes['tumour_fine'] = tumour_box
    tumour = _in_box(volume, predictors['tumour_fine'], tumour_box, TUMOUR, tta_flips,
                     pancreas_mask=pancreas)
    next_box = region_of_interest(tumour, tumour_margin_vox)
    if next_box is None or next_box == tumour_box:
      break
    tumour_box = next_box
  if not tumour_coarse.any() and not tumour.any():
    notes.append('no tumour found (coarse and fine)')
  label = np.zeros(volume.array.shape, dtype=np.uint8)
  label[pancreas] = PANCREAS
  label[tumour] = TUMOUR
  return CascadeOutput(label, notes, boxes)


def _describe(box) -> str:
  return '[' + ', '.join(f'{s.start}:{s.stop}' for s in box) + ']'


@dataclasses.dataclass(frozen=True)
class CascadeSpec:
  """The four trained stage runs of one cascade and the margins of its regions of interest."""
  stage_dirs: dict[str, pathlib.Path]  # stage -> its run directory (config.json, checkpoints/)
  pancreas_margin_vox: tuple[int, int, int]  # (z, y, x) around the coarse pancreas
  tumour_coarse_margin_vox: tuple[int, int, int]  # (z, y, x) around the fine pancreas
  tumour_margin_vox: tuple[int, int, int]  # (z, y, x) around the tumour found so far
  tumour_rounds: int  # how often tumour fine is re-cropped to its own result, at most
  source: pathlib.Path  # the folder or JSON file it was read from, for messages

  @classmethod
  def from_config(cls, stage_dirs: dict[str, pathlib.Path], experiments: ml_collections.ConfigDict,
                  source: pathlib.Path) -> 'CascadeSpec':
    return cls(stage_dirs={stage: pathlib.Path(stage_dirs[stage]) for stage in CASCADE_STAGES},
               pancreas_margin_vox=tuple(experiments.cascade_pancreas_margin_vox),
               tumour_coarse_margin_vox=tuple(experiments.cascade_tumour_coarse_margin_vox),
               tumour_margin_vox=tuple(experiments.cascade_tumour_margin_vox),
               tumour_rounds=_rounds(source, experiments.cascade_tumour_rounds), source=source)

  def predict(self, volume: Volume, predictors: dict[str, StagePredictor],
              tta_flips: int | None = None) -> CascadeOutput:
    return cascade_predict(volume, predictors, self.pancreas_margin_vox, self.tumour_margin_vox,
                           tta_flips=tta_flips, tumour_coarse_margin_vox=self.tumour_coarse_margin_vox,
                           tumour_rounds=self.tumour_rounds)


def write_spec(workdir: str | pathlib.Path, stage_dirs: dict[str, pathlib.Path],
               experiments: ml_collections.ConfigDict) -> pathlib.Path:
  """workdir/cascade.json: each stage's run directory relative to workdir where it lies inside
  (so the experiment folder can be moved or copied whole), the margins and the tumour rounds."""
  workdir = pathlib.Path(workdir)
  content: dict[str, Any] = {}
  for stage in CASCADE_STAGES:
    stage_dir = pathlib.Path(stage_dirs[stage])
    try:
      content[stage] = str(stage_dir.absolute().relative_to(workdir.absolute()))
    except ValueError:
      content[stage] = str(stage_dir.absolute())
  for key in MARGIN_KEYS:
    content[key] = [int(margin) for margin in experiments[f'cascade_{key}']]
  content[ROUNDS_KEY] = int(experiments.cascade_tumour_rounds)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json(workdir / SPEC_FILE, content)
  return workdir / SPEC_FILE


def read_spec(spec_path: str | pathlib.Path) -> CascadeSpec:
  """A cascade from an experiment folder (its cascade.json, else its four <stage>/ folders) or
  from a JSON file naming the four stage run directories (relative paths are taken from the
  file's folder) and optionally `pancreas_margin_vox`, `tumour_coarse_margin_vox` and
  `tumour_margin_vox` (z, y, x) and `tumour_rounds`.

  Settings the spec leaves out are those the pancreas_coarse run was configured with
  (config.experiments.cascade_*).
  """
  spec_path = pathlib.Path(spec_path)
  if spec_path.is_dir() and (spec_path / SPEC_FILE).is_file():
    spec_path = spec_path / SPEC_FILE
  if spec_path.is_dir():
    content: dict[str, Any] = {stage: stage for stage in CASCADE_STAGES}
    base_dir = spec_path
  elif spec_path.is_file():
    content = _read_spec_json(spec_path)
    base_dir = spec_path.parent
  else:
    raise ConfigError(f'--cascade={spec_path} does not exist: give the cascade experiment folder '
                      '(written by launch.cascade) or a JSON file naming the stage runs '
                      f'{CASCADE_STAGES}')
  stage_dirs = {}
  for stage in CASCADE_STAGES:
    stage_dir = base_dir / content[stage]  # an absolute path replaces base_dir
    if not stage_dir.is_dir():
      raise ConfigError(f'cascade spec {spec_path}: the {stage} run directory {stage_dir} does not '
                        f'exist; train the stage (python -m launch.cascade) or correct {stage!r}')
    if not (stage_dir / run_dir.CONFIG_FILE).is_file():
      raise ConfigError(f'cascade spec {spec_path}: the {stage} run directory {stage_dir} holds no '
                        f'config.json, so it is not a training run; correct {stage!r}')
    stage_dirs[stage] = stage_dir
  settings = {key: content.get(key) for key in MARGIN_KEYS + (ROUNDS_KEY,)}
  if any(value is None for value in settings.values()):
    trained = run_dir.load_config(stage_dirs['pancreas_coarse']).experiments
    for key in settings:
      if settings[key] is None:
        settings[key] = trained[f'cascade_{key}']
  return CascadeSpec(stage_dirs=stage_dirs, source=spec_path,
                     tumour_rounds=_rounds(spec_path, settings[ROUNDS_KEY]),
                     **{key: _margin(spec_path, key, settings[key]) for key in MARGIN_KEYS})


def _read_spec_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    content = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ConfigError(f'cascade spec {path} is not readable JSON ({error}); fix the file or give '
                      'the cascade experiment folder instead') from error
  if not isinstance(content, dict):
    raise ConfigError(f'cascade spec {path} must hold a JSON object with the keys {CASCADE_STAGES} '
                      f'(run directories) and optionally {MARGIN_KEYS + (ROUNDS_KEY,)}')
  known = CASCADE_STAGES + MARGIN_KEYS + (ROUNDS_KEY,)
  unknown = sorted(key for key in content if key not in known)
  if unknown:
    raise ConfigError(f'cascade spec {path}: unknown key {unknown[0]!r}; the keys are {known}')
  missing = [stage for stage in CASCADE_STAGES if stage not in content]
  if missing:
    raise ConfigError(f'cascade spec {path} lacks the run directory of the stage {missing[0]!r}; '
                      f'name all four stages {CASCADE_STAGES}')
  for stage in CASCADE_STAGES:
    if not isinstance(content[stage], str) or not content[stage]:
      raise ConfigError(f'cascade spec {path}: {stage!r} must be a run directory path (a string), '
                        f'not {content[stage]!r}')
  return content


def _margin(spec_path: pathlib.Path, key: str, value: Any) -> tuple[int, int, int]:
  """Three voxel counts (z, y, x), each a whole number >= 0."""
  def is_count(item):
    return (isinstance(item, (int, float)) and not isinstance(item, bool) and item >= 0
            and float(item).is_integer())
  if isinstance(value, (list, tuple)) and len(value) == 3 and all(map(is_count, value)):
    return tuple(int(item) for item in value)
  raise ConfigError(f'cascade spec {spec_path}: {key!r} = {value!r}; give three whole voxel counts '
                    '>= 0 in (z, y, x) order, e.g. [4, 12, 12]')


def _rounds(source, value: Any) -> int:
  if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
    return value
  raise ConfigError(f'{source}: tumour_rounds = {value!r}; give a whole number >= 1 (the reference '
                    're-crops tumour fine 4 times)')


def load_predictors(spec: CascadeSpec, checkpoint: str | None = None) -> dict[str, StagePredictor]:
  """Restores each stage's network; a run trained for another stage than the spec says is a
  ConfigError (its output channel would be read as the wrong structure)."""
  # Every stage is checked before any network is restored, so a wrong spec fails at once.
  for stage in CASCADE_STAGES:
    trained_stage = run_dir.load_config(spec.stage_dirs[stage]).stage
    if trained_stage != stage:
      raise ConfigError(f'cascade spec {spec.source}: {stage!r} names {spec.stage_dirs[stage]}, '
                        f'a run trained as stage {trained_stage!r}; give a {stage} run')
  return {stage: predictor_lib.load_predictor(spec.stage_dirs[stage], checkpoint=checkpoint)
          for stage in CASCADE_STAGES}
