"""HistoNeXt (seed 004) on CoNSeP: ConvNeXt encoder, dense-block NP / HV branches, ConvCAM type branch,
270² crops in, 80² out (the paper's geometry).

    python -m dualunet_jax.train --config=configs/histonext_consep.py --workdir=workdirs/histonext_tiny \
        --config.dataset.manual_dir=.data/CoNSeP [--config.model.histonext_variant=base]
    python -m dualunet_jax.summary --config=configs/histonext_consep.py --sizes=270

CoNSeP here has FOUR merged classes (malignant and normal epithelial are one class); the paper's five-class
CoNSeP table (HistoNeXt-Tiny: Dice 0.843, AJI 0.592, PQ 0.532, F1 0.773) is therefore not directly comparable
for the class scores. Kept from the paper: L = asymmetric NP (gamma+ 0.5, gamma- 4, clip [0.05, 0.95]) + HV
MSE + MSGE (5x5 gradient kernels on nuclear pixels) + focal TP (alpha 0.25, gamma 2); Adam 1e-4, x0.1 every 25
epochs, early stopping with patience 20 epochs on the validation loss, checkpoints every 5 epochs; two-phase
training (encoder frozen for the first 50 epochs, then all parameters, each phase with a fresh Adam and its
own x0.1-every-25-epochs schedule, as HoVer-Net's official two fits); type-aware sampling with the paper's
CoNSeP multipliers (misc x4, normal epithelial x3, others x1) mapped onto the four merged classes: other x4
(= misc), inflammatory x1, epithelial x1 (malignant x1 and normal x3 are one class here; malignant
epithelium dominates it and epithelial is already the second most frequent class, 5,537 of 15,555 Train
nuclei, so the rare-class boost is not applied), spindle x1; the paper's augmentation set (`preset
'histonext'`: affine with shear, elastic, H and E intensity, blur or noise, CLAHE, gamma, sharpen; see
data/augment_ops.py); the paper's batches, 64 in phase 1 and 16 in phase 2, at Adam 1e-4 in both.
Phase 1 assumes an ImageNet encoder (`--config.model.encoder_init=...`); from random weights, train one phase
(`--config.train.freeze_encoder_epochs=0`).
"""

from configs import hovernet_consep


def get_config(variant: str = 'tiny'):
  config = hovernet_consep.get_config('original')
  config.method = 'histonext'
  config.model.encoder = f'convnext_{variant or "tiny"}'  # informational: the variant picks the encoder
  config.model.histonext_variant = variant or 'tiny'
  config.loss.hv_np_loss = 'asymmetric'
  config.loss.hv_tp_loss = 'focal'
  for name in ('hv_np_ce', 'hv_mse', 'hv_msge', 'hv_tp_ce'):  # L = L_np + L_hv + L_tp
    setattr(config.loss, name, 1.0)
  config.dataset.crop_size = 270
  # other, inflammatory, epithelial, spindle (see the docstring for the paper's five classes)
  config.dataset.type_multipliers = (4.0, 1.0, 1.0, 1.0)
  config.augment.preset = 'histonext'  # affine + elastic, H&E, blur|noise, CLAHE, gamma, sharpen (augment_ops.py)
  config.augment.stain_preset = 'none'  # the preset's H and E intensity op replaces the HED jitter
  config.augment.color_jitter = 0.0  # (inherited from hovernet_consep; not part of the paper's set)
  config.augment.rot90 = False  # the affine's ±90° rotation covers it; flips stay on
  config.train.epochs = 100
  config.train.freeze_encoder_epochs = 50  # phase 1: encoder frozen; phase 2: all (ConvNeXt: no BatchNorm)
  config.train.batch_size = 16  # phase 2
  config.train.phase1_batch_size = 64
  config.train.base_batch_size = 16  # Adam 1e-4 in both phases
  config.train.steps_per_epoch = 27  # 27 tiles x 16 crops / batch 16 (phase 1: 7 steps of 64)
  config.train.lr_milestones = (25,)  # counted within each phase (fresh optimizer at the switch)
  config.train.eval_every_epochs = 5
  config.train.checkpoint_every_epochs = 5
  config.train.best_metric = 'loss'
  config.train.best_mode = 'min'
  config.train.early_stopping_patience = 4  # validations every 5 epochs: 20 epochs, the paper's patience
  return config
