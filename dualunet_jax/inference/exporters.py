"""Result shards on disk and the output formats written from them, streaming (memory flat in slide size).

Coordinates: results are kept in model-resolution continuous coordinates (pixel (r, c) spans [c, c+1) x
[r, r+1)); every exported coordinate is level-0 slide/image pixels = model coordinate * `scale` (QuPath's
convention: integer values are pixel corners).

Formats (`FORMATS`):
  geojson         `<name>.geojson`: RFC 7946 FeatureCollection, one Feature per nucleus, Polygon geometry
                  (closed ring, [x, y], level-0 px), properties {objectType: 'detection', classification:
                  {name, color: [r, g, b]}, measurements: {nucleus_id, area_um2, class_probability}};
                  QuPath: File > Import objects (or drag and drop).
  geojson_points  `<name>_points.geojson`: one Feature per class with a MultiPoint of all its centroids
                  (objectType 'annotation': QuPath shows them as point annotations); small for huge slides.
  csv             `<name>.csv`: id, x, y (level-0 px), class, class_name, area_px (level-0 px), area_um2,
                  probability (mean probability of the assigned class over the nucleus).
  maps            tiles: `<name>_instances.npy` int32 and `<name>_classes.npy` uint8 on the input's own pixel
                  grid; slides: `<name>_instances.tif` / `<name>_classes.tif`, tiled zlib TIFF at the model's
                  resolution (µm/px in the resolution tags; level-0 = map px * scale).
  overlay         `<name>_overlay.png`: the image (slides: a thumbnail, longest side <= 4096) with nucleus
                  contours (or centroid dots when contours would be < 1 px apart) in class colours.
  composition     `<name>_composition.json`: counts and fractions per class; `composition.csv` in the output
                  folder collects every image's row.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np

from dualunet_jax.inference import tiling

FORMATS = ('geojson', 'geojson_points', 'csv', 'maps', 'overlay', 'composition')
DEFAULT_FORMATS = ('geojson', 'csv', 'maps', 'overlay', 'composition')
# Distinct, colour-blind-friendly-ish class colours (class 1, 2, ...); background is never drawn.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))

Chunks = Callable[[], Iterator[tuple[np.ndarray, dict]]]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
  return [PALETTE[i % len(PALETTE)] for i in range(num_classes)]


@contextlib.contextmanager
def atomic_write(path: pathlib.Path, mode: str = 'w'):
  """Opens `path.tmp` for writing and renames it onto `path` on success (readers never see partial files)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  kwargs = {'newline': ''} if 'b' not in mode else {}
  try:
    with open(tmp, mode, **({'encoding': 'utf-8'} if 'b' not in mode else {}), **kwargs) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def atomic_save(path: pathlib.Path, save: Callable[[pathlib.Path], None]) -> None:
  """Calls `save(tmp_path)` and renames the result onto `path` (for writers that want a file name)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + '.tmp' + path.suffix)
  try:
    save(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


# ----------------------------------------------------------------------------------------------- shards


class ShardStore:
  """Per-row result shards of one image plus a JSON manifest, for streaming export and resume.

  Each finished grid row is one `row_NNNNN.npz` (atomic: temp file + os.replace), then the manifest is
  rewritten (also atomic). A manifest whose `signature` (input, geometry, model, options) differs from the
  current run's is discarded, so resumed runs never mix results of different settings.
  """

  def __init__(self, directory: pathlib.Path):
    self.dir = pathlib.Path(directory)
    self.manifest_path = self.dir / 'manifest.json'
    self.manifest: dict = {'signature': None, 'rows': {}}

  def open(self, signature: dict) -> None:
    """Loads the manifest when it matches `signature`, else starts empty (removing stale shards)."""
    self.dir.mkdir(parents=True, exist_ok=True)
    signature = json.loads(json.dumps(signature))  # normalise tuples -> lists for comparison
    if self.manifest_path.is_file():
      try:
        manifest = json.loads(self.manifest_path.read_text())
      except (OSError, ValueError):
        manifest = None
      if manifest and manifest.get('signature') == signature and (manifest.get('finished') or all(
          (self.dir / r['file']).is_file() for r in manifest['rows'].values())):
        self.manifest = manifest
        return
    for p in self.dir.glob('row_*.npz'):
      p.unlink()
    self.manifest = {'signature': signature, 'rows': {}}
    self._write_manifest()

  def _write_manifest(self) -> None:
    with atomic_write(self.manifest_path) as f:
      json.dump(self.manifest, f)

  @property
  def done_rows(self) -> set[int]:
    return {int(r) for r in self.manifest['rows']}

  def save_row(self, row: int, result: dict[str, np.ndarray]) -> None:
    name = f'row_{row:05d}.npz'
    with atomic_write(self.dir / name, 'wb') as f:
      np.savez(f, **result)
    self.manifest['rows'][str(row)] = {'file': name, 'count': int(len(result['y']))}
    self._write_manifest()

  def rows(self) -> list[int]:
    return sorted(self.done_rows)

  def offsets(self) -> dict[int, int]:
    """First global id - 1 of each row: ids are assigned in row order, so they never depend on the order in
    which rows finished (an interrupted and resumed run numbers nuclei exactly as an uninterrupted one)."""
    out, total = {}, 0
    for r in self.rows():
      out[r] = total
      total += self.manifest['rows'][str(r)]['count']
    return out

  @property
  def total(self) -> int:
    return sum(r['count'] for r in self.manifest['rows'].values())

  def load(self, row: int) -> dict[str, np.ndarray]:
    with np.load(self.dir / self.manifest['rows'][str(row)]['file']) as z:
      return {k: z[k] for k in tiling.RESULT_KEYS}

  def chunks(self) -> Iterator[tuple[np.ndarray, dict]]:
    """(ids int64[M], result) per row, in row order."""
    offsets = self.offsets()
    for r in self.rows():
      res = self.load(r)
      yield offsets[r] + 1 + np.arange(len(res['y']), dtype=np.int64), res

  def counts(self, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes + 1, np.int64)
    for _, res in self.chunks():
      counts += np.bincount(res['cls'], minlength=num_classes + 1)[:num_classes + 1]
    return counts[1:]


# ----------------------------------------------------------------------------------------------- vectors


def _ring_text(ring: np.ndarray) -> str:
  return '[' + ','.join(f'[{x:.2f},{y:.2f}]' for x, y in ring.tolist()) + ']'


UNCLASSIFIED = 'unclassified'  # class 0: a nucleus no class won (HoVer-Net's type vote can say background)
UNCLASSIFIED_COLOR = (128, 128, 128)


def class_name(class_names: Sequence[str], c: int) -> str:
  """Name of class c (1..K), or `UNCLASSIFIED` for 0."""
  return class_names[c - 1] if c > 0 else UNCLASSIFIED


def write_geojson(path: pathlib.Path, chunks: Chunks, class_names: Sequence[str], scale: float,
                  model_mpp: float, points: bool = False) -> None:
  """QuPath-importable GeoJSON (module docstring). Streams: one chunk in memory at a time."""
  colors = class_colors(len(class_names))

  def classification(c: int) -> str:
    color = list(colors[c - 1]) if c > 0 else list(UNCLASSIFIED_COLOR)
    return json.dumps({'name': class_name(class_names, c), 'color': color})

  with atomic_write(path) as f:
    f.write('{"type": "FeatureCollection", "features": [\n')
    first = True
    if points:
      for c in range(0, len(class_names) + 1):
        coords = []
        for _, res in chunks():
          sel = res['cls'] == c
          coords.extend(f'[{x:.2f},{y:.2f}]' for x, y in zip((res['x'][sel] * scale).tolist(),
                                                             (res['y'][sel] * scale).tolist()))
        if not coords:
          continue
        f.write(('' if first else ',\n') + '{"type": "Feature", "geometry": {"type": "MultiPoint", '
                f'"coordinates": [{",".join(coords)}]}}, "properties": {{"objectType": "annotation", '
                f'"name": {json.dumps(class_name(class_names, c))}, "classification": {classification(c)}}}}}')
        first = False
    else:
      cls_text = {c: classification(c) for c in range(0, len(class_names) + 1)}
      for ids, res in chunks():
        offsets = np.concatenate([[0], np.cumsum(res['poly_len'])])
        polys = res['poly'] * scale
        area_um2 = res['area'] * model_mpp ** 2
        for i in range(len(ids)):
          ring = polys[offsets[i]:offsets[i + 1]]
          f.write(('' if first else ',\n') + '{"type": "Feature", "geometry": {"type": "Polygon", '
                  f'"coordinates": [{_ring_text(ring)}]}}, "properties": {{"objectType": "detection", '
                  f'"classification": {cls_text[int(res["cls"][i])]}, "measurements": {{"nucleus_id": '
                  f'{int(ids[i])}, "area_um2": {area_um2[i]:.2f}, "class_probability": '
                  f'{float(res["prob"][i]):.4f}}}}}}}')
          first = False
    f.write('\n]}\n')


def write_csv(path: pathlib.Path, chunks: Chunks, class_names: Sequence[str], scale: float,
              model_mpp: float) -> None:
  with atomic_write(path) as f:
    w = csv.writer(f)
    w.writerow(['id', 'x', 'y', 'class', 'class_name', 'area_px', 'area_um2', 'probability'])
    for ids, res in chunks():
      for i, x, y, c, a, p in zip(ids.tolist(), (res['x'] * scale).tolist(), (res['y'] * scale).tolist(),
                                  res['cls'].tolist(), res['area'].tolist(), res['prob'].tolist()):
        w.writerow([i, f'{x:.2f}', f'{y:.2f}', c, class_name(class_names, c), f'{a * scale * scale:.1f}',
                    f'{a * model_mpp ** 2:.2f}', f'{p:.4f}'])


# ----------------------------------------------------------------------------------------------- composition


def composition(name: str, counts: np.ndarray, class_names: Sequence[str], extra: dict | None = None) -> dict:
  total = int(counts.sum())
  return {'image': name, 'total': total, **(extra or {}),
          'classes': {n: {'count': int(c), 'fraction': round(float(c) / total, 6) if total else 0.0}
                      for n, c in zip(class_names, counts)}}


def write_composition(path: pathlib.Path, comp: dict) -> None:
  with atomic_write(path) as f:
    json.dump(comp, f, indent=1)


def write_composition_table(out_dir: pathlib.Path) -> pathlib.Path:
  """`composition.csv` from every `*_composition.json` in `out_dir` (one row per image, sorted by name)."""
  out_dir = pathlib.Path(out_dir)
  comps = [json.loads(p.read_text()) for p in sorted(out_dir.glob('*_composition.json'))]
  path = out_dir / 'composition.csv'
  names = []
  for c in comps:
    names += [n for n in c['classes'] if n not in names]
  with atomic_write(path) as f:
    w = csv.writer(f)
    w.writerow(['image', 'total'] + [f'{n}_count' for n in names] + [f'{n}_fraction' for n in names])
    for c in sorted(comps, key=lambda c: c['image']):
      cl = c['classes']
      w.writerow([c['image'], c['total']] + [cl.get(n, {}).get('count', 0) for n in names]
                 + [cl.get(n, {}).get('fraction', 0.0) for n in names])
  return path


# ----------------------------------------------------------------------------------------------- rasters


def _nearest_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
  rows = np.minimum((np.arange(height) + 0.5) * array.shape[0] / height, array.shape[0] - 1).astype(np.int64)
  cols = np.minimum((np.arange(width) + 0.5) * array.shape[1] / width, array.shape[1] - 1).astype(np.int64)
  return array[rows[:, None], cols[None, :]]


def write_maps_npy(stem: pathlib.Path, store: ShardStore, model_hw: tuple[int, int],
                   image_hw: tuple[int, int]) -> list[pathlib.Path]:
  """Instance (int32) and class (uint8) maps of a tile on the input's own pixel grid (nearest resampling)."""
  inst = np.zeros(model_hw, np.int32)
  cls = np.zeros(model_hw, np.uint8)
  for ids, res in store.chunks():
    tiling.paint(res, ids, (0, 0) + tuple(model_hw), out=inst)
    tiling.paint(res, ids, (0, 0) + tuple(model_hw), values=res['cls'], out=cls)
  if tuple(image_hw) != tuple(model_hw):
    inst, cls = _nearest_resize(inst, *image_hw), _nearest_resize(cls, *image_hw)
  paths = [stem.with_name(stem.name + '_instances.npy'), stem.with_name(stem.name + '_classes.npy')]
  for p, a in zip(paths, (inst, cls)):
    with atomic_write(p, 'wb') as f:
      np.save(f, a)
  return paths


