"""The preprocessing cache: every case resampled, windowed, cropped to the body and given its
whole-case targets once, stored as memory-mappable .npy arrays, so a training step only crops.

Layout: `<cache_dir>/<settings_hash>/<center>/<case_id>/` holds
  image.npy          float32 (D, H, W), CT windowed by data.window_hu into [0, 1] (air -> 0)
  label.npy          uint8 (D, H, W), 0 background, 1 pancreas, 2 tumour
  sdf_pancreas.npy   float32 (D, H, W), signed distance in mm of label >= 1 (negative inside,
                     zero level between voxels: targets.signed_distance_mm); the loader
                     normalises it per training crop
  sdf_tumour.npy     float32 (D, H, W), the same for label == 2 (zeros when no tumour)
  skeleton_pancreas.npy, skeleton_tumour.npy   int32 (K, 3) voxel positions of the 3D skeletons
  case.json          the case's metadata (also gathered into the manifest)
and `<cache_dir>/<settings_hash>/manifest.json` lists every case with its metadata and problems.

The settings hash covers everything that changes the arrays (spacing, window, interpolation,
body crop, label map, format version), so a changed setting lands in a new folder and is
rebuilt; a case whose source files changed (size or modification time) is rebuilt in place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
from typing import Any, Sequence

import ml_collections
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dualseg_jax import files
from dualseg_jax import locks
from dualseg_jax import structures
from dualseg_jax.data import io
from dualseg_jax.data import registry
from dualseg_jax.data.resampling import resample, resampled_shape  # noqa: F401 (callers use preprocess.*)
from dualseg_jax.data import targets
from dualseg_jax.errors import ConfigError, DataError

log = logging.getLogger('dualseg_jax')

# Bump when the arrays' meaning or format changes: old caches then stop matching.
CACHE_VERSION = 2  # 2: SDFs in mm with the zero level between voxels
MANIFEST_FILE = 'manifest.json'
CASE_FILE = 'case.json'
INTERPOLATIONS = ('linear', 'cubic')


@dataclasses.dataclass(frozen=True)
class Settings:
  """The data settings that determine the cached arrays."""

  target_spacing_mm: tuple[float, float, float]
  window_hu: tuple[float, float]
  image_interpolation: str
  body_threshold_hu: float
  body_margin_mm: float
  label_map: str
  version: int = CACHE_VERSION

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> 'Settings':
    interpolation = data_config.image_interpolation
    if interpolation not in INTERPOLATIONS:
      raise ConfigError(f'data.image_interpolation={interpolation!r}: choose one of {INTERPOLATIONS}')
    spacing = tuple(float(s) for s in data_config.target_spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
      raise ConfigError(f'data.target_spacing_mm={spacing}: give three positive sizes (z, y, x) in mm')
    low, high = (float(v) for v in data_config.window_hu)
    if not low < high:
      raise ConfigError(f'data.window_hu=({low}, {high}): the lower bound must be below the upper')
    return cls(target_spacing_mm=spacing, window_hu=(low, high),
               image_interpolation=interpolation,
               body_threshold_hu=float(data_config.body_threshold_hu),
               body_margin_mm=float(data_config.body_margin_mm),
               label_map=str(data_config.label_map or ''))

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def hash(self) -> str:
    text = json.dumps(self.as_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Cache:
  """A built cache: its folder (one settings hash) and the manifest's per-case entries."""

  directory: pathlib.Path
  settings: Settings
  cases: dict[str, dict[str, Any]]  # '<center>/<case_id>' -> metadata

  def case_directory(self, center: str, case_id: str) -> pathlib.Path:
    return self.directory / center / case_id

  def entry(self, center: str, case_id: str) -> dict[str, Any]:
    key = f'{center}/{case_id}'
    if key not in self.cases:
      raise DataError(f'case {key} is not in the cache {self.directory}; rebuild it with '
                      '`python -m launch.preprocess --config=...`')
    return self.cases[key]


