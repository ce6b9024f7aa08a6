r"""The GPU measurement suite: one prepared, time-boxed run that writes one JSON and one markdown table.

    launch/gpu_suite.sh [--budget_s=540]                 # on a GPU box (installs carried wheels first)
    python benchmarks/gpu_suite.py --dry_run --out_dir=/tmp/s   # tiny sizes on a CPU (CI: tests/test_gpu_suite.py)

Steps, in order, each with its own time budget inside the total one (`--step_budgets`, 0 = what is left):
  device_ceiling  a bf16 matrix product (random data) and the datasheet's dense bf16 peak for the device kind
  forward         eval forward tiles/s of every model in MODELS, bfloat16 and float32, per tile size and batch
                  (a sweep; out-of-memory is caught and ends the sweep at that size), with XLA's FLOP count and
                  the percentage of the peak bf16 FLOP/s it reaches
  train_step      the jitted `trainer.train_step` (augmentation, dual loss, Adam), images/s at the reference batch
                  (8 crops of 256^2) and at the largest batch that fits (predicted from XLA's memory analysis of
                  two compiled batch sizes, then run)
  predict         the real engine (`inference.predict`: reader thread, device batches, post-processing pool on
                  all host cores, exporters) on the CoNSeP Test tiles and on a multi-gigapixel pyramidal TIFF
                  mosaic of them (sized to the time left): tiles/s, s/mm^2 at the model's 0.5 µm/px, and the
                  fraction of the time the device waits for the host
  train           the reference CoNSeP schedule (configs/consep.py: 100 epochs, random initialisation) through
                  `trainer.train_and_evaluate`, stopped with a checkpoint when the budget ends (rerun with the
                  same --train_workdir to resume), then the best checkpoint evaluated on CoNSeP Test

Every unit of work is timed (compile + runs) and the next unit is started only when its estimate (from the
units measured before it) fits the time left; what does not fit is recorded as skipped, with the reason.
`--dry_run` runs every step with tiny sizes and a stand-in model (`TinyDualNet`, DualU-Net's contract in two
convolutions: a full DualU-Net takes 10-80 s per compile on a small CPU) so the script never rots.

Weights are random: throughput does not depend on them, and the predict step swaps the model's outputs on the
device for ground-truth-derived maps (`predict_throughput.DeviceOraclePredictor`), so the host post-processes
realistic nuclei. Outputs: `<out_dir>/gpu_suite.json` (schema in `write_outputs`) and `gpu_suite.md`, both
rewritten after every unit, so a run killed from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))
import _machine  # noqa: E402
import _suite_data  # noqa: E402
import _timing  # noqa: E402

SCHEMA_VERSION = 1
STEPS = ('device_ceiling', 'forward', 'train_step', 'predict', 'train')
STATUSES = ('measured', 'partial', 'skipped', 'failed')
DEFAULT_STEP_BUDGETS = {'device_ceiling': 20, 'forward': 130, 'train_step': 100, 'predict': 150, 'train': 0}
# Seconds kept at the end of the total budget for the last write of the outputs.
FINAL_RESERVE_S = 5.0

# The full-size methods: (label, config overrides on configs/consep.py). Every model the suite measures is
# built by `_build_model` through the method registry (`config.method`). The predict and full-training steps
# run the first (DualU-Net ResNeXt-50); forward and train-step throughput run every row.
MODELS = (
    ('dualunet_resnext50', {'model.encoder': 'resnext50_32x4d'}),
    ('dualunet_convnext_base', {'model.encoder': 'convnext_base'}),
    # Valid convolutions: a side-S input gives (S - 92)^2 ('fast') or (S - 190)^2 ('original') outputs.
    ('hovernet_fast', {'method': 'hovernet', 'model.hovernet_mode': 'fast', 'model.encoder': 'preact_resnet50'}),
    ('hovernet_original', {'method': 'hovernet', 'model.hovernet_mode': 'original',
                           'model.encoder': 'preact_resnet50'}),
)
TINY_ENCODER = 'dry_run_tiny'
DRY_RUN_MODELS = ((TINY_ENCODER, {'model.encoder': TINY_ENCODER}),)

# Dense (no sparsity) bfloat16 tensor-core peak by device kind: (substring of jax's device_kind, TFLOP/s,
# source). Datasheet values are half the "with sparsity" figures NVIDIA prints. First match wins.
PEAK_BF16_TFLOPS = (
    ('GH200', 989.4, 'NVIDIA GH200 datasheet (H100 SXM5 tensor cores): 1,979 TFLOP/s bf16 with sparsity / 2'),
    ('H200', 989.4, 'NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with sparsity / 2 (this project\'s device '
                    'notes measured ~790 on an 8192^3 bf16 matmul)'),
    ('H100 PCIe', 756.0, 'NVIDIA H100 PCIe datasheet: 1,513 TFLOP/s bf16 with sparsity / 2'),
    ('H100 NVL', 835.5, 'NVIDIA H100 NVL datasheet: 1,671 TFLOP/s bf16 with sparsity / 2'),
    ('H100', 989.4, 'NVIDIA H100 SXM5 datasheet: 1,979 TFLOP/s bf16 with sparsity / 2'),
    ('B200', 2250.0, 'NVIDIA HGX B200 datasheet: 4.5 PFLOP/s fp16/bf16 with sparsity per GPU / 2'),
    ('A100', 312.0, 'NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense'),
    ('L40S', 362.1, 'NVIDIA L40S datasheet: 733 TFLOP/s bf16 with sparsity / 2'),
    ('L4', 121.0, 'NVIDIA L4 datasheet: 242 TFLOP/s bf16 with sparsity / 2'),
    ('A10', 125.0, 'NVIDIA A10 datasheet: 250 TFLOP/s bf16 with sparsity / 2'),
)


def peak_bf16(device_kind: str) -> tuple[float | None, str]:
  """(dense bf16 TFLOP/s, source) for a jax `device_kind`; (None, why) when the table does not know it."""
  for key, tflops, source in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops, source
  return None, f'no datasheet peak known for device kind {device_kind!r} (see PEAK_BF16_TFLOPS)'


# ----------------------------------------------------------------------------------------------- sizes

class Plan:
  """Sizes of one run: the GPU plan, or (`dry_run`) tiny ones that finish in seconds on a CPU."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run
    if not dry_run:
      self.models = MODELS
      self.forward_batches = {256: (1, 8, 32, 128), 1024: (1, 4, 16)}
      self.forward_runs = 10
      self.primary_pixels = 4 * 1024 * 1024  # the sweep starts at the batch closest to 4 Mpx, then widens
      self.ceiling_n, self.ceiling_runs = 8192, 10
      self.train_size, self.train_batch, self.train_max_batch, self.train_runs = 256, 8, 4096, 10
      self.predict_tiles, self.predict_batch, self.predict_runs = 14, 8, 3
      self.predict_tile, self.predict_overlap = 1024, 128  # the `dualunet-predict` defaults
      self.wsi_gigapixels, self.wsi_min_gigapixels = 2.0, 1.0
      self.guess_compile_s, self.guess_build_s = 60.0, 15.0  # before anything was measured
      self.train_overrides: dict[str, Any] = {'dataset.num_workers': 4}
      self.train_limits = None  # all of CoNSeP
      self.eval_reserve_s = 60.0
      self.largest_dtypes = ('bfloat16', 'float32')
      self.reference_dtypes = ('float32', 'bfloat16')  # float32: the reference settings; bf16: the fast path
      self.train_step_overrides: dict[str, Any] = {}
    else:
      self.models = DRY_RUN_MODELS
      self.forward_batches = {32: (1, 2), 64: (1,)}
      self.forward_runs = 2
      self.primary_pixels = 32 * 32
      self.ceiling_n, self.ceiling_runs = 128, 2
      self.train_size, self.train_batch, self.train_max_batch, self.train_runs = 32, 2, 8, 2
      self.predict_tiles, self.predict_batch, self.predict_runs = 2, 2, 1
      self.predict_tile, self.predict_overlap = 256, 32
      self.wsi_gigapixels, self.wsi_min_gigapixels = 0.0036, 0.001  # 2 x 2 blocks of 960^2
      self.guess_compile_s, self.guess_build_s = 5.0, 2.0
      self.train_overrides = {
          'dataset.crop_size': 32, 'dataset.num_workers': 0, 'train.batch_size': 2, 'train.epochs': 1,
          'train.steps_per_epoch': 3, 'train.lr_milestones': (1,), 'train.log_every_steps': 1,
          'train.eval_every_epochs': 1, 'train.checkpoint_every_epochs': 1, 'eval.max_val_images': 1,
          'eval.batch_size': 1, 'postprocess.workers': 2}
      self.train_limits = {'Train': 2, 'Test': 1}
      self.eval_reserve_s = 10.0
      self.largest_dtypes = ('bfloat16',)
      self.reference_dtypes = ('float32',)
      # HED jitter doubles the train step's compile time on a CPU; the dry run checks plumbing, not augmentation.
      self.train_step_overrides = {'augment.hed_scale': 0.0, 'augment.hed_shift': 0.0}
      self.train_overrides.update(self.train_step_overrides)
    self.predict_mpp = 0.5


