"""Data for the GPU measurement suite (`gpu_suite.py`): CoNSeP from the compact crops, oracle maps, and a
multi-gigapixel pyramidal TIFF mosaic of CoNSeP tiles.

The device machine has no registry and at most 64 MiB travel with the working tree, so CoNSeP travels as the
17 MB of JPEG crops kept beside the project (`../shared/data/consep/`, copied into the checkout as
`.data/carry/consep/`), not as the 93 MB TFDS-prepared copy or the 66 MB official layout. `assemble_consep`
rebuilds the official layout from them on all host cores (the crops' own `assemble_consep.py` does the pixel
work; this module only runs it in parallel and writes PNGs with fast compression).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import multiprocessing
import os
import pathlib
import zlib
from typing import Any, Sequence

import numpy as np

CONSEP_COUNTS = {'Train': 27, 'Test': 14}
CONSEP_MPP = 0.25
CONSEP_SIDE = 1000


def find_consep_raw(candidates: Sequence[str | os.PathLike]) -> pathlib.Path | None:
  """The first candidate folder holding the compact crops (`assemble_consep.py` and `images/`), or None."""
  for c in candidates:
    p = pathlib.Path(c)
    if (p / 'assemble_consep.py').is_file() and (p / 'images').is_dir():
      return p
  return None


def _assembler(raw_dir: str):
  spec = importlib.util.spec_from_file_location('assemble_consep', pathlib.Path(raw_dir) / 'assemble_consep.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assemble_one(raw_dir: str, out_dir: str, split: str, k: int) -> int:
  """Writes `<out>/<Split>/Images/<split>_<k>.png` and `Labels/<split>_<k>.mat`; returns the nucleus count."""
  import scipy.io as sio
  from PIL import Image
  lower = split.lower()
  image, labels = _assembler(raw_dir).assemble_tile(lower, k)
  base = pathlib.Path(out_dir) / split
  # Written under a temporary name and renamed: a half-written file is never taken for a finished one.
  png, mat = base / 'Images' / f'{lower}_{k}.png', base / 'Labels' / f'{lower}_{k}.mat'
  Image.fromarray(image).save(png.with_suffix('.tmp.png'), compress_level=1)
  sio.savemat(mat.with_suffix('.tmp.mat'), labels, do_compression=True)
  png.with_suffix('.tmp.png').rename(png)
  mat.with_suffix('.tmp.mat').rename(mat)
  return len(labels['inst_type'])


def assemble_consep(raw_dir: pathlib.Path, out_dir: pathlib.Path, limits: dict[str, int] | None = None,
                    workers: int = 0) -> dict[str, int]:
  """Official CoNSeP layout (`out/Train|Test/Images/*.png`, `Labels/*.mat`) from the compact crops.

  Args:
    raw_dir: the crops folder (see `find_consep_raw`).
    out_dir: created; tiles already there are kept (a rerun only finishes what is missing).
    limits: split -> number of tiles (the first k of each split; default all 27 / 14). Splits not named are
      not written.
    workers: processes (0 = all host cores).
  Returns:
    split -> tiles now present.
  """
  limits = dict(CONSEP_COUNTS) if limits is None else limits
  jobs = []
  for split, n in limits.items():
    for sub in ('Images', 'Labels'):
      (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
    for k in range(1, min(n, CONSEP_COUNTS[split]) + 1):
      lower = split.lower()
      if not ((out_dir / split / 'Images' / f'{lower}_{k}.png').is_file() and
              (out_dir / split / 'Labels' / f'{lower}_{k}.mat').is_file()):
        jobs.append((str(raw_dir), str(out_dir), split, k))
  if jobs:
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    # spawn: the parent has JAX loaded, which must not be forked.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      list(pool.map(_assemble_one, *zip(*jobs)))
  return {split: len(list((out_dir / split / 'Images').glob('*.png'))) for split in limits}


def consep_test_tiles(official_dir: pathlib.Path, n: int) -> list[tuple[pathlib.Path, dict[str, Any]]]:
  """The first `n` CoNSeP Test tiles as (png path, schema record with the merged classes)."""
  from dualunet_jax.data import consep
  pairs = consep.list_split(official_dir, 'Test')[:n]
  return [(image, consep.read_tile(image, label)) for image, label in pairs]


def oracle_maps(instance_map: np.ndarray, classes: np.ndarray, num_classes: int, scale: int, sigma: float
                ) -> tuple[np.ndarray, np.ndarray]:
  """Ground-truth-derived model outputs at the model's resolution (`scale` level-0 px per model px).

  Args:
    instance_map: int32[H, W] ids 1..N; classes: int32[N] in 1..K.
  Returns:
    class_probs float16[H/scale, W/scale, K+1] (one-hot), density float32[H/scale, W/scale].
  """
  from dualunet_jax.data import readers, targets
  # Subsampling drops the smallest nuclei: renumber the survivors 1..N and keep their classes.
  inst, old_ids = readers.relabel_contiguous(instance_map[::scale, ::scale])
  t = targets.make_targets(inst, np.asarray(classes)[old_ids - 1], sigma=sigma)
  return np.eye(num_classes + 1, dtype=np.float16)[t['class_map']], t['density'].astype(np.float32)


class MosaicOracle:
  """A window-aware engine predictor that serves oracle maps of inputs tiled from per-block maps.

  Every input is a grid of blocks (`layouts[name] = int[rows, cols]` of block indices; a plain tile is a 1x1
  grid); block `i` has maps `blocks[i]` of `block` x `block` model px. Outside the grid: background.
  Used with `predict_throughput.DeviceOraclePredictor`, so the device still runs the real network and the host
  post-processes realistic nuclei, for any slide size, without holding slide-sized maps.
  """
  needs_windows = True

  def __init__(self, blocks: Sequence[tuple[np.ndarray, np.ndarray]], layouts: dict[str, np.ndarray]):
    self.blocks, self.layouts = blocks, layouts
    self.block = blocks[0][1].shape[0]
    self.channels = blocks[0][0].shape[-1]

  def window(self, name: str, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    layout, b = self.layouts[name], self.block
    probs = np.zeros((h, w, self.channels), np.float16)
    probs[..., 0] = 1
    dens = np.zeros((h, w), np.float32)
    rows, cols = layout.shape
    for r in range(max(0, y0 // b), min(rows, -(-(y0 + h) // b))):
      for c in range(max(0, x0 // b), min(cols, -(-(x0 + w) // b))):
        by0, bx0 = max(y0, r * b), max(x0, c * b)
        by1, bx1 = min(y0 + h, (r + 1) * b), min(x0 + w, (c + 1) * b)
        p, d = self.blocks[layout[r, c]]
        probs[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] = p[by0 - r * b:by1 - r * b, bx0 - c * b:bx1 - c * b]
        dens[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] = d[by0 - r * b:by1 - r * b, bx0 - c * b:bx1 - c * b]
    return probs, dens

  def __call__(self, images: np.ndarray, windows) -> dict[str, np.ndarray]:
    """DualU-Net's maps of the windows: {'class_probs': [B, h, w, K+1], 'density': [B, h, w, 1]}."""
    out = [self.window(w.name, w.y0, w.x0, w.height, w.width) for w in windows]
    return {'class_probs': np.stack([o[0] for o in out]), 'density': np.stack([o[1] for o in out])[..., None]}