def cache_root(data_config: ml_collections.ConfigDict) -> pathlib.Path:
  """data.cache_dir, or <data.root>/cache."""
  if data_config.cache_dir:
    return pathlib.Path(data_config.cache_dir)
  if not data_config.root:
    raise ConfigError('data.cache_dir and data.root are both empty: set data.cache_dir to where '
                      'the preprocessed arrays should live')
  return pathlib.Path(data_config.root) / 'cache'


# --- Per-case array work ------------------------------------------------------------------------

def window(image_hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
  """HU -> [0, 1] float32 through the window (below -> 0, above -> 1)."""
  low, high = window_hu
  return np.clip((image_hu.astype(np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive-exclusive (low, high) corners of the set voxels of a non-empty mask."""
  low, high = [], []
  for axis in range(mask.ndim):
    occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    low.append(occupied[0])
    high.append(occupied[-1] + 1)
  return np.asarray(low, np.int64), np.asarray(high, np.int64)


def body_box(image_hu: np.ndarray, threshold_hu: float, margin_vox: Sequence[int],
             keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) corners of the largest component above `threshold_hu`, grown by `margin_vox`
  and by whatever `keep` marks (the label's foreground); the whole volume when nothing is found."""
  shape = np.asarray(image_hu.shape)
  body = image_hu > threshold_hu
  components, count = ndimage.label(body)
  boxes = []
  if count:
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(np.argmax(sizes)) + 1)
    boxes.append(bounding_box(largest))
  if keep is not None and keep.any():
    boxes.append(bounding_box(keep))
  if not boxes:
    return np.zeros(3, np.int64), shape
  low = np.min([box[0] for box in boxes], axis=0) - np.asarray(margin_vox)
  high = np.max([box[1] for box in boxes], axis=0) + np.asarray(margin_vox)
  return np.maximum(low, 0), np.minimum(high, shape)


def skeleton_positions(mask: np.ndarray) -> np.ndarray:
  """int32 (K, 3) voxels of the mask's 3D skeleton; where thinning leaves a component empty
  (it can, for some compact blobs), that component's deepest voxel stands in for it."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return np.zeros((0, 3), np.int32)
  thin = targets.skeleton(mask)
  components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
  covered = np.unique(components[thin])
  missing = [index for index in range(1, count + 1) if index not in covered]
  if missing:
    depth = ndimage.distance_transform_edt(mask)
    for index in missing:
      deepest = ndimage.maximum_position(depth, components, index)
      thin[tuple(deepest)] = True
  return np.argwhere(thin).astype(np.int32)


def _box_of(mask: np.ndarray) -> list[list[int]] | None:
  if not mask.any():
    return None
  low, high = bounding_box(mask)
  return [low.tolist(), high.tolist()]


def _fingerprint(case: registry.Case) -> dict[str, Any]:
  def stat(path):
    if path is None or not os.path.exists(path):
      return None
    info = os.stat(path)
    return [os.path.realpath(path), info.st_size, info.st_mtime_ns]
  return {'image': stat(case.image_path), 'label': stat(case.label_path)}


def preprocess_case(case: registry.Case, settings: Settings) -> tuple[dict[str, np.ndarray],
                                                                        dict[str, Any]]:
  """One case -> (arrays, metadata) as stored in the cache. Raises DataError for unreadable files."""
  if case.label_path is None:
    raise DataError(f'{case.center}/{case.case_id}: no label is listed for {case.image_path}')
  image, label = io.read_case(case.image_path, case.label_path, settings.label_map or None,
                              source_desc=f'{case.center}/{case.case_id}')
  source_spacing = np.asarray(image.spacing_mm, np.float64)
  margin_vox = np.ceil(settings.body_margin_mm / source_spacing).astype(np.int64)
  low, high = body_box(image.array, settings.body_threshold_hu, margin_vox, keep=label.array > 0)
  crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
  image_hu, source_label = image.array[crop], label.array[crop]

  new_shape = resampled_shape(image_hu.shape, source_spacing, settings.target_spacing_mm)
  spacing = tuple(float(size * s / new) for size, s, new in
                  zip(image_hu.shape, source_spacing, new_shape))
  image_interpolation = settings.image_interpolation
  windowed = window(resample(image_hu, new_shape, image_interpolation), settings.window_hu)
  cached_label = resample(source_label, new_shape, 'nearest').astype(np.uint8)

  arrays = {'image': windowed, 'label': cached_label}
  metadata: dict[str, Any] = {
      'center': case.center, 'case_id': case.case_id,
      'image_path': case.image_path, 'label_path': case.label_path,
      'source': _fingerprint(case),
      'shape': list(new_shape), 'spacing_mm': list(spacing),
      'source_shape': list(image.array.shape), 'source_spacing_mm': source_spacing.tolist(),
      'source_geometry': {'affine': image.geometry.affine.tolist(),
                          'shape': list(image.geometry.shape)},
      'source_crop': [low.tolist(), high.tolist()],
      'cached_affine': _cached_affine(image.canonical_affine, low, image_hu.shape,
                                      new_shape).tolist(),
      'problems': [],
  }
  for structure, select in structures.MASKS.items():
    mask = select(cached_label)
    signed_distance, valid = targets.signed_distance_mm(mask, spacing)
    arrays[f'sdf_{structure}'] = signed_distance
    arrays[f'skeleton_{structure}'] = skeleton_positions(mask)
    source_voxels = int(np.count_nonzero(select(source_label)))
    metadata[f'{structure}_voxels'] = int(np.count_nonzero(mask))
    metadata[f'{structure}_source_voxels'] = source_voxels
    metadata[f'{structure}_box'] = _box_of(mask)
    metadata[f'{structure}_sdf_valid'] = bool(valid)
    if source_voxels and not mask.any():
      metadata['problems'].append(
          f'{case.center}/{case.case_id}: the {structure} ({source_voxels} voxels at '
          f'{np.round(source_spacing, 3).tolist()} mm) vanished when resampled to '
          f'{list(settings.target_spacing_mm)} mm (data.target_spacing_mm)')
  if not metadata['pancreas_source_voxels']:
    metadata['problems'].append(f'{case.center}/{case.case_id}: label {case.label_path} has no '
                                'pancreas (label 1 or 2)')
  metadata['has_pancreas'] = metadata['pancreas_voxels'] > 0
  metadata['has_tumour'] = metadata['tumour_voxels'] > 0
  return arrays, metadata


def _cached_affine(canonical_affine: np.ndarray, crop_low: np.ndarray, cropped_shape, new_shape
                   ) -> np.ndarray:
  """Voxel (z, y, x) of the cached array -> world mm."""
  scale = np.asarray(cropped_shape, np.float64) / np.asarray(new_shape, np.float64)
  to_source = np.eye(4)
  to_source[:3, :3] = np.diag(scale)
  to_source[:3, 3] = crop_low + 0.5 * scale - 0.5
  return canonical_affine @ to_source


def _write_case(directory: pathlib.Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
  """Write into a sibling temporary folder, then rename: a case folder is complete or absent."""
  partial = directory.with_name(directory.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  try:
    partial.mkdir(parents=True)
    for name, array in arrays.items():
      np.save(partial / f'{name}.npy', np.ascontiguousarray(array), allow_pickle=False)
    (partial / CASE_FILE).write_text(json.dumps(metadata, indent=1) + '\n')
  except OSError:
    shutil.rmtree(partial, ignore_errors=True)  # gives a full disk its space back
    raise
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(partial, directory)


def _build_case(case: registry.Case, settings: Settings, directory: str) -> dict[str, Any]:
  """Worker: build and write one case; a DataError becomes a problem entry, not a crash."""
  try:
    arrays, metadata = preprocess_case(case, settings)
  except DataError as error:
    return {'center': case.center, 'case_id': case.case_id, 'image_path': case.image_path,
            'label_path': case.label_path, 'source': _fingerprint(case), 'failed': True,
            'problems': [str(error)], 'has_pancreas': False, 'has_tumour': False}
  _write_case(pathlib.Path(directory), arrays, metadata)
  return metadata


def _up_to_date(directory: pathlib.Path, case: registry.Case) -> dict[str, Any] | None:
  path = directory / CASE_FILE
  if not path.is_file():
    return None
  try:
    metadata = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  return metadata if metadata.get('source') == _fingerprint(case) else None


# --- The whole cache ---------------------------------------------------------------------------

# What a failed cache write leaves: each case folder is renamed into place only when complete.
_CACHE_SAFE = 'the cases already cached are complete and kept'


def build_cache(data_config: ml_collections.ConfigDict, cases: Sequence[registry.Case],
                num_workers: int | None = None, progress: bool = True) -> Cache:
  """Bring the cache for `cases` up to date (building only missing or stale cases) and return it.

  Problems (unreadable files, a pancreas lost to resampling) are written to the manifest and
  logged. Unreadable cases raise one DataError at the end unless data.skip_bad_cases.
  """
  settings = Settings.from_config(data_config)
  directory = cache_root(data_config) / settings.hash
  num_workers = data_config.num_workers if num_workers is None else num_workers
  # Two runs building one cache at once would write the same case folders and manifest: the
  # second waits, then finds the cases built and only checks them.
  with files.writing('the preprocessing cache', directory, safe=_CACHE_SAFE):
    with locks.hold(directory, 'building the preprocessing cache', wait=True):
      entries = _build_cases(settings, directory, cases, num_workers, progress)
      ordered = {f'{c.center}/{c.case_id}': entries[f'{c.center}/{c.case_id}'] for c in cases}
      manifest = {'settings_hash': settings.hash, 'settings': settings.as_json(), 'cases': ordered}
      files.write_bytes(directory / MANIFEST_FILE, (json.dumps(manifest, indent=1) + '\n').encode())

  problems = [p for entry in ordered.values() for p in entry['problems']]
  for problem in problems:
    log.warning('cache: %s', problem)
  failed = [key for key, entry in ordered.items() if entry.get('failed')]
  if failed and not data_config.skip_bad_cases:
    raise DataError(
        f'{len(failed)} of {len(ordered)} cases cannot be preprocessed (see {directory / MANIFEST_FILE}):'
        '\n  - ' + '\n  - '.join(p for key in failed for p in ordered[key]['problems'])
        + '\nfix or remove them, or set data.skip_bad_cases=True to train without them')
  return Cache(directory=directory, settings=settings, cases=ordered)


def _build_cases(settings: Settings, directory: pathlib.Path, cases: Sequence[registry.Case],
                 num_workers: int, progress: bool) -> dict[str, dict[str, Any]]:
  """Metadata of every case, building those missing or stale; the caller holds the cache's lock."""
  files.write_bytes(directory / 'settings.json',
                    (json.dumps(settings.as_json(), indent=1) + '\n').encode())
  entries: dict[str, dict[str, Any]] = {}
  to_build, seen = [], set()
  for case in cases:
    key = f'{case.center}/{case.case_id}'
    if key in seen:
      raise DataError(f'case {key} is listed twice: case ids must be unique within a center')
    seen.add(key)
    metadata = _up_to_date(directory / case.center / case.case_id, case)
    if metadata is None:
      to_build.append((case, str(directory / case.center / case.case_id)))
    else:
      entries[key] = metadata

  if to_build:
    log.info('preprocessing %d of %d cases into %s', len(to_build), len(cases), directory)
    # Closing the bar on an error too ends its line, so that the error's message starts its own.
    with tqdm(total=len(to_build), desc='preprocess', unit='case', disable=not progress,
              dynamic_ncols=True) as bar:
      if num_workers and num_workers > 0 and len(to_build) > 1:
        # spawn: the caller may hold JAX or Grain threads, which fork would copy half-alive.
        context = multiprocessing.get_context('spawn')
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
          futures = [pool.submit(_build_case, case, settings, out) for case, out in to_build]
          try:
            for future in concurrent.futures.as_completed(futures):
              metadata = future.result()
              entries[f"{metadata['center']}/{metadata['case_id']}"] = metadata
              bar.update(1)
          except BaseException:
            for future in futures:  # a full disk fails them all: stop at the first
              future.cancel()
            raise
      else:
        for case, out in to_build:
          metadata = _build_case(case, settings, out)
          entries[f"{metadata['center']}/{metadata['case_id']}"] = metadata
          bar.update(1)
  return entries


def ensure_cache(config: ml_collections.ConfigDict, cases: Sequence[registry.Case] | None = None,
                 progress: bool = True) -> Cache:
  """The cache of `cases`, or of every case of every center in data.centers (synthetic phantoms
  generated first when needed). Pass the split's train and val cases to keep the held-out
  center unread by training."""
  data_config = config.data
  if cases is None:
    if data_config.source == 'synthetic':
      from dualseg_jax.data import phantoms  # deferred: only synthetic runs generate data
      phantoms.ensure_synthetic_data(data_config)
    cases_by_center = registry.list_cases(data_config)
    cases = [case for center in data_config.centers for case in cases_by_center[center]]
  return build_cache(data_config, cases, progress=progress)


def load_cache(data_config: ml_collections.ConfigDict) -> Cache:
  """The cache for the current settings as the manifest lists it (no building)."""
  settings = Settings.from_config(data_config)
  directory = cache_root(data_config) / settings.hash
  path = directory / MANIFEST_FILE
  if not path.is_file():
    raise DataError(f'no preprocessed cache at {directory} for the current data settings: run '
                    '`python -m launch.preprocess --config=...` with the same config')
  manifest = json.loads(path.read_text())
  return Cache(directory=directory, settings=settings, cases=manifest['cases'])


def load_arrays(cache: Cache, center: str, case_id: str, names: Sequence[str],
                mmap: bool = True) -> dict[str, np.ndarray]:
  """Named cached arrays of one case, memory-mapped (read lazily) unless `mmap` is False."""
  directory = cache.case_directory(center, case_id)
  arrays = {}
  for name in names:
    path = directory / f'{name}.npy'
    try:
      arrays[name] = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
      raise DataError(f'{path} is missing or damaged ({error}); delete {directory} and rerun '
                      '`python -m launch.preprocess`') from error
  return arrays


def summary(cache: Cache) -> str:
  """A few lines on what the cache holds and what went wrong."""
  entries = list(cache.cases.values())
  usable = [e for e in entries if e.get('has_pancreas')]
  with_tumour = [e for e in usable if e.get('has_tumour')]
  size_bytes = sum(path.stat().st_size for path in cache.directory.rglob('*.npy'))
  lines = [f'cache {cache.directory}: {len(entries)} cases, {len(usable)} with a pancreas, '
           f'{len(with_tumour)} with a tumour, {size_bytes / 2**20:.0f} MiB',
           f'  settings: {json.dumps(cache.settings.as_json())}']
  problems = [p for e in entries for p in e['problems']]
  if problems:
    lines.append(f'  {len(problems)} problem(s) (those cases are left out of stages that need '
                 'the missing structure):')
    lines.extend(f'    - {problem}' for problem in problems)
  return '\n'.join(lines)


def main_from_config(config: ml_collections.ConfigDict) -> Cache:
  """What `python -m launch.preprocess` runs: build or refresh the cache, print its summary."""
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  cache = ensure_cache(config)
  print(summary(cache), flush=True)
  return cache
