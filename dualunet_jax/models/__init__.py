"""DualU-Net models (Flax NNX, NHWC): `DualUNet`, `build_model` from a config, `parameter_counts`.

Nothing here knows about data or losses. See `dualunet.py` for the input/output contract and the mapping of
attribute names to the reference PyTorch checkpoint keys.
"""

from typing import Any

import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models.dualunet import count_params
from dualunet_jax.models.dualunet import DualUNet
from dualunet_jax.models.dualunet import ENCODERS

__all__ = ['DualUNet', 'ENCODERS', 'PARTS', 'build_model', 'parameter_counts', 'compute_dtype']

PARTS = ('encoder', 'class_decoder', 'density_decoder', 'class_head', 'density_head')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f'model dtype must be one of {tuple(_DTYPES)}, got {name!r}')
  return _DTYPES[name]


def build_model(model_config: Any, num_classes: int, *, rngs: nnx.Rngs) -> DualUNet:
  """DualUNet from `config.model` (fields `encoder`, `width_multiplier`, `dtype`); K = num_classes."""
  return DualUNet(encoder=model_config.encoder, num_classes=num_classes,
                  width_multiplier=float(model_config.width_multiplier),
                  dtype=compute_dtype(model_config.dtype), rngs=rngs)


def parameter_counts(model: DualUNet) -> dict[str, int]:
  """Trainable parameters per part and 'total' (BN statistics excluded); works on `nnx.eval_shape` models."""
  counts = {part: count_params(getattr(model, part)) for part in PARTS}
  counts['total'] = sum(counts.values())
  return counts
