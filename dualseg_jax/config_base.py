"""Every knob of a run, with the paper's values as defaults; experiment configs start from here.

Sections: `data` (centers, splits, preprocessing, patches), `model` (network), `loss` (which
losses and their weights), `augment` (RandConv views and spatial/intensity augmentation),
`optim` (Adam and the schedule), `train` (loop, logging, checkpoints), `inference`
(sliding window, flips, post-processing), `evaluation` (metrics).

Every change to a config goes through `with_overrides` (dotted keys: presets, ablations, cascade
stages); `flatten` and `differences` compare two; `load_saved` reads back a run's config.json.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import ml_collections

from dualseg_jax import structures
from dualseg_jax.errors import ConfigError

# Keys added after runs had been made whose default computes something else than those runs did:
# a saved config.json without the key ran with the value here. Resuming and predicting read it so.
VALUES_BEFORE_KEYS: dict[str, Any] = {
    'augment.randconv_gain': math.sqrt(2.0),
    # Each level started with a strided residual block, kernels drawn he-normal.
    'model.downsample': 'strided_block',
    'model.kernel_init': 'he_normal',
    # Zoom, rotation, gamma and noise were drawn for every sample.
    'augment.scale_prob': 1.0,
    'augment.rotation_prob': 1.0,
    'augment.gamma_prob': 1.0,
    'augment.noise_prob': 1.0,
    'experiments.cascade_recipe': 'uniform',
    'experiments.cascade_tumour_rounds': 1,
    # Every stage trained train.steps.
    'experiments.cascade_epochs': (),
    # A ReLU followed the heads' group norm.
    'model.head_activation': 'relu',
}


def with_earlier_values(saved: dict) -> dict:
  """A copy of a saved config dict holding every VALUES_BEFORE_KEYS key it lacks at its earlier
  value (only where the key's section exists, so partial dicts stay partial)."""
  saved = copy.deepcopy(saved)
  for dotted_key, value in VALUES_BEFORE_KEYS.items():
    *parents, leaf = dotted_key.split('.')
    node = saved
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = value
  return saved

STAGES = structures.STAGES  # what `config.stage` may name
SYNTHETIC_CENTERS = ('center_a', 'center_b', 'center_c')


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 2022
  # Which network is trained: `joint` predicts (pancreas incl. tumour, tumour) in one model;
  # the four cascade stages predict one structure each.
  config.stage = 'joint'
  config.preset = ''  # 'paper' or 'quick'; resolved by the experiment config

  data = config.data = ml_collections.ConfigDict()
  data.source = 'synthetic'  # 'synthetic' | 'msd' | 'folders'
  data.root = ''  # synthetic: where the phantoms live (generated when empty); msd: Task07 root
  data.cache_dir = ''  # preprocessed arrays; '' -> <root>/cache
  data.centers = SYNTHETIC_CENTERS
  # Per center: a root in MSD layout, or a CSV/JSON manifest of image/label pairs. Empty -> <root>/<center>.
  data.center_roots = ml_collections.ConfigDict()
  data.manifest = ''  # optional CSV/JSON listing (center, image, label) rows
  data.label_map = ''  # e.g. '7:1' maps source label 7 to pancreas; '' keeps 0/1/2 as they are
  data.test_center = 'center_c'  # held out: never read by training
  data.val_fraction = 0.2  # of each training center's cases, for validation
  data.num_folds = 4  # in-domain k-fold for the pancreas protocol
  data.fold = -1  # -1: leave-one-center-out split; k >= 0: in-domain fold k
  # In-domain folds from a file in nnU-Net's splits_final.json format instead of drawn here (its
  # fold count must equal data.num_folds); every run writes its folds as <workdir>/splits.json.
  data.splits_file = ''
  data.synthetic_cases_per_center = 8
  data.synthetic_seed = 0
  data.window_hu = (-100.0, 240.0)
  data.target_spacing_mm = (2.5, 1.5, 1.5)  # (z, y, x)
  data.patch_size = (80, 224, 224)  # (D, H, W), multiples of 8
  data.batch_size = 1  # global, in volumes (each gives two views)
  data.foreground_fraction = 0.67  # tumour stages: share of patches centred on tumour
  data.joint_tumour_fraction = 0.33  # joint stage: share of patches centred on tumour
  # Share of patches placed anywhere in the case (not the fine stages, which only ever see their
  # ROI): whole-volume inference meets tissue far from the pancreas, so training must too.
  data.random_patch_fraction = 0.25
  # Training crops lie in the box of this structure ('pancreas' | 'tumour'; a case without tumour
  # falls back to its pancreas box) grown by random margins; the reference's fine tumour stage
  # crops around the tumour box.
  data.roi_structure = 'pancreas'
  data.crop_margin_xy = (0, 30)  # random ROI margin in voxels, in-plane (negative shrinks)
  data.crop_margin_z_fraction = (0.01, 0.1)  # random ROI margin as a fraction of the slices
  # Contrastive positions on the 1/8 grid: 'per_slice' (the method's: per 1/8 slice one skeleton
  # cell and one cell of the ring's 2D skeleton, D/8 rows) | 'uniform' (data.num_positions cells
  # drawn with replacement from the skeleton and from the ring).
  data.contrastive_sampling = 'per_slice'
  data.num_positions = 64  # 'uniform' sampling: positions per sample and kind
  # Loader processes. One paper-scale patch (80x224x224, two views' targets) costs ~200 ms of
  # host time and an H200 step ~120 ms: with 0 workers the training loop ran at 0.58 of the
  # bare step, with 6 at 1.01 (docs/results.md, section 15). The CPU presets set 0.
  data.num_workers = 6
  data.prefetch = 2
  data.skip_bad_cases = False
  data.image_interpolation = 'linear'  # resampling the CT to target_spacing_mm: 'linear' | 'cubic'
  data.body_threshold_hu = -500.0  # cache crop: largest component above this HU is the body
  data.body_margin_mm = 10.0  # kept around the body's bounding box
  data.ring_side_vox = (10, 20)  # contrastive negatives: cube side range of the ring dilation

  model = config.model = ml_collections.ConfigDict()
  model.widths = (32, 64, 128, 256)  # encoder widths per resolution level
  # Residual blocks per level; with model.downsample='separate' levels 1-3 count the identity
  # blocks after the downsampling unit: (1, 2, 2, 2) is the method's 2 per level.
  model.blocks = (1, 2, 2, 2)
  # How levels 1-3 halve the resolution: 'separate' (the method's: a GN-ReLU-3x3x3 conv with
  # stride 2 from the previous width, then model.blocks[l] identity blocks) | 'strided_block' (the
  # level's first residual block is strided and changes the width: 16,686,340 parameters with the
  # other defaults against 18,966,212, and the parameter names of checkpoints trained with it).
  model.downsample = 'separate'
  model.dilated_blocks = 2  # extra blocks at the bottom
  model.dilation = 2
  model.fusion_width = 128
  model.embedding_dim = 32
  model.decoder_widths = (64, 32, 32)
  model.dropout = 0.1  # channel dropout before the fusion conv
  model.num_groups = 8
  model.num_classes = 2  # joint: (pancreas incl. tumour, tumour)
  # Initial foreground probability of every voxel (the logits' bias); patches hold ~1-5% foreground.
  model.foreground_prior = 0.02
  # A group norm before the 1x1 segmentation and SDF heads (the method has none): without it the
  # weight-standardised decoder's logits start with a standard deviation of ~18 at paper scale
  # and the SDF's tanh saturated on >90% of voxels (models/unet.py).
  model.head_norm = True
  # What follows that norm: 'none' (the heads read signed normalised features) | 'relu'. Both
  # heads read the same channels: after a ReLU the SDF regression can code the pancreas as
  # channels switched off, and the logits there are then their bias, at logit(prior) ~ -3.9,
  # which Adam moves by ~1e-3 per step (docs/design.md, "Heads").
  model.head_activation = 'none'
  # Initial conv and dense kernels: 'torch_default' (the method's: PyTorch's default,
  # U(+-1/sqrt(fan_in)) for kernels and biases) | 'he_normal' (std sqrt(2 / fan_in), zero biases).
  model.kernel_init = 'torch_default'
  model.slice_head = False  # fine tumour stage: per-slice "contains tumour" classifier
  model.slice_hidden = 128
  model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
  model.remat = False
  # Strided convs as stride-1 convs read at every 2nd voxel: same numbers; faster gradients on
  # XLA's CPU backend for strided residual blocks, slower for the separate downsampling units
  # (the quick step 605 against 480 ms, docs/design.md), so no preset switches it on.
  model.subsample_stride = False
  # How a 3D conv is computed, same parameters and numbers: 'conv3d' (one 3D convolution),
  # 'depth_folded' (depth taps folded into channels, a 2D convolution per slice: 3-20x faster on
  # XLA's CPU backend), 'auto' (depth_folded on CPU, conv3d on GPU/TPU).
  model.conv_impl = 'auto'

  loss = config.loss = ml_collections.ConfigDict()
  # Name -> weight; a weight of 0 switches a loss off. Looked up in dualseg_jax.losses.
  loss.weights = ml_collections.ConfigDict(dict(
      dice=1.0, bce=1.0, sdf_l1=1.0, sdf_to_mask_dice=1.0, consistency=1.0,
      contrastive=0.1, slice_bce=0.0))
  # Name -> steps over which that term's weight grows linearly from 0 (absent: full weight from
  # step 0), e.g. --config.loss.ramp_up_steps.contrastive=150.
  loss.ramp_up_steps = ml_collections.ConfigDict({name: 0 for name in loss.weights})
  loss.transform = 'smooth'  # SDF -> mask: 'smooth' sigmoid(-k*sdf) | 'hard' threshold
  loss.transform_k = 1500.0
  loss.transform_k_start = 0.0  # > 0: anneal k from here to transform_k over anneal_steps
  loss.transform_anneal_steps = 0
  loss.transform_anneal = 'geometric'  # 'geometric' (equal steps per factor) | 'linear'
  loss.consistency_on_sdf = False  # fine stage: also MSE between the views' SDFs
  # Which patches the SDF regression (sdf_l1) reads: 'surface' (the method: a channel whose patch
  # holds the structure's surface) | 'all' (also patches without the structure, whose target is
  # the distance to it beyond the patch: the SDF head then meets tissue far from the pancreas).
  loss.sdf_l1_on = 'surface'
  # How the views' sigmoid maps are made to agree: 'mse' (the reference's tumour stages) |
  # 'cosine' (1 - cosine similarity per sample, the reference's coarse pancreas stage).
  loss.consistency_form = 'mse'
  loss.temperature = 0.05
  # 'two_class': the method's label-based NT-Xent (skeleton with skeleton, ring with ring, across
  # slices and views) | 'view_paired': a position's partner is itself in the other view.
  loss.contrastive_form = 'two_class'
  loss.slice_min_voxels = 10
  # Which views the terms that compare a prediction with the label read: 'all' (the method) |
  # 'first' (the first view only; with augment.raw_view=True that is the CT itself, and the
  # RandConv views train the network only through the consistency and contrastive terms).
  loss.supervised_views = 'all'
  loss.dice_smooth = 1e-5  # added to both sides of every soft Dice ratio

  augment = config.augment = ml_collections.ConfigDict()
  augment.num_views = 2  # 1: no RandConv, a single view
  # True: the first view is the CT itself and only the others are RandConv views, the reference's
  # recipe for its pancreas-fine stage; the segmentation terms then always see one undisturbed
  # image (a RandConv view keeps a median 69% of the pancreas's contrast, docs/results.md).
  augment.raw_view = False
  augment.randconv_kernel_sizes = (3, 5, 7)
  # RandConv kernels have std gain / sqrt(k^3): 1 is the method's reference (torch's
  # kaiming_normal_ with its default gain); sqrt(2) (~1.414) reproduces runs before this key.
  augment.randconv_gain = 1.0
  augment.spatial = True
  # Isotropic zoom factor, drawn per sample with probability scale_prob. The reference also draws
  # a scale in 0.8-1.2 with p 0.5 but then resizes the patch back to its shape, so its zoom has no
  # effect (a reference defect); this zoom is real, and --config.augment.scale_prob=0 restores the
  # reference's effective behaviour.
  augment.scale = (0.8, 1.2)
  augment.scale_prob = 0.5  # the reference's p for its scale draw
  augment.rotation_deg = 15.0  # the reference: U(-15, 15) degrees about each axis
  # The reference rotates with p 0.5; one draw per sample switches all three angles on or off.
  augment.rotation_prob = 0.5
  augment.elastic_prob = 0.1  # the reference's tumour stages (its pancreas stages: 0.5)
  augment.elastic_sigma_vox = 4.0
  augment.elastic_magnitude_vox = 4.0
  augment.flip_prob = 0.5  # per axis, the reference's
  augment.gamma = (0.7, 1.5)  # exponent on the [0, 1] image
  augment.gamma_prob = 0.5  # the reference's p
  # Additive Gaussian noise on the [0, 1] image, std U(0, 0.1) with p 0.5 as in the reference.
  # Every *_prob at 1 with noise_std (0.0, 0.05) reproduces the draws of runs made before the
  # *_prob keys (every transform on every sample).
  augment.noise_std = (0.0, 0.1)
  augment.noise_prob = 0.5

  optim = config.optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4
  optim.weight_decay = 5e-4
  optim.decoupled = False  # False: L2 added to the gradient (torch Adam); True: AdamW
  optim.schedule = 'poly'  # 'poly' | 'constant'
  optim.poly_power = 0.9
  optim.warmup_steps = 0

  train = config.train = ml_collections.ConfigDict()
  train.steps = 100_000
  train.log_every = 10
  # Every N steps, each active loss term's gradient norm over the encoder (metrics.jsonl
  # 'grad_norm/<term>', a panel of curves.png); 0: off. Each time about two steps' time, plus one
  # compile as long as the step's (docs/design.md, "Gradient balance on the encoder").
  train.grad_balance_every = 100
  train.eval_every = 1000  # 0: no validation
  train.checkpoint_every = 1000
  train.keep_checkpoints = 2
  train.max_bad_steps = 20  # non-finite steps in a row before the run stops
  train.tensorboard = False
  train.evaluate_test_center = True

  inference = config.inference = ml_collections.ConfigDict()
  inference.overlap = 0.5
  inference.windows_per_batch = 4
  inference.tta_flips = 8  # number of flip combinations (1 = none, up to 8)
  inference.threshold = 0.5
  # Connected components kept per structure: 'none' | 'largest' | 'fraction' (larger than
  # component_fraction x the largest) | 'min_volume' (at least min_component_mm3 each) |
  # 'largest_probability_mass' (the largest summed probability, and those above
  # component_fraction x that mass). See dualseg_jax/inference/postprocess.py.
  # Chosen on validation (docs/results.md, section 6): 'largest'.
  inference.postprocess = 'largest'
  inference.component_fraction = 0.5
  inference.min_component_mm3 = 500.0  # 'min_volume': about a sphere of 1 cm diameter
  inference.tumour_inside_pancreas = True
  inference.pancreas_dilation_vox = 3
  inference.device_buffer_max_voxels = 256 * 512 * 512
  inference.checkpoint = 'best'  # 'best' (workdir/best, else the latest) | 'latest'

  evaluation = config.evaluation = ml_collections.ConfigDict()
  evaluation.nsd_tolerance_mm = 2.0

  experiments = config.experiments = ml_collections.ConfigDict()
  # Cascade (launch.cascade): margins in voxels (z, y, x) of the canonical input grid around the
  # pancreas found by the previous stage; the fine stages predict only inside that box.
  # The reference's: pancreas fine inside the coarse pancreas + 5 slices / 25 voxels in-plane,
  # tumour coarse inside the fine pancreas + 8 / 30, tumour fine inside the tumour found so far
  # + 5 / 25, re-cropped to its own result for cascade_tumour_rounds rounds.
  experiments.cascade_pancreas_margin_vox = (5, 25, 25)
  experiments.cascade_tumour_coarse_margin_vox = (8, 30, 30)
  experiments.cascade_tumour_margin_vox = (5, 25, 25)
  experiments.cascade_tumour_rounds = 4
  experiments.cascade_fine_patch_size = ()  # (D, H, W) of the fine stages; () keeps data.patch_size
  # 'reference': each stage trains with the reference's recipe (docs/fidelity.md): pancreas coarse
  # at cascade_coarse_spacing_factor x the spacing (half the in-plane resolution), Dice + BCE +
  # NT-Xent + cosine consistency; pancreas fine in its pancreas box, Dice + BCE + NT-Xent on one
  # raw and one RandConv view; the tumour stages with the SDF terms, tumour fine cropped around
  # the tumour. 'uniform': every stage trains the config as given (the fine stages add the SDF
  # consistency, tumour fine the slice head).
  experiments.cascade_recipe = 'reference'
  experiments.cascade_coarse_spacing_factor = (1.0, 2.0, 2.0)  # (z, y, x)
  # Each stage's schedule in the reference's terms: epochs over the split's training cases (batch
  # 1: one step per case and epoch), in the order pancreas_coarse, pancreas_fine, tumour_coarse,
  # tumour_fine; a stage trains epochs x ceil(training cases / data.batch_size) steps.
  # (): every stage trains train.steps.
  experiments.cascade_epochs = (150, 150, 800, 800)
  return config


# ----------------------------------------------------------------------------------------------
# One way to change a config (dotted-key overrides), compare two, and read a saved one back.


def flatten(tree: dict | ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """Every value of a nested dict or ConfigDict by its dotted key, e.g. 'loss.weights.dice'."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def differences(base: dict | ml_collections.ConfigDict,
                other: dict | ml_collections.ConfigDict) -> dict[str, Any]:
  """The dotted keys whose value in `other` is not `base`'s, with `other`'s values: the overrides
  that turn `base` into `other`."""
  base_flat = flatten(base)
  return {key: value for key, value in flatten(other).items() if base_flat.get(key) != value}


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                   lock: bool = True) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted key (e.g. 'loss.weights.dice') set; unknown keys fail.

  Presets, ablation variants, cascade stages and tests all change configs this way. The copy is
  locked (no key can be added) unless `lock=False`.
  """
  variant = ml_collections.ConfigDict(config.to_dict())
  for dotted_key, value in overrides.items():
    *parents, leaf = dotted_key.split('.')
    node = variant
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f'override {dotted_key!r}: the config has no section {part!r}; check '
                          'the key against dualseg_jax/config_base.py')
      node = node[part]
    if leaf not in node:
      raise ConfigError(f'override {dotted_key!r}: the config has no key {leaf!r}; check the key '
                        'against dualseg_jax/config_base.py')
    node[leaf] = value
  if lock:
    variant.lock()
  return variant


def load_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config a run's config.json (read as a dict) describes, on today's defaults: a key the
  run predates holds what the run computed (VALUES_BEFORE_KEYS), else today's default.

  A value of the wrong type for its key raises TypeError.
  """
  config = base_config()
  _overlay(config, with_earlier_values(saved))
  return config


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if key in config and isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _overlay(config[key], value)
    elif key in config and isinstance(config[key], tuple) and isinstance(value, list):
      config[key] = tuple(value)  # JSON holds tuples as lists
    else:
      config[key] = value