# ----------------------------------------------------------------------------------------------- models

def _tiny_dual_net_class():
  from flax import nnx
  import jax
  import jax.numpy as jnp

  class _ConvBN(nnx.Module):
    def __init__(self, cin, cout, dtype, rngs):
      self.conv = nnx.Conv(cin, cout, (3, 3), dtype=dtype, rngs=rngs)
      self.norm = nnx.BatchNorm(cout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
      return jax.nn.relu(self.norm(self.conv(x)))

  class TinyDualNet(nnx.Module):
    """Dry-run stand-in with DualU-Net's contract: images uint8 or [0, 1] float [B, H, W, 3] ->
    (class_logits float32[B, H, W, K+1], density float32[B, H, W]); parts named as `models.PARTS`."""

    def __init__(self, num_classes: int, dtype=jnp.float32, width: int = 8, *, rngs: nnx.Rngs):
      self.dtype = dtype
      self.encoder = _ConvBN(3, width, dtype, rngs)
      self.class_decoder = _ConvBN(width, width, dtype, rngs)
      self.density_decoder = _ConvBN(width, width, dtype, rngs)
      self.class_head = nnx.Conv(width, num_classes + 1, (1, 1), rngs=rngs)
      self.density_head = nnx.Conv(width, 1, (1, 1), rngs=rngs)

    def __call__(self, images):
      x = images.astype(jnp.float32)
      if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
      features = self.encoder(x.astype(self.dtype))
      logits = self.class_head(self.class_decoder(features).astype(jnp.float32))
      density = self.density_head(self.density_decoder(features).astype(jnp.float32))
      return logits, density[..., 0]

  return TinyDualNet


def _build_model(config, rngs=None):
  """The model of `config` (`config.model`, K = `config.dataset.num_classes`): the one place the suite builds
  models, so that switching to the method registry (`config.method`) is a change here only."""
  from flax import nnx
  from dualunet_jax import models
  rngs = rngs if rngs is not None else nnx.Rngs(int(config.get('seed', 0)))
  from dualunet_jax import methods
  if config.model.encoder == TINY_ENCODER:
    return _tiny_dual_net_class()(config.dataset.num_classes, models.compute_dtype(config.model.dtype), rngs=rngs)
  return methods.get(config).build_model(config, config.dataset.num_classes, rngs=rngs)


def _random_model(config):
  """`_build_model` shape-only (`nnx.eval_shape`), then filled with host-random values (`models.fill_random`):
  the real initialiser compiles one program per parameter shape, minutes for a full model, for the same timing."""
  from flax import nnx
  from dualunet_jax import models
  return models.fill_random(nnx.eval_shape(lambda rngs: _build_model(config, rngs), nnx.Rngs(0)))


@contextlib.contextmanager
def _trainer_builds_through_suite():
  """`trainer.create_train_state` calls `models.build_model`; while this is active, stand-in encoders go
  through `_build_model` (dry run only; real encoders are untouched). Remove once `config.method` exists."""
  import ml_collections
  from dualunet_jax import models
  original = models.build_model

  def build(model_config, num_classes, *, rngs):
    if model_config.encoder != TINY_ENCODER:
      return original(model_config, num_classes, rngs=rngs)
    return _build_model(ml_collections.ConfigDict({'model': model_config.to_dict(),
                                                    'dataset': {'num_classes': num_classes}}), rngs)

  models.build_model = build
  try:
    yield
  finally:
    models.build_model = original


def make_config(overrides: dict[str, Any], dtype: str | None = None):
  """configs/consep.py with dotted-key `overrides` (keys that do not exist yet are created) and `dtype`."""
  from configs import consep
  config = consep.get_config()
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
    if dtype:
      config.model.dtype = dtype
  return config


def _is_oom(error: BaseException) -> bool:
  text = f'{type(error).__name__}: {error}'
  return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory', 'OOM'))


def _short(error: BaseException, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'


def _free_device_memory() -> None:
  import jax
  gc.collect()
  jax.clear_caches()
  gc.collect()


# ----------------------------------------------------------------------------------------------- budget

class Clock:
  """Deadline of one step: the step's own budget, capped by the total budget (less the final reserve)."""

  def __init__(self, deadline: float):
    self.deadline = deadline
    self.start = time.perf_counter()

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def fits(self, estimate_s: float) -> tuple[bool, str]:
    left = self.left()
    if estimate_s <= left:
      return True, ''
    return False, f'estimated {estimate_s:.0f} s > {max(left, 0):.0f} s left in the step budget'


def _unit(status: str, reason: str | None = None, **fields) -> dict[str, Any]:
  return {'status': status, 'reason': reason, **fields}


def _step_status(units: list[dict]) -> tuple[str, str | None]:
  """A step's status from its units: all measured -> measured; none -> skipped; else partial, with counts."""
  counts: dict[str, int] = {}
  for u in units:
    counts[u['status']] = counts.get(u['status'], 0) + 1
  measured = counts.get('measured', 0)
  if units and measured == len(units):
    return 'measured', None
  detail = ', '.join(f'{n} {s}' for s, n in sorted(counts.items()) if s != 'measured')
  first = next((u['reason'] for u in units if u['status'] != 'measured' and u.get('reason')), '')
  reason = f'{measured} of {len(units)} units measured ({detail}); first reason: {first}'
  if not units:
    reason = 'nothing to measure'
  return ('partial' if measured else 'skipped'), reason


# ----------------------------------------------------------------------------------------------- step 0

def step_device_ceiling(ctx: 'Suite', clock: Clock) -> dict:
  """bf16 n x n x n matrix product on random data: median TFLOP/s (the measured ceiling the datasheet's is
  compared with), and the device's memory limit."""
  import jax
  import jax.numpy as jnp
  n = ctx.plan.ceiling_n
  keys = jax.random.split(jax.random.key(0), 4)
  pairs = [(jax.random.normal(keys[2 * i], (n, n), jnp.bfloat16), jax.random.normal(keys[2 * i + 1], (n, n),
                                                                                     jnp.bfloat16))
           for i in range(2)]  # two input sets, alternated, so repeated runs do not just re-read the cache
  matmul = jax.jit(lambda a, b: a @ b)
  for a, b in pairs * 2:
    jax.block_until_ready(matmul(a, b))
  times = []
  for i in range(ctx.plan.ceiling_runs):
    a, b = pairs[i % 2]
    t = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t)
  tflops = 2 * n ** 3 / statistics.median(times) / 1e12
  ctx.measured_matmul_tflops = tflops
  unit = _unit('measured', matmul_n=n, median_s=statistics.median(times), tflops=tflops,
               device_memory_bytes=ctx.device_memory_bytes)
  return {'units': [unit]}


# ----------------------------------------------------------------------------------------------- step 1

def _forward_units(plan: Plan) -> list[tuple[str, dict, int, int, str]]:
  """(label, overrides, size, batch, dtype) in priority order: at every size the primary batch (closest to
  `primary_pixels`) in bf16 for every model, then float32, then the rest of the sweep (ascending batches)."""
  first, rest = [], []
  for size, batches in plan.forward_batches.items():
    primary = min(batches, key=lambda b: (abs(math.log(b * size * size / plan.primary_pixels)), b))
    for dtype in ('bfloat16', 'float32'):
      for label, overrides in plan.models:
        first.append((label, overrides, size, primary, dtype))
        rest += [(label, overrides, size, b, dtype) for b in batches if b != primary]
  return first + rest


def step_forward(ctx: 'Suite', clock: Clock) -> dict:
  from flax import nnx
  from dualunet_jax import summary
  plan, units = ctx.plan, []
  built: dict[str, Any] = {}  # label -> (config, abstract model, random state, params)
  graphdefs: dict[tuple[str, str], Any] = {}
  flops: dict[tuple[str, int], float] = {}
  compile_s: dict[str, list[float]] = {}
  oom_batch: dict[tuple[str, int, str], int] = {}
  for label, overrides, size, batch, dtype in _forward_units(plan):
    where = dict(model=label, size=size, batch=batch, dtype=dtype)
    if batch >= oom_batch.get((label, size, dtype), math.inf):
      units.append(_unit('skipped', f'batch {oom_batch[(label, size, dtype)]} already ran out of device memory',
                         **where))
      continue
    estimate = (0 if label in built else plan.guess_build_s) + \
        (max(compile_s[label]) if compile_s.get(label) else plan.guess_compile_s)
    ok, why = clock.fits(estimate)
    if not ok:
      units.append(_unit('skipped', why, **where))
      continue
    t0 = time.perf_counter()
    try:
      if label not in built:
        config = make_config(overrides)
        model = _random_model(config)
        _, state = nnx.split(model)
        from dualunet_jax import methods
        built[label] = (config, model, state, methods.get(config).parameter_counts(model)['total'])
      config, model, state, params = built[label]
      if (label, dtype) not in graphdefs:
        abstract = nnx.eval_shape(lambda rngs: _build_model(make_config(overrides, dtype), rngs), nnx.Rngs(0))
        abstract.eval()
        graphdefs[(label, dtype)] = nnx.split(abstract)[0]
      if (label, size) not in flops:
        flops[(label, size)] = summary.forward_flops(model, size)  # XLA cost analysis, batch 1
      seconds_compile, seconds = _timing.time_forward(graphdefs[(label, dtype)], state, size, batch,
                                                               plan.forward_runs)
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e):
        oom_batch[(label, size, dtype)] = batch
        units.append(_unit('oom', f'out of device memory at batch {batch}: {_short(e, 160)}', **where))
      else:
        units.append(_unit('failed', _short(e), **where))
      _free_device_memory()
      continue
    compile_s.setdefault(label, []).append(seconds_compile)
    tiles_per_s = batch / seconds
    achieved = flops[(label, size)] * tiles_per_s / 1e12
    units.append(_unit('measured', **where, params=params, compile_s=seconds_compile,
                       ms_per_batch=1e3 * seconds, tiles_per_s=tiles_per_s, gflops_per_tile=flops[(label, size)] / 1e9,
                       achieved_tflops=achieved, pct_peak_bf16=ctx.pct_peak(achieved),
                       pct_measured_matmul=ctx.pct_measured(achieved), unit_s=time.perf_counter() - t0))
    ctx.write()
  _add_ratios(units)
  return {'units': units}


