"""Everything a training run needs from the data side, in order: the data set (synthetic ones are
generated on first use), the split, the checks, the preprocessing cache, the training iterator and
the device-side augmentation."""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import ml_collections
from jax.experimental import multihost_utils

from dualseg_jax.data import augment
from dualseg_jax.data import loader
from dualseg_jax.data import preprocess
from dualseg_jax.data import registry
from dualseg_jax.errors import DataError

log = logging.getLogger('dualseg_jax')

DEFAULT_SYNTHETIC_ROOT = pathlib.Path('data') / 'synthetic'


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
  """Synthetic runs without a root use ./data/synthetic, written as an absolute path so that the
  run's config.json still finds the data from another directory."""
  if config.data.source == 'synthetic' and not config.data.root:
    config.data.root = str(DEFAULT_SYNTHETIC_ROOT.absolute())


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> PreparedData:
  """Lists, checks and caches the cases of the run's split; the test center is only listed."""
  if config.data.source == 'synthetic':
    from dualseg_jax.data import phantoms  # deferred: only synthetic runs generate data
    phantoms.ensure_synthetic_data(config.data)
  cases_by_center = registry.list_cases(config.data)
  split = registry.split_cases(config.data, cases_by_center, seed=config.seed)
  log.info('%s', split.summary())
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


def train_iterator(config: ml_collections.ConfigDict, data: PreparedData, local_batch: int):
  del local_batch  # the loader derives it from data.batch_size and the process count
  return loader.make_train_iterator(config, data.train_cases, data.cache, seed=config.seed)


def device_augmentation(config: ml_collections.ConfigDict):
  """`augment_fn(key, batch) -> batch` for the train step (with augment.spatial=False it still
  applies the intensity augmentation)."""
  return functools.partial(augment.augment_batch, augment_config=config.augment,
                           spacing_mm=tuple(config.data.target_spacing_mm),
                           slice_min_voxels=config.loss.slice_min_voxels)
