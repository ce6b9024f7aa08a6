"""Shared defaults for every experiment: the DualU-Net reference settings.

Not run directly; `pannuke.py`, `consep.py` and `demo.py` start from `get_config()` here and override.
Any field can be overridden on the command line, e.g.

    python -m dualunet_jax.train --config=configs/consep.py --workdir=workdirs/consep \
        --config.train.batch_size=16 --config.model.encoder=convnext_base

Values follow `../shared/reference/dualunet_reference.md` (the reference implementation, HEAD 406e98f) unless
a comment says otherwise.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42
  # dualunet | hovernet | conic | histonext | unet | unetpp (dualunet_jax/methods/; configs per method)
  config.method = 'dualunet'

  # ---------------------------------------------------------------- data
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'synthetic'  # synthetic | pannuke | consep | lizard | conic | monuseg | folder
  config.dataset.data_dir = 'workdirs/tfds'  # where TFDS writes/reads the prepared array_record files
  config.dataset.manual_dir = ''  # the unpacked official download (read once, when the dataset is prepared)
  config.dataset.train_split = 'train'
  config.dataset.val_split = 'test'  # the reference validates on CoNSeP Test (reference §6); override for PanNuke
  config.dataset.test_split = 'test'
  config.dataset.num_classes = 3  # K nucleus classes; the model predicts K + 1 channels (0 = background)
  config.dataset.class_names = ('lymphocyte', 'epithelial', 'spindle')
  config.dataset.mpp = 0.5  # microns per pixel the model is trained at (predict resamples inputs to this)
  # Training inputs: random crops of this side (0 = whole tiles). Evaluation always uses whole tiles.
  config.dataset.crop_size = 0
  config.dataset.resize = 0  # >0: resize tiles to this side first (reference CoNSeP parity mode: 1024)
  config.dataset.num_workers = 2  # grain worker processes (0 = in-process)
  config.dataset.prefetch = 2
  # Crops centred (+-c/4) on a pixel of a class drawn uniformly from those in the tile: this project's simple
  # rare-class sampler (not a paper's); excludes type_multipliers.
  config.dataset.class_balanced_sampling = False
  # HistoNeXt type-aware sampling (pipeline.TypeAwareSampler): crops are windows of a grid over the training
  # tiles, drawn with probability proportional to the multiplier of their dominant type (the class with the
  # most nucleus pixels; x1 without one). One value per class, in class order; () = uniform random crops.
  config.dataset.type_multipliers = ()
  config.dataset.type_sampling_stride = 0  # grid step of those windows in pixels (0 = crop_size // 8)
  config.dataset.binary = False  # True: every nucleus is class 1 'nucleus' (binary methods: unet, unetpp)
  config.dataset.synthetic_train_size = 512  # synthetic dataset only: tiles per split
  config.dataset.synthetic_test_size = 64
  config.dataset.synthetic_tile_size = 256
  config.dataset.seed = 0  # synthetic dataset only: the tiles are a pure function of (seed, split, index)
  config.dataset.source_mpp = 0.0  # folder datasets: microns per pixel of the stored images (0 = unknown)

  # ---------------------------------------------------------------- targets
  config.targets = ml_collections.ConfigDict()
  config.targets.sigma = 5.0  # Gaussian sigma of the centroid density map, in pixels
  # 'mass': centre of mass (the paper); 'bbox': floored bounding-box centre (the reference code, §3.5).
  config.targets.centroid = 'mass'

  # ---------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  config.model.encoder = 'resnext50_32x4d'  # resnext50_32x4d | convnext_{tiny,small,base,large}
  config.model.width_multiplier = 1.0  # <1 gives tiny models for tests and the CPU demo
  config.model.cardinality = 32  # ResNeXt 3x3 groups (1 = dense 3x3s; see resnext.py)
  config.model.encoder_blocks = ()  # blocks per encoder stage; () = the encoder's own (ResNeXt-50: 3, 4, 6, 3)
  config.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  config.model.encoder_init = ''  # ImageNet weights (.pth / .safetensors) for the encoder, see convert.py

  # ---------------------------------------------------------------- loss (reference §2)
  config.loss = ml_collections.ConfigDict()
  config.loss.ce_weight = 1.0
  config.loss.dice_weight = 1.0
  config.loss.mse_weight = 1.0
  config.loss.background_factor = 10.0  # class weights: inverse pixel frequency, background x10, sum 1
  config.loss.classification = 'ce'  # ce | focal | asymmetric (HistoNeXt options)
  config.loss.focal_gamma = 2.0
  config.loss.asl_gamma_neg = 4.0
  config.loss.asl_gamma_pos = 1.0
  config.loss.asl_clip = 0.05

  # ---------------------------------------------------------------- augmentation (paper, Appendix D)
  config.augment = ml_collections.ConfigDict()
  # Geometric / image set beyond the dihedral views: 'dualunet' (none: the paper's) | 'histonext' | 'conic'
  # (augment_ops.AUGMENT_PRESETS; fields set in config.augment override the preset's values).
  config.augment.preset = 'dualunet'
  config.augment.flips = True
  config.augment.rot90 = True
  # Colour (stain) augmentation: a preset, 'paper' (HED scale U(0.98, 1.02), shift U(-0.02, 0.02)) | 'strong'
  # (inter-lab variation: wide HED, stain mixing, gamma, brightness/contrast, saturation/hue) | 'none' |
  # 'custom' (the fields below alone); values in augment.STAIN_PRESETS. A field below that is set (not None)
  # overrides the preset's value, e.g. --config.augment.stain_preset=strong --config.augment.gamma=0.6.
  # 'paper' by measurement too (README, Stain robustness: at the run-A budget 'strong' costs 0.027 clean F1d
  # and 'paper' + --stain_norm=reinhard is steadier on shifted slides).
  config.augment.stain_preset = 'paper'
  float_or_none = lambda: ml_collections.config_dict.placeholder(float)  # None, overridable by a float flag
  config.augment.hed_scale = float_or_none()  # HED concentrations * U(1 - s, 1 + s)
  config.augment.hed_shift = float_or_none()  # HED concentrations + U(-s, s)
  config.augment.stain_mix = float_or_none()  # H and E stain vectors' RGB components * U(1 - s, 1 + s)
  config.augment.gamma = float_or_none()  # image ** exp(U(-s, s)): darker / paler staining, white kept
  config.augment.brightness = float_or_none()  # factor ~ U(1 - s, 1 + s)
  config.augment.contrast = float_or_none()  # factor ~ U(1 - s, 1 + s) around the mean grey
  config.augment.saturation = float_or_none()  # chroma factor ~ U(1 - s, 1 + s)
  config.augment.hue = float_or_none()  # chroma rotation ~ U(-s, s) turns
  config.augment.color_jitter = float_or_none()  # older combined brightness/contrast/saturation strength
  config.augment.blur_sigma = 0.0  # max Gaussian blur sigma (0 = off)
  config.augment.elastic_alpha = 0.0  # elastic deformation strength in pixels (0 = off)
  config.augment.elastic_sigma = 8.0

  # ---------------------------------------------------------------- post-processing (reference §4)
  config.postprocess = ml_collections.ConfigDict()
  config.postprocess.marker = 'hmaxima'  # hmaxima | peak_local_max
  config.postprocess.h = 0.15
  config.postprocess.min_distance = 3  # peak_local_max only
  config.postprocess.threshold = 0.1  # peak_local_max only, on the rescaled density
  config.postprocess.compactness = 1.0
  config.postprocess.relabel_connectivity = 1  # 1: 4-connected (reference eval), 2: 8-connected (inference)
  config.postprocess.workers = 0  # host processes for post-processing (0 = os.cpu_count())
  config.postprocess.backend = 'auto'  # auto: compiled kernels when numba is installed (same output) | numba | numpy

  # ---------------------------------------------------------------- optimisation (reference §6)
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8  # global batch, split over all devices
  config.train.epochs = 100
  config.train.steps_per_epoch = 0  # 0 = one pass over the training split
  config.train.learning_rate = 2e-4  # at base_batch_size; scaled linearly with the global batch
  config.train.base_batch_size = 8
  config.train.lr_milestones = (70, 90)  # epochs at which the learning rate is multiplied by lr_gamma
  config.train.lr_gamma = 0.1
  config.train.weight_decay = 1e-4  # coupled L2 (added to the gradient before Adam), as torch.optim.Adam
  config.train.log_every_steps = 10
  config.train.eval_every_epochs = 10
  config.train.checkpoint_every_epochs = 10  # periodic checkpoints for resuming (0 = only where the run stops)
  config.train.keep_checkpoints = 3  # periodic ones kept; the best by best_metric is kept apart (W/best)
  config.train.best_metric = 'f1_d'  # validation metric that selects the 'best' checkpoint
  config.train.best_mode = 'max'  # 'max' | 'min' (e.g. best_metric 'loss': the method's validation loss)
  config.train.early_stopping_patience = 0  # stop after this many validations without a new best (0 = never)
  # Two-phase training (HoVer-Net, HistoNeXt): the first N epochs train all but the encoder, the rest all
  # parameters; 0 = one phase. Phase 2 starts a fresh optimizer, so lr_milestones count from each phase's start;
  # early stopping only acts in phase 2 (trainer.make_optimizer).
  config.train.freeze_encoder_epochs = 0
  config.train.phase1_batch_size = 0  # global batch of phase 1 (0 = batch_size; HoVer-Net official: 16, then 4)
  # Encoder BatchNorm in phase 1: 'update' (training mode, running statistics move: the official HoVer-Net
  # code) | 'keep' (inference mode, statistics stay as loaded). ConvNeXt encoders have no BatchNorm.
  config.train.frozen_encoder_bn = 'update'

  # ---------------------------------------------------------------- evaluation
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.match_radius = 12.0  # pixels, detection pairing radius
  config.eval.num_overlays = 4
  config.eval.max_val_images = 0  # 0 = all; cap for quick validation during training

  return config
