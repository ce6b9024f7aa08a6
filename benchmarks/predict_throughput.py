"""End-to-end prediction throughput: decode -> model -> post-processing -> written outputs.

    python benchmarks/predict_throughput.py                       # full ResNeXt DualU-Net, random weights
    python benchmarks/predict_throughput.py --width=0.125 --runs=3 --image_side=2048
    python benchmarks/predict_throughput.py --width=0.125 --consep_dir=.data/CoNSeP --skip=image  # real tiles

Two workloads, both through `dualunet_jax.inference.predict` (reader thread, device batches, worker pool,
GeoJSON + CSV + maps + composition written):
  tiles   N synthetic 256x256 PNG tiles at the model's 0.5 µm/px (PanNuke-like), batch 8; with --consep_dir
          the 14 real CoNSeP Test 1000x1000 tiles instead (oracle maps from their annotations, 4 classes)
  image   one image_side^2 synthetic PNG, tiled at --tile_size with --overlap

Weights are random (throughput does not depend on them), but post-processing cost depends on how many nuclei
the maps hold, so the model's outputs are replaced ON THE DEVICE by ground-truth-derived maps of the synthetic
tiles (`out = model_out * 0 + oracle`): the device still computes the whole network and transfers full-size
outputs, and the host post-processes realistic nuclei (20-60 per 256^2 tile).

Each workload runs with post-processing in worker processes overlapped with device compute (--workers, 0 = one
per core) and, as the in-process baseline, with workers=1 (post-processing in the main thread, no overlap);
figures are medians over --runs after one warm-up run (compilation excluded). The in-process baseline runs
once per post-processing backend (--backends: `numpy`, and `numba` where installed), which shows how much of
the end-to-end time the post-processing takes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)


def consep_inputs(consep_dir: str):
  """The CoNSeP Test tiles (files of the official layout) and their oracle maps (4 merged classes)."""
  from dualunet_jax import oracle
  from dualunet_jax.data import consep
  maps, files = {}, []
  for rec in consep.iter_split(consep_dir, 'test'):
    probs, density = oracle.oracle_outputs(rec['instance_map'], rec['instance_classes'], 4, sigma=5.0)
    maps[rec['name']] = {'class_probs': probs.astype(np.float16), 'density': density[..., None]}
    files.append(pathlib.Path(consep_dir) / 'Test' / 'Images' / f"{rec['name']}.png")
  return files, maps


def random_model(width: float, num_classes: int = 3):
  """DualU-Net with random weights, built abstractly and filled from numpy (no slow eager initialisers)."""
  from configs import default
  from dualunet_jax import models
  config = default.get_config()
  config.model.width_multiplier = width
  model = models.fill_random(models.abstract_model(config.model, num_classes))
  model.eval()
  return model


class DeviceOraclePredictor:
  """Runs the real model, then swaps its outputs on the device for oracle maps of the same windows.

  `maps`: input name -> full-image DualU-Net maps {'class_probs', 'density'} at model resolution (an
  `engine.MapsPredictor`), or any window-aware predictor serving such maps."""
  needs_windows = True

  def __init__(self, model, maps):
    import jax
    import jax.numpy as jnp
    from dualunet_jax.inference import engine
    self.model = engine.model_predictor([model])
    self.oracle = engine.MapsPredictor(maps) if isinstance(maps, dict) else maps
    # nan_to_num: random weights can overflow, and inf * 0 would poison the oracle maps.
    zero = lambda x: jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) * 0
    self.combine = jax.jit(lambda maps, oracle: {
        name: (zero(maps[name]) + oracle[name]).astype(maps[name].dtype) for name in maps})

  def __call__(self, images, windows):
    return self.combine(self.model(images), self.oracle(images, windows))


def synthetic_inputs(folder: pathlib.Path, n_tiles: int, image_side: int):
  """N 256^2 tiles and one image_side^2 mosaic of synthetic tiles, with their oracle maps."""
  from PIL import Image
  from dualunet_jax.data import synthetic, targets
  maps, tiles = {}, []
  recs = [synthetic.render_tile(i, size=256, num_classes=3, split='test') for i in range(max(n_tiles, 16))]

  def oracle(inst, classes):
    t = targets.make_targets(inst, classes, sigma=5.0)
    return {'class_probs': np.eye(4, dtype=np.float16)[t['class_map']], 'density': t['density'][..., None]}

  (folder / 'tiles').mkdir(parents=True)
  for i in range(n_tiles):
    path = folder / 'tiles' / f'tile_{i:03d}.png'
    Image.fromarray(recs[i]['image']).save(path)
    maps[path.stem] = oracle(recs[i]['instance_map'], recs[i]['instance_classes'])
    tiles.append(path)
  k = image_side // 256
  image = np.zeros((image_side, image_side, 3), np.uint8)
  inst = np.zeros((image_side, image_side), np.int32)
  classes = []
  for r in range(k):
    for c in range(k):
      rec = recs[(r * k + c) % len(recs)]
      image[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = rec['image']
      tile_inst = rec['instance_map']
      inst[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = np.where(tile_inst > 0, tile_inst + len(classes), 0)
      classes.extend(rec['instance_classes'].tolist())
  big = folder / 'image.png'
  Image.fromarray(image).save(big)
  maps['image'] = oracle(inst, np.asarray(classes, np.int32))
  return tiles, big, maps


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--width', type=float, default=1.0, help='model width multiplier (1.0 = reference)')
  parser.add_argument('--tiles', type=int, default=32, help='number of 256^2 tiles')
  parser.add_argument('--image_side', type=int, default=4096)
  parser.add_argument('--tile_size', type=int, default=1024)
  parser.add_argument('--overlap', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=8, help='batch of 256^2 tiles (large tiles: 2)')
  parser.add_argument('--workers', type=int, default=0)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--skip', choices=('tiles', 'image'), default=None)
  parser.add_argument('--consep_dir', default=None, help='official-layout CoNSeP: its Test tiles as the tiles '
                      'workload')
  parser.add_argument('--backends', default=None, help='comma-separated post-processing backends for the '
                      'in-process runs (default: numpy, and numba where installed)')
  args = parser.parse_args()
  from dualunet_jax import postprocess_kernels
  backends = (args.backends.split(',') if args.backends else
              ['numpy'] + (['numba'] if postprocess_kernels.available() else []))

  from dualunet_jax.inference import engine
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='predict_bench_'))
  try:
    tiles, big, maps = synthetic_inputs(tmp / 'in', args.tiles, args.image_side)
    num_classes, class_names = 3, ('lymphocyte', 'epithelial', 'spindle')
    workloads = []
    if args.consep_dir:
      tiles, maps = consep_inputs(args.consep_dir)
      num_classes, class_names = 4, ('other', 'inflammatory', 'epithelial', 'spindle')
      workloads.append(('consep', tiles, 1024, 128, 2, len(tiles)))
    elif args.skip != 'tiles':
      workloads.append(('tiles', tiles, 256, 0, args.batch_size, len(tiles)))
    predictor = DeviceOraclePredictor(random_model(args.width, num_classes), maps)
    print(f'machine: {_machine.describe()}; model width {args.width}; in-process backends {backends}')
    if args.skip != 'image' and not args.consep_dir:
      grid = __import__('dualunet_jax.inference.tiling', fromlist=['TileGrid']).TileGrid.create(
          args.image_side, args.image_side, args.tile_size, args.overlap)
      workloads.append(('image', [big], args.tile_size, args.overlap, 2, len(grid.tiles())))
    pool = engine.make_pool(args.workers or os.cpu_count())  # reused: worker start-up is not per call
    for name, inputs, tile_size, overlap, batch, n in workloads:
      mpp = 0.25 if name == 'consep' else 0.5
      for workers, backend in [(args.workers, 'auto')] + [(1, b) for b in backends]:
        opt = engine.Options(model_mpp=mpp, class_names=class_names, postprocess={'backend': backend},
                             tile_size=tile_size, overlap=overlap, batch_size=batch, workers=workers,
                             formats=('geojson', 'csv', 'maps', 'composition'), progress=False)
        times = []
        for run in range(args.runs + 1):  # run 0 compiles
          out = tmp / f'out_{name}_{workers}_{run}'
          t0 = time.perf_counter()
          summary = engine.predict([engine.InputSpec(p, mpp=mpp) for p in inputs], predictor, out, opt,
                                   executor=pool if workers != 1 else None)
          times.append(time.perf_counter() - t0)
          shutil.rmtree(out)
        med = statistics.median(times[1:])
        nuclei = sum(s['nuclei'] for s in summary)
        mode = (f'workers={workers or os.cpu_count()} (overlapped)' if workers != 1 else
                f'workers=1 (in-process, {backend})')
        side = {'image': args.image_side, 'consep': 1000}.get(name, 256)
        mm2 = len(inputs) * (side * mpp * 1e-3) ** 2
        print(f'{name:6s} {mode:34s} {n} tiles of {tile_size}^2, {nuclei} nuclei: median {med:.2f} s '
              f'({n / med:.2f} tiles/s, {med / mm2:.2f} s/mm^2 at {mpp} µm/px) runs {[round(t, 2) for t in times[1:]]}')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
