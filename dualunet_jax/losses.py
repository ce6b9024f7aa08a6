"""DualU-Net loss: class-weighted soft cross-entropy + soft Dice on the class head, MSE on the density head.

Pure functions of arrays, jittable, float32 math whatever the logits' dtype (bfloat16 compute stays out of the
loss). Layout NHWC: `logits: [B, H, W, C]` with C = K + 1 (channel 0 = background).

Reference (`../shared/reference/dualunet_reference.md` §2, `DualLoss_combined`):
    total = ce_weight * CE + dice_weight * Dice + mse_weight * MSE    (all 1.0)
with the class weights of `class_weights_from_counts` used by both CE and Dice.

Deliberate difference: the reference pools the Dice statistics over each GPU's batch (4 images) and DDP
averages the gradients; here they are pooled over the whole (global, sharded) batch seen by the jitted step.

Class weights are host-side numpy (`pixel_class_counts` is accumulated over the training set once, then
`class_weights_from_counts`; `save_class_weights` / `load_class_weights` cache them in the workdir).
"""

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualunet_jax.config_fields import config_field

CLASSIFICATION_LOSSES = ('ce', 'focal', 'asymmetric')


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def weighted_soft_cross_entropy(logits: jax.Array, target_onehot: jax.Array,
                                class_weights: jax.Array) -> jax.Array:
  """`torch.nn.CrossEntropyLoss(weight=w)` with a probability target (reference §2).

  CE = mean over all B*H*W pixels of sum_c -w_c y_c log_softmax(z)_c. Divided by the pixel count, NOT by the
  sum of the target weights (that is PyTorch's class-index behaviour, not the dense-target one).

  Args:
    logits: float[B, H, W, C] (any float dtype; computed in float32).
    target_onehot: float[B, H, W, C] (one-hot or soft).
    class_weights: float32[C].

  Returns:
    float32 scalar.
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  per_pixel = -jnp.sum(_f32(class_weights) * _f32(target_onehot) * logp, axis=-1)
  return jnp.mean(per_pixel)


def soft_dice_loss(logits: jax.Array, target_onehot: jax.Array, class_weights: jax.Array,
                   eps: float = 1.0) -> jax.Array:
  """The reference `DiceLoss_w` (eps 1, beta 1, soft): 1 - mean_c score_c, background included.

  p = softmax(z); per class c, pooled over batch and space: tp_c = sum y p,
  score_c = (2 w_c tp_c + eps) / (w_c (sum p_c + sum y_c) + eps). The weights cancel except through eps.

  Args:
    logits: float[B, H, W, C].
    target_onehot: float[B, H, W, C].
    class_weights: float32[C].
    eps: additive smoothing.

  Returns:
    float32 scalar.
  """
  p = jax.nn.softmax(_f32(logits), axis=-1)
  y = _f32(target_onehot)
  w = _f32(class_weights)
  axes = tuple(range(p.ndim - 1))
  tp = jnp.sum(p * y, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
  score = (2.0 * w * tp + eps) / (w * denom + eps)
  return 1.0 - jnp.mean(score)


def _squeeze_channel(x: jax.Array) -> jax.Array:
  return x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x


def density_mse(density: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over all elements of (density - target)^2 on the raw density output (no activation).

  Args:
    density: float[B, H, W] or float[B, H, W, 1].
    target: float[B, H, W] or float[B, H, W, 1].

  Returns:
    float32 scalar.
  """
  d, g = _squeeze_channel(_f32(density)), _squeeze_channel(_f32(target))
  if d.shape != g.shape:
    raise ValueError(f'density {density.shape} and target {target.shape} shapes differ')
  return jnp.mean(jnp.square(d - g))


