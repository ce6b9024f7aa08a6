r"""Training-step throughput (images/s) of the real jitted `trainer.train_step`, per model variant.

    .venv/bin/python benchmarks/train_step_throughput.py                              # the demo model, CPU
    .venv/bin/python benchmarks/train_step_throughput.py --config=configs/pannuke.py --width_multipliers=1 \
        --crop_size=256 --batch_size=8                                                 # the reference model

The step is the one `train.py` runs (on-device augmentation, the dual loss, coupled-L2 Adam update) on a
batch of random uint8 images with plausible targets, on a `data` mesh over all local devices. Each variant
(width multiplier x ResNeXt cardinality) is compiled first (compile time printed), run once more to warm up,
then timed --runs times; the table shows the median seconds per step. `ratio` is images/s over the first
variant's images/s, measured in the same process. Parameter values are host-random (`models.fill_random`):
the real initialiser compiles one program per parameter shape and does not change the timing.
Figures only, never asserted.
"""

from collections.abc import Sequence
import functools
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dualunet_jax import models, optim, trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'demo.py'), 'Experiment config.')
_WIDTHS = flags.DEFINE_list('width_multipliers', None, 'Width multipliers (default: the config\'s).')
_CARDINALITIES = flags.DEFINE_list('cardinalities', ['32', '1'],
                                   'ResNeXt 3x3 group counts (the first is the ratio baseline).')
_CROP = flags.DEFINE_integer('crop_size', 0, 'Square training crop side (0 = the config\'s crop_size).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch (0 = the config\'s train.batch_size).')
_RUNS = flags.DEFINE_integer('runs', 8, 'Timed steps per variant (median reported).')


def fake_batch(batch: int, size: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """uint8 images and targets of the right shapes and dtypes (timing does not depend on their values)."""
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'class_map': rng.integers(0, num_classes + 1, (batch, size, size), dtype=np.int32),
          'density': rng.random((batch, size, size), dtype=np.float32)}


def time_variant(config, width: float, cardinality: int, batch: dict, mesh, runs: int,
                 ) -> tuple[int, float, float]:
  """(parameters, compile seconds, median seconds per step) of one model variant."""
  num_classes = config.dataset.num_classes
  with config.unlocked():
    config.model.width_multiplier = width
    config.model.cardinality = cardinality
  model = models.fill_random(models.abstract_model(config.model, num_classes))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.train, steps_per_epoch=100), wrt=nnx.Param)
  params = models.parameter_counts(model)['total']
  graphdef, state = nnx.split((model, optimizer))
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  weights = jnp.full((num_classes + 1,), 1.0 / (num_classes + 1), jnp.float32)
  step = jax.jit(functools.partial(trainer.train_step, graphdef, class_weights=weights,
                                   config=config), donate_argnums=0)
  key = jax.random.key(0)
  t = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  state, metrics = step(state, batch, key)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return params, compile_s, statistics.median(times)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  widths = [float(w) for w in (_WIDTHS.value or [config.model.width_multiplier])]
  cardinalities = [int(c) for c in _CARDINALITIES.value]
  size = _CROP.value or config.dataset.crop_size or 256
  batch_size = _BATCH.value or config.train.batch_size
  mesh = trainer.make_mesh()
  batch = fake_batch(batch_size, size, config.dataset.num_classes)
  print(_machine.describe())
  print(f'{config.model.encoder}, K={config.dataset.num_classes}, batch {batch_size} x {size}x{size}; train '
        f'step (augment + loss + Adam), median of {_RUNS.value} steps after compile + 1 warm-up')
  header = (f"{'width':>6} {'cardinality':>11} {'parameters':>11} {'compile s':>10} {'s/step':>8} "
            f"{'images/s':>9} {'ratio':>6}")
  print(header)
  print('-' * len(header))
  baseline = None
  for width in widths:
    for cardinality in cardinalities:
      params, compile_s, seconds = time_variant(config, width, cardinality, batch, mesh, _RUNS.value)
      rate = batch_size / seconds
      baseline = rate if baseline is None else baseline
      print(f'{width:>6g} {cardinality:>11} {params:>11,} {compile_s:>10.1f} {seconds:>8.3f} {rate:>9.1f} '
            f'{rate / baseline:>6.2f}', flush=True)
  print(f'ratio = images/s over the first row\'s images/s (width {widths[0]:g}, cardinality '
        f'{cardinalities[0]}).')


if __name__ == '__main__':
  app.run(main)
