"""Everything a training run needs from the data side, in order: the data set (synthetic ones are
generated on first use), the split, the checks, the preprocessing cache, the training iterator and
the device-side augmentation."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib

import jax
import ml_collections
from jax.experimental import multihost_utils

from dualseg_jax import files
from dualseg_jax.data import augment
from dualseg_jax.data import loader
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.errors import DataError

log = logging.getLogger('dualseg_jax')

# What a run records about the files it read and will evaluate on (workdir/IDENTITY_FILE).
IDENTITY_FILE = 'data_identity.json'


@dataclasses.dataclass
class PreparedData:
  split: registry.Split  # train and val feed training; test is only read by the final evaluation
  cache: preprocess.Cache
  train_cases: list  # cached training cases usable for the stage
  problems: list[str]  # cases left out (data.skip_bad_cases) with the reason

  @property
  def test_tag(self) -> str:
    centers = sorted({case.center for case in self.split.test})
    return 'test_' + '+'.join(centers) if centers else 'test'


def resolve_data_root(config: ml_collections.ConfigDict) -> None:
  """Settles what the data decides before the run's config.json is written. Synthetic runs
  without a root use ./data/synthetic/<generator version, seed, size>, and data.splits_file is
  made absolute, so that config.json still finds them from another directory. An empty
  data.label_map becomes the numbering the centers' dataset.json `labels` give, when they
  renumber pancreas and tumour (registry.dataset_label_map)."""
  if config.data.source == 'synthetic' and not config.data.root:
    from dualseg_jax.data import phantoms  # deferred: only synthetic runs generate data
    config.data.root = str(phantoms.default_root(config.data).absolute())
  if config.data.get('splits_file'):
    config.data.splits_file = str(pathlib.Path(config.data.splits_file).absolute())
  if not config.data.label_map:
    label_map, sources = registry.dataset_label_map(config.data)
    if label_map:
      log.info('data.label_map=%r, the label numbering of %s', label_map,
               ', '.join(str(path) for path in sources))
      config.data.label_map = label_map


def data_identity(config: ml_collections.ConfigDict, split: registry.Split) -> dict:
  """What identifies the data of a run: every case of the split with its role and the size and
  modification time of its files (a stat, so the held-out center is listed, never read), and for
  synthetic data the generator's parameters."""
  cases = {}
  for role, group in (('train', split.train), ('val', split.val), ('test', split.test)):
    for case in group:
      stamps = {}
      for kind, path in (('image', case.image_path), ('label', case.label_path)):
        if path:
          stat = pathlib.Path(path).stat()
          stamps[kind] = [stat.st_size, stat.st_mtime_ns]
      cases[f'{case.center}/{case.case_id}'] = {'role': role, **stamps}
  identity = {'source': config.data.source, 'root': config.data.root, 'cases': cases}
  if config.data.source == 'synthetic':
    from dualseg_jax.data import phantoms  # deferred: only synthetic runs generate data
    parameters = phantoms.read_parameters(pathlib.Path(config.data.root)) or {}
    identity['phantoms'] = {key: value for key, value in parameters.items() if key != 'files'}
  return identity


def check_data_identity(config: ml_collections.ConfigDict, split: registry.Split,
                        workdir: str | pathlib.Path) -> None:
  """Records the run's data identity in a new workdir; in a workdir that has one, raises a
  DataError naming what changed since (a resumed or re-evaluated run must read the data it
  started with)."""
  path = pathlib.Path(workdir) / IDENTITY_FILE
  current = data_identity(config, split)
  if not path.is_file():
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      files.write_json(path, current)
    return
  recorded = json.loads(path.read_text())
  changes = identity_changes(recorded, current)
  if changes:
    listed = '\n  '.join(changes[:10]) + (f'\n  ... and {len(changes) - 10} more'
                                          if len(changes) > 10 else '')
    raise DataError(f'the data of the run in {workdir} changed since it started ({path}):\n  '
                    f'{listed}\nrestore the original data, or train and evaluate in a new '
                    '--workdir')