def _add_ratios(units: list[dict]) -> None:
  """bf16 tiles/s over float32 tiles/s of the same model, size and batch."""
  f32 = {(u['model'], u['size'], u['batch']): u['tiles_per_s'] for u in units
         if u['status'] == 'measured' and u['dtype'] == 'float32'}
  for u in units:
    if u['status'] == 'measured' and u['dtype'] == 'bfloat16':
      base = f32.get((u['model'], u['size'], u['batch']))
      u['bf16_over_f32'] = u['tiles_per_s'] / base if base else None


# ----------------------------------------------------------------------------------------------- step 2

def _memory_bytes(compiled) -> int | None:
  """Peak device bytes of a compiled program per XLA's memory analysis (arguments + outputs + temporaries,
  less donated aliases), or None where the backend gives none."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def predict_largest_batch(points: list[tuple[int, int]], limit: int | None, step: int, cap: int
                          ) -> tuple[int, str]:
  """(largest batch, how it was found) from compiled programs' peak bytes `points` [(batch, bytes), ...]:
  memory(b) ~ fixed + slope * b through the smallest and largest batch, solved for 92 % of `limit` (headroom
  for the allocator), rounded down to a multiple of `step` and capped at `cap`. No limit (CPU) -> `cap`."""
  if limit is None:
    return cap, 'no device memory limit known: the cap'
  if len(points) < 2:
    return points[-1][0] if points else step, 'fewer than two memory analyses'
  (b0, m0), (b1, m1) = points[0], points[-1]
  slope = max((m1 - m0) / max(b1 - b0, 1), 1.0)
  target = int((0.92 * limit - (m0 - slope * b0)) // slope)
  target = max(step, min(target, cap) // step * step)
  return target, (f'predicted from XLA memory analysis ({m0 / 2**30:.2f} GiB at batch {b0}, {m1 / 2**30:.2f} GiB '
                  f'at {b1}, limit {limit / 2**30:.1f} GiB)')


def step_train_step(ctx: 'Suite', clock: Clock) -> dict:
  import jax
  from jax.sharding import Mesh
  tst = _timing
  plan, units = ctx.plan, []
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  round_b = lambda b: max(mesh.size, b // mesh.size * mesh.size)  # batches split evenly over the devices
  compile_s: list[float] = []
  states: dict[tuple[str, str], Any] = {}
  memory: dict[tuple[str, str], list[tuple[int, int]]] = {}

  def run(label, overrides, dtype, batch, kind):
    """Compiles and times one (model, dtype, batch); returns the unit."""
    where = dict(model=label, dtype=dtype, batch=batch, size=plan.train_size, kind=kind)
    estimate = (plan.guess_build_s if (label, dtype) not in states else 0) + \
        (max(compile_s) if compile_s else plan.guess_compile_s) * (1 if plan.dry_run else 2)
    ok, why = clock.fits(estimate)
    if not ok:
      return _unit('skipped', why, **where)
    t0 = time.perf_counter()
    try:
      config = make_config({**overrides, **plan.train_step_overrides}, dtype)
      if (label, dtype) not in states:
        states[(label, dtype)] = tst.make_train_step(config, _random_model(config), mesh)
      step, state = states[(label, dtype)]
      host = tst.fake_batch(batch, plan.train_size, config.dataset.num_classes)
      device_batch = tst.shard_batch(host, mesh)
      t = time.perf_counter()
      compiled = step.lower(state, device_batch, jax.random.key(0)).compile()
      seconds_compile = time.perf_counter() - t
      peak = _memory_bytes(compiled)
      _, seconds, state = tst.time_steps(compiled, state, device_batch, plan.train_runs)
      states[(label, dtype)] = (step, state)
    except Exception as e:  # pylint: disable=broad-except
      # The state was donated to the failed call or is intact; rebuild it next time to be sure.
      states.pop((label, dtype), None)
      _free_device_memory()
      if _is_oom(e):
        return _unit('oom', f'out of device memory at batch {batch}: {_short(e, 160)}', **where)
      return _unit('failed', _short(e), **where)
    compile_s.append(seconds_compile)
    if peak is not None:
      memory.setdefault((label, dtype), []).append((batch, peak))
    return _unit('measured', **where, compile_s=seconds_compile, s_per_step=seconds, images_per_s=batch / seconds,
                 memory_bytes=peak, unit_s=time.perf_counter() - t0)

  def largest(label, overrides, dtype):
    """Largest batch that fits: memory(b) ~ fixed + slope * b from two compiled batches, then verified by
    running it (stepping down by 20 % on out-of-memory)."""
    ref, twice = round_b(plan.train_batch), round_b(2 * plan.train_batch)
    out = [run(label, overrides, dtype, twice, 'largest_probe')]
    if out[0]['status'] != 'measured':
      return out
    target, why = predict_largest_batch(sorted(set(memory.get((label, dtype), []))), ctx.device_memory_bytes,
                                        ref, plan.train_max_batch)
    target = round_b(target)
    while target > twice:
      unit = run(label, overrides, dtype, target, 'largest')
      unit['how'] = why
      out.append(unit)
      if unit['status'] != 'oom':
        break
      target = round_b(int(target * 0.8) // ref * ref)
      why = 'stepped down 20 % after out-of-memory'
    return out

  for label, overrides in plan.models:
    for dtype in plan.reference_dtypes:
      units.append(run(label, overrides, dtype, round_b(plan.train_batch), 'reference'))
      ctx.write()
  for dtype in plan.largest_dtypes:
    for label, overrides in plan.models:
      units += largest(label, overrides, dtype)
      ctx.write()
  return {'units': units}


# ----------------------------------------------------------------------------------------------- step 3

class DeviceTimeline:
  """Wraps an engine predictor and records, per batch, when it was dispatched and when the device finished it
  (a waiter thread blocks on each output in order). Device-busy time is the union of
  [max(dispatch returned, previous batch done), done]; everything else in the span is the device waiting."""
  needs_windows = True

  def __init__(self, inner):
    self.inner = inner
    self.events: list[list[float]] = []
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._wait, daemon=True, name='suite-device-timeline')
    self._thread.start()

  def _wait(self):
    import jax
    while True:
      item = self._queue.get()
      if item is None:
        return
      outputs, event = item
      jax.block_until_ready(outputs)
      event[2] = time.perf_counter()

  def __call__(self, images, windows=None):
    t0 = time.perf_counter()
    out = self.inner(images, windows=windows) if getattr(self.inner, 'needs_windows', False) else self.inner(images)
    event = [t0, time.perf_counter(), 0.0]
    self.events.append(event)
    self._queue.put((out, event))
    return out

  def reset(self):
    self.flush()
    self.events = []

  def flush(self):
    while any(e[2] == 0.0 for e in self.events):
      time.sleep(0.001)

  def close(self):
    self._queue.put(None)

  def summary(self) -> dict[str, float]:
    """{'batches', 'span_s' (first dispatch to last done), 'device_busy_s', 'device_wait_fraction'}."""
    self.flush()
    if not self.events:
      return {'batches': 0, 'span_s': 0.0, 'device_busy_s': 0.0, 'device_wait_fraction': float('nan')}
    busy, prev_done = 0.0, -math.inf
    for _, dispatched, done in self.events:
      start = max(dispatched, prev_done)
      busy += max(0.0, done - start)
      prev_done = max(prev_done, done)
    span = prev_done - self.events[0][0]
    return {'batches': len(self.events), 'span_s': span, 'device_busy_s': busy,
            'device_wait_fraction': max(0.0, 1.0 - busy / span) if span > 0 else float('nan')}


def _predict_inputs(ctx: 'Suite', n: int):
  """(png paths, per-tile oracle maps at model res, source name, level-0 mpp, blocks for the mosaic):
  CoNSeP Test tiles when available (assembled from the carried crops if needed), else synthetic tiles
  (dry run only)."""
  scale = int(round(ctx.plan.predict_mpp / _suite_data.CONSEP_MPP))
  official = ctx.consep_official({'Test': n})
  if official is not None:
    tiles = _suite_data.consep_test_tiles(official, n)
    source, mpp = 'CoNSeP Test', _suite_data.CONSEP_MPP
    records = [rec for _, rec in tiles]
    paths = [p for p, _ in tiles]
  elif ctx.plan.dry_run:
    from PIL import Image
    from dualunet_jax.data import synthetic
    folder = ctx.scratch / 'synthetic_tiles'
    folder.mkdir(parents=True, exist_ok=True)
    records, paths = [], []
    for i in range(n):  # 500^2 at 0.5 µm/px, upsampled to CoNSeP's 1000^2 at 0.25
      rec = synthetic.render_tile(i, size=500, num_classes=4, split='test')
      image = np.asarray(Image.fromarray(rec['image']).resize((1000, 1000), Image.Resampling.BILINEAR))
      inst = np.repeat(np.repeat(rec['instance_map'], 2, 0), 2, 1)
      path = folder / f'synthetic_{i}.png'
      Image.fromarray(image).save(path, compress_level=1)
      records.append(dict(rec, image=image, instance_map=inst))
      paths.append(path)
    source, mpp = 'synthetic (dry run; CoNSeP crops not found)', _suite_data.CONSEP_MPP
  else:
    return None
  return paths, records, source, mpp, scale


def step_predict(ctx: 'Suite', clock: Clock) -> dict:
  import jax
  import predict_throughput
  from dualunet_jax.inference import engine
  plan, units = ctx.plan, []
  t = time.perf_counter()
  inputs = _predict_inputs(ctx, plan.predict_tiles)
  if inputs is None:
    return {'units': [_unit('skipped', ctx.no_consep_reason(), workload='consep_test_tiles')]}
  paths, records, source, mpp, scale = inputs
  prepare_s = time.perf_counter() - t
  label, overrides = plan.models[0]
  config = make_config(overrides, 'bfloat16')
  k = config.dataset.num_classes
  sigma = config.targets.sigma / scale
  tile_maps = [_suite_data.oracle_maps(r['instance_map'], r['instance_classes'], k, scale, sigma) for r in records]
  oracle = _suite_data.MosaicOracle(tile_maps, {p.stem: np.zeros((1, 1), np.int32) + i for i, p in enumerate(paths)})
  model = _random_model(config)
  model.eval()
  timeline = DeviceTimeline(predict_throughput.DeviceOraclePredictor(model, oracle))
  workers = os.cpu_count() or 1
  pool = engine.make_pool(workers)
  common = dict(model=label, dtype='bfloat16', model_mpp=plan.predict_mpp, workers=workers,
                batch_size=plan.predict_batch)
  try:
    # ---- CoNSeP Test tiles: one warm-up run (compiles every batch shape), then timed runs
    opt = engine.Options(model_mpp=plan.predict_mpp, class_names=tuple(config.dataset.class_names),
                         tile_size=plan.predict_tile, overlap=plan.predict_overlap, batch_size=plan.predict_batch,
                         workers=workers, formats=('geojson', 'csv', 'maps', 'composition'), progress=False)
    specs = [engine.InputSpec(p, mpp=mpp) for p in paths]
    walls, waits, nuclei = [], [], 0
    t = time.perf_counter()
    for run in range(plan.predict_runs + 1):
      out = ctx.scratch / f'predict_tiles_{run}'
      timeline.reset()
      t0 = time.perf_counter()
      summary = engine.predict(specs, timeline, out, opt, executor=pool)
      wall = time.perf_counter() - t0
      shutil.rmtree(out, ignore_errors=True)
      if run:
        walls.append(wall)
        waits.append(timeline.summary()['device_wait_fraction'])
        nuclei = sum(s['nuclei'] for s in summary)
      if run == 0 and not clock.fits(wall * plan.predict_runs)[0]:
        break
    tiles_s = time.perf_counter() - t
    # Device alone: the same predictor on a full batch of the same tiles, back to back.
    tile_side = engine.tiling.TileGrid.create(1000 // scale, 1000 // scale, plan.predict_tile,
                                              plan.predict_overlap).tile_shape[0]
    batch = np.random.default_rng(0).integers(0, 256, (plan.predict_batch, tile_side, tile_side, 3), np.uint8)
    windows = [engine.Window(paths[0].stem, 0, 0, tile_side, tile_side)] * plan.predict_batch
    device_times = []
    for _ in range(4):
      t0 = time.perf_counter()
      jax.block_until_ready(timeline.inner(batch, windows=windows))
      device_times.append(time.perf_counter() - t0)
    device_only = plan.predict_batch / statistics.median(device_times[1:])
    area = len(paths) * (_suite_data.CONSEP_SIDE * mpp * 1e-3) ** 2
    pixels = len(paths) * (_suite_data.CONSEP_SIDE // scale) ** 2
    if walls:
      wall = statistics.median(walls)
      units.append(_unit('measured', workload='consep_test_tiles', source=source, **common, tiles=len(paths),
                         tile_shape=tile_side, nuclei=nuclei, runs=len(walls), wall_s=wall,
                         tiles_per_s=len(paths) / wall, area_mm2=area, s_per_mm2=wall / area,
                         device_wait_fraction=statistics.median(waits), device_only_tiles_per_s=device_only,
                         prepare_s=prepare_s, unit_s=tiles_s))
    else:
      units.append(_unit('skipped', 'the warm-up run left no time for a timed run', workload='consep_test_tiles'))
    ctx.write()

    # ---- the pyramidal TIFF mosaic, as large as the time left allows (at least wsi_min_gigapixels)
    units.append(_predict_wsi(ctx, clock, records, mpp, scale, k, sigma, timeline, pool, config, common,
                              px_per_s=pixels / statistics.median(walls) if walls else None))
  finally:
    timeline.close()
    pool.shutdown(wait=True, cancel_futures=True)
  return {'units': units}


def _predict_wsi(ctx, clock, records, mpp, scale, k, sigma, timeline, pool, config, common, px_per_s) -> dict:
  from dualunet_jax.inference import engine
  plan = ctx.plan
  if px_per_s is None:
    return _unit('skipped', 'no end-to-end rate measured on the tiles to size the slide', workload='wsi')
  side = 960  # CoNSeP tiles cropped to a multiple of 64: TIFF tiles of 480 px at levels 0 and 1
  model_block = side // scale
  stride = plan.predict_tile - plan.predict_overlap
  write_px_per_s = 4e8  # level-0 px/s of `write_mosaic_tiff` (pre-compressed tiles), conservative

  def estimate(n):
    model_side = n * model_block
    tiles_px = math.ceil(model_side / stride) ** 2 * plan.predict_tile ** 2  # overlap included
    return 1.3 * tiles_px / px_per_s + (n * side) ** 2 / write_px_per_s + (20 if not plan.dry_run else 1)

  n = _suite_data.mosaic_grid_for(plan.wsi_gigapixels, side)
  while n > 1 and not clock.fits(estimate(n))[0]:
    n -= 1
  gigapixels = (n * side) ** 2 / 1e9
  if gigapixels < plan.wsi_min_gigapixels or not clock.fits(estimate(n))[0]:
    return _unit('skipped', f'{clock.left():.0f} s left: the smallest slide of {plan.wsi_min_gigapixels} '
                 f'gigapixels needs about {estimate(_suite_data.mosaic_grid_for(plan.wsi_min_gigapixels, side)):.0f} s',
                 workload='wsi')
  t = time.perf_counter()
  blocks = [np.ascontiguousarray(r['image'][:side, :side]) for r in records]
  block_maps = [(p[:model_block, :model_block], d[:model_block, :model_block])
                for p, d in (_suite_data.oracle_maps(r['instance_map'][:side, :side], r['instance_classes'], k,
                                                     scale, sigma) for r in records)]
  layout = _suite_data.mosaic_layout(n, n, len(blocks))
  path = ctx.scratch / 'wsi' / 'mosaic.tif'
  info = _suite_data.write_mosaic_tiff(path, blocks, layout, mpp)
  write_s = time.perf_counter() - t
  timeline.inner.oracle = _suite_data.MosaicOracle(block_maps, {'mosaic': layout})
  opt = engine.Options(model_mpp=plan.predict_mpp, class_names=tuple(config.dataset.class_names),
                       tile_size=plan.predict_tile, overlap=plan.predict_overlap, batch_size=plan.predict_batch,
                       workers=common['workers'], formats=('geojson', 'csv', 'composition'), progress=False)
  # Compile the model for this tile shape first, outside the timed run.
  t = time.perf_counter()
  warm = np.random.default_rng(0).integers(0, 256, (plan.predict_batch, plan.predict_tile, plan.predict_tile, 3),
                                           np.uint8)
  import jax
  jax.block_until_ready(timeline.inner.model(warm))
  compile_s = time.perf_counter() - t
  timeline.reset()
  out = ctx.scratch / 'predict_wsi'
  t0 = time.perf_counter()
  summary = engine.predict([engine.InputSpec(path)], timeline, out, opt, executor=pool)[0]
  wall = time.perf_counter() - t0
  shutil.rmtree(out, ignore_errors=True)
  area = (n * side * mpp * 1e-3) ** 2
  result = _unit('measured', workload='wsi', **common, gigapixels=info['gigapixels'],
                 level0_side=info['height'], levels=info['levels'], file_bytes=info['bytes'],
                 tiles=summary['tiles'], tile_shape=plan.predict_tile, nuclei=summary['nuclei'], wall_s=wall,
                 tiles_per_s=summary['tiles'] / wall, area_mm2=area, s_per_mm2=wall / area,
                 device_wait_fraction=timeline.summary()['device_wait_fraction'], write_tiff_s=write_s,
                 compile_s=compile_s, estimate_s=estimate(n), formats=list(opt.formats))
  path.unlink(missing_ok=True)
  return result


# ----------------------------------------------------------------------------------------------- step 4

class _TimeUp(KeyboardInterrupt):
  """Raised from the trainer's `on_step` at the deadline: the trainer saves a checkpoint on KeyboardInterrupt."""