def mosaic_layout(rows: int, cols: int, n_blocks: int) -> np.ndarray:
  """int[rows, cols] block indices: neighbours differ, so the mosaic is not one tile repeated in a band."""
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  return ((r * 5 + c * 3) % n_blocks).astype(np.int32)


def _down2(a: np.ndarray) -> np.ndarray:
  h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
  return a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean((1, 3)).round().astype(np.uint8)


def write_mosaic_tiff(path: pathlib.Path, blocks: Sequence[np.ndarray], layout: np.ndarray, mpp: float,
                      workers: int = 0, min_side: int = 1024) -> dict[str, Any]:
  """A tiled, zlib, pyramidal BigTIFF (OpenSlide 'generic-tiff') of `blocks` placed by `layout`.

  Level 0 and 1 are written from tiles compressed once per distinct block (a multi-gigapixel file in seconds);
  the coarser levels (each half the previous, down to `min_side`) are built in memory and compressed on
  `workers` threads.

  Args:
    blocks: uint8[S, S, 3] level-0 images, S a multiple of 64 (TIFF tiles of S/2 px at levels 0 and 1).
    layout: int[rows, cols] block indices (`mosaic_layout`).
    mpp: level-0 µm/px (written as resolution tags in centimetres).
  Returns:
    {'path', 'height', 'width', 'gigapixels', 'levels', 'bytes'}.
  """
  import tifffile
  side = blocks[0].shape[0]
  if side % 64 or any(b.shape != (side, side, 3) for b in blocks):
    raise ValueError(f'blocks must be uint8[S, S, 3] with S a multiple of 64, got {blocks[0].shape}')
  half = side // 2
  rows, cols = layout.shape
  quads = [[zlib.compress(np.ascontiguousarray(b[qy * half:(qy + 1) * half, qx * half:(qx + 1) * half]).tobytes(), 1)
            for qy in (0, 1) for qx in (0, 1)] for b in blocks]
  level1 = [zlib.compress(_down2(b).tobytes(), 1) for b in blocks]

  def level0_tiles():
    for ty in range(rows * 2):
      for tx in range(cols * 2):
        yield quads[layout[ty // 2, tx // 2]][(ty % 2) * 2 + tx % 2]

  def level1_tiles():
    for r in range(rows):
      for c in range(cols):
        yield level1[layout[r, c]]

  quarter = side // 4
  small = [_down2(_down2(b)) for b in blocks]
  level = np.empty((rows * quarter, cols * quarter, 3), np.uint8)
  for r in range(rows):
    for c in range(cols):
      level[r * quarter:(r + 1) * quarter, c * quarter:(c + 1) * quarter] = small[layout[r, c]]
  common = dict(photometric='rgb', compression='zlib', resolutionunit='CENTIMETER', metadata=None)
  path.parent.mkdir(parents=True, exist_ok=True)
  levels = 2
  with tifffile.TiffWriter(path, bigtiff=True) as tw:
    tw.write(level0_tiles(), shape=(rows * side, cols * side, 3), dtype=np.uint8, tile=(half, half),
             resolution=(1e4 / mpp, 1e4 / mpp), subfiletype=0, **common)
    tw.write(level1_tiles(), shape=(rows * half, cols * half, 3), dtype=np.uint8, tile=(half, half),
             resolution=(1e4 / (2 * mpp), 1e4 / (2 * mpp)), subfiletype=1, **common)
    downsample = 4
    while True:
      tw.write(level, tile=(256, 256), resolution=(1e4 / (downsample * mpp),) * 2, subfiletype=1,
               maxworkers=workers or os.cpu_count(), **common)
      levels += 1
      if max(level.shape[:2]) <= min_side:
        break
      level, downsample = _down2(level), downsample * 2
  height, width = rows * side, cols * side
  return {'path': str(path), 'height': height, 'width': width, 'gigapixels': height * width / 1e9,
          'levels': levels, 'bytes': path.stat().st_size}


def mosaic_grid_for(gigapixels: float, side: int) -> int:
  """Blocks per side of a square mosaic of `side`-px blocks with about `gigapixels` level-0 pixels."""
  return max(1, int(math.ceil(math.sqrt(gigapixels * 1e9) / side)))
