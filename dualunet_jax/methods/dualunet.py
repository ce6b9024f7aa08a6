"""DualU-Net (Anglada-Rotger et al., MIDL 2025): class logits + Gaussian centroid density, two decoders.

Model: `models.DualUNet` (models/dualunet.py). Targets: `data.targets.make_targets` (class map, density).
Loss: `losses.dual_loss` (weighted CE + Dice + density MSE). Post-processing: `postprocess.postprocess_maps`
(h-maxima markers on the density, marker watershed, majority vote). Both maps are scalar fields under TTA.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from dualunet_jax import losses, models
from dualunet_jax import postprocess as postprocess_lib
from dualunet_jax.methods import base


class DualUNetMethod(base.Method):
  name = 'dualunet'
  target_kinds = {'density': 'scalar'}
  map_kinds = {'class_probs': 'scalar', 'density': 'scalar'}
  postprocess_fn = staticmethod(postprocess_lib.postprocess_maps)

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    return models.build_model(config.model, num_classes, rngs=rngs)

  def parameter_counts(self, model: nnx.Module) -> dict[str, int]:
    return models.parameter_counts(model)

  def encoder_init(self, model: nnx.Module, path: str) -> None:
    from dualunet_jax import convert  # torch / safetensors readers only when asked for
    convert.load_encoder_weights(model, path)

  def make_targets(self, instance_map: np.ndarray, instance_classes: np.ndarray, config: Any) -> dict[str, np.ndarray]:
    from dualunet_jax.data import targets
    out = targets.make_targets(instance_map, instance_classes, sigma=float(config.targets.sigma),
                               centroid=config.targets.centroid,
                               num_classes=max(int(config.dataset.num_classes), 1))
    return {'class_map': out['class_map'].astype(np.int32), 'density': out['density'].astype(np.float32),
            'instance_map': np.asarray(instance_map, np.int32)}

  def loss(self, outputs, batch, class_weights, config):
    class_logits, density = outputs
    return losses.dual_loss(class_logits, density, batch['class_map'], batch['density'], class_weights,
                            config.loss)

  def maps(self, outputs) -> base.Maps:
    class_logits, density = outputs
    return {'class_probs': jax.nn.softmax(class_logits, axis=-1), 'density': density[..., None]}

  def postprocess_kwargs(self, config: Any) -> dict[str, Any]:
    return postprocess_lib.from_config(config.postprocess)

  def oracle_maps(self, instance_map, instance_classes, num_classes, config) -> dict[str, np.ndarray]:
    from dualunet_jax import oracle
    probs, density = oracle.oracle_outputs(instance_map, instance_classes, num_classes,
                                           sigma=float(config.targets.sigma), centroid=config.targets.centroid)
    return {'class_probs': probs, 'density': density[..., None]}
