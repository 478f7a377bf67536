"""The coarse-to-fine cascade: pancreas coarse -> pancreas fine in its region of interest ->
tumour coarse -> tumour fine inside the pancreas region; training the four stages in order,
the cascade spec (cascade.json) naming the four runs, and predicting and evaluating with them."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable, Protocol, Sequence

import ml_collections
import numpy as np

from dualseg_jax import files
from dualseg_jax.data.volume import Volume
from dualseg_jax.errors import ConfigError
from dualseg_jax.experiments import runs

log = logging.getLogger('dualseg_jax')

CASCADE_STAGES = ('pancreas_coarse', 'pancreas_fine', 'tumour_coarse', 'tumour_fine')
PANCREAS, TUMOUR = 1, 2
# Written by train_stages into the experiment folder; read by `launch.predict --cascade`.
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


CASCADE_RECIPES = ('reference', 'uniform')
# Crops of the reference's training scripts: (in-plane voxel margin range, z margin range as a
# share of the slices, the structure whose box they grow).
_REFERENCE_CROPS = {
    'pancreas_fine': ((20, 20), (0.05, 0.05), 'pancreas'),
    'tumour_coarse': ((0, 30), (0.01, 0.1), 'pancreas'),
    'tumour_fine': ((-5, 40), (0.01, 0.1), 'tumour'),
}


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The config of one cascade stage: one output channel, the fine patch size for fine stages,
  the slice-classification head for the fine tumour stage, and with
  `experiments.cascade_recipe='reference'` the reference's per-stage resolution, crops, losses
  and views (docs/fidelity.md)."""
  if stage not in CASCADE_STAGES:
    raise ConfigError(f'stage {stage!r} is not a cascade stage {CASCADE_STAGES}')
  recipe = config.experiments.cascade_recipe
  if recipe not in CASCADE_RECIPES:
    raise ConfigError(f'experiments.cascade_recipe={recipe!r}: choose one of {CASCADE_RECIPES}')
  overrides: dict[str, Any] = {'stage': stage, 'model.num_classes': 1}
  fine_patch = tuple(config.experiments.cascade_fine_patch_size)
  if stage.endswith('_fine') and fine_patch:
    overrides['data.patch_size'] = fine_patch
  if stage == 'tumour_fine':
    overrides['model.slice_head'] = True
    overrides['loss.weights.slice_bce'] = 1.0
  if recipe == 'uniform':
    if stage.endswith('_fine'):
      overrides['loss.consistency_on_sdf'] = True
    return runs.with_overrides(config, overrides)

  if stage.startswith('pancreas_'):
    # The SDF terms belong to the reference's tumour stages only.
    overrides['loss.weights.sdf_l1'] = 0.0
    overrides['loss.weights.sdf_to_mask_dice'] = 0.0
    overrides['loss.consistency_on_sdf'] = False
    overrides['augment.elastic_prob'] = 0.5  # the reference's pancreas stages (tumour: 0.1)
  if stage == 'pancreas_coarse':
    factor = tuple(float(f) for f in config.experiments.cascade_coarse_spacing_factor)
    if len(factor) != 3 or any(f <= 0 for f in factor):
      raise ConfigError(f'experiments.cascade_coarse_spacing_factor={factor}: give three positive '
                        'factors (z, y, x), e.g. (1, 2, 2) for half the in-plane resolution')
    overrides['data.target_spacing_mm'] = tuple(
        s * f for s, f in zip(config.data.target_spacing_mm, factor))
    overrides['loss.consistency_form'] = 'cosine'
  elif stage == 'pancreas_fine':
    overrides['loss.weights.consistency'] = 0.0
    overrides['augment.raw_view'] = True
  else:
    overrides['loss.consistency_form'] = 'mse'
    overrides['loss.consistency_on_sdf'] = stage == 'tumour_fine'
  if stage in _REFERENCE_CROPS:
    margin_xy, margin_z, structure = _REFERENCE_CROPS[stage]
    overrides['data.crop_margin_xy'] = margin_xy
    overrides['data.crop_margin_z_fraction'] = margin_z
    overrides['data.roi_structure'] = structure
    # These stages only ever predict inside the box of the stage before them.
    overrides['data.random_patch_fraction'] = 0.0
  return runs.with_overrides(config, overrides)


