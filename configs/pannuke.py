"""PanNuke, one fold of the 3-fold protocol (train fold1, validate fold2, test fold3 by default).

    python -m dualunet_jax.train --config=configs/pannuke.py --workdir=workdirs/pannuke_123 \
        --config.dataset.manual_dir=/data/pannuke
    python -m dualunet_jax.eval --config=configs/pannuke.py --workdir=workdirs/pannuke_123 --split=fold3

`manual_dir` holds the unzipped official folds (`Fold 1/images/fold1/images.npy`, ...). The whole protocol
(3 rotations, mean ± std table): `launch/pannuke_3fold.sh /data/pannuke`.
Expected (paper, ResNeXt-50 with ImageNet encoder, 100 epochs on 2 GPUs): F1d 0.80, mean F1c 0.54, Dice 0.77.
Size: ~2,700 tiles per fold, so 100 epochs ≈ 33k steps at batch 8. Not yet run by us (no PanNuke download and
no GPU on the machines that built this release).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'pannuke'
  config.dataset.num_classes = 5
  config.dataset.class_names = ('neoplastic', 'inflammatory', 'connective', 'dead', 'epithelial')
  config.dataset.mpp = 0.25  # 40x
  config.dataset.train_split = 'fold1'
  config.dataset.val_split = 'fold2'
  config.dataset.test_split = 'fold3'
  config.dataset.crop_size = 0  # 256x256 tiles, used whole as the reference does
  config.train.eval_every_epochs = 10
  config.eval.max_val_images = 512  # validation during training on a fixed subset; eval.py uses all
  return config
