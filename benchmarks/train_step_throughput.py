r"""Training-step throughput (images/s) of the real jitted `trainer.train_step`, per model variant.

    .venv/bin/python benchmarks/train_step_throughput.py                              # the demo model, CPU
    .venv/bin/python benchmarks/train_step_throughput.py --config=configs/pannuke.py --width_multipliers=1 \
        --crop_size=256 --batch_size=8                                                 # the reference model
    .venv/bin/python benchmarks/train_step_throughput.py --config=configs/hovernet_consep.py:fast \
        --width_multipliers=0.25 --cardinalities=1 --batch_size=8 --runs=3            # any method

The step is the one `train.py` runs (on-device augmentation, the dual loss, coupled-L2 Adam update) on a
batch of random uint8 images with plausible targets, on a `data` mesh over all local devices. Each variant
(width multiplier x ResNeXt cardinality x grouped-convolution implementation: `--grouped_conv=split,xla`, the
CPU path of models/grouped_conv.py against XLA's grouped kernels) is compiled first (compile time printed), run
once more to warm up, then timed --runs times; the table shows the median seconds per step. `ratio` is
images/s over the first variant's images/s, measured in the same process. Parameter values are host-random (`models.fill_random`):
the real initialiser compiles one program per parameter shape and does not change the timing.
Figures only, never asserted.
"""

from collections.abc import Sequence
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)
from _timing import fake_batch, make_train_step, shard_batch, time_steps  # noqa: E402

from dualunet_jax import methods, models, trainer  # noqa: E402
from dualunet_jax.models import grouped_conv  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'demo.py'), 'Experiment config.')
_WIDTHS = flags.DEFINE_list('width_multipliers', None, 'Width multipliers (default: the config\'s).')
_CARDINALITIES = flags.DEFINE_list('cardinalities', ['32', '1'],
                                   'ResNeXt 3x3 group counts (the first is the ratio baseline).')
_CROP = flags.DEFINE_integer('crop_size', 0, 'Square training crop side (0 = the config\'s crop_size).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Global batch (0 = the config\'s train.batch_size).')
_RUNS = flags.DEFINE_integer('runs', 8, 'Timed steps per variant (median reported).')
_GROUPED = flags.DEFINE_list('grouped_conv', ['auto'], 'Grouped-convolution implementations to compare: auto | '
                             'split (the CPU path) | xla (XLA\'s grouped kernels); see models/grouped_conv.py.')


def time_variant(config, width: float, cardinality: int, implementation: str, batch: dict, mesh, runs: int,
                 ) -> tuple[int, float, float]:
  """(parameters, compile seconds, median seconds per step) of one model variant."""
  with config.unlocked():
    config.model.width_multiplier = width
    config.model.cardinality = cardinality
  method = methods.get(config)
  model = models.fill_random(method.abstract_model(config, config.dataset.num_classes))
  params = method.parameter_counts(model)['total']
  with grouped_conv.implementation(implementation):  # read while the step is traced (its first call)
    step, state = make_train_step(config, model, mesh)
    compile_s, seconds, _ = time_steps(step, state, shard_batch(batch, mesh), runs)
  return params, compile_s, seconds


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
  print(f'{config.get("method", "dualunet")} ({config.model.encoder}), K={config.dataset.num_classes}, batch '
        f'{batch_size} x {size}x{size}; train step (augment + loss + Adam), median of {_RUNS.value} steps after '
        'compile + 1 warm-up')
  header = (f"{'width':>6} {'cardinality':>11} {'grouped conv':>12} {'parameters':>11} {'compile s':>10} "
            f"{'s/step':>8} {'images/s':>9} {'ratio':>6}")
  print(header)
  print('-' * len(header))
  baseline = None
  for width in widths:
    for cardinality in cardinalities:
      for implementation in _GROUPED.value:
        params, compile_s, seconds = time_variant(config, width, cardinality, implementation, batch, mesh,
                                                  _RUNS.value)
        rate = batch_size / seconds
        baseline = rate if baseline is None else baseline
        print(f'{width:>6g} {cardinality:>11} {implementation:>12} {params:>11,} {compile_s:>10.1f} '
              f'{seconds:>8.3f} {rate:>9.2f} {rate / baseline:>6.2f}', flush=True)
  print(f'ratio = images/s over the first row\'s images/s (width {widths[0]:g}, cardinality '
        f'{cardinalities[0]}, grouped conv {_GROUPED.value[0]}).')


if __name__ == '__main__':
  app.run(main)
