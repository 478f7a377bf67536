"""Tests of the synthetic three-center CT generator: determinism, anatomy, center differences,
MSD layout and geometry, and the measurements its summaries rely on."""

import json
import math
import pathlib

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy import special

from dualseg_jax.data import phantoms
from dualseg_jax.data import volume as volume_lib
from dualseg_jax.errors import ConfigError, DataError

CENTERS = tuple(phantoms.CENTER_PROTOCOLS)
CUBE = np.ones((3, 3, 3), bool)


@pytest.fixture(scope='module')
def tumour_cases():
  """One case per center, forced to carry a tumour."""
  return {center: phantoms.render_case(protocol, phantoms.case_rng(0, center, 0), with_tumour=True)
          for center, protocol in phantoms.CENTER_PROTOCOLS.items()}


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp('phantoms')
  preview = out / 'preview.png'
  summary = phantoms.write_dataset(out, cases_per_center=1, seed=3, preview_path=preview)
  return out, summary, preview


def _files(root):
  return sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file() and p.suffix != '.png')


def test_same_seed_gives_same_bytes(written, tmp_path):
  out, _, _ = written
  phantoms.write_dataset(tmp_path, cases_per_center=1, seed=3)
  assert _files(out) == _files(tmp_path)
  assert len(_files(out)) == 1 + 3 * 3  # phantoms.json; per center dataset.json, image, label
  for relative in _files(out):
    assert (out / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative


def test_case_depends_only_on_seed_center_and_index(written, tmp_path):
  out, _, _ = written
  phantoms.write_dataset(tmp_path / 'same', cases_per_center=1, seed=3, centers=('center_b',))
  phantoms.write_dataset(tmp_path / 'other', cases_per_center=1, seed=4, centers=('center_b',))
  image = 'center_b/imagesTr/center_b_000.nii.gz'
  assert (tmp_path / 'same' / image).read_bytes() == (out / image).read_bytes()
  first = np.asarray(nib.load(out / image).dataobj)
  second = np.asarray(nib.load(tmp_path / 'other' / image).dataobj)
  assert first.shape == second.shape
  assert np.mean(first != second) > 0.5


def test_tumour_lies_in_or_touches_the_pancreas(tumour_cases):
  for center, case in tumour_cases.items():
    tumour, gland = case.label == 2, case.label == 1
    assert tumour.sum() > 0, center
    assert (ndimage.binary_dilation(tumour, CUBE) & gland).any(), center
    components, count = ndimage.label(tumour, structure=CUBE)
    for index in range(1, count + 1):
      component = components == index
      assert (ndimage.binary_dilation(component, CUBE) & gland).any(), (center, index)


def test_case_without_tumour_has_no_tumour_label():
  protocol = phantoms.CENTER_PROTOCOLS['center_b']
  case = phantoms.render_case(protocol, phantoms.case_rng(0, 'center_b', 1), with_tumour=False)
  assert not case.has_tumour
  assert case.tumour_contrast_hu == 0.0
  assert set(np.unique(case.label)) == {0, 1}


def test_organ_volumes_are_plausible(tumour_cases):
  # Adult references: pancreas 50-100 mL, spleen 100-250 mL, each kidney 120-200 mL, liver
  # 1200-1800 mL. The scan covers about 150-240 mm around the pancreas, so the liver dome and
  # parts of spleen or kidneys may fall outside: the lower bounds allow for that.
  ranges = dict(pancreas=(30, 150), liver=(500, 2500), spleen=(60, 450), kidneys=(150, 600),
                tumour=(0.3, 40))
  for center, case in tumour_cases.items():
    for organ, (low, high) in ranges.items():
      assert low <= case.organ_volumes_ml[organ] <= high, (center, organ, case.organ_volumes_ml)
    # The label, on the stored grid, agrees with the rendered gland volume.
    label_ml = (case.label >= 1).sum() * np.prod(case.spacing_mm) / 1000.0
    assert label_ml == pytest.approx(case.organ_volumes_ml['pancreas'], rel=0.2), center


def test_hounsfield_units_match_the_protocol(tumour_cases):
  for center, case in tumour_cases.items():
    protocol = phantoms.CENTER_PROTOCOLS[center]
    image = case.image_hu.astype(float)
    air = case.tissue == phantoms.Tissue.AIR
    fat = ndimage.binary_erosion(case.tissue == phantoms.Tissue.FAT, iterations=2)
    # Air is clipped at -1024, which biases the median of noisy air upwards by little.
    assert np.median(image[air]) == pytest.approx(-1000 + protocol.hu_offset, abs=12), center
    assert np.median(image[fat]) == pytest.approx(-100 + protocol.hu_offset, abs=15), center
    measured = phantoms.measure_case(case, protocol)
    # Partial volume with surrounding fat lowers the measured gland, more so in thick slices.
    assert case.pancreas_hu - 30 < measured['pancreas_hu'] < case.pancreas_hu + 5, center
    assert protocol.tumour_contrast_hu[0] <= case.tumour_contrast_hu <= (
        protocol.tumour_contrast_hu[1]), center
  # With thin slices and a sharp kernel the drawn tumour contrast survives into the image; thick
  # slices and smooth kernels mix small lesions with their surroundings.
  case = tumour_cases['center_a']
  measured = phantoms.measure_case(case, phantoms.CENTER_PROTOCOLS['center_a'])
  assert measured['tumour_contrast_hu'] == pytest.approx(case.tumour_contrast_hu, abs=15)


def test_centers_differ_measurably(tumour_cases):
  stats = {center: phantoms.measure_center([case], phantoms.CENTER_PROTOCOLS[center])
           for center, case in tumour_cases.items()}
  spacings = {tuple(row['spacing_mm']) for row in stats.values()}
  assert len(spacings) == 3
  a, b, c = (stats[center] for center in CENTERS)
  assert a['noise_sigma_hu'] * 1.3 < b['noise_sigma_hu'] and b['noise_sigma_hu'] * 1.2 < c[
      'noise_sigma_hu']
  # Sharp < standard < smooth kernel; center_c's smooth kernel is a little wider than center_b's.
  assert a['edge_width_mm'] + 1.0 < b['edge_width_mm'] and b['edge_width_mm'] + 0.3 < c[
      'edge_width_mm']
  pancreas = sorted(row['pancreas_hu'] for row in stats.values())
  assert min(np.diff(pancreas)) > 10.0
  # The nominal noise is recovered within the share the local-mean filter removes.
  for center in CENTERS:
    nominal = phantoms.CENTER_PROTOCOLS[center].noise_sigma_hu
    assert 0.7 * nominal < stats[center]['noise_sigma_hu'] < 1.15 * nominal, center


@pytest.fixture(scope='module')
def tumour_cases_per_center(tumour_cases):
  """Four cases per center, each forced to carry a tumour (the first is tumour_cases')."""
  return {center: [tumour_cases[center]] + [
      phantoms.render_case(protocol, phantoms.case_rng(0, center, index), with_tumour=True)
      for index in (1, 2, 3)] for center, protocol in phantoms.CENTER_PROTOCOLS.items()}


def test_tumours_are_visible_at_the_quick_spacing_and_center_c_is_the_hardest(
    tumour_cases_per_center):
  stats = {center: phantoms.measure_center(cases, phantoms.CENTER_PROTOCOLS[center],
                                           resampled_spacing_mm=(3.0, 3.0, 3.0))
           for center, cases in tumour_cases_per_center.items()}
  for center, row in stats.items():
    assert row['tumour_cases'] == 4
    assert np.allclose(row['spacing_mm'], 3.0, atol=0.1), center
    # The floor holds for the center's mean: a single small lesion's mean is itself noisy (the
    # noise is correlated over millimetres) and may measure below it, as faint lesions do.
    assert row['tumour_cnr'] > phantoms.VISIBILITY_CNR_FLOOR, (center, row['tumour_cnr'])
    # The gland stands out from peripancreatic fat and from bowel, as on real scans.
    assert row['pancreas_fat_contrast_hu'] > 100, center
  others = [stats[center] for center in CENTERS if center != 'center_c']
  assert all(stats['center_c']['tumour_cnr'] < row['tumour_cnr'] for row in others)
  thickness = {center: phantoms.CENTER_PROTOCOLS[center].slice_thickness_mm for center in CENTERS}
  assert max(thickness, key=thickness.get) == 'center_c'


def test_noise_measure_matches_white_noise_formula():
  rng = np.random.default_rng(0)
  sigma_hu = 10.0
  image = 40.0 + sigma_hu * rng.standard_normal((40, 40, 40))
  region = np.ones(image.shape, bool)
  # The residual image - G*image of white noise has variance sigma^2 (1 - 2 g0 + sum g^2) with g
  # the 3D kernel: scipy's Gaussian truncated at 4 sigma, i.e. radius 6 for sigma 1.5.
  offsets = np.arange(-6, 7)
  weights = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
  weights /= weights.sum()
  expected = sigma_hu * math.sqrt(1 - 2 * weights[6] ** 3 + (weights ** 2).sum() ** 3)
  assert phantoms.noise_sigma_hu(image, region) == pytest.approx(expected, rel=0.03)


def test_edge_width_of_an_error_function_edge():
  sigma_mm, spacing_mm = 3.0, (2.0, 1.0, 1.0)
  x = np.arange(200) * spacing_mm[2]
  radius = 60.0
  image = np.zeros((4, 120, 200))
  for row in range(120):
    half_width = math.sqrt(max(radius ** 2 - (row - 60.0) ** 2, 0.0))
    distance = half_width - np.abs(x - 100.0)  # positive inside a disc of the given radius
    image[:, row] = -1000 + 900 * 0.5 * (1 + special.erf(distance / (sigma_mm * math.sqrt(2))))
  # 10-90 % rise of a Gaussian-blurred step: 2 * 1.2816 sigma.
  assert phantoms.edge_width_mm(image, spacing_mm) == pytest.approx(2.5631 * sigma_mm, rel=0.05)


def test_dataset_json_and_files(written):
  out, summary, _ = written
  assert set(summary) == set(CENTERS)
  parameters = json.loads((out / phantoms.PARAMETERS_FILE).read_text())
  assert parameters['seed'] == 3 and parameters['cases_per_center'] == 1
  for center in CENTERS:
    dataset = json.loads((out / center / 'dataset.json').read_text())
    assert dataset['modality'] == {'0': 'CT'}
    assert dataset['labels'] == {'0': 'background', '1': 'pancreas', '2': 'cancer'}
    assert dataset['numTraining'] == len(dataset['training']) == 1
    assert dataset['protocol']['name'] == center
    assert 'description' in dataset['protocol']
    for entry in dataset['training']:
      image = nib.load(out / center / entry['image'])
      label = nib.load(out / center / entry['label'])
      assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
      assert np.allclose(image.affine, label.affine) and image.shape == label.shape
      assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
      assert entry['image'].startswith('./imagesTr/center_')


def test_stored_geometry_round_trips_to_the_canonical_arrays(written):
  out, _, _ = written
  for center in CENTERS:
    protocol = phantoms.CENTER_PROTOCOLS[center]
    image_hu, label, spacing_mm = phantoms.generate_case(protocol, phantoms.case_rng(3, center, 0))
    assert image_hu.dtype == np.int16 and label.dtype == np.uint8
    assert image_hu.shape == label.shape == protocol.shape_zyx
    assert spacing_mm == protocol.spacing_mm
    stored = nib.load(out / center / 'imagesTr' / f'{center}_000.nii.gz')
    signs = np.sign(np.diag(stored.affine)[:3])
    expected_signs = (-1, -1, 1) if protocol.orientation == 'LPS' else (1, 1, 1)
    assert tuple(signs) == expected_signs, center
    volume = volume_lib.volume_from_source(np.asarray(stored.dataobj), stored.affine)
    assert np.allclose(volume.spacing_mm, protocol.spacing_mm)
    np.testing.assert_array_equal(volume.array, image_hu)
    stored_label = nib.load(out / center / 'labelsTr' / f'{center}_000.nii.gz')
    label_volume = volume_lib.volume_from_source(np.asarray(stored_label.dataobj),
                                                 stored_label.affine)
    np.testing.assert_array_equal(label_volume.array, label)


def test_preview_png_is_written(written):
  import matplotlib.image
  _, _, preview = written
  assert preview.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  pixels = matplotlib.image.imread(preview)
  assert pixels.shape[0] > 300 and pixels.shape[1] > 600
  assert pixels[..., :3].std() > 0.1  # an image, not a blank canvas


def _data_config(root, cases, centers=('center_b',)):
  return ml_collections.ConfigDict(dict(
      root=str(root), centers=centers, synthetic_cases_per_center=cases, synthetic_seed=0))


def test_ensure_synthetic_data_generates_reuses_and_never_replaces_a_finished_set(tmp_path):
  root = tmp_path / 'synthetic'
  assert phantoms.ensure_synthetic_data(_data_config(root, 2)) == root
  first = root / 'center_b' / 'imagesTr' / 'center_b_001.nii.gz'
  assert first.is_file()
  stamp = first.stat().st_mtime_ns
  phantoms.ensure_synthetic_data(_data_config(root, 2))
  assert first.stat().st_mtime_ns == stamp  # untouched
  # Runs that read this folder depend on it: other parameters are refused, not regenerated.
  with pytest.raises(DataError, match="'cases_per_center': 2.*'cases_per_center': 1.*new folder"):
    phantoms.ensure_synthetic_data(_data_config(root, 1))
  assert first.stat().st_mtime_ns == stamp
  assert json.loads((root / 'center_b' / 'dataset.json').read_text())['numTraining'] == 2
  # A center added later is generated beside the finished ones, which stay as they were.
  phantoms.ensure_synthetic_data(_data_config(root, 2, centers=('center_a',)))
  assert (root / 'center_a' / 'dataset.json').is_file()
  assert first.stat().st_mtime_ns == stamp
  assert phantoms.read_parameters(root)['centers'] == ['center_b', 'center_a']
  with pytest.raises(ConfigError, match='data.centers'):
    phantoms.ensure_synthetic_data(_data_config(root, 1, centers=('hospital_x',)))


def test_an_unfinished_generation_is_generated_again(tmp_path):
  root = tmp_path / 'synthetic'
  phantoms.ensure_synthetic_data(_data_config(root, 1))
  (root / 'phantoms.json').unlink()  # as a generation killed before its last write leaves it
  (root / 'center_b' / 'dataset.json').unlink()
  phantoms.ensure_synthetic_data(_data_config(root, 1))
  assert phantoms.read_parameters(root)['cases_per_center'] == 1


def test_each_parameter_set_has_its_own_default_folder():
  names = {phantoms.dataset_folder_name(_data_config('', cases)) for cases in (2, 3)}
  names.add(phantoms.dataset_folder_name(ml_collections.ConfigDict(dict(
      synthetic_cases_per_center=2, synthetic_seed=1))))
  assert len(names) == 3
  assert phantoms.default_root(_data_config('', 8)) == pathlib.Path(
      'data', 'synthetic', f'v{phantoms.GENERATOR_VERSION}-seed0-8cases')


def test_make_phantoms_refuses_a_finished_set_unless_told_to_replace_it(tmp_path):
  root = tmp_path / 'synthetic'
  phantoms.refuse_finished_set(root)  # nothing there yet
  phantoms.ensure_synthetic_data(_data_config(root, 1))
  with pytest.raises(DataError, match='already holds synthetic phantoms.*--overwrite'):
    phantoms.refuse_finished_set(root)
