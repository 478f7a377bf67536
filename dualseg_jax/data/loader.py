"""Grain input pipelines over the preprocessing cache: random training patches with all their
targets (docs/design.md batch keys), and whole cached cases for validation.

Per training example the host only crops from memory-mapped arrays and draws contrastive
positions; everything per-case (resampling, SDFs, skeletons) was done once by `preprocess`.

The SDF in a patch is cropped from the case's signed distance in mm (distances reach structure
beyond the patch), given the patch mask's sign where the two could differ (beyond the case's edge,
where the label reads background) and normalised per patch, as the method normalises per training
crop: mask == (sdf < 0) holds exactly (docs/design.md, "Signed distances"). `sdf_valid` is False
for a channel whose mask is empty (or full) inside the patch. Positives are drawn from the case
skeleton's voxels that fall in the patch, on the 1/8 grid; negatives from the ring around the
patch's structure (cube dilation of random side data.ring_side_vox, minus the structure) on the
1/8 grid, minus every cell holding a structure voxel; `targets.contrastive_positions` draws them
(data.contrastive_sampling: one of each per 1/8 slice, or data.num_positions of each).

Randomness comes only from Grain's per-example generator (seeded by the pipeline seed and the
example's index), so batches are the same whatever the number of workers, and the iterator's
state (get_state/set_state, or grain.checkpoint with Orbax) resumes the exact sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from dualseg_jax import structures
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.data import targets
from dualseg_jax.errors import ConfigError
from dualseg_jax.structures import EMBEDDING_STRIDE

log = logging.getLogger('dualseg_jax')

# Which structure's bounding box the training crops are taken around (data.roi_structure).
ROI_STRUCTURES = structures.NAMES


@dataclasses.dataclass(frozen=True)
class CachedCase:
  """One cached case as the loader sees it (small and picklable: it travels to workers)."""

  center: str
  case_id: str
  case_index: int  # position in the cache manifest: stable across splits and runs
  center_index: int  # position of the center in data.centers
  directory: str
  shape: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  pancreas_box: tuple[tuple[int, ...], tuple[int, ...]] | None
  tumour_box: tuple[tuple[int, ...], tuple[int, ...]] | None


def _box(value) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  return None if value is None else (tuple(value[0]), tuple(value[1]))


def cached_cases(cache: preprocess.Cache, cases: Sequence[registry.Case], stage: str,
                 centers: Sequence[str]) -> list[CachedCase]:
  """The cached entries of `cases` usable for `stage`; the others are logged with the reason.

  Every stage crops around the pancreas, so a case without one (absent in its label, or lost
  when resampled: see the manifest's problems) is left out.
  """
  structures.stage_structures(stage)  # an unknown stage fails here, naming the stages
  order = {key: index for index, key in enumerate(cache.cases)}
  centers = tuple(centers)
  usable = []
  for case in cases:
    entry = cache.entry(case.center, case.case_id)
    if entry.get('failed') or not entry.get('has_pancreas'):
      log.warning('left out of stage %s: %s/%s (%s)', stage, case.center, case.case_id,
                  '; '.join(entry['problems']) or 'no pancreas in the cached label')
      continue
    usable.append(CachedCase(
        center=case.center, case_id=case.case_id, case_index=order[f'{case.center}/{case.case_id}'],
        center_index=centers.index(case.center) if case.center in centers else -1,
        directory=str(cache.case_directory(case.center, case.case_id)),
        shape=tuple(entry['shape']), spacing_mm=tuple(entry['spacing_mm']),
        pancreas_box=_box(entry['pancreas_box']), tumour_box=_box(entry['tumour_box'])))
  return usable


def split_cached_cases(config: ml_collections.ConfigDict, cache: preprocess.Cache,
                       split: registry.Split) -> dict[str, list[CachedCase]]:
  """'train', 'val' and 'test' cached cases of a registry split, for config.stage."""
  centers = config.data.centers
  return {name: cached_cases(cache, getattr(split, name), config.stage, centers)
          for name in ('train', 'val', 'test')}


def check_no_test_center(config: ml_collections.ConfigDict, cases: Sequence[Any]) -> None:
  """Leave-one-center-out: the held-out center must never reach training."""
  if int(config.data.fold) != -1:
    return
  leaked = sorted({case.case_id for case in cases if case.center == config.data.test_center})
  if leaked:
    raise ConfigError(
        f'training cases include the held-out center data.test_center={config.data.test_center!r} '
        f'({leaked[:5]}...): pass only the split\'s train cases to the training loader')


# --- One training example ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PatchSettings:
  """What the patch sampler needs from the config, as plain values (picklable for workers)."""

  stage: str
  patch_size: tuple[int, int, int]
  roi_structure: str
  crop_margin_xy: tuple[int, int]
  crop_margin_z_fraction: tuple[float, float]
  foreground_fraction: float
  joint_tumour_fraction: float
  random_patch_fraction: float
  contrastive_sampling: str
  num_positions: int
  slice_min_voxels: int
  ring_side_vox: tuple[int, int]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'PatchSettings':
    data = config.data
    patch_size = tuple(int(s) for s in data.patch_size)
    if len(patch_size) != 3 or any(s <= 0 or s % EMBEDDING_STRIDE for s in patch_size):
      raise ConfigError(f'data.patch_size={patch_size}: give three sizes, each a multiple of '
                        f'{EMBEDDING_STRIDE}')
    structures.stage_structures(config.stage)  # an unknown stage fails here
    if data.contrastive_sampling not in targets.CONTRASTIVE_SAMPLINGS:
      raise ConfigError(f'data.contrastive_sampling={data.contrastive_sampling!r}: choose one of '
                        f'{targets.CONTRASTIVE_SAMPLINGS}')
    if data.roi_structure not in ROI_STRUCTURES:
      raise ConfigError(f'data.roi_structure={data.roi_structure!r}: choose one of {ROI_STRUCTURES}')
    low, high = (int(v) for v in data.crop_margin_xy)
    if low > high:
      raise ConfigError(f'data.crop_margin_xy=({low}, {high}): the first is the smallest margin '
                        'drawn and must not exceed the second')
    return cls(stage=config.stage, patch_size=patch_size, roi_structure=str(data.roi_structure),
               crop_margin_xy=tuple(int(v) for v in data.crop_margin_xy),
               crop_margin_z_fraction=tuple(float(v) for v in data.crop_margin_z_fraction),
               foreground_fraction=float(data.foreground_fraction),
               joint_tumour_fraction=float(data.joint_tumour_fraction),
               random_patch_fraction=float(data.random_patch_fraction),
               contrastive_sampling=str(data.contrastive_sampling),
               num_positions=int(data.num_positions),
               slice_min_voxels=int(config.loss.slice_min_voxels),
               ring_side_vox=tuple(int(v) for v in data.ring_side_vox))


def read_window(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                fill: float | None, out: np.ndarray | None = None) -> np.ndarray:
  """array[start : start + size], reading only what lies inside; the rest is `fill`, or the
  nearest edge value when `fill` is None. Writes into `out` (shape `size`) when given."""
  start = np.asarray(start, np.int64)
  size = tuple(int(n) for n in size)
  shape = np.asarray(array.shape[:3], np.int64)
  low = np.clip(start, 0, shape)
  high = np.clip(start + size, 0, shape)
  if out is None:
    out = np.empty(size, array.dtype)
  inner_low, inner_high = low - start, high - start
  if np.any(inner_high <= inner_low):  # nothing of the array inside the window
    out[...] = fill if fill is not None else 0
    return out
  inner = tuple(slice(lo, hi) for lo, hi in zip(inner_low, inner_high))
  out[inner] = array[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
  # Fill the border one axis at a time: with `fill` None the edge plane is repeated outwards.
  for axis in range(3):
    before = (slice(None),) * axis + (slice(0, inner_low[axis]),)
    after = (slice(None),) * axis + (slice(inner_high[axis], None),)
    if fill is None:
      out[before] = out[(slice(None),) * axis + (slice(inner_low[axis], inner_low[axis] + 1),)]
      out[after] = out[(slice(None),) * axis + (slice(inner_high[axis] - 1, inner_high[axis]),)]
    else:
      out[before] = fill
      out[after] = fill
  return out


def _roi(case: CachedCase, settings: PatchSettings, rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
  """The box of `settings.roi_structure` (the pancreas box for a case without tumour) grown by
  random margins (in-plane voxels, negative ones shrink it; z as a share of the slices); never
  less than one voxel per axis."""
  box = case.pancreas_box
  if settings.roi_structure == 'tumour' and case.tumour_box is not None:
    box = case.tumour_box
  low, high = (np.asarray(corner, np.int64) for corner in box)
  shape = np.asarray(case.shape, np.int64)
  low_fraction, high_fraction = settings.crop_margin_z_fraction
  z_margins = np.round(rng.uniform(low_fraction, high_fraction, size=2) * shape[0]).astype(np.int64)
  xy_low, xy_high = settings.crop_margin_xy
  xy_margins = rng.integers(xy_low, xy_high + 1, size=(2, 2))
  margin_low = np.array([z_margins[0], xy_margins[0, 0], xy_margins[0, 1]])
  margin_high = np.array([z_margins[1], xy_margins[1, 0], xy_margins[1, 1]])
  roi_low, roi_high = np.maximum(low - margin_low, 0), np.minimum(high + margin_high, shape)
  # A negative margin larger than half the box would leave nothing: keep the box's centre voxel.
  centre = (low + high - 1) // 2
  empty = roi_high <= roi_low
  return np.where(empty, centre, roi_low), np.where(empty, centre + 1, roi_high)


def _patch_start(case: CachedCase, settings: PatchSettings, rng: np.random.Generator,
                 label: np.ndarray) -> np.ndarray:
  """Corner of the patch: inside the ROI when it is larger than the patch, covering the ROI
  otherwise; tumour stages centre a share of patches on a random tumour voxel."""
  size = np.asarray(settings.patch_size, np.int64)
  roi_low, roi_high = _roi(case, settings, rng)
  placement = rng.uniform()
  if not settings.stage.endswith('_fine') and placement < settings.random_patch_fraction:
    # Anywhere in the (body-cropped) case: whole-volume inference meets what lies far from the
    # pancreas, so training must too.
    shape = np.asarray(case.shape, np.int64)
    return np.array([rng.integers(0, max(n - p, 0) + 1) if n >= p else (n - p) // 2
                     for n, p in zip(shape, size)], np.int64)
  tumour_share = (settings.foreground_fraction if settings.stage.startswith('tumour_')
                  else settings.joint_tumour_fraction if settings.stage == 'joint' else 0.0)
  wants_tumour = rng.uniform() < tumour_share
  if case.tumour_box is not None and wants_tumour:
    box_low, box_high = (np.asarray(corner, np.int64) for corner in case.tumour_box)
    window = tuple(slice(lo, hi) for lo, hi in zip(box_low, box_high))
    tumour_voxels = np.argwhere(np.asarray(label[window]) == structures.TUMOUR)
    centre = box_low + tumour_voxels[rng.integers(len(tumour_voxels))]
    return centre - size // 2
  roi_size = roi_high - roi_low
  start = np.empty(3, np.int64)
  for axis in range(3):
    if roi_size[axis] >= size[axis]:
      start[axis] = rng.integers(roi_low[axis], roi_high[axis] - size[axis] + 1)
    else:
      start[axis] = rng.integers(roi_high[axis] - size[axis], roi_low[axis] + 1)
  return start


def _positions_in_patch(skeleton_voxels: np.ndarray, start: np.ndarray, size: np.ndarray
                        ) -> np.ndarray:
  """Skeleton voxels (K, 3) of the case -> bool mask of the patch's 1/8 grid."""
  relative = skeleton_voxels.astype(np.int64) - start
  inside = np.all((relative >= 0) & (relative < size), axis=1)
  cells = relative[inside] // EMBEDDING_STRIDE
  grid = np.zeros(tuple(size // EMBEDDING_STRIDE), bool)
  grid[tuple(cells.T)] = True
  return grid


def sample_patch(case: CachedCase, settings: PatchSettings, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
  """One training example of `case` with every target key of docs/design.md."""
  channel_structures = structures.stage_structures(settings.stage)
  directory = case.directory
  load = lambda name: np.load(f'{directory}/{name}.npy', mmap_mode='r')
  label_map = load('label')
  start = _patch_start(case, settings, rng, label_map)
  size = np.asarray(settings.patch_size, np.int64)

  image = np.empty(tuple(size) + (1,), np.float32)
  read_window(load('image'), start, size, fill=0.0, out=image[..., 0])
  label = read_window(label_map, start, size, fill=0)
  mask = targets.stage_channel_masks(label, settings.stage)
  sdf = np.empty(tuple(size) + (len(channel_structures),), np.float32)
  sdf_scale_mm = np.empty((len(channel_structures), 2), np.float32)
  for channel, name in enumerate(channel_structures):
    read_window(load(f'sdf_{name}'), start, size, fill=None, out=sdf[..., channel])
    # The edge value repeated beyond the case can carry the inside's sign where the label reads
    # background; the label decides.
    inside = mask[..., channel] > 0
    signed_distance = np.where(inside, -np.abs(sdf[..., channel]), np.abs(sdf[..., channel]))
    sdf_scale_mm[channel] = targets.signed_distance_scales(signed_distance)
    sdf[..., channel] = targets.normalize_signed_distance(signed_distance)
  # Voxel counts from the label (count_nonzero on uint8 is far cheaper than reducing the masks).
  tumour = label == structures.TUMOUR
  structure_counts = {'pancreas': np.count_nonzero(label), 'tumour': np.count_nonzero(tumour)}
  sdf_valid = np.array([0 < structure_counts[name] < label.size for name in channel_structures])

  structure = tumour if channel_structures[-1] == 'tumour' else label > 0
  skeleton_cells = _positions_in_patch(load(f'skeleton_{channel_structures[-1]}'), start, size)
  positions = targets.contrastive_positions(structure, skeleton_cells, rng,
                                            settings.contrastive_sampling, settings.num_positions,
                                            settings.ring_side_vox)
  return {
      'image': image,
      'label': label.astype(np.int32),
      'mask': mask,
      'sdf': sdf,
      'sdf_scale_mm': sdf_scale_mm,
      'sdf_valid': sdf_valid,
      **positions,
      'slice_label': targets.slice_labels(structure, settings.slice_min_voxels),
      'case_index': np.int32(case.case_index),
      'center_index': np.int32(case.center_index),
      'patch_start': start.astype(np.int32),  # corner in the cached case, for tracing a batch back
  }


class TrainPatchSource(grain.sources.RandomAccessDataSource):
  """Grain source of the cached training cases; each element is a CachedCase (arrays are read
  by `PatchSampler`, so only small records are shuffled and sent to workers)."""

  def __init__(self, cases: Sequence[CachedCase]):
    if not cases:
      raise ConfigError('no usable training cases: check the split (data.centers, '
                        'data.test_center, data.val_fraction) and the cache manifest problems')
    self._cases = list(cases)

  def __len__(self) -> int:
    return len(self._cases)

  def __getitem__(self, index: int) -> CachedCase:
    return self._cases[index]

  def __repr__(self) -> str:
    return f'TrainPatchSource({len(self._cases)} cases)'


class PatchSampler(grain.transforms.RandomMap):
  """CachedCase + Grain's per-example generator -> one training example."""

  def __init__(self, settings: PatchSettings):
    self.settings = settings

  def random_map(self, element: CachedCase, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return sample_patch(element, self.settings, rng)


# --- Datasets and iterators ---------------------------------------------------------------------

def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ConfigError(f'data.batch_size={global_batch_size} is not divisible by the '
                      f'{process_count} JAX processes: make it a multiple')
  return global_batch_size // process_count


def _as_cached(config, cases, cache) -> list[CachedCase]:
  if cases and isinstance(cases[0], CachedCase):
    return list(cases)
  if cache is None:
    cache = preprocess.ensure_cache(config, cases=list(cases))
  return cached_cases(cache, cases, config.stage, config.data.centers)


def make_train_dataset(config: ml_collections.ConfigDict, cases: Sequence[Any],
                       cache: preprocess.Cache | None, seed: int,
                       process_index: int | None = None, process_count: int | None = None
                       ) -> grain.MapDataset:
  """Shuffled, repeated, sharded and batched training examples as an (infinite) MapDataset.

  `cases` are registry Cases of the training split (or CachedCases); with no `cache` it is
  built for them. The batch is data.batch_size / process_count examples of this process.
  """
  if process_index is None or process_count is None:
    import jax  # deferred: only the process layout is needed here
    process_index, process_count = jax.process_index(), jax.process_count()
  cached = _as_cached(config, cases, cache)
  check_no_test_center(config, cached)
  batch_size = local_batch_size(int(config.data.batch_size), process_count)
  dataset = (grain.MapDataset.source(TrainPatchSource(cached))
             .seed(seed)
             .shuffle()
             .repeat()
             .random_map(PatchSampler(PatchSettings.from_config(config))))
  # Shard after the random map so every process draws from its own example indices.
  dataset = dataset[process_index::process_count]
  return dataset.batch(batch_size, drop_remainder=True)


def make_train_iterator(config: ml_collections.ConfigDict, cases: Sequence[Any],
                        cache: preprocess.Cache | None, seed: int,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> grain.DatasetIterator:
  """The checkpointable training iterator (data.num_workers processes, data.prefetch batches)."""
  dataset = make_train_dataset(config, cases, cache, seed, process_index, process_count)
  prefetch = max(1, int(config.data.prefetch))
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                       prefetch_buffer_size=prefetch))
  if config.data.num_workers > 0:
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers), per_worker_buffer_size=prefetch))
  return iter(iterable)


def load_case(case: CachedCase) -> dict[str, Any]:
  """A whole cached case for validation: image (D, H, W) float32, label (D, H, W) uint8."""
  image = np.load(f'{case.directory}/image.npy')
  label = np.load(f'{case.directory}/label.npy')
  return {'image': image, 'label': label, 'spacing_mm': np.asarray(case.spacing_mm, np.float32),
          'case_index': np.int32(case.case_index), 'center_index': np.int32(case.center_index),
          'case_id': case.case_id, 'center': case.center}


def make_eval_dataset(cases: Sequence[CachedCase]) -> grain.MapDataset:
  """Whole preprocessed cases (no crop, no batching), in the given order."""
  return grain.MapDataset.source(list(cases)).map(load_case)
