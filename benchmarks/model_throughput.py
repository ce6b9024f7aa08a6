r"""DualU-Net forward throughput (tiles/s), float32 vs bfloat16 compute, per tile size and batch size.

    .venv/bin/python benchmarks/model_throughput.py                                   # ResNeXt, CPU-sized
    .venv/bin/python benchmarks/model_throughput.py --encoder=convnext_base --sizes=256,1024 \
        --batch_sizes=1,8,32 --max_batch_pixels=0                                      # a GPU

Eval-mode forward (`model.eval()`, the jitted pure function of the split state), batch of random [0, 1]
images on the default device. Each (dtype, size, batch) is compiled first (compile time printed), run once
more to warm up, then timed --runs times (block_until_ready); the table shows the median. `ratio` is bfloat16
tiles/s over float32 tiles/s of the same size and batch, measured in the same process. Parameter values are
random (He-normal kernels, BatchNorm near identity), generated on the host: the real initialiser compiles one
program per parameter shape, which costs a minute on a small CPU and does not change the timing.
Figures only, never asserted.
"""

from collections.abc import Sequence
import pathlib
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)
from _timing import time_forward  # noqa: E402

from flax import nnx  # noqa: E402

from dualunet_jax import models  # noqa: E402

_ENCODER = flags.DEFINE_enum('encoder', 'resnext50_32x4d', list(models.ENCODERS), 'Encoder.')
_WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Channel width multiplier (1 = the reference model).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 5, 'K nucleus classes (K + 1 output channels).')
_SIZES = flags.DEFINE_list('sizes', ['256', '1024'], 'Square tile sides.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '2', '4'], 'Batch sizes.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                             'Compute dtypes (the first is the ratio baseline).')
_RUNS = flags.DEFINE_integer('runs', 5, 'Timed runs per configuration (median reported).')
_MAX_PIXELS = flags.DEFINE_integer('max_batch_pixels', 1024 * 1024,
                                   'Skip configurations with batch * size^2 above this (0 = no limit); the '
                                   'default keeps a CPU run to a few minutes (1024^2 only at batch 1).')


def graphdef_for(dtype: str):
  model = nnx.eval_shape(lambda rngs: models.DualUNet(encoder=_ENCODER.value, num_classes=_NUM_CLASSES.value,
                                                     width_multiplier=_WIDTH.value,
                                                     dtype=models.compute_dtype(dtype), rngs=rngs),
                         nnx.Rngs(0))
  model.eval()
  return nnx.split(model)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sizes = [int(s) for s in _SIZES.value]
  batches = [int(b) for b in _BATCHES.value]
  dtypes = list(_DTYPES.value)
  print(_machine.describe())
  graphdefs = {dtype: graphdef_for(dtype) for dtype in dtypes}
  graphdef0, abstract_state = graphdefs[dtypes[0]]
  state = models.random_state(abstract_state)
  params = models.parameter_counts(nnx.merge(graphdef0, state))['total']
  print(f'DualU-Net {_ENCODER.value} width x{_WIDTH.value:g}, K={_NUM_CLASSES.value}, {params:,} parameters; '
        f'eval forward, median of {_RUNS.value} runs after compile + 1 warm-up')
  header = (f"{'size':>6} {'batch':>5} {'dtype':>9} {'compile s':>10} {'ms/batch':>10} {'tiles/s':>9} "
            f"{'ratio':>7}")
  print(header)
  print('-' * len(header))
  for size in sizes:
    for batch in batches:
      if _MAX_PIXELS.value and batch * size * size > _MAX_PIXELS.value:
        print(f'{size:>6} {batch:>5}  skipped (batch * size^2 > --max_batch_pixels={_MAX_PIXELS.value})')
        continue
      baseline = None
      for dtype in dtypes:
        compile_s, seconds = time_forward(graphdefs[dtype][0], state, size, batch, _RUNS.value)
        rate = batch / seconds
        baseline = rate if baseline is None else baseline
        print(f'{size:>6} {batch:>5} {dtype:>9} {compile_s:>10.1f} {1e3 * seconds:>10.1f} {rate:>9.2f} '
              f'{rate / baseline:>7.2f}', flush=True)
  print(f'ratio = tiles/s over {dtypes[0]} tiles/s at the same size and batch.')


if __name__ == '__main__':
  app.run(main)