def weighted_focal_loss(logits: jax.Array, target_onehot: jax.Array, class_weights: jax.Array,
                        gamma: float = 2.0) -> jax.Array:
  """Class-weighted focal cross-entropy (Lin et al. 2017) on the softmax: mean over pixels of
  sum_c -w_c y_c (1 - p_c)^gamma log p_c. gamma = 0 is `weighted_soft_cross_entropy`.

  Shapes as `weighted_soft_cross_entropy`; float32 scalar.
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  # (1 - p)^gamma with gamma possibly fractional: clip so the base is never a tiny negative rounding error.
  modulator = jnp.power(jnp.clip(1.0 - jnp.exp(logp), 0.0, 1.0), gamma)
  per_pixel = -jnp.sum(_f32(class_weights) * _f32(target_onehot) * modulator * logp, axis=-1)
  return jnp.mean(per_pixel)


def asymmetric_loss(logits: jax.Array, target_onehot: jax.Array, class_weights: jax.Array,
                    gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05,
                    log_eps: float = 1e-8) -> jax.Array:
  """Asymmetric loss (ASL, Ridnik et al. 2021, `AsymmetricLoss`): one-vs-all SIGMOID variant, class-weighted.

  Per pixel and class, p = sigmoid(z_c) and the negative probability is shifted, p_m = max(p - clip, 0):
    L_c = -w_c [ y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m) ]
  (logs clamped at `log_eps` as in the original code); loss = mean over pixels of sum_c L_c. The focusing
  weights keep their gradient (the original's `disable_torch_grad_focal_loss=False`). Channel 0 (background)
  is one of the one-vs-all classes. At inference the class is still argmax over the logits.

  Shapes as `weighted_soft_cross_entropy`; float32 scalar.
  """
  z = _f32(logits)
  y = _f32(target_onehot)
  p = jax.nn.sigmoid(z)
  p_neg = jnp.clip(1.0 - p + clip, max=1.0) if clip > 0 else 1.0 - p  # = 1 - p_m
  log_pos = jnp.log(jnp.clip(p, min=log_eps))
  log_neg = jnp.log(jnp.clip(p_neg, min=log_eps))
  pos = y * jnp.power(1.0 - p, gamma_pos) * log_pos
  neg = (1.0 - y) * jnp.power(1.0 - p_neg, gamma_neg) * log_neg
  per_pixel = -jnp.sum(_f32(class_weights) * (pos + neg), axis=-1)
  return jnp.mean(per_pixel)


def classification_loss(logits: jax.Array, target_onehot: jax.Array, class_weights: jax.Array,
                        loss_config: Any = None) -> jax.Array:
  """The class-head pixel loss selected by `loss_config.classification` ('ce' | 'focal' | 'asymmetric')."""
  kind = config_field(loss_config, 'classification', 'ce')
  if kind == 'ce':
    return weighted_soft_cross_entropy(logits, target_onehot, class_weights)
  if kind == 'focal':
    gamma = config_field(loss_config, 'focal_gamma', 2.0)
    return weighted_focal_loss(logits, target_onehot, class_weights, gamma=gamma)
  if kind == 'asymmetric':
    return asymmetric_loss(logits, target_onehot, class_weights,
                           gamma_neg=config_field(loss_config, 'asl_gamma_neg', 4.0),
                           gamma_pos=config_field(loss_config, 'asl_gamma_pos', 1.0),
                           clip=config_field(loss_config, 'asl_clip', 0.05))
  raise ValueError(f'loss.classification must be one of {CLASSIFICATION_LOSSES}, got {kind!r}')


def dual_loss(class_logits: jax.Array, density: jax.Array, class_map: jax.Array, density_target: jax.Array,
              class_weights: jax.Array, loss_config: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DualU-Net training loss (reference §2).

  Args:
    class_logits: float[B, H, W, C], C = K + 1.
    density: float[B, H, W] or float[B, H, W, 1], raw density head output.
    class_map: int32[B, H, W] in 0..K (`targets.class_map`); one-hot to C channels here, on device. Values
      >= C would give all-zero target rows: keep them in range.
    density_target: float32[B, H, W] or [B, H, W, 1] (`targets.density_map`).
    class_weights: float32[C] (`class_weights_from_counts`).
    loss_config: `config.loss` (ConfigDict / dict / None for the reference defaults); read at trace time, so
      close over it (or mark it static) when jitting.

  Returns:
    (total float32 scalar, {'ce', 'dice', 'mse', 'total'} float32 scalars). 'ce' is the classification
    term, whichever `loss_config.classification` selects.
  """
  num_channels = class_logits.shape[-1]
  class_weights = jnp.asarray(class_weights)
  if class_weights.shape != (num_channels,):
    raise ValueError(f'class_weights shape {class_weights.shape} does not match the {num_channels} logit '
                     'channels')
  onehot = jax.nn.one_hot(class_map, num_channels, dtype=jnp.float32)
  ce = classification_loss(class_logits, onehot, class_weights, loss_config)
  dice = soft_dice_loss(class_logits, onehot, class_weights)
  mse = density_mse(density, density_target)
  total = (config_field(loss_config, 'ce_weight', 1.0) * ce
           + config_field(loss_config, 'dice_weight', 1.0) * dice
           + config_field(loss_config, 'mse_weight', 1.0) * mse)
  return total, {'ce': ce, 'dice': dice, 'mse': mse, 'total': total}


# ---------------------------------------------------------------------------------------------- class weights


def pixel_class_counts(class_map: np.ndarray, num_classes: int) -> np.ndarray:
  """Pixels per class of a class map (or a batch of them); sum the results over the training set.

  Args:
    class_map: int[...] in 0..K.
    num_classes: K, the number of nucleus classes (the result has K + 1 entries, 0 = background).

  Returns:
    int64[K + 1].
  """
  flat = np.asarray(class_map).reshape(-1)
  if not np.issubdtype(flat.dtype, np.integer):
    raise TypeError(f'class_map must be integer, got {flat.dtype}')
  if flat.size and (flat.min() < 0 or flat.max() > num_classes):
    raise ValueError(f'class_map values must lie in 0..{num_classes}, got {flat.min()}..{flat.max()}')
  return np.bincount(flat, minlength=num_classes + 1).astype(np.int64)


def class_weights_from_counts(counts: np.ndarray, background_factor: float = 10.0) -> np.ndarray:
  """The reference `compute_class_weights_with_background`: inverse frequency, background x factor, sum 1.

  w_c = total / (C count_c + 1e-6); w_0 *= background_factor; w /= sum(w). A class with no pixels gets a
  weight of ~1 (it takes all the mass), as in the reference; check the counts first.

  Args:
    counts: int[C] pixels per class, C = K + 1 (0 = background).
    background_factor: multiplier of the background weight before normalisation.

  Returns:
    float32[C], sums to 1.
  """
  counts = np.asarray(counts, np.float64).reshape(-1)
  if counts.size < 2 or (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f'counts must hold >= 2 non-negative class counts with a positive total, got {counts}')
  w = counts.sum() / (counts.size * counts + 1e-6)
  w[0] *= background_factor
  return (w / w.sum()).astype(np.float32)


def save_class_weights(path: str | os.PathLike, weights: np.ndarray,
                       counts: np.ndarray | None = None) -> None:
  """Writes {'weights': [...], 'counts': [...]} as JSON, atomically (temp file in the same folder + replace),
  so concurrent processes never read a half-written file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {'weights': [float(w) for w in np.asarray(weights, np.float32).reshape(-1)],
             'counts': None if counts is None else [int(c) for c in np.asarray(counts).reshape(-1)]}
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(payload, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def load_class_weights(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
  """Reads `save_class_weights` JSON, or a reference `.npy` file (e.g. `ce_weights_consep_Train_b10.npy`).

  Returns:
    (weights float32[C], counts int64[C] or None when not stored).
  """
  path = pathlib.Path(path)
  if path.suffix == '.npy':
    return np.load(path).astype(np.float32).reshape(-1), None
  payload = json.loads(path.read_text())
  weights = np.asarray(payload['weights'], np.float32)
  counts = payload.get('counts')
  return weights, None if counts is None else np.asarray(counts, np.int64)
