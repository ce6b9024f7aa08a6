"""The reference optimiser: Adam with coupled L2 weight decay and a step-decay learning rate (reference §6)."""

import ml_collections
import optax


def learning_rate(train_config: ml_collections.ConfigDict) -> float:
  """Peak learning rate, scaled linearly with the global batch (the reference's `lr_auto_scale`)."""
  return train_config.learning_rate * train_config.batch_size / train_config.base_batch_size


def lr_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """x`lr_gamma` at each milestone epoch. The reference steps `MultiStepLR` after each epoch, so epoch e
  (counted from 1) trains at lr * gamma^(number of milestones < e): with milestones (70, 90) epochs 1-70 use
  the full rate and epoch 71 starts at step 70 * steps_per_epoch."""
  boundaries = {int(m) * steps_per_epoch: train_config.lr_gamma for m in train_config.lr_milestones}
  return optax.piecewise_constant_schedule(learning_rate(train_config), boundaries)


def make_optimizer(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch.optim.Adam(weight_decay=wd) semantics: the decay is added to the gradient *before* the moment
  estimates (coupled L2, not AdamW), on every parameter including BatchNorm scales and biases."""
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(lr_schedule(train_config, steps_per_epoch)),
  )