def step_train(ctx: 'Suite', clock: Clock) -> dict:
  from flax import nnx
  from dualunet_jax import checkpointing, evaluation, trainer
  from dualunet_jax.data import sources
  plan = ctx.plan
  label, overrides = plan.models[0]
  config = make_config({**overrides, **plan.train_overrides})
  ok, why = clock.fits(plan.eval_reserve_s + 2 * plan.guess_compile_s)
  if not ok:
    return {'units': [_unit('skipped', why, workload='consep_train')]}
  t = time.perf_counter()
  official = ctx.consep_official(plan.train_limits)
  with config.unlocked():
    if official is not None:
      config.dataset.manual_dir = str(official)
      config.dataset.data_dir = str(ctx.data_root / 'tfds')
    elif plan.dry_run:  # CoNSeP crops absent: the synthetic dataset keeps the dry run whole
      config.dataset.name = 'synthetic'
      config.dataset.num_classes = 3
      config.dataset.synthetic_train_size, config.dataset.synthetic_test_size = 4, 1
      config.dataset.synthetic_tile_size = 64
      config.dataset.data_dir = str(ctx.data_root / 'tfds')
    else:
      return {'units': [_unit('skipped', ctx.no_consep_reason(), workload='consep_train')]}
  for split in ('train', 'test'):
    sources.load_source(config.dataset, split)  # prepares the TFDS copy once (timed as data preparation)
  prepare_s = time.perf_counter() - t
  workdir = ctx.train_workdir
  steps_seen: list[int] = []
  step_times: list[float] = []
  deadline = clock.deadline - plan.eval_reserve_s

  def on_step(step):
    steps_seen.append(step)
    step_times.append(time.perf_counter())
    if step_times[-1] > deadline:
      raise _TimeUp()

  t = time.perf_counter()
  finished, val = False, {}
  with _trainer_builds_through_suite():
    try:
      val = trainer.train_and_evaluate(config, workdir, on_step=on_step)
      finished = True
    except _TimeUp:
      pass
  train_s = time.perf_counter() - t
  saved = checkpointing.load_config(workdir)
  steps_per_epoch = config.train.steps_per_epoch
  total = config.train.epochs * steps_per_epoch
  start = steps_seen[0] - 1 if steps_seen else (total if finished else 0)
  done = steps_seen[-1] if steps_seen else start
  gaps = np.diff(step_times[1:]) if len(step_times) > 2 else np.array([])  # step 1 holds the compile
  steady = float(np.median(gaps)) if len(gaps) else None  # per step, compile and validation passes excluded
  unit = _unit('measured' if finished else 'partial', None if finished else
               f'the budget ended at step {done} of {total} (epoch {done / steps_per_epoch:.1f}); a checkpoint '
               f'is saved in {workdir}: run the suite again with the same --train_workdir to resume',
               workload='consep_train' if official is not None else 'synthetic_train', model=label,
               dtype=config.model.dtype, batch=config.train.batch_size, crop=config.dataset.crop_size,
               epochs=config.train.epochs, steps_total=total, resumed_from_step=start, steps_done=done,
               train_s=train_s, prepare_s=prepare_s, s_per_step_steady=steady,
               images_per_s_steady=config.train.batch_size / steady if steady else None,
               projected_full_schedule_s=(total * steady) if steady else None,
               last_validation={k: v for k, v in val.items() if isinstance(v, (int, float))}, workdir=str(workdir))
  units = [unit]
  # A test pass costs about what the slowest gap between steps did (a validation pass), or the reserve.
  eval_estimate = max([plan.eval_reserve_s / 2] + list(gaps if len(step_times) > 2 else []))
  ok, why = clock.fits(eval_estimate)
  if finished and not ok:
    units.append(_unit('skipped', why, workload='eval_test'))
  elif finished:
    t = time.perf_counter()
    eval_config = make_config({**overrides, **plan.train_overrides})
    with eval_config.unlocked():
      eval_config.model = saved.model
      eval_config.dataset = config.dataset
    model = nnx.eval_shape(lambda rngs: _build_model(eval_config, rngs), nnx.Rngs(0))
    meta = checkpointing.restore_model(workdir, model, 'best')
    model.eval()
    test = sources.load_source(config.dataset, config.dataset.test_split)
    metrics = evaluation.evaluate(model, test, eval_config, mesh=trainer.make_mesh(), desc='test')
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    units.append(_unit('measured', workload='eval_test', checkpoint='best', checkpoint_step=meta.get('step'),
                       images=len(test), metrics=evaluation.json_safe(headline), eval_s=time.perf_counter() - t))
  elif not finished:
    units.append(_unit('skipped', 'training has not finished: the test evaluation runs after the last epoch',
                       workload='eval_test'))
  return {'units': units}


