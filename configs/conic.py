"""The CoNIC-challenge framework (seed 002, "Pathology AI", 1st R² / 3rd mPQ+): a HoVer-Net with one merged
decoder (dropout after each upsampling) on an SE-ResNeXt encoder, trained on the CoNIC patches (Lizard, 256²,
six classes, 0.5 µm/px).

    python -m dualunet_jax.train --config=configs/conic.py --workdir=workdirs/conic_seresnext50 \
        --config.dataset.manual_dir=/data/conic          # images.npy, labels.npy (counts.csv)
    python -m dualunet_jax.train --config=configs/conic.py --workdir=workdirs/conic_seresnext101 \
        --config.dataset.manual_dir=/data/conic --config.model.encoder=seresnext101_32x4d
    python -m dualunet_jax.predict --checkpoint=workdirs/conic_seresnext50 --checkpoint=workdirs/conic_seresnext101 \
        --tta --tta_views=4 --input=... --output=...    # the paper's dual-level ensemble: flips + two encoders
    python -m dualunet_jax.train --config=configs/conic.py:consep --workdir=W \
        --config.dataset.manual_dir=.data/CoNSeP        # the framework on CoNSeP (four merged classes)

Paper settings kept here: loss weights NP CE 2 + Dice 2, NC CE 3 + Dice 1, HV MSE 2 + MSGE 2; Adam 3e-4,
batch 16, 50 epochs, x0.1 every 10 epochs after epoch 30; flips, rot90, transpose (= flips + rot90), colour
jitter and a blur. ImageNet encoder: `--config.model.encoder_init=<timm seresnext50_32x4d .safetensors>`.
Early stopping on the validation loss (`best_metric='loss'`, patience 10 validations, our choice: the paper
gives none) needs a validation split: the CoNIC release has one split, so pass one, e.g. a held-out folder
dataset (`--config.dataset.val_split=...`); without it training runs the 50 epochs and keeps the last.
Neither two-phase training nor type-aware sampling: the paper mentions neither.
"""

from configs import consep, default


def get_config(data: str = 'conic'):
  """data: 'conic' (the challenge's patches) or 'consep' (`--config=configs/conic.py:consep`: CoNSeP's four
  merged classes, 256² crops of its 1000² tiles, validation on Test, as configs/consep.py)."""
  data = data or 'conic'
  if data not in ('conic', 'consep'):
    raise ValueError(f'configs/conic.py: data must be conic or consep, got {data!r}')
  config = default.get_config()
  config.method = 'conic'
  config.dataset.name = 'conic'
  config.dataset.num_classes = 6
  config.dataset.class_names = ('neutrophil', 'epithelial', 'lymphocyte', 'plasma', 'eosinophil', 'connective')
  config.dataset.mpp = 0.5
  config.dataset.train_split = 'train'
  config.dataset.val_split = ''  # the release has one split (see the docstring)
  config.dataset.test_split = 'train'
  config.dataset.crop_size = 0  # whole 256² patches
  if data == 'consep':
    config.dataset = consep.get_config().dataset

  config.model.encoder = 'seresnext50_32x4d'
  config.model.dropout_rate = 0.1  # models/conic_net.py: the paper gives no rate

  config.targets.hv_min_size = 30
  for name, weight in (('hv_np_ce', 2.0), ('hv_np_dice', 2.0), ('hv_mse', 2.0), ('hv_msge', 2.0),
                       ('hv_tp_ce', 3.0), ('hv_tp_dice', 1.0)):
    setattr(config.loss, name, weight)

  config.augment.preset = 'conic'  # transpose + one of Gaussian / median / motion blur (augment_ops.py)
  config.augment.stain_preset = 'conic'  # colour jitter: brightness / contrast / saturation 0.2, hue 0.05
  config.augment.color_jitter = 0.0  # (the preset's jitter replaces it)
  config.augment.blur_sigma = 0.0  # (the preset's one-of blur replaces it)

  config.train.batch_size = 16
  config.train.base_batch_size = 16
  config.train.learning_rate = 3e-4
  config.train.weight_decay = 0.0
  config.train.epochs = 50
  config.train.lr_milestones = (30, 40)  # x0.1 every 10 epochs after epoch 30
  config.train.eval_every_epochs = 1
  config.train.best_metric = 'loss'
  config.train.best_mode = 'min'
  config.train.early_stopping_patience = 10
  config.train.freeze_encoder_epochs = 0  # the paper trains all parameters from the start (one phase)
  config.eval.batch_size = 16
  return config
