"""`launch.bench`'s rows on the tiny preset: a training run against the bare step, the loader."""

import json
import math

import numpy as np

import pytest

from tests.conftest import tiny_run_config
from dualseg_jax.tools import bench


@pytest.mark.slow
def test_training_run_is_measured_against_the_bare_step(phantom_root, capsys):
  config = tiny_run_config(phantom_root, steps=3)
  [row] = list(bench.run('train', config, repeats=2, train_steps=3))
  assert capsys.readouterr().out == ''  # stdout is left to the JSON rows
  json.dumps(row)
  assert row['what'] == 'train' and row['steps'] == 3 and row['log_every'] == 1
  # Three log windows of one step each; the first holds the compile and is left out.
  assert len(row['train_steps_per_s_windows']) == 2
  assert row['train_steps_per_s'] > 0 and row['bare_steps_per_s'] > 0
  assert math.isclose(row['train_over_bare'], row['train_steps_per_s'] / row['bare_steps_per_s'],
                      rel_tol=0.01)
  assert row['within_10_percent'] == (row['train_over_bare'] >= 0.9)
  assert row['bare_step_time_ms'] > 0 and row['patch_size'] == list(config.data.patch_size)


def test_too_few_steps_for_a_steady_state_name_the_flag(phantom_root):
  config = tiny_run_config(phantom_root, steps=3)
  config.train.log_every = 2
  with pytest.raises(ValueError, match='--train_steps=5'):
    list(bench.run('train', config, train_steps=5))


def test_step_row_names_the_device_and_how_the_convs_ran(phantom_root):
  config = tiny_run_config(phantom_root, steps=3)
  [row] = list(bench.run('step', config, repeats=2))
  assert row['what'] == 'step' and row['device'] and row['loss_finite']
  assert row['conv_impl'] == 'depth_folded'  # 'auto' on the CPU backend
  assert row['voxels_per_s'] > 0 and row['compile_s'] > 0


def test_targets_row_reports_that_a_perfect_sdf_gives_back_the_mask(phantom_root):
  """`--what=targets` on augmented tiny patches: at k = 1500 the transformed target SDF is the
  pancreas mask (mean Dice >= 0.98, docs/design.md "Signed distances"); a soft k scores lower.
  The tumours of the tiny set hold a handful of voxels at 3 mm (one of 5 voxels scores 0.90:
  three outside voxels sit within 0.3 mm of the surface); tests/data/test_augment.py checks a
  tumour of ~250 voxels, and the quick preset measures 0.991 over 36 tumour patches."""
  config = tiny_run_config(phantom_root, steps=3)
  [row] = list(bench.run('targets', config, loader_batches=4))
  json.dumps(row)
  assert row['benchmark'] == 'targets' and row['pancreas_patches'] > 0
  assert row['pancreas_k1500_dice_mean'] >= 0.98
  assert row['pancreas_k50_dice_mean'] < row['pancreas_k1500_dice_mean']


def test_balance_row_gives_each_active_term_an_encoder_gradient_norm(phantom_root):
  config = tiny_run_config(phantom_root, steps=3)
  [row] = list(bench.run('balance', config, loader_batches=2))
  json.dumps(row)
  assert row['what'] == 'balance' and row['params_from'] == 'initialisation'
  active = [name for name, weight in config.loss.weights.items() if weight != 0]
  for name in active:
    assert row[f'grad_norm/{name}'] is not None and row[f'grad_norm/{name}'] >= 0
  assert row['grad_norm/dice'] > 0 and row['call_time_ms'] > 0


def test_views_row_reports_how_much_pancreas_contrast_randconv_keeps(phantom_root):
  """A view keeps a share of the patch's pancreas contrast: quantiles in order, shares in [0, 1];
  the separability itself is the textbook d' (checked by hand on two constant regions + noise)."""
  from dualseg_jax.tools.bench import data as data_bench
  rng = np.random.default_rng(0)
  image = rng.normal(0.0, 1.0, (8, 8, 8))
  inside = np.zeros(image.shape, bool)
  inside[2:5, 2:5, 2:5] = True
  around = ~inside
  image[inside] += 3.0
  a, b = image[inside], image[around]
  expected = (a.mean() - b.mean()) / np.sqrt(0.5 * (a.var() + b.var()))
  assert np.isclose(data_bench._separability(image, inside, around), expected)
  config = tiny_run_config(phantom_root, steps=3)
  [row] = list(bench.run('views', config, loader_batches=2))
  json.dumps(row)
  assert row['benchmark'] == 'views' and row['patches'] > 0
  assert row['pancreas_patches'] == row['patches'] and 'tumour_patches' in row
  scales = ['gain_1', 'gain_sqrt2'] + (['tumour_gain_1', 'tumour_gain_sqrt2']
                                       if row['tumour_patches'] else [])
  for scale in scales:
    quantiles = [row[f'{scale}_kept_q{q}'] for q in (10, 25, 50, 75, 90)]
    assert quantiles == sorted(quantiles)
    assert 0.0 <= row[f'{scale}_inverted'] <= 1.0 and 0.0 <= row[f'{scale}_under_quarter'] <= 1.0
