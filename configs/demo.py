"""The embedded demo: a tiny DualU-Net trained on synthetic H&E nuclei on a laptop CPU.

    make demo
    # = python -m dualunet_jax.train --config=configs/demo.py --workdir=workdirs/demo
    #   python -m dualunet_jax.eval  --config=configs/demo.py --workdir=workdirs/demo

Nothing to download: the synthetic tiles are rendered procedurally (dualunet_jax/data/synthetic.py) and
prepared as array_record files on first use. Measured on a 2-core CPU (README, Demo): train + eval 6 min 10 s,
detection F1 0.924, mean class F1 0.883, Dice 0.919, bPQ 0.698 on the 64 held-out tiles.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'synthetic'
  config.dataset.num_classes = 3
  config.dataset.class_names = ('lymphocyte', 'epithelial', 'spindle')
  config.dataset.mpp = 0.5
  config.dataset.synthetic_train_size = 256
  config.dataset.synthetic_test_size = 64
  config.dataset.synthetic_tile_size = 256
  config.dataset.train_split = 'train'
  config.dataset.val_split = 'test'
  config.dataset.test_split = 'test'
  config.dataset.crop_size = 128  # ~1.25 crops per 256² tile per epoch
  config.dataset.num_workers = 0  # the CPU is the device too: worker processes would compete with XLA

  # Synthetic nuclei are ~12-17 px across at 0.5 um/px. With the reference's sigma 5 (chosen for 40x CoNSeP)
  # the peaks of touching nuclei merge: on the 64 test tiles even ground-truth maps reach only F1d 0.791
  # (`python -m dualunet_jax.eval --config=configs/demo.py --oracle --config.targets.sigma=5`); sigma 2 gives
  # 0.988 (sigma 3: 0.966).
  config.targets.sigma = 2.0

  config.model.width_multiplier = 0.25  # ~5.3 M parameters (the reference model: 41 M)
  # Dense 3x3s instead of ResNeXt's 32 groups: chosen when XLA:CPU's grouped kernels made the grouped model 7.5x
  # slower per step; the demo's figures were measured with it. Since models/grouped_conv.py the grouped model
  # is as fast on the CPU (width 1/4: 0.46 s vs 0.56 s per step, batch 8 of 128²; README, Demo).
  config.model.cardinality = 1

  config.train.batch_size = 8
  config.train.learning_rate = 2e-3  # a tiny model from scratch tolerates (and needs) a larger step
  config.train.epochs = 16
  config.train.steps_per_epoch = 40
  config.train.lr_milestones = (11, 14)  # ~70 % and 90 % of the run, as the reference's (70, 90) of 100
  config.train.eval_every_epochs = 0  # validate after epoch 1 and the last: the held-out split only reports
  config.train.checkpoint_every_epochs = 1
  config.train.log_every_steps = 10
  config.eval.batch_size = 8
  config.eval.max_val_images = 32
  config.eval.num_overlays = 4
  config.postprocess.workers = 2
  return config
