"""Test helpers for the NP/HV/TP models (test_seresnext.py, test_conic_net.py, test_histonext.py).

Speed on a 2-core CPU: models are built with `nnx.eval_shape` and filled with host random values (a real eager
init compiles one XLA program per parameter shape: minutes for HistoNeXt-tiny), and forwards are compiled at
XLA backend optimisation level 0 (about half the compile time, same numerics), as tests/test_models.py does.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax import models

FAST_COMPILE = {'xla_backend_optimization_level': 0}


def abstract(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
  """build(rngs) under nnx.eval_shape: every Variable a ShapeDtypeStruct, nothing allocated."""
  return nnx.eval_shape(build, nnx.Rngs(0))


def filled(build: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
  """An abstract model with random parameters/statistics (`models.random_state`) and real RNG streams."""
  model = abstract(build)
  nnx.update(model, models.random_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)), seed))
  keys, counts = nnx.state(model, nnx.RngKey, nnx.RngCount)
  nnx.update(model, jax.tree.map(lambda _: jax.random.key(seed), keys),
             jax.tree.map(lambda _: jnp.zeros((), jnp.uint32), counts))
  return model


def forward(model: nnx.Module, inputs: Any) -> tuple[Any, nnx.State]:
  """(model(inputs), state after the call) through one fast-compiled jit; `model` is left unchanged.
  `inputs`: an array or a pytree of arrays (numpy or jax)."""
  graphdef, state = nnx.split(model)

  def f(state, inputs):
    module = nnx.merge(graphdef, state)
    return module(inputs), nnx.state(module)

  inputs = jax.tree.map(jnp.asarray, inputs)
  return jax.jit(f).lower(state, inputs).compile(FAST_COMPILE)(state, inputs)
