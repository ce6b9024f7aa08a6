"""Binary nucleus segmentation: plain U-Net ('unet') and U-Net++ ('unetpp'), the stage-1 base models of the
two-stage enhancement protocol (seed 003, `../shared/reference/seed_systems.md` §D).

Model: `models.unet.UNet` / `models.unetpp.UNetPlusPlus` from `config.model` (base_channels,
width_multiplier, batch_norm, deep_supervision (unetpp), dtype), 1 logit channel (D with deep supervision).
Targets: the foreground (class_map = 1 on nuclei) and the instance map. Loss: binary cross-entropy, mean over
pixels (the paper's loss; averaged over the supervised columns with deep supervision). Maps:
'class_probs' [1 - p, p] (K = 1) and 'fg' p. Post-processing: `postprocess_binary.postprocess_binary_maps`
(connected components of p > 0.5).

Binary methods need a one-class dataset (`config.dataset.num_classes == 1`, e.g. `config.dataset.binary`);
`build_model` refuses K > 1 rather than silently scoring one predicted class against K true ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualunet_jax import postprocess_binary
from dualunet_jax.methods import base


def bce_with_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean binary cross-entropy (float32 scalar) of logits float[...] against a 0/1 target of the same shape."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), target.astype(jnp.float32)))


def binary_class_probs(p: jax.Array) -> jax.Array:
  """Foreground probability float[..., H, W] -> [..., H, W, 2] as (background, nucleus), K = 1."""
  return jnp.stack([1.0 - p, p], axis=-1)


class BinaryMethod(base.Method):
  """What 'unet' and 'unetpp' share; subclasses only build their network (`_network`)."""

  target_kinds: dict[str, str] = {}  # class_map and instance_map move with the shared augmentation
  map_kinds = {'class_probs': 'scalar', 'fg': 'scalar'}
  postprocess_fn = staticmethod(postprocess_binary.postprocess_binary_maps)

  def _network(self, model_config: Any, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    if num_classes != 1:
      raise ValueError(f'method {self.name!r} segments nuclei against background (K = 1) but the dataset has '
                       f'K = {num_classes} classes; use a one-class dataset (config.dataset.binary=True)')
    from dualunet_jax import models
    return self._network(config.model, models.compute_dtype(config.model.get('dtype', 'float32')), rngs)

  def make_targets(self, instance_map: np.ndarray, instance_classes: np.ndarray, config: Any) -> dict[str, np.ndarray]:
    instance_map = np.asarray(instance_map, np.int32)
    return {'class_map': (instance_map > 0).astype(np.int32), 'instance_map': instance_map}

  def loss(self, outputs, batch, class_weights, config):
    """BCE of logits float32[B, H, W, D] against class_map > 0 (every column D against the same mask);
    `class_weights` are unused (the paper's plain BCE)."""
    target = jnp.broadcast_to((batch['class_map'] > 0)[..., None], outputs.shape)
    bce = bce_with_logits(outputs, target)
    return bce, {'bce': bce, 'total': bce}

  def maps(self, outputs) -> base.Maps:
    """logits [B, H, W, D] -> {'class_probs': [B, H, W, 2], 'fg': [B, H, W, 1]}; p = mean over the D columns
    of sigmoid (U-Net++'s "accurate mode" with deep supervision; D = 1 otherwise)."""
    p = jnp.mean(jax.nn.sigmoid(outputs.astype(jnp.float32)), axis=-1)
    return {'class_probs': binary_class_probs(p), 'fg': p[..., None]}

  def postprocess_kwargs(self, config: Any) -> dict[str, Any]:
    return postprocess_binary.from_config(config.postprocess)

  def oracle_maps(self, instance_map, instance_classes, num_classes, config) -> dict[str, np.ndarray]:
    """The ground-truth mask as probabilities 0/1: its ceiling is that of connected components (touching
    nuclei merge)."""
    p = (np.asarray(instance_map) > 0).astype(np.float32)
    return {'class_probs': np.stack([1.0 - p, p], axis=-1), 'fg': p[..., None]}


class UNetMethod(BinaryMethod):
  name = 'unet'

  def _network(self, model_config, dtype, rngs):
    from dualunet_jax.models.unet import UNet
    return UNet(base_channels=int(model_config.get('base_channels', 64)),
                width_multiplier=float(model_config.width_multiplier),
                batch_norm=bool(model_config.get('batch_norm', False)), dtype=dtype, rngs=rngs)


class UNetPlusPlusMethod(BinaryMethod):
  name = 'unetpp'

  def _network(self, model_config, dtype, rngs):
    from dualunet_jax.models.unetpp import UNetPlusPlus
    return UNetPlusPlus(base_channels=int(model_config.get('base_channels', 32)),
                        width_multiplier=float(model_config.width_multiplier),
                        batch_norm=bool(model_config.get('batch_norm', False)),
                        deep_supervision=bool(model_config.get('deep_supervision', False)), dtype=dtype,
                        rngs=rngs)