def write_maps_tiff(stem: pathlib.Path, store: ShardStore, grid: tiling.TileGrid, model_mpp: float,
                    tile: int = 512) -> list[pathlib.Path]:
  """Instance (int32) and class (uint8) maps of a slide as tiled zlib TIFFs at the model's resolution.

  Written tile row by tile row: only the shards of grid rows whose tiles reach the current band are loaded.
  """
  import tifffile
  height, width = grid.height, grid.width
  stride, margin = grid.stride, grid.margin
  offsets = store.offsets()
  done = set(store.rows())
  cache: dict[int, tuple[np.ndarray, dict]] = {}

  def band(y0: int, y1: int) -> list[tuple[np.ndarray, dict]]:
    if grid.single:
      rows = {0}
    else:
      rows = {r for r in range(max(0, (y0 - margin) // stride - 1), (y1 + margin) // stride + 2) if r in done}
    for r in list(cache):
      if r not in rows:
        del cache[r]
    for r in sorted(rows - set(cache)):
      res = store.load(r)
      cache[r] = (offsets[r] + 1 + np.arange(len(res['y']), dtype=np.int64), res)
    return [cache[r] for r in sorted(rows)]

  def tiles(values: str, dtype) -> Iterator[np.ndarray]:
    for ty in range(0, height, tile):
      parts = band(ty, ty + tile)
      for tx in range(0, width, tile):
        out = np.zeros((tile, tile), dtype)
        for ids, res in parts:
          tiling.paint(res, ids, (ty, tx, tile, tile), values=res['cls'] if values == 'cls' else None, out=out)
        yield out

  paths = []
  res_tag = (1e4 / model_mpp, 1e4 / model_mpp)
  for suffix, values, dtype in (('_instances.tif', 'ids', np.int32), ('_classes.tif', 'cls', np.uint8)):
    path = stem.with_name(stem.name + suffix)
    cache.clear()
    atomic_save(path, lambda p: tifffile.imwrite(
        p, tiles(values, dtype), shape=(height, width), dtype=dtype, tile=(tile, tile), compression='zlib',
        resolution=res_tag, resolutionunit='CENTIMETER', metadata=None,
        description=json.dumps({'model_mpp': model_mpp, 'content': values})))
    paths.append(path)
  return paths


def write_overlay(path: pathlib.Path, image: np.ndarray, chunks: Chunks, num_classes: int,
                  to_image: float) -> None:
  """PNG of `image` with nucleus contours (or dots) in class colours.

  Args:
    image: uint8[h, w, 3] (the input, or a thumbnail of it).
    to_image: model-res coordinate -> `image` pixel factor.
  """
  from PIL import Image, ImageDraw
  colors = class_colors(num_classes)
  canvas = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(canvas)
  dots = to_image < 0.5  # nuclei would be a few pixels wide: draw centroids instead of contours
  for _, res in chunks():
    offsets = np.concatenate([[0], np.cumsum(res['poly_len'])])
    for i in range(len(res['y'])):
      color = colors[(int(res['cls'][i]) - 1) % len(colors)]
      if dots:
        x, y = res['x'][i] * to_image, res['y'][i] * to_image
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=color)
      else:
        ring = res['poly'][offsets[i]:offsets[i + 1]] * to_image
        draw.line([tuple(p) for p in ring.tolist()], fill=color, width=1 if to_image < 2 else 2)
  buf = io.BytesIO()
  canvas.save(buf, format='PNG')
  with atomic_write(path, 'wb') as f:
    f.write(buf.getvalue())
