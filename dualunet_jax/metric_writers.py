"""Training metrics as JSON lines and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

import json
import math
import os
import pathlib
import time
from typing import Mapping

import jax


class MetricWriter:
  """Appends `{"step": s, "split": ..., "time": ..., **scalars}` to `W/metrics.jsonl` and writes the same
  scalars to TensorBoard under `W/tensorboard`. Only process 0 writes (multi-host runs)."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float], split: str = 'train') -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) or hasattr(v, '__float__')}
    record = {'step': int(step), 'split': split, 'time': time.time(),
              **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(f'{split}/{k}', v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `W/metrics.jsonl` (a truncated last line from a killed run is skipped)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  records = []
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
