"""Two-stage enhancement (seed 003): train the 76k-parameter EnhancementNet on a frozen stage-1 model
(stage 2), then fine-tune both (joint). See dualunet_jax/refinement.py.

    # stage 1: any method, e.g. configs/unet_consep.py -> workdirs/unet_consep
    python -m dualunet_jax.train --config=configs/refine_consep.py --workdir=workdirs/unet_consep_refine \
        --config.refine.init_workdir=workdirs/unet_consep
    python -m dualunet_jax.train --config=configs/refine_consep.py --workdir=workdirs/unet_consep_joint \
        --config.refine.init_workdir=workdirs/unet_consep_refine --config.refine.mode=joint
    python -m dualunet_jax.eval --workdir=workdirs/unet_consep_joint --split=test   # with and without

The stage-1 run's method, dataset, targets, model, loss and post-processing sections are taken from
`init_workdir`'s config.json (`refinement.resolve_config`); this file sets only the run's own optimisation
and the refinement stage. The paper: BCE, Adam 1e-4, early stopping on the validation loss.
"""

import ml_collections

from configs import consep


def get_config():
  config = consep.get_config()
  config.refine = ml_collections.ConfigDict()
  config.refine.mode = 'stage2'  # stage2: only the EnhancementNet trains | joint: both stages
  config.refine.init_workdir = ''  # stage 2: the stage-1 workdir; joint: the stage-2 workdir
  config.refine.init_checkpoint = 'best'  # 'best' | 'last' | a step of init_workdir
  config.refine.stage1_workdir = ''  # filled in by resolve_config (provenance)
  config.refine.features = 64  # EnhancementNet: 3 x conv3x3(64) + conv1x1, 76,289 parameters
  config.refine.num_convs = 3
  config.refine.stage1_loss_weight = 1.0  # joint mode: + weight x the stage-1 method's own loss
  config.train.learning_rate = 1e-4
  config.train.base_batch_size = config.train.batch_size
  config.train.weight_decay = 0.0
  config.train.lr_milestones = ()
  config.train.epochs = 50
  config.train.eval_every_epochs = 1
  config.train.best_metric = 'loss'
  config.train.best_mode = 'min'
  config.train.early_stopping_patience = 5
  return config
