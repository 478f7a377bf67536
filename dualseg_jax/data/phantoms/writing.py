"""Writing the synthetic centers in MSD layout (images, labels, dataset.json) with the parameters
that made them, and finding or generating the set a run's config asks for."""

from __future__ import annotations

import gzip
import json
import pathlib
import time

from absl import logging
import numpy as np

from dualseg_jax import files
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.data.phantoms import measurements
from dualseg_jax.data.phantoms import preview
from dualseg_jax.data.phantoms import rendering
from dualseg_jax.data.phantoms.protocols import CENTER_PROTOCOLS, CenterProtocol
from dualseg_jax.data.phantoms.rendering import PhantomCase
from dualseg_jax.errors import ConfigError, DataError

# Bump when the generator changes what it draws, or the order it draws in: a new version is a new
# folder (dataset_folder_name).
GENERATOR_VERSION = 2
PARAMETERS_FILE = 'phantoms.json'
LABEL_NAMES = {'0': 'background', '1': 'pancreas', '2': 'cancer'}


def _geometry(case: PhantomCase, orientation: str) -> volume_lib.Geometry:
  """Source-file geometry; 'LPS' stores x and y reversed, as DICOM-derived NIfTI often is."""
  spacing_z, spacing_y, spacing_x = case.spacing_mm
  origin_z, origin_y, origin_x = case.origin_mm
  depth, height, width = case.image_hu.shape
  affine = np.diag([spacing_x, spacing_y, spacing_z, 1.0])
  affine[:3, 3] = (origin_x, origin_y, origin_z)
  if orientation == 'LPS':
    affine[0, 0], affine[1, 1] = -spacing_x, -spacing_y
    affine[0, 3] = origin_x + spacing_x * (width - 1)
    affine[1, 3] = origin_y + spacing_y * (height - 1)
  elif orientation != 'RAS':
    raise ConfigError(f'CenterProtocol.orientation {orientation!r}: use "RAS" or "LPS"')
  return volume_lib.Geometry(affine=affine, shape=(width, height, depth))


def _write_nifti(path: pathlib.Path, array: np.ndarray, geometry: volume_lib.Geometry) -> None:
  image = volume_lib.to_nifti(array, geometry)
  image.header.set_xyzt_units('mm', 'sec')
  # gzip with a fixed mtime and no file name, so the same seed gives the same bytes.
  files.write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def _dataset_json(protocol: CenterProtocol, case_ids: list[str]) -> dict:
  return {
      'name': f'Synthetic pancreas CT, {protocol.name}',
      'description': 'Procedural abdominal CT with pancreas and pancreatic tumour labels.',
      'reference': 'dualseg_jax.data.phantoms',
      'licence': 'CC0',
      'tensorImageSize': '3D',
      'modality': {'0': 'CT'},
      'labels': dict(LABEL_NAMES),
      'numTraining': len(case_ids),
      'numTest': 0,
      'training': [{'image': f'./imagesTr/{case_id}.nii.gz',
                    'label': f'./labelsTr/{case_id}.nii.gz'} for case_id in case_ids],
      'test': [],
      'protocol': protocol.as_json(),
  }


def _check_centers(centers) -> tuple[str, ...]:
  centers = tuple(centers)
  unknown = [center for center in centers if center not in CENTER_PROTOCOLS]
  if unknown:
    raise ConfigError(
        f'data.centers holds {unknown}, which the synthetic generator does not know; '
        f'choose from {sorted(CENTER_PROTOCOLS)} or set data.source to "msd"/"folders"')
  return centers


def write_dataset(out_dir, cases_per_center: int, seed: int,
                  centers=tuple(CENTER_PROTOCOLS), preview_path=None,
                  measure_spacings_mm=(), keep_centers=()) -> dict:
  """Generate and write every center in MSD layout; returns per-center measurements and timing,
  with `resampled`: {spacing (z, y, x): measure_center there} for each of `measure_spacings_mm`.

  `keep_centers`: centers a finished generation with the same parameters already wrote there;
  their files stay untouched and the folder's record lists them with the new ones.
  """
  centers = _check_centers(centers)
  if cases_per_center < 1:
    raise ConfigError(f'cases_per_center is {cases_per_center}; it must be at least 1')
  out_dir = pathlib.Path(out_dir)
  previous = read_parameters(out_dir)
  keep_centers = [center for center in keep_centers if center not in centers]
  kept_files = [relative for relative in (previous or {}).get('files', [])
                if relative.split('/')[0] in keep_centers]
  # Until the new set is complete, nothing may claim that the folder holds a finished set.
  (out_dir / PARAMETERS_FILE).unlink(missing_ok=True)
  for center in centers:
    (out_dir / center / 'dataset.json').unlink(missing_ok=True)
  summary, written, preview_cases = {}, [], {}
  for center in centers:
    protocol = CENTER_PROTOCOLS[center]
    center_dir = out_dir / center
    (center_dir / 'imagesTr').mkdir(parents=True, exist_ok=True)
    (center_dir / 'labelsTr').mkdir(parents=True, exist_ok=True)
    cases, case_ids, seconds = [], [], 0.0
    for index in range(cases_per_center):
      case_id = f'{center}_{index:03d}'
      started = time.perf_counter()
      case = rendering.render_case(protocol, rendering.case_rng(seed, center, index))
      seconds += time.perf_counter() - started
      geometry = _geometry(case, protocol.orientation)
      _write_nifti(center_dir / 'imagesTr' / f'{case_id}.nii.gz', case.image_hu, geometry)
      _write_nifti(center_dir / 'labelsTr' / f'{case_id}.nii.gz', case.label, geometry)
      written += [f'{center}/imagesTr/{case_id}.nii.gz', f'{center}/labelsTr/{case_id}.nii.gz']
      if center not in preview_cases or (case.has_tumour and not preview_cases[center].has_tumour):
        preview_cases[center] = case
      cases.append(case)
      case_ids.append(case_id)
    files.write_bytes(center_dir / 'dataset.json',
                      (json.dumps(_dataset_json(protocol, case_ids), indent=2) + '\n').encode())
    summary[center] = measurements.measure_center(cases, protocol)
    summary[center]['seconds_per_case'] = seconds / cases_per_center
    summary[center]['resampled'] = {
        tuple(spacing): measurements.measure_center(cases, protocol,
                                                    resampled_spacing_mm=tuple(spacing))
        for spacing in measure_spacings_mm}
  written = kept_files + written
  _remove_stale_files(out_dir, previous, written)
  parameters = dict(generator_version=GENERATOR_VERSION, seed=int(seed),
                    cases_per_center=int(cases_per_center),
                    centers=list(keep_centers) + list(centers), files=written)
  files.write_bytes(out_dir / PARAMETERS_FILE, (json.dumps(parameters, indent=2) + '\n').encode())
  if preview_path:
    preview.write_preview(preview_path, preview_cases)
  return summary


