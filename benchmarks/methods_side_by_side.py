r"""DualU-Net's claim ("two heads are enough") measured in one framework, one process, one machine.

    .venv/bin/python benchmarks/methods_side_by_side.py --consep_dir=.data/CoNSeP            # all steps
    .venv/bin/python benchmarks/methods_side_by_side.py --consep_dir=.data/CoNSeP --steps=size,post

Rows: full-size DualU-Net (ResNeXt-50, ConvNeXt-B), HoVer-Net (fast, original), the CoNIC framework
(SE-ResNeXt-50, one merged decoder) and HistoNeXt-Tiny (270 -> 80, like HoVer-Net original). Columns, each also as a
ratio against DualU-Net ResNeXt-50 measured in the same run:
  size   parameters; XLA GFLOPs of the eval forward for a 256² and a 1024² OUTPUT (a valid-convolution model
         gets the input its outputs need: 256 + 2 * margin);
  model  forward tiles/s at a 256² output, float32, batch --batch, median of --runs after compile + warm-up;
  post   host post-processing tiles/s on each method's oracle maps (ideal maps from ground truth) of the 256²
         crops of CoNSeP Test (9 per tile at y, x in {0, 256, 512}), one process, median of --runs;
  e2e    `inference.predict` seconds on the 14 CoNSeP Test tiles (1000², native µm/px = the model's), median
         of --runs after a one-tile warm-up, tiles of --tile_size, post-processing pool of all host cores
         (random weights: the model's speed does not depend on its values, and its outputs are replaced by
         nothing: real maps of random weights).
--trained=ROW=W,... replaces a row's random full-size model with the trained one in workdir W (its last
checkpoint and its own config, e.g. the run-A-budget models of benchmarks/run_a_budget.sh): then e2e measures real
maps through each method's real post-processing, which random weights cannot give:
    .venv/bin/python benchmarks/methods_side_by_side.py --steps=size,e2e --rows=dualunet_resnext,hovernet_fast \
        --trained=dualunet_resnext=workdirs/consep_w25,hovernet_fast=workdirs/hovernet_fast_w25 --batch=2
The paper's figures (PyTorch, two different code bases): x2.5 (CoNSeP test inference, 66.3 s vs 168.35 s)
and x5.1 (PanNuke fold, 108.1 s vs 551.45 s) for DualU-Net ResNeXt against HoVer-Net.
Figures only, never asserted.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib
import sys
import tempfile

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _machine  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dualunet_jax import methods, models, summary  # noqa: E402
from dualunet_jax.methods.base import margin_of  # noqa: E402

_CONSEP = flags.DEFINE_string('consep_dir', '.data/CoNSeP', 'CoNSeP in the official layout (Test/ is read).')
_STEPS = flags.DEFINE_list('steps', ['size', 'model', 'post', 'e2e'], 'Which measurements to run.')
_ROWS = flags.DEFINE_list('rows', ['dualunet_resnext', 'dualunet_convnext', 'hovernet_fast', 'hovernet_original',
                                   'conic_seresnext50', 'histonext_tiny'], 'Which rows (see ROWS).')
_BATCH = flags.DEFINE_integer('batch', 4, 'Tiles per forward.')
_RUNS = flags.DEFINE_integer('runs', 3, 'Timed runs (median reported).')
_TILE = flags.DEFINE_integer('tile_size', 512, 'End-to-end tile side (model-resolution output pixels).')
_WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Channel width multiplier (1 = the published models).')
_TRAINED = flags.DEFINE_list('trained', [], 'ROW=WORKDIR pairs: that row uses the trained model of WORKDIR (last '
                             'checkpoint, its config) instead of random full-size weights.')

NUM_CLASSES = 4  # CoNSeP's four merged classes
# label -> (method, config.model overrides)
ROWS = {
    'dualunet_resnext': ('dualunet', {'encoder': 'resnext50_32x4d'}),
    'dualunet_convnext': ('dualunet', {'encoder': 'convnext_base'}),
    'hovernet_fast': ('hovernet', {'hovernet_mode': 'fast'}),
    'hovernet_original': ('hovernet', {'hovernet_mode': 'original'}),
    'conic_seresnext50': ('conic', {'encoder': 'seresnext50_32x4d'}),
    'histonext_tiny': ('histonext', {'encoder': 'convnext_tiny', 'histonext_variant': 'tiny'}),
}


def row_config(label: str) -> ml_collections.ConfigDict:
  """The experiment config of a row: the method's CoNSeP defaults with the row's model overrides."""
  from configs import default
  method, overrides = ROWS[label]
  config = default.get_config()
  config.method = method
  config.dataset.num_classes = NUM_CLASSES
  config.dataset.class_names = ('other', 'inflammatory', 'epithelial', 'spindle')
  config.dataset.mpp = 0.25
  config.postprocess.workers = 1
  with config.unlocked():
    for key, value in dict(overrides, width_multiplier=_WIDTH.value).items():
      config.model[key] = value
  return config


def random_model(config: ml_collections.ConfigDict) -> nnx.Module:
  model = methods.get(config).abstract_model(config, NUM_CLASSES)
  models.fill_random(model)
  model.eval()
  return model


def measure_size(config, model) -> dict[str, float]:
  m = margin_of(model)
  out = {'params_m': methods.get(config).parameter_counts(model)['total'] / 1e6}
  for size in (256, 1024):
    out[f'gflops_{size}'] = summary.forward_flops(model, size + 2 * m) / 1e9
  return out


def measure_model(config, model) -> dict[str, float]:
  method = methods.get(config)
  graphdef, state = nnx.split(model)
  m = margin_of(model)
  images = jax.random.randint(jax.random.key(0), (_BATCH.value, 256 + 2 * m, 256 + 2 * m, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  forward = jax.jit(lambda state, x: method.maps(nnx.merge(graphdef, state)(x)))
  seconds = _machine.median_seconds(lambda: jax.block_until_ready(forward(state, images)), _RUNS.value,
                                    warmup=True)
  return {'model_tiles_s': _BATCH.value / seconds}


def consep_crops() -> list[dict]:
  from dualunet_jax.data import consep, targets
  crops = []
  for record in consep.iter_split(_CONSEP.value, 'test'):
    inst, classes = record['instance_map'], record['instance_classes']
    for y in (0, 256, 512):
      for x in (0, 256, 512):
        crop, old = targets.relabel_contiguous(inst[y:y + 256, x:x + 256])
        cls = np.asarray(classes, np.int32)[old - 1] if old.size else np.zeros((0,), np.int32)
        crops.append({'instance_map': crop, 'instance_classes': np.maximum(cls, 1)})
  return crops


def measure_post(config, crops) -> dict[str, float]:
  method = methods.get(config)
  maps = [method.oracle_maps(c['instance_map'], c['instance_classes'], NUM_CLASSES, config) for c in crops]
  kwargs = method.postprocess_kwargs(config)
  seconds = _machine.median_seconds(lambda: [method.postprocess_fn(m, **kwargs) for m in maps], _RUNS.value,
                                    warmup=True)
  return {'post_tiles_s': len(maps) / seconds}


def measure_e2e(config, model) -> dict[str, float]:
  from dualunet_jax import inference
  method = methods.get(config)
  images = sorted(pathlib.Path(_CONSEP.value, 'Test', 'Images').glob('*.png'))
  predictor = inference.model_predictor([model], method=method)
  options = inference.Options(model_mpp=0.25, class_names=tuple(config.dataset.class_names),
                              tile_size=_TILE.value, overlap=64, batch_size=_BATCH.value, formats=('csv',),
                              postprocess=method.postprocess_kwargs(config), postprocess_fn=method.postprocess_fn,
                              progress=False)
  with tempfile.TemporaryDirectory() as tmp:
    pool = inference.engine.make_pool(os.cpu_count() or 1)
    try:
      inference.predict(images[:1], predictor, pathlib.Path(tmp) / 'warm', options, executor=pool)  # compile
      runs = iter(range(_RUNS.value))  # a fresh output folder per run: predict skips tiles already written
      seconds = _machine.median_seconds(
          lambda: inference.predict(images, predictor, pathlib.Path(tmp) / f'run{next(runs)}', options,
                                    executor=pool), _RUNS.value)
    finally:
      pool.shutdown()
  return {'e2e_s': seconds, 'e2e_tiles': len(images)}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(_machine.describe(), flush=True)
  steps = set(_STEPS.value)
  crops = consep_crops() if 'post' in steps else []
  results: dict[str, dict[str, float]] = {}
  if any('=' not in pair for pair in _TRAINED.value):
    raise app.UsageError(f'--trained takes ROW=WORKDIR pairs, got {_TRAINED.value}')
  trained = dict(pair.split('=', 1) for pair in _TRAINED.value)
  unknown = set(trained) - set(_ROWS.value)
  if unknown:
    raise app.UsageError(f'--trained names rows not in --rows: {sorted(unknown)}')
  for label in _ROWS.value:
    if label in trained:
      from dualunet_jax import checkpointing
      model, config = checkpointing.restore_for_inference(trained[label], 'last')
      label = f'{label} ({pathlib.Path(trained[label]).name})'
    else:
      config = row_config(label)
      model = random_model(config)
    row: dict[str, float] = {}
    if 'size' in steps:
      row.update(measure_size(config, model))
    if 'model' in steps:
      row.update(measure_model(config, model))
    if 'post' in steps:
      row.update(measure_post(config, crops))
    if 'e2e' in steps:
      row.update(measure_e2e(config, model))
    results[label] = row
    print(label, {k: round(v, 3) for k, v in row.items()}, flush=True)
  base = next((row for label, row in results.items() if label.startswith('dualunet_resnext')), {})
  keys = sorted({k for row in results.values() for k in row})
  print()
  print('| row | ' + ' | '.join(keys) + ' |')
  print('|---|' + '---|' * len(keys))
  for label, row in results.items():
    cells = []
    for k in keys:
      v = row.get(k)
      ratio = f' ({v / base[k]:.2f}x)' if v is not None and base.get(k) else ''
      cells.append('' if v is None else f'{v:.3g}{ratio}')
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  print('Ratios are against dualunet_resnext in this run (for e2e_s and gflops, < 1x is faster / cheaper).')


if __name__ == '__main__':
  app.run(main)
