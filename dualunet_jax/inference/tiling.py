"""Tile grid with overlaps and the ownership rule that stitches per-tile instances into one image.

Geometry (all in model-resolution pixels, i.e. after resampling the input to the model's µm/px):

    cores    a regular grid of `stride x stride` cells that partitions the image [0, H) x [0, W)
    tiles    each core grown by `margin = overlap // 2` on every side: `tile_size = stride + overlap`;
             tiles near the image border reach outside it and are filled with white

Stitching rule: a nucleus found in a tile is kept iff its centroid (floored) lies in that tile's core. Cores
partition the image, so every nucleus whose centroid is inside the image is reported exactly once; a nucleus
whose centroid is in a core lies at least `margin` px from its tile's edge, so it is segmented whole whenever
its radius (plus the context the model needs) is below `margin`. No instance map blending, no IoU merging.

A small image (both sides <= `tile_size`) is one tile of its own size (rounded up to a multiple of 32): no
overlap is needed there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile: `row, col` in the grid; `y0, x0` its top-left (may be negative); `core` (y0, x0, y1, x1)."""
  row: int
  col: int
  y0: int
  x0: int
  height: int
  width: int
  core: tuple[int, int, int, int]

  def owns(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bool[M]: which global centroids (float, model-res px) fall in this tile's core."""
    y, x = np.floor(y), np.floor(x)
    cy0, cx0, cy1, cx1 = self.core
    return (y >= cy0) & (y < cy1) & (x >= cx0) & (x < cx1)


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """The tile grid of one image of `height x width` model-resolution pixels.

  Attributes:
    height, width: image size (model-res px).
    tile_size: side of every tile; for a single-tile image the tile is the image itself.
    overlap: total overlap between neighbouring tiles (2 * margin); even.
  """
  height: int
  width: int
  tile_size: int
  overlap: int

  @classmethod
  def create(cls, height: int, width: int, tile_size: int, overlap: int) -> 'TileGrid':
    if tile_size <= 0 or overlap < 0 or overlap >= tile_size:
      raise ValueError(f'need tile_size > overlap >= 0, got tile_size={tile_size}, overlap={overlap}')
    if overlap % 2:
      raise ValueError(f'overlap must be even (a margin of overlap/2 on each side), got {overlap}')
    return cls(int(height), int(width), int(tile_size), int(overlap))

  @property
  def single(self) -> bool:
    """The whole image fits in one tile (no stitching)."""
    return self.height <= self.tile_size and self.width <= self.tile_size

  @property
  def stride(self) -> int:
    return self.tile_size - self.overlap

  @property
  def margin(self) -> int:
    return self.overlap // 2

  @property
  def shape(self) -> tuple[int, int]:
    """(rows, cols) of the grid."""
    if self.single:
      return 1, 1
    return math.ceil(self.height / self.stride), math.ceil(self.width / self.stride)

  @property
  def tile_shape(self) -> tuple[int, int]:
    t = self.tile(0, 0)
    return t.height, t.width

  def tile(self, row: int, col: int) -> Tile:
    if self.single:
      # Rounded up to a multiple of 32 (reflect-filled by the reader): the model needs no internal padding
      # and images of similar sizes share one compiled shape.
      return Tile(0, 0, 0, 0, _round_up(self.height, 32), _round_up(self.width, 32),
                  (0, 0, self.height, self.width))
    s, m = self.stride, self.margin
    core = (row * s, col * s, min((row + 1) * s, self.height), min((col + 1) * s, self.width))
    return Tile(row, col, row * s - m, col * s - m, self.tile_size, self.tile_size, core)

  def tiles(self) -> list[Tile]:
    rows, cols = self.shape
    return [self.tile(r, c) for r in range(rows) for c in range(cols)]

  def select(self, tissue: np.ndarray | None) -> list[Tile]:
    """Tiles whose core touches tissue. `tissue`: bool[h, w] mask covering the image at any scale."""
    if tissue is None:
      return self.tiles()
    th, tw = tissue.shape
    keep = []
    for t in self.tiles():
      cy0, cx0, cy1, cx1 = t.core
      # Map the core to mask pixels, always covering at least one mask pixel.
      my0, mx0 = int(cy0 * th / self.height), int(cx0 * tw / self.width)
      my1 = max(my0 + 1, math.ceil(cy1 * th / self.height))
      mx1 = max(mx0 + 1, math.ceil(cx1 * tw / self.width))
      if tissue[my0:my1, mx0:mx1].any():
        keep.append(t)
    return keep


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def crop_padded(array: np.ndarray, y0: int, x0: int, height: int, width: int, fill=0) -> np.ndarray:
  """`array[y0:y0+height, x0:x0+width]` with the part outside `array` filled with `fill`.

  Args:
    array: [H, W, ...].
  Returns:
    [height, width, ...], same dtype.
  """
  out = np.full((height, width) + array.shape[2:], fill, array.dtype)
  sy0, sx0 = max(y0, 0), max(x0, 0)
  sy1, sx1 = min(y0 + height, array.shape[0]), min(x0 + width, array.shape[1])
  if sy1 > sy0 and sx1 > sx0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
  return out


# ----------------------------------------------------------------------------------------------- per tile

# Keys of the per-tile result (`tile_instances`), all model-resolution, global image coordinates:
#   y, x        float64[M]   centroid (continuous: pixel (r, c) spans [c, c+1) x [r, r+1))
#   cls         int32[M]     class 1..K
#   area        int32[M]     pixels (inside the image)
#   prob        float32[M]   mean probability of the assigned class over the nucleus
#   class_probs float32[M, K+1] mean class probabilities over the nucleus (channel 0 background)
#   bbox        int32[M, 4]  y0, x0, y1, x1 (clipped to the image)
#   poly        float32[P, 2] concatenated closed contours (x, y), continuous coordinates
#   poly_len    int32[M]     vertices per contour
#   mask        uint8[Q]     concatenated np.packbits of each bbox mask (only with want_masks)
#   mask_len    int32[M]     bytes per mask
RESULT_KEYS = ('y', 'x', 'cls', 'area', 'prob', 'class_probs', 'bbox', 'poly', 'poly_len', 'mask', 'mask_len')


def empty_result() -> dict[str, np.ndarray]:
  return {'y': np.zeros(0), 'x': np.zeros(0), 'cls': np.zeros(0, np.int32), 'area': np.zeros(0, np.int32),
          'prob': np.zeros(0, np.float32), 'class_probs': np.zeros((0, 0), np.float32),
          'bbox': np.zeros((0, 4), np.int32),
          'poly': np.zeros((0, 2), np.float32), 'poly_len': np.zeros(0, np.int32),
          'mask': np.zeros(0, np.uint8), 'mask_len': np.zeros(0, np.int32)}


def concat_results(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  # Empty results carry no class count (class_probs is [0, 0]): leave them out of a non-empty concatenation.
  results = [r for r in results if len(r['y'])] or [empty_result()]
  return {k: np.concatenate([r[k] for r in results]) for k in RESULT_KEYS}


def contour(mask: np.ndarray) -> np.ndarray:
  """The outer contour of a binary mask as a closed ring.

  The iso-0.5 line between pixel centres (skimage `find_contours`), with collinear vertices removed
  (lossless; skimage's `approximate_polygon` would cost ~40x more than the contour itself).

  Args:
    mask: bool[h, w], one nucleus.
  Returns:
    float32[P, 2] (x, y) in the mask's continuous coordinates (pixel (r, c) spans [c, c+1) x [r, r+1)),
    first == last, P >= 4, positive shoelace area in (x, y).
  """
  from skimage import measure
  rings = measure.find_contours(np.pad(mask.astype(np.float32), 1), 0.5)
  if not rings:  # unreachable for mask.any(); a unit square keeps the output valid
    return np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], np.float32)
  ring = max(rings, key=len)[:, ::-1] - 0.5  # padded (row, col) -> (x, y) continuous: -1 pad, +0.5 centre
  pts = ring[:-1] if np.array_equal(ring[0], ring[-1]) else ring
  d_in = pts - np.roll(pts, 1, axis=0)
  d_out = np.roll(pts, -1, axis=0) - pts
  turn = np.abs(d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) > 1e-9
  if turn.sum() >= 3:
    pts = pts[turn]
  ring = np.concatenate([pts, pts[:1]])
  x, y = ring[:, 0], ring[:, 1]
  if np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) < 0:
    ring = ring[::-1]
  return ring.astype(np.float32)