def identity_changes(recorded: dict, current: dict) -> list[str]:
  """Human-readable differences between two data identities (empty when they agree)."""
  changes = []
  if recorded.get('phantoms') != current.get('phantoms'):
    changes.append(f"synthetic generator parameters: run has {recorded.get('phantoms')}, "
                   f"now {current.get('phantoms')}")
  old_cases, new_cases = recorded.get('cases', {}), current.get('cases', {})
  for name in sorted(set(old_cases) | set(new_cases)):
    old, new = old_cases.get(name), new_cases.get(name)
    if old is None:
      changes.append(f'{name}: not in the run\'s data, now {new["role"]}')
    elif new is None:
      changes.append(f'{name}: {old["role"]} case of the run, now missing')
    elif old['role'] != new['role']:
      changes.append(f'{name}: {old["role"]} case of the run, now {new["role"]}')
    else:
      for kind in ('image', 'label'):
        if old.get(kind) != new.get(kind):
          changes.append(f'{name}: its {kind} file changed (size, time: run {old.get(kind)}, '
                         f'now {new.get(kind)})')
  return changes


def list_and_split(config: ml_collections.ConfigDict
                   ) -> tuple[dict[str, list[registry.Case]], registry.Split]:
  """(cases per center, the run's train/val/test split) of a config whose data root is resolved
  (`resolve_data_root`); the synthetic set is generated first when it is missing. Files are
  listed, not read."""
  if config.data.source == 'synthetic':
    from dualseg_jax.data import phantoms  # deferred: only synthetic runs generate data
    phantoms.ensure_synthetic_data(config.data)
  cases_by_center = registry.list_cases(config.data)
  return cases_by_center, registry.split_cases(config.data, cases_by_center, seed=config.seed)


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> PreparedData:
  """Lists, checks and caches the cases of the run's split; the test center is only listed."""
  cases_by_center, split = list_and_split(config)
  log.info('%s', split.summary())
  check_data_identity(config, split, workdir)
  if jax.process_index() == 0:
    files.write_json(pathlib.Path(workdir) / registry.SPLITS_FILE,
                     registry.nnunet_splits(config.data, cases_by_center, split, config.seed))
  # Preprocessing reads every case once, reports every unreadable or inconsistent one in a
  # single error (or skips and lists them with data.skip_bad_cases), and never reads the test center.
  if jax.process_count() > 1 and jax.process_index() != 0:
    multihost_utils.sync_global_devices('cache built by process 0')
  cache = preprocess.ensure_cache(config, list(split.train) + list(split.val))
  if jax.process_count() > 1 and jax.process_index() == 0:
    multihost_utils.sync_global_devices('cache built by process 0')
  problems = [problem for entry in cache.cases.values() for problem in entry.get('problems', [])]
  if problems:
    report = pathlib.Path(workdir) / 'data_problems.txt'
    report.write_text('\n'.join(problems) + '\n')
    log.warning('%d data problem(s) reported by preprocessing; listed in %s', len(problems), report)
  usable = {(case.center, case.case_id) for case in split.train + split.val
            if not cache.entry(case.center, case.case_id).get('failed')}
  split = registry.Split(train=[c for c in split.train if (c.center, c.case_id) in usable],
                         val=[c for c in split.val if (c.center, c.case_id) in usable],
                         test=list(split.test))
  train_cases = loader.cached_cases(cache, split.train, config.stage, config.data.centers)
  if not train_cases:
    raise DataError(f'no training case of {sorted({c.center for c in split.train})} is usable for '
                    f'stage {config.stage!r} (see the problems above): check the labels')
  loader.check_no_test_center(config, train_cases)
  return PreparedData(split=split, cache=cache, train_cases=train_cases, problems=problems)


def train_iterator(config: ml_collections.ConfigDict, data: PreparedData):
  """This process's share of the training batches (the loader derives its batch from
  data.batch_size and the process count)."""
  return loader.make_train_iterator(config, data.train_cases, data.cache, seed=config.seed)


def device_augmentation(config: ml_collections.ConfigDict):
  """`augment_fn(key, batch) -> batch` for the train step (with augment.spatial=False it still
  applies the intensity augmentation)."""
  return functools.partial(augment.augment_batch, augment_config=config.augment,
                           spacing_mm=tuple(config.data.target_spacing_mm),
                           slice_min_voxels=config.loss.slice_min_voxels)