# ----------------------------------------------------------------------------------------------- driver

STEP_FUNCTIONS: dict[str, Callable[['Suite', Clock], dict]] = {
    'device_ceiling': step_device_ceiling, 'forward': step_forward, 'train_step': step_train_step,
    'predict': step_predict, 'train': step_train}


class Suite:
  """Holds the run's settings, the results so far, and writes them."""

  def __init__(self, args: argparse.Namespace):
    import jax
    self.args = args
    self.plan = Plan(args.dry_run)
    self.start = time.perf_counter()
    self.deadline = self.start + args.budget_s - FINAL_RESERVE_S
    self.out_dir = pathlib.Path(args.out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix='gpu_suite_'))
    self.scratch.mkdir(parents=True, exist_ok=True)
    self.data_root = pathlib.Path(args.data_root) if args.data_root else (
        self.scratch / 'data' if args.dry_run else REPO / '.data' / 'gpu_suite')
    self.train_workdir = pathlib.Path(args.train_workdir) if args.train_workdir else (
        self.scratch / 'train' if args.dry_run else REPO / 'workdirs' / 'gpu_suite' / 'consep')
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    self.device_memory_bytes = int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None
    self.peak_tflops, self.peak_source = peak_bf16(device.device_kind)
    self.measured_matmul_tflops: float | None = None
    import flax
    self.result: dict[str, Any] = {
        'schema_version': SCHEMA_VERSION,
        'dry_run': bool(args.dry_run),
        'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'finished_utc': None,
        'complete': False,
        'machine': {'description': _machine.describe(), 'platform': device.platform,
                    'device_kind': device.device_kind, 'device_count': jax.device_count(),
                    'device_memory_bytes': self.device_memory_bytes, 'host_cores': os.cpu_count(),
                    'python': platform.python_version(), 'jax': jax.__version__, 'flax': flax.__version__},
        'peak_bf16': {'tflops': self.peak_tflops, 'source': self.peak_source, 'measured_matmul_tflops': None},
        'budget': {'total_s': float(args.budget_s), 'used_s': 0.0, 'per_step_s': dict(args.step_budgets)},
        'steps': {},
    }

  # -- percentages of the two peaks
  def pct_peak(self, tflops: float) -> float | None:
    return 100.0 * tflops / self.peak_tflops if self.peak_tflops else None

  def pct_measured(self, tflops: float) -> float | None:
    return 100.0 * tflops / self.measured_matmul_tflops if self.measured_matmul_tflops else None

  # -- data
  def consep_official(self, limits: dict[str, int] | None) -> pathlib.Path | None:
    """The official CoNSeP layout with at least the tiles of `limits` (None = all): an existing complete copy
    (`--consep_dir`, default `.data/CoNSeP`), linked tile by tile into a subset folder when `limits` asks for
    fewer; else the first tiles of each split assembled from the carried crops into `data_root/CoNSeP`. None
    when neither exists."""
    want = dict(_suite_data.CONSEP_COUNTS) if limits is None else limits
    complete = pathlib.Path(self.args.consep_dir)
    if (complete / 'Test' / 'Labels' / 'test_14.mat').is_file() and (complete / 'Train' / 'Labels' /
                                                                    'train_27.mat').is_file():
      if limits is None:
        return complete
      subset = self.data_root / ('CoNSeP_' + '_'.join(f'{k}{v}' for k, v in sorted(want.items())))
      for split, n in want.items():
        for sub, ext in (('Images', '.png'), ('Labels', '.mat')):
          (subset / split / sub).mkdir(parents=True, exist_ok=True)
          for k in range(1, n + 1):
            link = subset / split / sub / f'{split.lower()}_{k}{ext}'
            if not link.exists():
              link.symlink_to((complete / split / sub / link.name).resolve())
      return subset
    raw = _suite_data.find_consep_raw([self.args.consep_raw] if self.args.consep_raw else
                                      [REPO / '.data' / 'carry' / 'consep', REPO / 'shared' / 'data' / 'consep',
                                       REPO.parent / 'shared' / 'data' / 'consep'])
    if raw is None:
      return None
    out = self.data_root / 'CoNSeP'  # one folder that grows: tiles already assembled are not redone
    _suite_data.assemble_consep(raw, out, want)
    return out

  def no_consep_reason(self) -> str:
    return ('CoNSeP not found: neither a complete official copy at --consep_dir nor the compact crops '
            '(copy ../shared/data/consep to .data/carry/consep and carry .data/carry)')

  # -- outputs
  def write(self) -> None:
    write_outputs(self.result, self.out_dir)

  def run(self) -> dict:
    for name in self.args.steps:
      now = time.perf_counter()
      budget = self.args.step_budgets.get(name, 0) or math.inf
      clock = Clock(min(now + budget, self.deadline))
      entry: dict[str, Any] = {'status': 'skipped', 'reason': None, 'budget_s': None if budget == math.inf else budget,
                               'seconds': 0.0, 'units': []}
      self.result['steps'][name] = entry
      if self.deadline - now <= 1.0:
        entry['reason'] = f'the total budget of {self.args.budget_s:.0f} s is spent'
        self.write()
        continue
      try:
        entry.update(STEP_FUNCTIONS[name](self, clock))
        entry['status'], entry['reason'] = _step_status(entry['units'])
      except Exception as e:  # pylint: disable=broad-except
        entry['status'], entry['reason'] = 'failed', _short(e, 600)
        entry['traceback'] = traceback.format_exc(limit=12)
      entry['seconds'] = time.perf_counter() - now
      if name == 'device_ceiling':
        self.result['peak_bf16']['measured_matmul_tflops'] = self.measured_matmul_tflops
      self.result['budget']['used_s'] = time.perf_counter() - self.start
      self.write()
      _free_device_memory()
      print(f'[gpu_suite] {name}: {entry["status"]} in {entry["seconds"]:.1f} s'
            + (f' ({entry["reason"]})' if entry['reason'] else ''), flush=True)
    self.result['budget']['used_s'] = time.perf_counter() - self.start
    self.result['finished_utc'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    self.result['complete'] = True
    self.write()
    return self.result


# ----------------------------------------------------------------------------------------------- outputs

def _fmt(value: Any, digits: int = 2) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    if math.isnan(value):
      return 'nan'
    return f'{value:,.{digits}f}'
  return str(value)


def markdown(result: dict) -> str:
  """The run as markdown: machine, budget, one table per step (skipped units listed with their reasons)."""
  m = result['machine']
  lines = [f"# GPU measurement suite{' (dry run)' if result['dry_run'] else ''}", '',
           f"- machine: {m['description']}",
           f"- jax {m['jax']}, flax {m['flax']}, python {m['python']}; started {result['started_utc']}",
           f"- peak bf16: {_fmt(result['peak_bf16']['tflops'], 1)} TFLOP/s ({result['peak_bf16']['source']}); "
           f"measured bf16 matmul {_fmt(result['peak_bf16']['measured_matmul_tflops'], 1)} TFLOP/s",
           f"- budget: {_fmt(result['budget']['used_s'], 0)} of {_fmt(result['budget']['total_s'], 0)} s used"
           + ('' if result['complete'] else ' (run not complete)'), '']
  tables = {
      'forward': ('model', 'size', 'batch', 'dtype', 'compile_s', 'ms_per_batch', 'tiles_per_s', 'bf16_over_f32',
                  'gflops_per_tile', 'achieved_tflops', 'pct_peak_bf16', 'pct_measured_matmul'),
      'train_step': ('model', 'dtype', 'kind', 'batch', 'size', 'compile_s', 's_per_step', 'images_per_s',
                     'memory_bytes'),
      'predict': ('workload', 'model', 'dtype', 'tiles', 'tile_shape', 'nuclei', 'wall_s', 'tiles_per_s',
                  's_per_mm2', 'device_wait_fraction', 'device_only_tiles_per_s', 'gigapixels'),
      'train': ('workload', 'model', 'dtype', 'steps_done', 'steps_total', 'images_per_s_steady',
                'projected_full_schedule_s', 'metrics'),
      'device_ceiling': ('matmul_n', 'median_s', 'tflops', 'device_memory_bytes'),
  }
  for name, entry in result['steps'].items():
    lines.append(f"## {name}: {entry['status']} ({_fmt(entry['seconds'], 1)} s"
                 + (f", budget {_fmt(entry['budget_s'], 0)} s)" if entry.get('budget_s') else ')'))
    if entry.get('reason'):
      lines.append(f"\n{entry['reason']}")
    measured = [u for u in entry['units'] if u['status'] == 'measured' or u['status'] == 'partial']
    cols = tables.get(name, ())
    if measured and cols:
      lines += ['', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
      for u in measured:
        cells = []
        for c in cols:
          v = u.get(c)
          if c == 'memory_bytes' and v is not None:
            v = f'{v / 2**30:.2f} GiB'
          if c == 'metrics' and isinstance(v, dict):
            v = ', '.join(f'{k} {v[k]:.3f}' for k in ('f1_d', 'f1_c_mean', 'dice', 'bpq') if k in v)
          cells.append(_fmt(v, 3 if c in ('device_wait_fraction', 'bf16_over_f32') else 2))
        lines.append('| ' + ' | '.join(cells) + ' |')
    others = [u for u in entry['units'] if u['status'] not in ('measured', 'partial')]
    if others:
      lines.append('')
      for u in others:
        where = ', '.join(f'{k}={u[k]}' for k in ('model', 'workload', 'size', 'batch', 'dtype', 'kind') if k in u)
        lines.append(f"- {u['status']}: {where}: {u['reason']}")
    lines.append('')
  return '\n'.join(lines)


def write_outputs(result: dict, out_dir: pathlib.Path) -> None:
  """`gpu_suite.json` and `gpu_suite.md`, each written to a temporary name and renamed (never half-written).

  JSON: schema_version, dry_run, started_utc, finished_utc, complete, machine{description, platform,
  device_kind, device_count, device_memory_bytes, host_cores, python, jax, flax}, peak_bf16{tflops, source,
  measured_matmul_tflops}, budget{total_s, used_s, per_step_s}, steps{<name>: {status (measured | partial |
  skipped | failed), reason (None only when measured), budget_s, seconds, units[{status, reason, ...figures}]}}.
  """
  from dualunet_jax import evaluation
  payload = json.dumps(evaluation.json_safe(result), indent=1, sort_keys=False)
  for name, text in (('gpu_suite.json', payload), ('gpu_suite.md', markdown(result))):
    tmp = out_dir / f'.{name}.tmp'
    tmp.write_text(text)
    tmp.replace(out_dir / name)


def _parse_budgets(text: str) -> dict[str, float]:
  budgets = dict(DEFAULT_STEP_BUDGETS)
  for part in filter(None, text.split(',')):
    name, _, value = part.partition('=')
    if name not in STEPS or not value:
      raise argparse.ArgumentTypeError(f'--step_budgets: expected NAME=SECONDS with NAME in {STEPS}, got {part!r}')
    budgets[name] = float(value)
  return budgets


def _parse_steps(text: str) -> list[str]:
  steps = [s for s in text.split(',') if s]
  bad = [s for s in steps if s not in STEPS]
  if bad:
    raise argparse.ArgumentTypeError(f'--steps: unknown step(s) {bad}; choose from {STEPS}')
  return steps


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dry_run', action='store_true', help='tiny sizes and a stand-in model (CPU, CI)')
  parser.add_argument('--budget_s', type=float, default=540.0, help='total seconds for all steps')
  parser.add_argument('--step_budgets', type=_parse_budgets, default=dict(DEFAULT_STEP_BUDGETS),
                      help='NAME=SECONDS,... per step (0 = whatever the total leaves); defaults '
                           + ','.join(f'{k}={v:g}' for k, v in DEFAULT_STEP_BUDGETS.items()))
  parser.add_argument('--steps', type=_parse_steps, default=list(STEPS), help='comma-separated, in this order')
  parser.add_argument('--out_dir', default=os.environ.get('OUT') or 'workdirs/gpu_suite',
                      help='where gpu_suite.json / .md go (default $OUT, else workdirs/gpu_suite)')
  parser.add_argument('--scratch', default='', help='temporary files (default: a new folder under /tmp)')
  parser.add_argument('--data_root', default='', help='assembled CoNSeP and its TFDS copy (default '
                      '.data/gpu_suite; dry run: under --scratch)')
  parser.add_argument('--train_workdir', default='', help='step 4 workdir, resumed when it holds checkpoints '
                      '(default workdirs/gpu_suite/consep; dry run: under --scratch)')
  parser.add_argument('--consep_dir', default=str(REPO / '.data' / 'CoNSeP'),
                      help='a complete official-layout CoNSeP, used when present')
  parser.add_argument('--consep_raw', default='', help='the compact crops (default: .data/carry/consep, '
                      'shared/data/consep or ../shared/data/consep, the first that exists)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  suite = Suite(args)
  print(f'[gpu_suite] {suite.result["machine"]["description"]}; budget {args.budget_s:.0f} s; '
        f'writing {suite.out_dir}/gpu_suite.json', flush=True)
  result = suite.run()
  print(markdown(result), flush=True)
  if not args.scratch:  # our own temporary folder (predict outputs, the slide, dry-run data)
    shutil.rmtree(suite.scratch, ignore_errors=True)
  return 1 if any(s['status'] == 'failed' for s in result['steps'].values()) else 0


if __name__ == '__main__':
  sys.exit(main())
