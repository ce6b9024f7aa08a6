"""DualU-Net models (Flax NNX, NHWC): `DualUNet`, `build_model` from a config, `parameter_counts`.

Nothing here knows about data or losses. See `dualunet.py` for the input/output contract and the mapping of
attribute names to the reference PyTorch checkpoint keys.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualunet_jax.models import resnext
from dualunet_jax.models.dualunet import count_params
from dualunet_jax.models.dualunet import DualUNet
from dualunet_jax.models.dualunet import ENCODERS

__all__ = ['DualUNet', 'ENCODERS', 'PARTS', 'abstract_model', 'build_model', 'compute_dtype', 'fill_random',
           'parameter_counts', 'random_state']

PARTS = ('encoder', 'class_decoder', 'density_decoder', 'class_head', 'density_head')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f'model dtype must be one of {tuple(_DTYPES)}, got {name!r}')
  return _DTYPES[name]


def build_model(model_config: Any, num_classes: int, *, rngs: nnx.Rngs) -> DualUNet:
  """DualUNet from `config.model` (fields `encoder`, `width_multiplier`, `dtype`, optional `cardinality` and
  `encoder_blocks`); K = num_classes. Configs saved before those existed get the ResNeXt default (32) and the
  encoder's own depth."""
  return DualUNet(encoder=model_config.encoder, num_classes=num_classes,
                  width_multiplier=float(model_config.width_multiplier),
                  dtype=compute_dtype(model_config.dtype),
                  cardinality=int(model_config.get('cardinality', resnext.CARDINALITY)),
                  encoder_blocks=tuple(model_config.get('encoder_blocks', ())), rngs=rngs)


def abstract_model(model_config: Any, num_classes: int) -> DualUNet:
  """`build_model` under `nnx.eval_shape`: every Variable holds a jax.ShapeDtypeStruct, nothing is allocated.

  For parameter counts, FLOP analysis and checkpoint-layout work on full-size models. The Rngs is passed in as
  an argument (not created inside the traced function), which makes tracing ~35% faster here.
  """
  return nnx.eval_shape(lambda rngs: build_model(model_config, num_classes, rngs=rngs), nnx.Rngs(0))


def parameter_counts(model: DualUNet) -> dict[str, int]:
  """Trainable parameters per part and 'total' (BN statistics excluded); works on `nnx.eval_shape` models."""
  counts = {part: count_params(getattr(model, part)) for part in PARTS}
  counts['total'] = sum(counts.values())
  return counts


def random_state(state: nnx.State, seed: int = 0) -> nnx.State:
  """Fills `state` (abstract or concrete) in place with host-generated stand-in values and returns it:
  He-normal kernels, unit norm scales and BatchNorm variances, layer scale 0.5, zero biases and means; random
  streams (dropout) get valid keys and zero counters.

  For benchmarks and plumbing tests, whose results do not depend on the values: the real initialisation
  compiles one XLA program per parameter shape, tens of seconds for a tiny model on a small CPU.
  """
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # a dropout stream's key: a valid key
      keys = jax.random.split(jax.random.key(seed), math.prod(leaf.shape))
      return keys.reshape(leaf.shape)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):  # e.g. the stream's counter
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == 'kernel':
      std = math.sqrt(2.0 / max(1, math.prod(leaf.shape[:-1])))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.float32(std))
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, jnp.float32)
    if name == 'gamma':
      return jnp.full(leaf.shape, 0.5, jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state)))
  return state


def fill_random(model: DualUNet, seed: int = 0) -> DualUNet:
  """`random_state` applied to a model (e.g. an `abstract_model`) in place; returns the model."""
  nnx.update(model, random_state(nnx.state(model), seed))
  return model
