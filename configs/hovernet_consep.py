"""HoVer-Net on CoNSeP (4 merged classes), the official "original" model: 270x270 crops in, 80x80 out.

    python ../shared/data/consep/assemble_consep.py --out .data/CoNSeP
    python -m dualunet_jax.train --config=configs/hovernet_consep.py --workdir=W \
        --config.dataset.manual_dir=.data/CoNSeP
    python -m dualunet_jax.train --config=configs/hovernet_consep.py:fast --workdir=W ...   # the "fast" model
    python -m dualunet_jax.eval --config=configs/hovernet_consep.py --oracle --split=test \
        --config.dataset.manual_dir=.data/CoNSeP     # ideal NP/HV/TP maps through the official post-processing

ImageNet encoder: `--config.model.encoder_init=ImageNet-ResNet50-Preact_pytorch.tar` (the official file,
`{'desc': state_dict}`; see convert_hovernet.py).

Official training (vqdang/hover_net `models/hovernet/opt.py`): two phases of 50 epochs, Adam(1e-4, betas 0.9,
0.999), no weight decay, StepLR x0.1 every 25 epochs, restarted per phase; phase 1 freezes the encoder's
d0 units and d1..d3 (batch 16), phase 2 trains everything (batch 4 per GPU); all six loss weights 1. Here:
the same two phases (`config.train.freeze_encoder_epochs`, a fresh Adam and schedule per phase; phase 1 freezes
what the official freezes: the stem, d0's shortcut and block-end BatchNorm and conv_bot keep training,
`HoVerNetMethod.encoder_filter`) and the official batches (16, then 4: `config.train.phase1_batch_size`).
Phase 1 assumes the ImageNet encoder; from random weights, train one phase (`--config.train.freeze_encoder_epochs=0
--config.train.epochs=50`). Official augmentation
(affine, flips, blurs, hue/saturation/brightness/contrast) is approximated by the project's dihedral views,
HED jitter and colour jitter; elastic deformation stays off (it would move HV vectors without re-deriving
them).

Tests build a tiny variant with `tiny(get_config())`.
"""

from configs import consep


def get_config(mode: str = 'original'):
  """mode: 'original' (270 -> 80) or 'fast' (256 -> 164); `--config=configs/hovernet_consep.py:fast`."""
  mode = mode or 'original'
  if mode not in ('original', 'fast'):
    raise ValueError(f'HoVer-Net mode must be original or fast, got {mode!r}')
  config = consep.get_config()
  config.method = 'hovernet'
  config.model.encoder = 'preact_resnet50'  # informational: HoVer-Net has one encoder
  config.model.hovernet_mode = mode
  config.dataset.crop_size = 270 if mode == 'original' else 256  # input side; outputs 80 / 164

  config.targets.hv_min_size = 30  # official: no HV values for instances < 30 px inside the output crop

  for name in ('hv_np_ce', 'hv_np_dice', 'hv_mse', 'hv_msge', 'hv_tp_ce', 'hv_tp_dice'):
    setattr(config.loss, name, 1.0)
  config.loss.hv_msge_pytorch_kernels = False  # True: the PyTorch port's transposed gradient kernels
  config.loss.hv_np_loss = 'ce_dice'  # HistoNeXt: 'asymmetric'
  config.loss.hv_tp_loss = 'ce_dice'  # HistoNeXt: 'focal'

  config.postprocess.hv_np_threshold = 0.5
  config.postprocess.hv_energy_threshold = 0.4
  config.postprocess.hv_sobel_ksize = 21
  config.postprocess.hv_min_size = 10
  config.postprocess.hv_marker_min_size = 10
  config.postprocess.hv_opening_ksize = 5
  config.postprocess.hv_blur = True

  config.augment.color_jitter = 0.2  # the official varies hue, saturation, brightness and contrast

  config.train.batch_size = 4  # phase 2 (official: 4 per GPU, one GPU here)
  config.train.phase1_batch_size = 16  # phase 1 (official: 16 per GPU)
  config.train.base_batch_size = 4  # Adam 1e-4 in both phases (phase_config keeps the rate across the change)
  config.train.learning_rate = 1e-4
  config.train.weight_decay = 0.0
  config.train.epochs = 100
  config.train.freeze_encoder_epochs = 50  # phase 1: encoder frozen; phase 2: all (lr_milestones per phase)
  config.train.lr_milestones = (25,)
  config.train.lr_gamma = 0.1
  config.train.steps_per_epoch = 108  # 27 tiles x 16 crops / batch 4, as configs/consep.py (phase 1: 27 of 16)
  config.eval.batch_size = 2
  return config


def tiny(config, width_multiplier: float = 0.125):
  """A CPU-test variant: narrow model, small batches, smallest crop the mode supports (198 / 104)."""
  config.model.width_multiplier = width_multiplier
  config.dataset.crop_size = 198 if config.model.hovernet_mode == 'original' else 104
  config.dataset.num_workers = 0
  config.train.freeze_encoder_epochs = 0  # tiny runs train everything
  config.train.phase1_batch_size = 0
  config.train.batch_size = 2
  config.train.base_batch_size = 2
  config.eval.batch_size = 1
  config.postprocess.workers = 1
  return config