def train_stages(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 train_fn: Callable | None = None) -> dict[str, pathlib.Path]:
  """Trains the four stages in order in workdir/<stage> (finished ones are not redone); the
  stages skip their own held-out evaluation, which only the whole cascade is given. Then writes
  workdir/cascade.json, so `launch.predict --cascade=workdir` finds the stages and margins."""
  specs = []
  for stage in CASCADE_STAGES:
    stage_overrides = {k: v for k, v in _flat_differences(config, stage_config(config, stage)).items()}
    stage_overrides['train.evaluate_test_center'] = False
    specs.append(runs.RunSpec(name=stage, overrides=stage_overrides))
  stage_dirs = runs.run_all(config, workdir, specs, train_fn=train_fn)
  write_spec(workdir, stage_dirs, config.experiments)
  return stage_dirs


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
    if not (stage_dir / 'config.json').is_file():
      raise ConfigError(f'cascade spec {spec_path}: the {stage} run directory {stage_dir} holds no '
                        f'config.json, so it is not a training run; correct {stage!r}')
    stage_dirs[stage] = stage_dir
  settings = {key: content.get(key) for key in MARGIN_KEYS + (ROUNDS_KEY,)}
  if any(value is None for value in settings.values()):
    from dualseg_jax.inference import predictor as predictor_lib  # deferred: imports jax
    trained = predictor_lib.load_config(stage_dirs['pancreas_coarse']).experiments
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
  from dualseg_jax.inference import predictor as predictor_lib  # deferred: imports jax
  # Every stage is checked before any network is restored, so a wrong spec fails at once.
  for stage in CASCADE_STAGES:
    trained_stage = predictor_lib.load_config(spec.stage_dirs[stage]).stage
    if trained_stage != stage:
      raise ConfigError(f'cascade spec {spec.source}: {stage!r} names {spec.stage_dirs[stage]}, '
                        f'a run trained as stage {trained_stage!r}; give a {stage} run')
  return {stage: predictor_lib.load_predictor(spec.stage_dirs[stage], checkpoint=checkpoint)
          for stage in CASCADE_STAGES}


def _flat_differences(base: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> dict:
  def flatten(tree, prefix=''):
    flat = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        flat.update(flatten(value, f'{prefix}{key}.'))
      else:
        flat[f'{prefix}{key}'] = value
    return flat
  base_flat, other_flat = flatten(base.to_dict()), flatten(other.to_dict())
  return {key: value for key, value in other_flat.items() if base_flat.get(key) != value}


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             stage_dirs: dict[str, pathlib.Path]) -> dict | None:
  """Predicts the held-out cases with the cascade and scores them: workdir/evaluation/ holds
  predictions/ (input geometry), ground_truth/ and images/ (links), notes.json, summary.json."""
  from dualseg_jax.data import io
  from dualseg_jax.data import pipeline
  from dualseg_jax.data import registry
  from dualseg_jax.evaluation import report
  workdir = pathlib.Path(workdir)
  evaluation_config = stage_config(config, 'tumour_fine')
  with evaluation_config.unlocked():
    pipeline.resolve_data_root(evaluation_config)
  split = registry.split_cases(evaluation_config.data, registry.list_cases(evaluation_config.data),
                               seed=evaluation_config.seed)
  # The first evaluation records the data; a later one refuses data changed since.
  pipeline.check_data_identity(evaluation_config, split, workdir)
  cases = [case for case in split.test if case.label_path]
  if not cases:
    log.warning('no labelled test cases for the cascade to evaluate')
    return None
  spec = CascadeSpec.from_config(stage_dirs, config.experiments, source=workdir)
  predictors = load_predictors(spec)
  out_dir = workdir / 'evaluation'
  (out_dir / 'predictions').mkdir(parents=True, exist_ok=True)
  notes = {}
  for case in cases:
    volume = io.read_volume(case.image_path)
    output = spec.predict(volume, predictors)
    io.write_nifti(output.label, volume.geometry, out_dir / 'predictions' / f'{case.case_id}.nii.gz',
                   dtype=np.uint8)
    notes[case.case_id] = output.notes
    for note in output.notes:
      log.warning('%s: %s', case.case_id, note)
  files.write_json(out_dir / 'notes.json', notes)
  for case in cases:
    _link(case.label_path, out_dir / 'ground_truth', case.case_id)
    _link(case.image_path, out_dir / 'images', case.case_id)
  summary = report.evaluate_folder(
      out_dir / 'predictions', out_dir / 'ground_truth', out_dir,
      centers={case.case_id: case.center for case in cases}, images_dir=out_dir / 'images',
      nsd_tolerance_mm=config.evaluation.nsd_tolerance_mm, gt_label_map=config.data.label_map or None)
  summary['notes'] = notes
  return summary


def _link(source: str, folder: pathlib.Path, case_id: str) -> None:
  """folder/<case_id><suffix of source> -> source, so the evaluation matches files by case name."""
  from dualseg_jax.data import io
  folder.mkdir(parents=True, exist_ok=True)
  link = folder / (case_id + io.volume_suffix(source))
  if link.is_symlink() or link.exists():
    link.unlink()
  link.symlink_to(pathlib.Path(source).absolute())
