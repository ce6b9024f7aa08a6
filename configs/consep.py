"""CoNSeP (Graham et al. 2019): train on Train (27 tiles), validate/test on Test (14 tiles), 4 merged classes.

    python ../shared/data/consep/assemble_consep.py --out .data/CoNSeP     # or the official download
    python -m dualunet_jax.train --config=configs/consep.py --workdir=workdirs/consep \
        --config.dataset.manual_dir=.data/CoNSeP
    python -m dualunet_jax.eval --config=configs/consep.py --workdir=workdirs/consep --split=test
    python -m dualunet_jax.eval --config=configs/consep.py --oracle --split=test \
        --config.dataset.manual_dir=.data/CoNSeP        # what post-processing alone loses

Training uses random 256x256 crops of the 1000x1000 tiles (an epoch = 16 crops per tile, about the tile
area); evaluation runs on whole 1000x1000 tiles. Reference parity mode (whole tiles bicubic-resized to 1024,
as the reference trains and evaluates): `--config.dataset.crop_size=0 --config.dataset.resize=1024
--config.train.batch_size=8 --config.train.steps_per_epoch=0`.
Paper (ResNeXt-50, ImageNet encoder, 100 epochs): F1d 0.72, F1c other 0.44 / inflammatory 0.63 /
epithelial 0.62 / spindle 0.56, Dice 0.77, bPQ 0.34. See the README for what this port measured.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'consep'
  config.dataset.num_classes = 4
  config.dataset.class_names = ('other', 'inflammatory', 'epithelial', 'spindle')
  config.dataset.mpp = 0.25  # 40x
  config.dataset.train_split = 'train'
  config.dataset.val_split = 'test'  # as the reference (§6): CoNSeP has no separate validation split
  config.dataset.test_split = 'test'
  config.dataset.crop_size = 256
  config.train.steps_per_epoch = 54  # 27 tiles x 16 crops / batch 8
  config.eval.batch_size = 2
  return config
