"""Every knob of a run, with the paper's values as defaults; experiment configs start from here.

Sections: `data` (centers, splits, preprocessing, patches), `model` (network), `loss` (which
losses and their weights), `augment` (RandConv views and spatial/intensity augmentation),
`optim` (Adam and the schedule), `train` (loop, logging, checkpoints), `inference`
(sliding window, flips, post-processing), `evaluation` (metrics).
"""

from __future__ import annotations

import ml_collections

STAGES = ('joint', 'pancreas_coarse', 'pancreas_fine', 'tumour_coarse', 'tumour_fine')
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
  data.crop_margin_xy = (0, 30)  # random ROI margin in voxels, in-plane
  data.crop_margin_z_fraction = (0.01, 0.1)  # random ROI margin as a fraction of the slices
  # Contrastive positions on the 1/8 grid: 'per_slice' (the method's: per 1/8 slice one skeleton
  # cell and one cell of the ring's 2D skeleton, D/8 rows) | 'uniform' (data.num_positions cells
  # drawn with replacement from the skeleton and from the ring).
  data.contrastive_sampling = 'per_slice'
  data.num_positions = 64  # 'uniform' sampling: positions per sample and kind
  data.num_workers = 0
  data.prefetch = 2
  data.skip_bad_cases = False
  data.image_interpolation = 'linear'  # resampling the CT to target_spacing_mm: 'linear' | 'cubic'
  data.body_threshold_hu = -500.0  # cache crop: largest component above this HU is the body
  data.body_margin_mm = 10.0  # kept around the body's bounding box
  data.ring_side_vox = (10, 20)  # contrastive negatives: cube side range of the ring dilation

  model = config.model = ml_collections.ConfigDict()
  model.widths = (32, 64, 128, 256)  # encoder widths per resolution level
  model.blocks = (1, 2, 2, 2)  # residual blocks per level
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
  model.slice_head = False  # fine tumour stage: per-slice "contains tumour" classifier
  model.slice_hidden = 128
  model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
  model.remat = False
  # Strided convs as stride-1 convs read at every 2nd voxel: same numbers, much faster gradients
  # on XLA's CPU backend; the CPU presets switch it on.
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
  loss.temperature = 0.05
  # 'two_class': the method's label-based NT-Xent (skeleton with skeleton, ring with ring, across
  # slices and views) | 'view_paired': a position's partner is itself in the other view.
  loss.contrastive_form = 'two_class'
  loss.slice_min_voxels = 10
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
  augment.scale = (0.8, 1.2)
  augment.rotation_deg = 15.0
  augment.elastic_prob = 0.1
  augment.elastic_sigma_vox = 4.0
  augment.elastic_magnitude_vox = 4.0
  augment.flip_prob = 0.5
  augment.gamma = (0.7, 1.5)
  augment.noise_std = (0.0, 0.05)

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
  experiments.cascade_pancreas_margin_vox = (4, 12, 12)
  experiments.cascade_tumour_margin_vox = (2, 6, 6)
  experiments.cascade_fine_patch_size = ()  # (D, H, W) of the fine stages; () keeps data.patch_size
  return config
