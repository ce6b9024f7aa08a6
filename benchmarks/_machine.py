"""One line naming the machine a benchmark ran on (every figure we publish names its machine), and the median
timer the benchmarks share."""

import os
import platform
import statistics
import time


def describe() -> str:
  """'<cpu model>, <n> cores, load avg <x> | jax <version>, <platform>:<device kind> x<count>'."""
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  device = jax.devices()[0]
  return (f'{cpu}, {os.cpu_count()} cores, load avg {load:.1f} | jax {jax.__version__}, '
          f'{device.platform}:{device.device_kind} x{jax.device_count()}')


def median_seconds(fn, repeats: int, warmup: bool = False) -> float:
  """Median wall seconds of `repeats` calls of `fn()` (after one untimed call when `warmup`: a compile)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
