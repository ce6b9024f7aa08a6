"""Plain U-Net (Ronneberger 2015), binary nuclei vs background on CoNSeP: stage 1 of the two-stage
enhancement protocol (seed 003; see dualunet_jax/refinement.py).

    python -m dualunet_jax.train --config=configs/unet_consep.py --workdir=workdirs/unet_consep \
        --config.dataset.manual_dir=.data/CoNSeP
    python -m dualunet_jax.eval --config=configs/unet_consep.py --workdir=workdirs/unet_consep --split=test

Paper settings (the seed-003 paper): BCE, Adam 1e-4 (no weight decay, no schedule), early stopping on the
validation loss; CoNSeP has no validation split, so Test stands in (as configs/consep.py). Full-size model:
base 64 (64..1024 channels, 31.0 M parameters); BatchNorm on (training from scratch; see models/unet.py).
Needs the one-class view of the dataset (`config.dataset.binary`: every nucleus class 1, K = 1).
"""

from configs import consep


def binary_consep(method: str):
  """configs/consep.py as one nucleus class, with the seed-003 optimisation (Adam 1e-4, early stopping)."""
  config = consep.get_config()
  config.method = method
  config.dataset.binary = True  # every nucleus is class 1 (K = 1)
  config.dataset.num_classes = 1
  config.dataset.class_names = ('nucleus',)
  config.model.batch_norm = True
  config.train.learning_rate = 1e-4
  config.train.base_batch_size = config.train.batch_size  # 1e-4 at the batch used, no linear scaling
  config.train.weight_decay = 0.0
  config.train.lr_milestones = ()
  config.train.eval_every_epochs = 1
  config.train.best_metric = 'loss'  # validation loss, lower is better
  config.train.best_mode = 'min'
  config.train.early_stopping_patience = 10  # validations without a new best before stopping (0 = never)
  config.postprocess.fg_threshold = 0.5
  config.postprocess.split = False  # postprocess_binary.py says why
  config.postprocess.split_min_distance = 3
  return config


def get_config():
  config = binary_consep('unet')
  config.model.base_channels = 64
  return config
