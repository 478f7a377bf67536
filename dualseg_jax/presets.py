"""Scale presets: `paper` (the published recipe, for GPUs), `quick` (trains in minutes on a CPU),
`tiny` (unit and smoke tests). With no preset named, `auto` chooses by the available backend.

A preset is data: dotted config keys and their values, set by `config_base.with_overrides` on
top of an experiment config, the same way ablation variants and cascade stages change one.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dualseg_jax import config_base

# What both CPU presets share, each for XLA's CPU backend and minutes-long schedules.
_CPU = {
    # XLA's CPU convolutions are slow at a few channels: 3 mm voxels keep the patches small.
    'data.target_spacing_mm': (3.0, 3.0, 3.0),
    # One block per level and one dilated block: a step in a fraction of a second.
    'model.blocks': (1, 1, 1, 1),
    'model.dilated_blocks': 1,
    # Ten times the paper's rate: schedules of hundreds of steps, not 100k.
    'optim.learning_rate': 1e-3,
    # Each flip combination is one more pass over every predicted case: one pass on a CPU.
    'inference.tta_flips': 1,
    # The reference's 150/800 epochs are days on a CPU: every cascade stage trains train.steps.
    'experiments.cascade_epochs': (),
    # XLA's CPU backend already uses every core for the convolutions; a quick patch costs a few
    # ms of host time, so loader processes would only compete with it.
    'data.num_workers': 0,
}

OVERRIDES: dict[str, dict[str, Any]] = {
    # The published recipe: config_base's values as they are.
    'paper': {},
    'quick': {
        **_CPU,
        'data.synthetic_cases_per_center': 8,
        # At _CPU's 3 mm, 24x48x48 patches (72x144x144 mm, the pancreas with its surroundings)
        # keep a step near 0.25 s with depth-folded convolutions (model.conv_impl).
        'data.patch_size': (24, 48, 48),
        'data.num_positions': 32,
        # A quarter of the paper's widths.
        'model.widths': (8, 16, 32, 64),
        'model.fusion_width': 32,
        'model.embedding_dim': 16,
        'model.decoder_widths': (16, 8, 8),
        'model.num_groups': 4,
        # 600 steps see 600 patches: the SDF terms at the paper's weight 1 and k = 1500 from the
        # start pull the shared decoder towards the distance field and the segmentation Dice stays
        # near 0 for hundreds of steps (docs/design.md, "Short schedules"); the paper preset
        # keeps them.
        'loss.weights.sdf_l1': 0.3,
        'loss.weights.sdf_to_mask_dice': 0.3,
        'loss.transform_k_start': 50.0,
        'loss.transform_anneal_steps': 300,
        # At initialisation the contrastive term's gradient on the encoder is ~260x the Dice
        # term's and Adam's second moment then damps the segmentation updates; its weight grows
        # from 0 over the first 300 steps (docs/design.md, "Short schedules").
        'loss.ramp_up_steps.contrastive': 300,
        # Whole-volume validation meets tissue far from the pancreas: half the patches go anywhere.
        'data.random_patch_fraction': 0.5,
        # Noise is drawn per voxel: at 3 mm voxels a structure averages ~4x fewer voxels than at
        # the paper's 2.5 x 1.5 x 1.5 mm, so the reference's U(0, 0.1) (up to 34 HU on the window)
        # would bury center_c's 15-30 HU tumour contrast; half of it keeps the same visibility.
        'augment.noise_std': (0.0, 0.05),
        # The first view is the CT itself and only it meets the label terms; the RandConv view
        # trains through the consistency and contrastive terms. Chosen on validation over the
        # method's form (label terms on both RandConv views): validation pancreas Dice +9 to +13
        # points in each of 3 seeds at 1000 steps (docs/results.md, section 12).
        'augment.raw_view': True,
        'loss.supervised_views': 'first',
        # About 22 minutes on 2 CPU cores, data and held-out report included, validated and saved
        # six times (each validation predicts 4 volumes, ~28 s). Chosen on validation: 1200 steps
        # ended at 0.61 validation pancreas Dice, still rising; 1800 end at 0.65, their best
        # (docs/results.md, sections 13 and 14).
        'train.steps': 1800,
        'train.log_every': 10,
        'train.eval_every': 300,
        'train.checkpoint_every': 300,
    },
    'tiny': {
        **_CPU,
        # He-normal kernels: the tiny network's test of the contrastive term's initial pull on the
        # encoder (tests/losses/test_gradient_balance.py) then reads 76-165x the Dice term's, far
        # from its bound, so a structural regression of the kind that once put it at 1460-1750x
        # (a 1x1 fusion conv) shows, rather than the PyTorch default's smaller heads (755-1406x).
        'model.kernel_init': 'he_normal',
        # The smallest data and network every code path runs on, in seconds on 2 CPU cores.
        'data.synthetic_cases_per_center': 3,
        'data.patch_size': (16, 32, 32),
        'data.num_positions': 8,
        'model.widths': (4, 8, 8, 8),
        'model.fusion_width': 8,
        'model.embedding_dim': 8,
        'model.decoder_widths': (8, 4, 4),
        'model.num_groups': 2,
        # Three steps that log, validate and checkpoint.
        'train.steps': 3,
        'train.log_every': 1,
        'train.grad_balance_every': 0,  # tests that need it switch it on
        'train.eval_every': 2,
        'train.checkpoint_every': 2,
        # Less window overlap, more windows a batch: prediction in tests stays short.
        'inference.overlap': 0.25,
        'inference.windows_per_batch': 8,
    },
}
PRESETS = tuple(OVERRIDES)


def resolve(preset: str | None) -> tuple[str, str]:
  """Returns (preset name, why it was chosen).

  Choosing by backend starts JAX's backend: multi-host runs, which must call
  jax.distributed.initialize() first, name their preset (FILE:paper).
  """
  if preset in (None, '', 'auto'):
    import jax  # deferred: choosing a preset is the only reason a config touches jax
    backend = jax.default_backend()
    if backend in ('gpu', 'tpu'):
      return 'paper', f'no preset named; {backend} available -> paper'
    return 'quick', 'no preset named; CPU only -> quick'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {PRESETS} (e.g. --config=FILE:quick)')
  return preset, f'preset {preset!r} named'


def apply(config: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
  """`config` with the preset's overrides and its name in `config.preset`, unlocked (the command
  line locks it once its own overrides are in)."""
  name, _ = resolve(preset)
  return config_base.with_overrides(config, {'preset': name, **OVERRIDES[name]}, lock=False)