def warm_up() -> None:
  """Imports what `tile_instances` needs (submitted once per worker when a pool starts)."""
  import scipy.ndimage  # noqa: F401
  import skimage.measure  # noqa: F401
  import dualunet_jax.postprocess  # noqa: F401


def tile_instances(maps: dict[str, np.ndarray], tile: Tile, image_hw: tuple[int, int], postprocess_fn: Any,
                   postprocess_kwargs: dict, want_masks: bool = False) -> dict[str, np.ndarray]:
  """Post-processes one tile and keeps the nuclei it owns (centroid in its core), in global coordinates.

  Runs in a worker process (picklable arguments, numpy only).

  Args:
    maps: the method's maps of the tile, {name: float16/float32[h, w, C]} with 'class_probs' [h, w, K+1].
    tile: the tile's geometry.
    image_hw: (H, W) of the whole image (model-res), to clip nuclei reaching outside it.
    postprocess_fn: the method's post-processing (`Method.postprocess_fn`), `fn(maps, **kwargs) -> Instances`.
    postprocess_kwargs: its options.
    want_masks: also return packed bbox masks (for instance/class maps).
  Returns:
    dict of `RESULT_KEYS` arrays; nuclei in the order of the tile's instance labels.
  """
  import scipy.ndimage as ndi
  maps = {name: np.asarray(value, np.float32) for name, value in maps.items()}
  probs = maps['class_probs']
  inst = postprocess_fn(maps, **postprocess_kwargs)
  if inst.num_instances == 0:
    return empty_result()
  gy = inst.centroids[:, 0].astype(np.float64) + tile.y0 + 0.5  # centre-of-mass index -> continuous
  gx = inst.centroids[:, 1].astype(np.float64) + tile.x0 + 0.5
  owned = np.flatnonzero(tile.owns(gy, gx))
  if owned.size == 0:
    return empty_result()
  height, width = image_hw
  slices = ndi.find_objects(inst.instance_map)
  out = {k: [] for k in RESULT_KEYS}
  for i in owned:
    sl = slices[i]
    # Clip the bbox to the image (a nucleus owned by a border tile may spill into the padding).
    ly0, lx0 = max(sl[0].start, -tile.y0), max(sl[1].start, -tile.x0)
    ly1, lx1 = min(sl[0].stop, height - tile.y0), min(sl[1].stop, width - tile.x0)
    mask = inst.instance_map[ly0:ly1, lx0:lx1] == i + 1
    area = int(mask.sum())
    if area == 0:
      continue
    cls = int(inst.classes[i])
    ring = contour(mask) + np.array([lx0 + tile.x0, ly0 + tile.y0], np.float32)
    out['y'].append(gy[i])
    out['x'].append(gx[i])
    out['cls'].append(cls)
    out['area'].append(area)
    mean_probs = probs[ly0:ly1, lx0:lx1][mask].mean(axis=0)
    out['prob'].append(float(mean_probs[cls]))
    out['class_probs'].append(mean_probs)
    out['bbox'].append((ly0 + tile.y0, lx0 + tile.x0, ly1 + tile.y0, lx1 + tile.x0))
    out['poly'].append(ring)
    out['poly_len'].append(len(ring))
    if want_masks:
      bits = np.packbits(mask.ravel())
      out['mask'].append(bits)
      out['mask_len'].append(len(bits))
    else:
      out['mask_len'].append(0)
  if not out['y']:
    return empty_result()
  return {'y': np.asarray(out['y'], np.float64), 'x': np.asarray(out['x'], np.float64),
          'cls': np.asarray(out['cls'], np.int32), 'area': np.asarray(out['area'], np.int32),
          'prob': np.asarray(out['prob'], np.float32),
          'class_probs': np.asarray(out['class_probs'], np.float32).reshape(len(out['y']), probs.shape[-1]),
          'bbox': np.asarray(out['bbox'], np.int32).reshape(-1, 4),
          'poly': np.concatenate(out['poly']).astype(np.float32),
          'poly_len': np.asarray(out['poly_len'], np.int32),
          'mask': np.concatenate(out['mask']) if out['mask'] else np.zeros(0, np.uint8),
          'mask_len': np.asarray(out['mask_len'], np.int32)}