def read_parameters(out_dir: pathlib.Path) -> dict | None:
  """The parameters a finished generation recorded in `out_dir`, or None."""
  path = out_dir / PARAMETERS_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(
        f'{path} is unreadable ({error}); delete it to regenerate the phantoms') from error


def _remove_stale_files(out_dir: pathlib.Path, previous: dict | None, written: list[str]) -> None:
  """Cases an earlier, larger generation wrote and this one did not; only files it listed."""
  if not previous:
    return
  for relative in set(previous.get('files', [])) - set(written):
    path = out_dir / relative
    if path.is_file() and path.resolve().is_relative_to(out_dir.resolve()):
      path.unlink()


def refuse_finished_set(out_dir) -> None:
  """Raises a DataError when `out_dir` holds a finished generation: runs may depend on it."""
  parameters = read_parameters(pathlib.Path(out_dir))
  if parameters is not None:
    made_with = {key: value for key, value in parameters.items() if key != 'files'}
    raise DataError(f'{out_dir} already holds synthetic phantoms ({made_with}); runs that read '
                    'them would change under them: choose another --out, or pass --overwrite')


def dataset_folder_name(data_config) -> str:
  """The folder name of one parameter set: runs that differ in generator version, seed or size
  each get their own folder, so no run regenerates the data another run reads."""
  return (f'v{GENERATOR_VERSION}-seed{int(data_config.synthetic_seed)}-'
          f'{int(data_config.synthetic_cases_per_center)}cases')


def default_root(data_config) -> pathlib.Path:
  """Where a synthetic run without data.root keeps its phantoms: data/synthetic/<parameters>."""
  return pathlib.Path('data') / 'synthetic' / dataset_folder_name(data_config)


def ensure_synthetic_data(data_config) -> pathlib.Path:
  """The phantom folder for `data_config`, generated when missing.

  A finished set is never replaced: a folder generated with other parameters is refused, since
  runs that trained or were evaluated on it would silently change. Two processes asking for the
  same missing set at once generate it once (the second waits, then finds it).
  """
  from dualseg_jax import locks  # deferred: only generation needs the lock
  root = pathlib.Path(data_config.root) if data_config.root else default_root(data_config)
  centers = _check_centers(data_config.centers)
  wanted = dict(generator_version=GENERATOR_VERSION, seed=int(data_config.synthetic_seed),
                cases_per_center=int(data_config.synthetic_cases_per_center))
  if _usable(root, centers, wanted):
    return root
  with locks.hold(root, 'generating synthetic phantoms', wait=True):
    if _usable(root, centers, wanted):  # another process generated it while this one waited
      return root
    logging.info('Generating synthetic phantoms in %s: %d cases per center, seed %d', root,
                 wanted['cases_per_center'], wanted['seed'])
    finished = _finished_centers(root, wanted)
    write_dataset(root, wanted['cases_per_center'], wanted['seed'],
                  [center for center in centers if center not in finished], keep_centers=finished)
  return root


def _usable(root: pathlib.Path, centers: tuple[str, ...], wanted: dict) -> bool:
  """Whether `root` holds a finished set with the `wanted` parameters for every center; raises
  when it holds a finished set made with other parameters."""
  previous = read_parameters(root)
  have_all = all((root / center / 'dataset.json').is_file() for center in centers)
  if previous is None:
    if have_all:
      logging.info('%s holds dataset.json for %s but no %s: using it as it is', root, centers,
                   PARAMETERS_FILE)
    return have_all  # otherwise an unfinished generation (or nothing): generate
  made_with = {key: previous.get(key) for key in wanted}
  if made_with != wanted:
    raise DataError(
        f'{root} holds synthetic phantoms generated with {made_with}; this config asks for '
        f'{wanted}. Runs that used that folder depend on it, so it is not regenerated: leave '
        'data.root empty (each parameter set gets its own folder under data/synthetic/) or set '
        '--config.data.root to a new folder')
  return have_all and set(centers) <= set(previous.get('centers', []))


def _finished_centers(root: pathlib.Path, wanted: dict) -> list[str]:
  """Centers a finished generation with the `wanted` parameters wrote in `root` (each center's
  cases depend only on the seed, so a generation adds the missing centers beside them)."""
  previous = read_parameters(root)
  if previous is None or any(previous.get(key) != value for key, value in wanted.items()):
    return []
  return list(previous.get('centers', []))

