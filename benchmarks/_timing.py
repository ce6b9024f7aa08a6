"""Timing helpers shared by the benchmark scripts and the GPU suite (`gpu_suite.py`).

Kept free of absl flags: the scripts define their flags at import, so one process cannot import two of them.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dualunet_jax import optim, trainer


def time_forward(graphdef, state, size: int, batch: int, runs: int) -> tuple[float, float]:
  """(compile seconds, median seconds per forward) of the eval forward on float32[batch, size, size, 3]."""

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  images = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), jnp.float32)
  t = time.perf_counter()
  compiled = jax.jit(forward).lower(state, images).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(state, images))  # warm-up
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(compiled(state, images))
    times.append(time.perf_counter() - t)
  return compile_s, statistics.median(times)


def fake_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """uint8 images and every method's targets, of the right shapes and dtypes (timing does not depend on
  their values): class and instance maps, DualU-Net's density, HoVer-Net's HV vectors."""
  rng = np.random.default_rng(seed)
  class_map = rng.integers(0, num_classes + 1, (batch, size, size), dtype=np.int32)
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), 'class_map': class_map,
          'instance_map': (class_map > 0).astype(np.int32),
          'density': rng.random((batch, size, size), dtype=np.float32),
          'hv': rng.uniform(-1, 1, (batch, size, size, 2)).astype(np.float32)}


def make_train_step(config, model, mesh):
  """(jitted `trainer.train_step` for `model`, donating its state; the (model, optimizer) state replicated on
  `mesh`). Uniform class weights: the step's cost does not depend on them."""
  num_classes = config.dataset.num_classes
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.train, steps_per_epoch=100), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  weights = jnp.full((num_classes + 1,), 1.0 / (num_classes + 1), jnp.float32)
  step = jax.jit(functools.partial(trainer.train_step, graphdef, class_weights=weights,
                                   config=config), donate_argnums=0)
  return step, state


def shard_batch(batch: dict, mesh) -> dict:
  """A host batch as global arrays split over the mesh's 'data' axis."""
  return jax.device_put(batch, NamedSharding(mesh, P('data')))


def time_steps(step, state, batch: dict, runs: int):
  """(seconds of the first call (compile, if `step` is not compiled yet, plus one step), median seconds per
  step over `runs` steps after one more warm-up step, the final state). `batch` from `shard_batch`."""
  key = jax.random.key(0)
  t = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - t
  state, metrics = step(state, batch, key)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return first_s, statistics.median(times), state
