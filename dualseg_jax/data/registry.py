"""Which cases exist (MSD folders, manifests), which center each belongs to, how they split into
train/val/test (leave-one-center-out or k-fold), and a check of every case before training."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import zlib

import numpy as np

from dualseg_jax.data import io
from dualseg_jax.errors import ConfigError, DataError

SOURCES = ('synthetic', 'msd', 'folders')
MANIFEST_COLUMNS = ('center', 'case_id', 'image', 'label')
# A run's folds in nnU-Net's splits_final.json format, written into its workdir.
SPLITS_FILE = 'splits.json'
_MANIFEST_SUFFIXES = ('.csv', '.json')


@dataclasses.dataclass(frozen=True)
class Case:
  """One CT and its label; paths are absolute strings so a Case survives serialisation."""

  center: str
  case_id: str
  image_path: str
  label_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Split:
  train: list[Case]
  val: list[Case]
  test: list[Case]

  def summary(self) -> str:
    def describe(cases):
      counts = {}
      for case in cases:
        counts[case.center] = counts.get(case.center, 0) + 1
      return ', '.join(f'{center} {count}' for center, count in sorted(counts.items())) or 'none'
    return (f'train: {describe(self.train)}; val: {describe(self.val)}; '
            f'test: {describe(self.test)}')


# --- Discovery ---------------------------------------------------------------------------------

def _strip_suffix(name: str) -> str:
  return name[:len(name) - len(io.volume_suffix(name))]


def _is_volume_file(path: pathlib.Path) -> bool:
  # macOS leaves `._name` shadow files beside every file of the MSD archives.
  return (path.is_file() and not path.name.startswith('.')
          and any(path.name.lower().endswith(s) for s in io.VOLUME_SUFFIXES))


def _with_channel_suffix(path: pathlib.Path) -> pathlib.Path:
  """pancreas_001.nii.gz -> pancreas_001_0000.nii.gz (the nnU-Net name of the same image)."""
  stem = _strip_suffix(path.name)
  return path.with_name(stem + io.CHANNEL_SUFFIX + path.name[len(stem):])


def discover_center(root: str | os.PathLike, center: str | None = None) -> list[Case]:
  """Cases of one center stored in MSD/nnU-Net layout (imagesTr/, labelsTr/, dataset.json).

  dataset.json's 'training' list is used when present; otherwise images in imagesTr/ are paired
  with the label of the same case id in labelsTr/ (images may carry nnU-Net's `_0000` suffix).
  A root holding `manifest.csv` or `manifest.json` instead is read as a manifest. Images
  without a label get `label_path=None`.
  """
  root = pathlib.Path(root).resolve()
  center = center or root.name
  if not root.is_dir():
    raise DataError(f'data folder {root} for center {center!r} does not exist: check the path')
  for name in ('manifest.csv', 'manifest.json'):
    if (root / name).is_file():
      listed = read_manifest(root / name, center)
      return [dataclasses.replace(case, center=center) for case in listed]
  dataset_json = root / 'dataset.json'
  if dataset_json.is_file():
    cases = _cases_from_dataset_json(dataset_json, center)
    if cases is not None:
      return cases
  images_folder, labels_folder = root / 'imagesTr', root / 'labelsTr'
  if not images_folder.is_dir():
    raise DataError(
        f'{root} (center {center!r}) has neither imagesTr/ nor dataset.json nor a manifest: '
        'give a folder in MSD layout (imagesTr/, labelsTr/) or a CSV/JSON manifest')
  labels = {}
  if labels_folder.is_dir():
    labels = {_strip_suffix(p.name): p for p in labels_folder.iterdir() if _is_volume_file(p)}
  cases = []
  for image in sorted(p for p in images_folder.iterdir() if _is_volume_file(p)):
    case_id = io.case_id_from_path(image)
    label = labels.get(case_id)
    cases.append(Case(center, case_id, str(image), str(label) if label else None))
  if not cases:
    raise DataError(f'{images_folder} holds no NIfTI/NRRD images (center {center!r})')
  return cases


def _cases_from_dataset_json(path: pathlib.Path, center: str) -> list[Case] | None:
  try:
    description = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise DataError(f'{path} cannot be read as JSON ({error}): fix or remove it') from error
  entries = description.get('training') if isinstance(description, dict) else None
  if not entries:
    return None  # nnU-Net v2 dataset.json lists no files: pair the folders instead
  cases = []
  for entry in entries:
    if not isinstance(entry, dict) or 'image' not in entry:
      raise DataError(f"{path}: 'training' entry {entry!r} has no 'image': fix the file")
    image = (path.parent / entry['image']).resolve()
    if not image.exists() and _with_channel_suffix(image).exists():
      image = _with_channel_suffix(image)
    label = (path.parent / entry['label']).resolve() if entry.get('label') else None
    cases.append(Case(center, io.case_id_from_path(image), str(image),
                      str(label) if label else None))
  return cases


def read_manifest(path: str | os.PathLike, default_center: str | None = None) -> list[Case]:
  """Cases listed in a CSV (columns center,case_id,image,label) or a JSON list of such dicts.

  Relative paths are taken from the manifest's folder; an empty label means no label; a missing
  case_id is the image's file name without suffix.
  """
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise DataError(f'manifest {path} does not exist: check data.manifest / data.center_roots')
  try:
    if path.suffix.lower() == '.csv':
      with open(path, newline='') as file:
        rows = list(csv.DictReader(file))
    elif path.suffix.lower() == '.json':
      rows = json.loads(path.read_text())
      if isinstance(rows, dict) and 'cases' in rows:
        rows = rows['cases']
    else:
      raise DataError(f'manifest {path}: give a .csv or .json file')
  except (OSError, ValueError, csv.Error) as error:
    if isinstance(error, DataError):
      raise
    raise DataError(f'manifest {path} cannot be read ({error}): fix the file') from error
  if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
    raise DataError(f'manifest {path} must be a list of rows with columns {MANIFEST_COLUMNS}')
  cases = []
  for number, row in enumerate(rows, start=1):
    row = {str(key).strip().lower(): (value or '') for key, value in row.items() if key}
    center = str(row.get('center', '')).strip() or default_center
    image = str(row.get('image', '')).strip()
    if not center or not image:
      raise DataError(
          f"manifest {path}, row {number}: needs 'center' and 'image' (columns "
          f'{MANIFEST_COLUMNS}), got {row}')
    image_path = (path.parent / image).resolve()
    label = str(row.get('label', '')).strip()
    label_path = str((path.parent / label).resolve()) if label else None
    case_id = str(row.get('case_id', '')).strip() or io.case_id_from_path(image_path)
    cases.append(Case(center, case_id, str(image_path), label_path))
  duplicates = _duplicates([(c.center, c.case_id) for c in cases])
  if duplicates:
    raise DataError(f'manifest {path} lists (center, case_id) more than once: {duplicates}')
  return cases


def _duplicates(keys: list) -> list:
  seen, repeated = set(), []
  for key in keys:
    if key in seen and key not in repeated:
      repeated.append(key)
    seen.add(key)
  return repeated


def _read_center_source(location: str, center: str) -> list[Case]:
  path = pathlib.Path(location)
  if path.suffix.lower() in _MANIFEST_SUFFIXES and not path.is_dir():
    return [case for case in read_manifest(path, center) if case.center == center]
  return discover_center(path, center)


def list_cases(data_config) -> dict[str, list[Case]]:
  """Every case of every center named in data.centers, keyed by center, in data.centers order."""
  source = data_config.source
  centers = tuple(data_config.centers)
  if not centers:
    raise ConfigError('data.centers is empty: name at least one center')
  duplicates = _duplicates(list(centers))
  if duplicates:
    raise ConfigError(f'data.centers names {duplicates} more than once: {centers}')
  center_roots = dict(data_config.center_roots.items()) if data_config.center_roots else {}
  root = str(data_config.root or '')
  if source == 'synthetic':
    if not root:
      raise ConfigError(
          'data.root is empty: set it to the folder the synthetic phantoms were written to '
          '(one subfolder per center)')
    cases = {c: discover_center(center_roots.get(c) or pathlib.Path(root) / c, c) for c in centers}
  elif source == 'msd':
    if not root:
      raise ConfigError("data.root is empty: with data.source='msd' it must be the Task07 folder "
                        '(holding dataset.json, imagesTr/, labelsTr/)')
    others = [c for c in centers[1:] if c not in center_roots]
    if others:
      raise ConfigError(
          f"data.source='msd' reads one center, data.centers[0]={centers[0]!r}, from data.root; "
          f'data.centers also names {others} without data.center_roots entries: list only the '
          'MSD center in data.centers, or give data.center_roots for the others')
    cases = {centers[0]: discover_center(root, centers[0])}
    cases.update({c: _read_center_source(center_roots[c], c) for c in centers[1:]})
  elif source == 'folders':
    manifest_cases = {}
    if data_config.manifest:
      for case in read_manifest(data_config.manifest):
        manifest_cases.setdefault(case.center, []).append(case)
    without_data = [c for c in centers if not center_roots.get(c) and c not in manifest_cases]
    if without_data:
      raise ConfigError(
          f'centers {without_data} (in data.centers) have no data: set '
          + ', '.join(f'data.center_roots.{c}' for c in without_data)
          + ' to a folder or manifest, or list them in data.manifest'
          + (f' (which names centers {sorted(manifest_cases)})' if data_config.manifest else ''))
    cases = {c: (_read_center_source(center_roots[c], c) if center_roots.get(c)
                 else manifest_cases[c]) for c in centers}
  else:
    raise ConfigError(f'data.source is {source!r}; choose one of {SOURCES}')
  for center, center_cases in cases.items():
    if not center_cases:
      raise DataError(f'center {center!r} has no cases: check its folder or manifest')
  return cases


# --- Label numbering from dataset.json ----------------------------------------------------------

# Label names (lower case) meaning the tumour; others holding 'pancrea' mean the pancreas.
_TUMOUR_NAMES = ('cancer', 'tumour', 'tumor', 'lesion')


def _label_value(value) -> int:
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f'{value!r} is not a label value')
  return value


def _names_tumour(name: str) -> bool:
  return any(word in name for word in _TUMOUR_NAMES)


def label_map_from_dataset_json(path: str | os.PathLike) -> str | None:
  """data.label_map for the labels a dataset.json names, MSD's {"1": "pancreas", "2": "cancer"}
  or nnU-Net's {"pancreas": 1, "cancer": 2}: '' when they are numbered 0/1/2 already, None when
  the file names no labels or none that is the pancreas or a tumour (the labels are then taken
  as they are, as before dataset.json was read).

  Other structures become background. In an nnU-Net region such as {"pancreas": [1, 2],
  "cancer": 2} the values a tumour label claims stay tumour.
  """
  path = pathlib.Path(path)
  try:
    description = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise DataError(f'{path} cannot be read as JSON ({error}): fix or remove it') from error
  labels = description.get('labels') if isinstance(description, dict) else None
  if not labels:
    return None
  try:
    named = []  # (lower-case name, label values)
    for key, value in dict(labels).items():
      if isinstance(value, str):  # MSD: value -> name
        named.append((value.lower(), [_label_value(key)]))
      else:  # nnU-Net: name -> value, or a region's list of values
        values = value if isinstance(value, (list, tuple)) else [value]
        named.append((str(key).lower(), [_label_value(v) for v in values]))
  except (TypeError, ValueError) as error:
    raise DataError(f"{path}: 'labels' {labels!r} cannot be read ({error}); write them as "
                    '{"background": 0, "pancreas": 1, "cancer": 2}') from error
  tumour = {v for name, values in named if _names_tumour(name) for v in values} - {0}
  pancreas = {v for name, values in named
              if 'pancrea' in name and not _names_tumour(name) for v in values} - tumour - {0}
  if not tumour and not pancreas:
    return None
  mapping = {**{value: 1 for value in pancreas}, **{value: 2 for value in tumour}}
  listed = {value for _, values in named for value in values} - {0}
  if all(mapping.get(value) == value for value in listed):
    return ''
  return ','.join(f'{source}:{target}' for source, target in sorted(mapping.items()))


def _center_folders(data_config) -> dict[str, pathlib.Path | None]:
  """The folder each center of data.centers is read from; None for a center read from a
  manifest (list_cases decides the same way)."""
  centers = tuple(data_config.centers)
  center_roots = dict(data_config.center_roots.items()) if data_config.center_roots else {}
  root = str(data_config.root or '')
  locations = {c: center_roots.get(c) for c in centers}
  if data_config.source == 'synthetic' and root:
    locations = {c: center_roots.get(c) or pathlib.Path(root) / c for c in centers}
  elif data_config.source == 'msd' and root and centers:
    locations[centers[0]] = root
  folders = {}
  for center, location in locations.items():
    folder = pathlib.Path(location) if location else None
    read_as_folder = folder is not None and folder.is_dir() and not any(
        (folder / name).is_file() for name in ('manifest.csv', 'manifest.json'))
    folders[center] = folder if read_as_folder else None
  return folders


def dataset_label_map(data_config) -> tuple[str, list[pathlib.Path]]:
  """data.label_map as the centers' dataset.json files number their labels, and the files read.

  '' when every file numbers them 0/1/2 already (or none names labels). One data.label_map serves
  every center, so a renumbering is used only when every center's dataset.json asks for that same
  one; otherwise a ConfigError lists what each center asks for.
  """
  asked, sources = {}, []  # center -> its map; None: not described, 0/1/2 unless others renumber
  for center, folder in _center_folders(data_config).items():
    path = folder / 'dataset.json' if folder is not None else None
    asked[center] = label_map_from_dataset_json(path) if path and path.is_file() else None
    if asked[center] is not None:
      sources.append(path)
  renumbered = {map_ for map_ in asked.values() if map_}
  if not renumbered:
    return '', sources
  if len(renumbered) > 1 or None in asked.values() or '' in asked.values():
    described = ', '.join(
        f'{center}: ' + (repr(map_) if map_ else ('0/1/2 as they are' if map_ == '' else
                                                   'no dataset.json labels naming the pancreas'))
        for center, map_ in asked.items())
    raise ConfigError(
        f'the centers number their labels differently ({described}; read from '
        f'{", ".join(str(path) for path in sources)}); data.label_map is one map for every '
        'center: renumber the labels of some centers, or set data.label_map explicitly')
  return renumbered.pop(), sources


# --- Splits ------------------------------------------------------------------------------------

def _center_rng(seed: int, center: str, purpose: str) -> np.random.Generator:
  # Keyed by center name, so a center's split does not depend on which other centers exist.
  return np.random.default_rng(
      [int(seed), zlib.crc32(center.encode()), zlib.crc32(purpose.encode())])


def _shuffled(cases: list[Case], seed: int, center: str, purpose: str) -> list[Case]:
  ordered = sorted(cases, key=lambda case: case.case_id)
  permutation = _center_rng(seed, center, purpose).permutation(len(ordered))
  return [ordered[i] for i in permutation]


def _split_off_validation(cases_by_center: dict[str, list[Case]], val_fraction: float,
                          seed: int) -> tuple[list[Case], list[Case]]:
  train, val = [], []
  for center, cases in cases_by_center.items():
    shuffled = _shuffled(cases, seed, center, 'validation')
    num_val = int(round(val_fraction * len(shuffled)))
    if val_fraction > 0 and len(shuffled) >= 2:
      num_val = min(max(num_val, 1), len(shuffled) - 1)
    val.extend(shuffled[:num_val])
    train.extend(shuffled[num_val:])
  return train, val


def split_cases(data_config, cases_by_center: dict[str, list[Case]], seed: int = 2022) -> Split:
  """Train/val/test cases: leave-one-center-out (data.fold == -1) or in-domain fold data.fold.

  Pass the run's config.seed as `seed`; the split is a function of (cases, config, seed) only.
  Leave-one-center-out: test is every case of data.test_center, and train/val come from the other
  centers in data.centers, data.val_fraction of each center for validation (at least one case
  per center of two or more). k-fold: the cases of all data.centers are dealt into data.num_folds
  folds per center; fold data.fold is the test set and val is taken from the rest in the same way.
  With data.splits_file (nnU-Net's splits_final.json) the folds are the file's: fold data.fold's
  "val" cases are the test set (nnU-Net's held-out fold), its "train" cases give train and val.
  """
  centers = tuple(data_config.centers)
  missing = [c for c in centers if c not in cases_by_center]
  if missing:
    raise ConfigError(f'data.centers names {missing}, for which no cases were listed')
  val_fraction = float(data_config.val_fraction)
  if not 0.0 <= val_fraction < 1.0:
    raise ConfigError(f'data.val_fraction is {val_fraction}; it must lie in [0, 1)')
  fold, num_folds = int(data_config.fold), int(data_config.num_folds)
  splits_file = str(data_config.get('splits_file') or '')
  if splits_file and fold == -1:
    raise ConfigError(
        f'data.splits_file={splits_file!r} gives in-domain folds, but data.fold is -1 '
        '(leave-one-center-out): set data.fold to the fold of the file to train')
  if fold == -1:
    test_center = data_config.test_center
    if test_center not in centers:
      raise ConfigError(
          f'data.test_center is {test_center!r}; choose one of the known centers {centers} '
          '(data.centers)')
    training_centers = [c for c in centers if c != test_center]
    if not training_centers:
      raise ConfigError(
          f'data.centers {centers} leaves no training center besides data.test_center '
          f'{test_center!r}: add centers, or use an in-domain fold (data.fold >= 0)')
    test = sorted(cases_by_center[test_center], key=lambda case: case.case_id)
    train, val = _split_off_validation(
        {c: cases_by_center[c] for c in training_centers}, val_fraction, seed)
    description = f'leave-one-center-out (data.test_center={test_center!r})'
  else:
    if num_folds < 2:
      raise ConfigError(f'data.num_folds is {num_folds}; k-fold needs at least 2 folds')
    if not 0 <= fold < num_folds:
      raise ConfigError(
          f'data.fold is {fold}; choose -1 (leave-one-center-out) or 0..{num_folds - 1} '
          f'(data.num_folds={num_folds})')
    if splits_file:
      trained, test = _fold_of_splits_file(
          splits_file, fold, num_folds, {c: cases_by_center[c] for c in centers})
      description = f'fold {fold} of {splits_file} (data.splits_file)'
    else:
      folds = fold_assignment({c: cases_by_center[c] for c in centers}, num_folds, seed)
      test = [case for case, k in folds if k == fold]
      trained = [case for case, k in folds if k != fold]
      description = f'fold {fold} of {num_folds} (data.fold)'
    rest = {}
    for case in trained:
      rest.setdefault(case.center, []).append(case)
    train, val = _split_off_validation(rest, val_fraction, seed)
  _check_overlap(train, val, test)
  empty = [name for name, cases in (('train', train), ('test', test)) if not cases]
  if val_fraction > 0 and not val:
    empty.append('val')
  if empty:
    raise ConfigError(
        f'the {description} split leaves {" and ".join(empty)} empty (cases per center: '
        f'{ {c: len(cases_by_center[c]) for c in centers} }, data.val_fraction={val_fraction}): '
        'add cases, or change data.centers / data.val_fraction / data.num_folds')
  return Split(train=train, val=val, test=test)


def fold_assignment(cases_by_center: dict[str, list[Case]], num_folds: int,
                    seed: int) -> list[tuple[Case, int]]:
  """(case, fold) for every case: each center's shuffled cases dealt round robin over the folds,
  continuing where the previous center stopped so fold sizes differ by at most one."""
  total = sum(len(cases) for cases in cases_by_center.values())
  if total < num_folds:
    raise ConfigError(
        f'data.num_folds is {num_folds} but data.centers hold only {total} cases: lower it')
  assignment, position = [], 0
  for center in sorted(cases_by_center):
    for case in _shuffled(cases_by_center[center], seed, center, 'folds'):
      assignment.append((case, position % num_folds))
      position += 1
  return assignment


def _case_names(cases_by_center: dict[str, list[Case]]) -> dict[Case, str]:
  """The name of each case in split files: its case id (nnU-Net's identifier), or
  center/case_id where several centers hold the same case id."""
  counts = {}
  for cases in cases_by_center.values():
    for case in cases:
      counts[case.case_id] = counts.get(case.case_id, 0) + 1
  return {case: case.case_id if counts[case.case_id] == 1 else f'{case.center}/{case.case_id}'
          for cases in cases_by_center.values() for case in cases}


def read_splits_file(path: str | os.PathLike) -> list[dict[str, list[str]]]:
  """The folds of a file in nnU-Net's splits_final.json format: a list holding, per fold,
  {"train": [case, ...], "val": [case, ...]}."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'data.splits_file {path} does not exist: check the path')
  try:
    folds = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise DataError(f'data.splits_file {path} cannot be read as JSON ({error}): fix the file'
                    ) from error
  well_formed = isinstance(folds, list) and folds and all(
      isinstance(fold, dict) and all(
          isinstance(fold.get(part), list) and all(isinstance(name, str) for name in fold[part])
          for part in ('train', 'val'))
      for fold in folds)
  if not well_formed:
    raise DataError(
        f'data.splits_file {path} is not a list of folds {{"train": [case, ...], "val": '
        '[case, ...]} (the format of nnU-Net\'s splits_final.json): fix the file')
  return [{'train': list(fold['train']), 'val': list(fold['val'])} for fold in folds]


def _fold_of_splits_file(path: str, fold: int, num_folds: int,
                         cases_by_center: dict[str, list[Case]]) -> tuple[list[Case], list[Case]]:
  """(cases trained on, held-out cases) of fold `fold` of a splits file. Cases are named by case
  id or center/case_id; cases the fold does not name take no part in the run."""
  folds = read_splits_file(path)
  if len(folds) != num_folds:
    raise ConfigError(
        f'data.splits_file {path} holds {len(folds)} folds but data.num_folds is {num_folds}: '
        f'set --config.data.num_folds={len(folds)}')
  lookup = {}
  for case, name in _case_names(cases_by_center).items():
    lookup[name] = lookup[f'{case.center}/{case.case_id}'] = case
  unknown = sorted({name for entry in folds for part in ('train', 'val') for name in entry[part]
                    if name not in lookup})
  if unknown:
    raise DataError(
        f'data.splits_file {path} names {len(unknown)} case(s) that data.centers '
        f'{tuple(cases_by_center)} do not hold: {unknown[:10]}'
        + (f' and {len(unknown) - 10} more' if len(unknown) > 10 else '')
        + f' (known cases are named like {sorted(lookup)[:3]}): fix the file, or list the '
        'centers that hold them in data.centers')
  trained = list(dict.fromkeys(lookup[name] for name in folds[fold]['train']))
  held_out = list(dict.fromkeys(lookup[name] for name in folds[fold]['val']))
  both = sorted(case.case_id for case in set(trained) & set(held_out))
  if both:
    raise DataError(f'data.splits_file {path}: fold {fold} lists {both[:10]} in both "train" and '
                    '"val": fix the file')
  return trained, sorted(held_out, key=lambda case: (case.center, case.case_id))


def nnunet_splits(data_config, cases_by_center: dict[str, list[Case]], split: Split,
                  seed: int) -> list[dict[str, list[str]]]:
  """The run's folds in nnU-Net's splits_final.json format (SPLITS_FILE): per fold, "train" the
  cases trained on (train and val here) and "val" the held-out ones (test here). A k-fold run
  lists all its folds (those of data.splits_file as read), leave-one-center-out its one split;
  `split` is the run's split_cases(data_config, cases_by_center, seed)."""
  if int(data_config.fold) >= 0 and data_config.get('splits_file'):
    return read_splits_file(data_config.splits_file)
  chosen = {c: cases_by_center[c] for c in data_config.centers}
  names = _case_names(chosen)
  if int(data_config.fold) == -1:
    return [{'train': sorted(names[case] for case in split.train + split.val),
             'val': sorted(names[case] for case in split.test)}]
  num_folds = int(data_config.num_folds)
  folds = fold_assignment(chosen, num_folds, seed)
  return [{'train': sorted(names[case] for case, k in folds if k != fold),
           'val': sorted(names[case] for case, k in folds if k == fold)}
          for fold in range(num_folds)]


def _check_overlap(train: list[Case], val: list[Case], test: list[Case]) -> None:
  images = {}
  for name, cases in (('train', train), ('val', val), ('test', test)):
    for case in cases:
      images.setdefault(os.path.realpath(case.image_path), []).append(f'{name}:{case.case_id}')
  shared = {path: uses for path, uses in images.items() if len(uses) > 1}
  if shared:
    raise DataError(
        f'the same image is listed more than once across the split: {shared}; remove duplicates '
        'from the folders or manifest')


# --- Checking every case up front ---------------------------------------------------------------

def case_problems(case: Case, label_map=None) -> list[str]:
  """Everything wrong with one case, as messages naming its files ([] when it is usable)."""
  name = f'{case.center}/{case.case_id}'
  problems = []
  if not os.path.exists(case.image_path):
    problems.append(f'{name}: image {case.image_path} does not exist')
  if case.label_path is None:
    problems.append(f'{name}: no label is listed for image {case.image_path}')
  elif not os.path.exists(case.label_path):
    problems.append(f'{name}: label {case.label_path} does not exist')
  if problems:
    return problems
  try:
    _, label = io.read_case(case.image_path, case.label_path, label_map, source_desc=name)
  except DataError as error:
    return [str(error)]
  if not label.array.any():
    # Every stage crops around the pancreas (tumour voxels count as pancreas).
    problems.append(
        f'{name}: label {case.label_path} has no pancreas or tumour voxels (all background after '
        'data.label_map): give the label that marks the pancreas, or check data.label_map')
  return problems


def validate_cases(cases: list[Case], label_map=None) -> list[str]:
  """Problems of all cases (reads every image and label once); [] when every case is usable."""
  io.parse_label_map(label_map)  # a bad map is one config error, not one problem per case
  problems = []
  for case in cases:
    problems.extend(case_problems(case, label_map))
  return problems


def check_cases(cases: list[Case], label_map=None,
                skip_bad_cases: bool = False) -> tuple[list[Case], list[str]]:
  """(usable cases, problem report). Raises one DataError listing every bad case unless
  `skip_bad_cases` (data.skip_bad_cases), in which case the bad ones are dropped and reported."""
  io.parse_label_map(label_map)
  good, problems = [], []
  for case in cases:
    found = case_problems(case, label_map)
    problems.extend(found)
    if not found:
      good.append(case)
  if problems and not skip_bad_cases:
    bad = len(cases) - len(good)
    raise DataError(
        f'{bad} of {len(cases)} cases cannot be used:\n  - ' + '\n  - '.join(problems)
        + '\nfix or remove them, or set data.skip_bad_cases=True to train without them')
  return good, problems
