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
from dualunet_jax.models import resnext

PAPER_TABLE2 = {  # encoder -> (params M, "GLOPs" at 256^2, at 1024^2), MIDL 2025 paper Table 2.
    'resnext50_32x4d': (41.01, 16.26, 260.23),
    'convnext_base': (97.81, 26.78, 428.49),
}


class DualUNetMethod(base.Method):
  name = 'dualunet'
  target_kinds = {'density': 'scalar'}
  map_kinds = {'class_probs': 'scalar', 'density': 'scalar'}
  postprocess_fn = staticmethod(postprocess_lib.postprocess_maps)

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    return models.build_model(config.model, num_classes, rngs=rngs)

  def parameter_counts(self, model: nnx.Module) -> dict[str, int]:
    return models.parameter_counts(model)

  def summary_notes(self, config: Any, model: nnx.Module, counts) -> list[str]:
    notes = []
    regrouped = model.encoder_name.startswith('resnext') and model.cardinality != resnext.CARDINALITY
    if regrouped:
      notes.append(f'ResNeXt 3x3 convolutions in {model.cardinality} group(s), not {resnext.CARDINALITY}: not '
                   'the reference architecture')
    paper = PAPER_TABLE2.get(model.encoder_name)
    if paper and model.width_multiplier == 1.0 and not regrouped:
      notes.append(f'Paper Table 2 ({model.encoder_name}): {paper[0]:.2f} M params, {paper[1]:.2f} "GLOPs" at '
                   f'256x256, {paper[2]:.2f} at 1024x1024.')
    return notes

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