def paint(result: dict[str, np.ndarray], ids: np.ndarray, window: tuple[int, int, int, int],
          values: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
  """Rasterises nuclei masks into a window of the image.

  Args:
    result: concatenated per-tile results with masks (`want_masks=True`).
    ids: int[M] value of each nucleus (e.g. global instance ids).
    window: (y0, x0, h, w) model-res window.
    values: int[M] to paint instead of ids (e.g. classes); None = ids.
    out: int[h, w] array to paint into (zeros of int32 by default).
  Returns:
    int[h, w]; where nuclei overlap the later one wins.
  """
  y0, x0, h, w = window
  if out is None:
    out = np.zeros((h, w), np.int32)
  values = ids if values is None else values
  bbox = result['bbox']
  if len(bbox) == 0:
    return out
  offsets = np.concatenate([[0], np.cumsum(result['mask_len'])])
  hit = np.flatnonzero((bbox[:, 0] < y0 + h) & (bbox[:, 2] > y0) & (bbox[:, 1] < x0 + w) & (bbox[:, 3] > x0))
  for i in hit:
    by0, bx0, by1, bx1 = (int(v) for v in bbox[i])
    bh, bw = by1 - by0, bx1 - bx0
    mask = np.unpackbits(result['mask'][offsets[i]:offsets[i + 1]], count=bh * bw).reshape(bh, bw).astype(bool)
    sy0, sx0 = max(by0, y0), max(bx0, x0)
    sy1, sx1 = min(by1, y0 + h), min(bx1, x0 + w)
    m = mask[sy0 - by0:sy1 - by0, sx0 - bx0:sx1 - bx0]
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0][m] = values[i]
  return out
