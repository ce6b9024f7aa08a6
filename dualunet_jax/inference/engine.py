"""Batched tiled inference over images and slides, overlapped with host post-processing, streamed to disk.

Pipeline (one call of `predict` over any number of inputs):

  reader thread      open input -> resolution -> tissue mask -> tile grid -> read + resample tiles -> queue
  main thread        stack tiles of equal shape into batches -> dispatch the predictor (asynchronous on the
                     device) -> while it runs: fetch the previous batch, submit each tile to the pool, save
                     finished grid rows as shards, export finished inputs
  worker processes   `tiling.tile_instances`: post-processing + ownership filter + contours per tile

The "model" is any callable `predictor(images uint8[B, h + 2m, w + 2m, 3]) -> {name: float[B, h, w, C]}` (the
method's maps, numpy or jax arrays, always with 'class_probs' [B, h, w, K+1]); `m = predictor.margin` (default
0) is the context a valid-convolution model consumes on each side, read from the slide around each tile.
`model_predictor` builds one from Flax models of one method with test-time augmentation and checkpoint
ensembles. A predictor with attribute `needs_windows = True` is called as `predictor(images,
windows=[Window, ...])` (used by the oracle in tests, which crops ground-truth maps). The maps of each tile go
to the method's post-processing (`Options.postprocess_fn`) in the worker processes.

Resume: every finished grid row of an input is a shard in `<output>/.dualunet_work/<name>/` listed in a
manifest; a rerun with the same settings skips finished rows (and finished inputs) and numbers nuclei
identically (ids are assigned in row order at export).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import glob
import json
import logging
import multiprocessing
import os
import pathlib
import queue
import shutil
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from dualunet_jax.data.readers import natural_key
from dualunet_jax.inference import exporters
from dualunet_jax.inference import slide as slide_lib
from dualunet_jax.inference import tiling

WORK_DIR = '.dualunet_work'
Predictor = Callable[..., tuple[Any, Any]]


class StopRun(RuntimeError):
  """Raised when `stop_after_rows` rows were saved (tests use it to simulate an interrupted run)."""


@dataclasses.dataclass(frozen=True)
class Window:
  """A tile window handed to window-aware predictors: input `name`, model-res top-left and size."""
  name: str
  y0: int
  x0: int
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One input: the file and an optional level-0 µm/px override."""
  path: pathlib.Path
  mpp: float | None = None


@dataclasses.dataclass
class Options:
  """Inference settings (the CLI flags of `dualunet_jax.predict`).

  Attributes:
    model_mpp: µm/px the model was trained at (`config.dataset.mpp`); inputs are resampled to it.
    class_names: names of classes 1..K.
    tile_size, overlap: tile side and total overlap in model-res px (margin = overlap / 2 per side).
    batch_size: tiles per batch (the model predictor splits a batch over its devices).
    formats: subset of `exporters.FORMATS`.
    tissue: 'auto' (slides only) | 'on' | 'off': skip tiles without tissue on a thumbnail.
    workers: post-processing processes; 0 = os.cpu_count(); 1 = in the main thread (no overlap).
    prefetch: batches read ahead by the reader thread.
    postprocess: keyword options of `postprocess_fn`.
    postprocess_fn: the method's post-processing (`Method.postprocess_fn`; default DualU-Net's), a top-level
      JAX-free function of one tile's maps, pickled by reference into the workers.
    stain_norm: an unfitted `data.stain.Normalizer` (training statistics) or None: each input gets a copy fitted
      once on its thumbnail (per slide, not per tile), applied to every tile before the model.
    predictor_id: identifies the model/TTA for the resume signature.
    keep_work: keep the row shards after export (the manifest is always kept, to skip finished inputs).
    progress: show a tqdm bar (tiles, tiles/s, ETA).
  """
  model_mpp: float
  class_names: tuple[str, ...]
  tile_size: int = 1024
  overlap: int = 128
  batch_size: int = 4
  formats: tuple[str, ...] = exporters.DEFAULT_FORMATS
  tissue: str = 'auto'
  thumbnail_side: int = 1024
  overlay_side: int = 4096
  workers: int = 0
  prefetch: int = 2
  postprocess: dict = dataclasses.field(default_factory=dict)
  postprocess_fn: Callable[..., Any] | None = None
  stain_norm: Any = None
  predictor_id: str = ''
  keep_work: bool = False
  progress: bool = True

  def __post_init__(self):
    bad = [f for f in self.formats if f not in exporters.FORMATS]
    if bad:
      raise ValueError(f'unknown output format(s) {bad}; choose from {exporters.FORMATS}')
    if self.tissue not in ('auto', 'on', 'off'):
      raise ValueError(f"tissue must be 'auto', 'on' or 'off', got {self.tissue!r}")
    tiling.TileGrid.create(1, 1, self.tile_size, self.overlap)  # validates the geometry


# ----------------------------------------------------------------------------------------------- jobs


@dataclasses.dataclass(eq=False)
class _Job:
  """One input being processed."""
  spec: InputSpec
  name: str
  source: Any
  view: slide_lib.ModelView
  grid: tiling.TileGrid
  store: exporters.ShardStore
  todo: list[tiling.Tile]
  row_sizes: dict[int, int]
  tiles_total: int
  normalizer: Any = None
  started: float = dataclasses.field(default_factory=time.perf_counter)
  pending: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))
  finished: bool = False

  @property
  def rows_left(self) -> set[int]:
    return set(self.row_sizes) - self.store.done_rows


def _unique_names(paths: Sequence[pathlib.Path]) -> list[str]:
  seen: dict[str, int] = {}
  names = []
  for p in paths:
    stem = p.stem if not p.name.lower().endswith('.ome.tif') else p.name[:-8]
    seen[stem] = seen.get(stem, 0) + 1
    names.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem]}')
  return names


def output_files(out_dir: pathlib.Path, name: str, formats: Sequence[str], is_slide: bool) -> list[pathlib.Path]:
  """Files `predict` writes for one input."""
  stem = out_dir / name
  files = []
  for fmt in formats:
    if fmt == 'geojson':
      files.append(stem.with_name(name + '.geojson'))
    elif fmt == 'geojson_points':
      files.append(stem.with_name(name + '_points.geojson'))
    elif fmt == 'csv':
      files.append(stem.with_name(name + '.csv'))
    elif fmt == 'maps':
      ext = '.tif' if is_slide else '.npy'
      files += [stem.with_name(name + '_instances' + ext), stem.with_name(name + '_classes' + ext)]
    elif fmt == 'overlay':
      files.append(stem.with_name(name + '_overlay.png'))
    elif fmt == 'composition':
      files.append(stem.with_name(name + '_composition.json'))
  return files


class _Engine:

  def __init__(self, predictor: Predictor, out_dir: pathlib.Path, options: Options,
               stop_after_rows: int | None, executor: concurrent.futures.Executor | None = None):
    self.executor = executor
    self.predictor = predictor
    self.out_dir = pathlib.Path(out_dir)
    self.opt = options
    self.stop_after_rows = stop_after_rows
    self.rows_saved = 0
    self.want_masks = 'maps' in options.formats
    self.needs_windows = bool(getattr(predictor, 'needs_windows', False))
    self.margin = int(getattr(predictor, 'margin', 0) or 0)
    from dualunet_jax import postprocess as postprocess_lib  # pylint: disable=import-outside-toplevel
    self.postprocess_fn = options.postprocess_fn or postprocess_lib.postprocess_maps
    self.summaries: list[dict] = []

  # ------------------------------------------------------------------ reader side

  def prepare(self, spec: InputSpec, name: str) -> _Job:
    opt = self.opt
    source = slide_lib.open_source(spec.path)
    try:
      mpp = slide_lib.resolve_mpp(source, opt.model_mpp, spec.mpp)
      view = slide_lib.ModelView(source, mpp, opt.model_mpp)
      grid = tiling.TileGrid.create(view.height, view.width, opt.tile_size, opt.overlap)
      use_tissue = opt.tissue == 'on' or (opt.tissue == 'auto' and source.is_slide)
      thumb = source.thumbnail(opt.thumbnail_side) if (use_tissue or opt.stain_norm is not None) else None
      tissue = slide_lib.tissue_mask(thumb) if use_tissue else None
      normalizer = None
      if opt.stain_norm is not None:  # colour statistics do not depend on resolution: the thumbnail will do
        normalizer = copy.copy(opt.stain_norm).fit(thumb)
      tiles = grid.select(tissue)
      stat = spec.path.stat()
      signature = {
          'input': str(spec.path.resolve()), 'bytes': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
          'mpp': mpp, 'model_mpp': opt.model_mpp, 'tile_size': opt.tile_size, 'overlap': opt.overlap,
          'tissue': use_tissue, 'predictor': opt.predictor_id, 'postprocess': opt.postprocess,
          'postprocess_fn': _qualified_name(self.postprocess_fn),
          'masks': self.want_masks, 'tiles': len(tiles),
          'stain_norm': None if opt.stain_norm is None else opt.stain_norm.kind,
      }
      store = exporters.ShardStore(self.out_dir / WORK_DIR / name)
      store.open(signature)
      files = output_files(self.out_dir, name, opt.formats, source.is_slide)
      if store.manifest.get('finished') and not all(f.is_file() for f in files):
        store.open({**signature, 'reset': True})  # outputs were removed: start this input again
        store.open(signature)
      row_sizes = collections.Counter(t.row for t in tiles)
      done = store.done_rows
      todo = [] if store.manifest.get('finished') else [t for t in tiles if t.row not in done]
      return _Job(spec, name, source, view, grid, store, todo, dict(row_sizes), len(tiles), normalizer)
    except Exception:
      source.close()
      raise

  def produce(self, specs: Sequence[InputSpec], q: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    try:
      for spec, name in zip(specs, _unique_names([s.path for s in specs])):
        job = self.prepare(spec, name)
        if not put(('job', job)):
          return
        m = self.margin  # context a valid-convolution model consumes around the tile
        for tile in job.todo:
          image = job.view.read(tile.y0 - m, tile.x0 - m, tile.height + 2 * m, tile.width + 2 * m)
          if job.normalizer is not None:
            image = job.normalizer(image)
          if not put(('tile', job, tile, image)):
            return
      put(('end',))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the main thread)
      put(('error', e))

  # ------------------------------------------------------------------ main side

  def run(self, specs: Sequence[InputSpec]) -> list[dict]:
    from tqdm.auto import tqdm
    opt = self.opt
    workers = opt.workers or os.cpu_count() or 1
    own_pool = self.executor is None and workers > 1
    self.pool = self.executor
    if own_pool:
      self.pool = make_pool(workers)
    self.max_outstanding = 2 * workers + opt.batch_size
    self.outstanding: collections.deque = collections.deque()
    self.jobs: list[_Job] = []
    self.pbar = tqdm(total=0, unit='tile', disable=not opt.progress, smoothing=0.1, dynamic_ncols=True)
    q: queue.Queue = queue.Queue(maxsize=max(2, opt.prefetch) * opt.batch_size)
    stop = threading.Event()
    reader = threading.Thread(target=self.produce, args=(specs, q, stop), daemon=True, name='dualunet-reader')
    reader.start()
    inflight = None
    batch: list[tuple[_Job, tiling.Tile, np.ndarray]] = []
    try:
      while True:
        msg = q.get()
        if msg[0] == 'error':
          raise msg[1]
        if msg[0] == 'job':
          job = msg[1]
          self.jobs.append(job)
          self.pbar.total += len(job.todo)
          self.pbar.refresh()
        elif msg[0] == 'tile':
          _, job, tile, image = msg
          if batch and batch[0][2].shape != image.shape:
            inflight = self._dispatch(batch, inflight)
            batch = []
          batch.append((job, tile, image))
          if len(batch) == opt.batch_size:
            inflight = self._dispatch(batch, inflight)
            batch = []
        else:  # end
          if batch:
            inflight = self._dispatch(batch, inflight)
          if inflight is not None:
            self._collect(inflight)
            inflight = None
          break
        self._poll()
      while any(not j.finished for j in self.jobs):
        self._poll(block=True)
    finally:
      stop.set()
      while reader.is_alive():
        try:
          q.get(timeout=0.05)
        except queue.Empty:
          pass
      if own_pool:
        self.pool.shutdown(wait=True, cancel_futures=True)
      self.pbar.close()
      for job in self.jobs:
        job.source.close()
    if any(f.startswith('composition') for f in opt.formats):
      exporters.write_composition_table(self.out_dir)
    return self.summaries

  def _dispatch(self, batch, inflight):
    """Starts the predictor on `batch` (asynchronous for jax), then fetches the previous batch."""
    images = np.stack([b[2] for b in batch])
    if self.needs_windows:
      windows = [Window(j.name, t.y0, t.x0, t.height, t.width) for j, t, _ in batch]
      outputs = self.predictor(images, windows=windows)
    else:
      outputs = self.predictor(images)
    if inflight is not None:
      self._collect(inflight)
    return [(j, t) for j, t, _ in batch], outputs

  def _collect(self, inflight) -> None:
    items, outputs = inflight
    maps = {name: np.asarray(value) for name, value in outputs.items()}  # waits for the device
    for name, value in maps.items():
      if value.dtype not in (np.float16, np.float32):
        maps[name] = value.astype(np.float32)
    for i, (job, tile) in enumerate(items):
      args = ({name: value[i] for name, value in maps.items()}, tile, (job.grid.height, job.grid.width),
              self.postprocess_fn, self.opt.postprocess, self.want_masks)
      if self.pool is None:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(tiling.tile_instances(*args))
      else:
        fut = self.pool.submit(tiling.tile_instances, *args)
      job.pending[tile.row][tile.col] = fut
      self.outstanding.append(fut)
    # Back-pressure: bounded work in flight keeps memory flat however large the slide.
    while len(self.outstanding) > self.max_outstanding:
      concurrent.futures.wait([self.outstanding.popleft()])
      self._poll()

  def _poll(self, block: bool = False) -> None:
    """Saves finished rows, exports finished inputs. `block`: wait for at least one future first."""
    while self.outstanding and self.outstanding[0].done():
      self.outstanding.popleft()
    if block and self.outstanding:
      concurrent.futures.wait(list(self.outstanding), return_when=concurrent.futures.FIRST_COMPLETED)
    for job in self.jobs:
      if job.finished:
        continue
      for row in sorted(job.pending):
        futs = job.pending[row]
        if len(futs) < job.row_sizes[row] or not all(f.done() for f in futs.values()):
          continue
        result = tiling.concat_results([futs[c].result() for c in sorted(futs)])
        job.store.save_row(row, result)
        del job.pending[row]
        self.pbar.update(len(futs))
        self.rows_saved += 1
        if self.stop_after_rows is not None and self.rows_saved >= self.stop_after_rows:
          raise StopRun(f'stopped after {self.rows_saved} rows (stop_after_rows)')
      if not job.rows_left and not job.pending:  # every row with tissue is saved: export
        self._finish(job)

  def _finish(self, job: _Job) -> None:
    """Exports one input from its shards."""
    opt, store, view = self.opt, job.store, job.view
    stem = self.out_dir / job.name
    k = len(opt.class_names)
    files = output_files(self.out_dir, job.name, opt.formats, job.source.is_slide)
    if not store.manifest.get('finished'):
      chunks = store.chunks
      if 'geojson' in opt.formats:
        exporters.write_geojson(stem.with_name(job.name + '.geojson'), chunks, opt.class_names, view.scale,
                                opt.model_mpp)
      if 'geojson_points' in opt.formats:
        exporters.write_geojson(stem.with_name(job.name + '_points.geojson'), chunks, opt.class_names,
                                view.scale, opt.model_mpp, points=True)
      if 'csv' in opt.formats:
        exporters.write_csv(stem.with_name(job.name + '.csv'), chunks, opt.class_names, view.scale,
                            opt.model_mpp)
      if 'maps' in opt.formats:
        if job.source.is_slide:
          exporters.write_maps_tiff(stem, store, job.grid, opt.model_mpp)
        else:
          exporters.write_maps_npy(stem, store, (view.height, view.width),
                                   (job.source.height, job.source.width))
      if 'overlay' in opt.formats:
        thumb = job.source.thumbnail(opt.overlay_side)
        exporters.write_overlay(stem.with_name(job.name + '_overlay.png'), thumb, chunks, k,
                                thumb.shape[1] / view.width)
      counts = store.counts(k)
      extra = {'input': str(job.spec.path), 'mpp': opt.model_mpp / view.scale, 'model_mpp': opt.model_mpp,
               'tiles': job.tiles_total}
      if 'composition' in opt.formats:
        exporters.write_composition(stem.with_name(job.name + '_composition.json'),
                                    exporters.composition(job.name, counts, opt.class_names, extra))
      store.manifest['finished'] = True
      store.manifest['counts'] = counts.tolist()
      store._write_manifest()
      if not opt.keep_work:
        for p in store.dir.glob('row_*.npz'):
          p.unlink()
    job.finished = True
    job.source.close()
    counts = store.manifest.get('counts', [0] * k)
    self.summaries.append({'name': job.name, 'input': str(job.spec.path), 'nuclei': int(sum(counts)),
                           'counts': dict(zip(opt.class_names, counts)), 'tiles': job.tiles_total,
                           'files': [str(f) for f in files], 'seconds': time.perf_counter() - job.started})
    logging.info('%s: %d nuclei from %d tiles -> %s', job.name, sum(counts), job.tiles_total, self.out_dir)


def make_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """A spawn-context process pool for post-processing (JAX must not be forked), started right away: each
  worker imports the post-processing stack while the device compiles, not when the first tile arrives."""
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
  for _ in range(workers):
    pool.submit(tiling.warm_up)
  return pool


def predict(inputs: Sequence[InputSpec | str | os.PathLike], predictor: Predictor, output_dir: str | os.PathLike,
            options: Options, *, stop_after_rows: int | None = None,
            executor: concurrent.futures.Executor | None = None) -> list[dict]:
  """Runs tiled inference on every input and writes the requested outputs into `output_dir`.

  Args:
    inputs: files (see `slide.open_source`), each optionally with an mpp override (`InputSpec`).
    predictor: `images uint8[B, h, w, 3] -> (class_probs [B, h, w, K+1], density [B, h, w])`.
    output_dir: created if needed; outputs are `<name>.<ext>` (see `exporters`).
    options: `Options`.
    stop_after_rows: raise `StopRun` after saving this many grid rows (simulates an interruption).
    executor: a process pool to reuse across calls (`make_pool`); None = one per call when workers > 1.
  Returns:
    One summary dict per input processed (name, nuclei, counts per class, tiles, files, seconds).
  """
  specs = [s if isinstance(s, InputSpec) else InputSpec(pathlib.Path(s)) for s in inputs]
  specs = [dataclasses.replace(s, path=pathlib.Path(s.path)) for s in specs]
  out_dir = pathlib.Path(output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  return _Engine(predictor, out_dir, options, stop_after_rows, executor).run(specs)


def clean_work(output_dir: str | os.PathLike) -> None:
  """Removes the resume state (`<output>/.dualunet_work`)."""
  shutil.rmtree(pathlib.Path(output_dir) / WORK_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- predictors

def _qualified_name(fn: Any) -> str:
  return f'{getattr(fn, "__module__", "")}.{getattr(fn, "__qualname__", repr(fn))}'


class MapsPredictor:
  """A window-aware "predictor" that crops precomputed full-image maps (model resolution) for each tile.

  Feeding ground-truth-derived maps (an oracle) through the engine checks tiling and stitching independently
  of any model; precomputed model outputs can be re-post-processed the same way.

  Args:
    maps: input name -> {map name: float[H, W, C]} at model resolution (a method's maps, with 'class_probs').
      Outside the image the class probabilities are background (channel 0 = 1) and every other map 0.
  """
  needs_windows = True

  def __init__(self, maps: dict[str, dict[str, np.ndarray]]):
    self.maps = maps

  def __call__(self, images: np.ndarray, windows: Sequence[Window]) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for w in windows:
      for name, value in self.maps[w.name].items():
        crop = tiling.crop_padded(np.asarray(value, np.float32), w.y0, w.x0, w.height, w.width, 0)
        if name == 'class_probs':
          crop[..., 0] += crop.sum(-1) == 0
        out[name].append(crop)
    return {name: np.stack(values) for name, values in out.items()}


# D4 views as (rot90 k, horizontal flip); the first four keep non-square shapes.
VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))


def average_maps(member_methods: Sequence[Any], graphdefs: Sequence[Any], states: Sequence[Any],
                 margins: Sequence[int], images: Any, views: Sequence[tuple[int, bool]] = VIEWS[:1]) -> dict[str, Any]:
  """The mean of each member's maps over ensemble members and TTA views (traceable: call it under `jax.jit`).

  Every map is a plain mean: class probabilities are averaged after each member's softmax, HV vectors after
  each view is rotated back (`methods.base.undo_view`, by the map's kind).

  Args:
    member_methods: the `methods.Method` of each member (their `maps` and `map_kinds`; the same map names).
    graphdefs, states: `nnx.split` of each member model (eval mode).
    margins: context px per side each member consumes (`base.margin_of`).
    images: uint8|float[B, h + 2M, w + 2M, 3] with M = max(margins); a member with a smaller margin sees them
      centre-cropped to its own.
    views: (rot90 k, horizontal flip) views (`VIEWS`); the default is the image alone.
  Returns:
    {name: float32[B, h, w, C]}.
  """
  import jax.numpy as jnp
  from flax import nnx
  from dualunet_jax.methods import base
  margin = max(margins)
  sums: dict[str, Any] = {}
  for method, graphdef, state, m in zip(member_methods, graphdefs, states, margins):
    model = nnx.merge(graphdef, state)
    x0 = base.center_crop(images, margin - m)
    for k, flip in views:
      x = jnp.rot90(x0, k, axes=(1, 2))
      x = x[:, :, ::-1] if flip else x
      for name, value in method.maps(model(x)).items():
        value = base.undo_view(value.astype(jnp.float32), method.map_kinds[name], k, flip)
        sums[name] = sums[name] + value if name in sums else value
  n = len(graphdefs) * len(views)
  return {name: value / n for name, value in sums.items()}


def model_predictor(models: Sequence[Any], *, method: Any = None, tta_views: int = 1, probs_dtype: str = 'float16',
                    devices: Sequence[Any] | None = None) -> Predictor:
  """A jitted predictor averaging a method's maps over TTA views and models.

  Data parallel over `devices` (default: all local devices): the parameters are replicated, each batch is
  split over the devices (padded with copies of its last tile to a multiple of their count; the padding is
  cut from the outputs). `predictor.num_devices` tells callers how many tiles a batch needs to fill them;
  `predictor.margin` is the context (px per side) the largest-margin model consumes: the engine reads it
  around every tile, and models with a smaller margin see the input cropped to theirs.

  Args:
    models: Flax NNX models of `method` in eval mode (a checkpoint ensemble: same K; encoders may differ).
    method: a `methods.Method` (default DualU-Net).
    tta_views: 1 (none), 2, 4 (flips / rot180: any shape) or 8 (all flips and rot90s); each view is undone
      before averaging, vector maps (HV) rotated back with `methods.base.undo_view`.
    probs_dtype: dtype of the returned class probabilities ('float16' halves device->host and IPC traffic);
      every other map is float32.
    devices: the devices to run on (default `jax.local_devices()`).
  Returns:
    `predictor(images uint8[B, h + 2m, w + 2m, 3]) -> {name: [B, h, w, C]}`, jax arrays (asynchronous).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from dualunet_jax import methods as methods_lib
  from dualunet_jax.methods import base
  if tta_views not in (1, 2, 4, 8):
    raise ValueError(f'tta_views must be 1, 2, 4 or 8, got {tta_views}')
  method = method or methods_lib.get(methods_lib.DEFAULT)
  mesh = Mesh(np.asarray(list(devices) if devices is not None else jax.local_devices()), ('data',))
  splits = [nnx.split(m) for m in models]
  graphdefs = [g for g, _ in splits]
  margins = [base.margin_of(m) for m in models]
  margin = max(margins)
  states = jax.device_put([s for _, s in splits], NamedSharding(mesh, PartitionSpec()))
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  views = VIEWS[:tta_views]
  out_dtype = jnp.dtype(probs_dtype)

  def forward(states, images):
    maps = average_maps([method] * len(graphdefs), graphdefs, states, margins, images, views)
    return {name: value.astype(out_dtype if name == 'class_probs' else jnp.float32) for name, value in maps.items()}

  jitted = jax.jit(forward)

  def predictor(images):
    images = np.asarray(images)
    n = images.shape[0]
    pad = -n % mesh.size
    if pad:  # eval-mode models treat tiles independently: the copies change nothing but the work done
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    maps = jitted(states, jax.device_put(images, batch_sharding))
    return {name: value[:n] for name, value in maps.items()} if pad else maps

  predictor.num_devices = mesh.size
  predictor.margin = margin
  return predictor


def checkpoint_predictor(checkpoints: Sequence[str | os.PathLike], *, which: str | int = 'best',
                         tta_views: int = 1, refine: bool = True) -> tuple[Predictor, Any, str]:
  """Restores checkpoints (workdirs or step folders) of one method into one ensemble predictor.

  Args:
    refine: a checkpoint that holds a refinement stage (two-stage enhancement, `refinement.py`) predicts with
      it; False predicts with its stage-1 model alone (the maps the refinement replaces).

  Returns:
    (predictor, config of the first checkpoint, identity string for resume signatures).
  """
  from dualunet_jax import checkpointing, methods, refinement
  models, configs = [], []
  for path in checkpoints:
    model, config = checkpointing.restore_for_inference(path, which)
    if not refine and refinement.is_two_stage(config):
      model = model.stage1
      config.refine.mode = ''  # the stage-1 method from here on (`methods.get`)
    models.append(model)
    configs.append(config)
  first = configs[0]
  for path, config in zip(checkpoints[1:], configs[1:]):
    if (config.dataset.num_classes != first.dataset.num_classes or config.dataset.mpp != first.dataset.mpp
        or methods.method_name(config) != methods.method_name(first)):
      raise ValueError(f'{path}: cannot ensemble with {checkpoints[0]}: method/num_classes/mpp '
                       f'{methods.method_name(config)}/{config.dataset.num_classes}/{config.dataset.mpp} vs '
                       f'{methods.method_name(first)}/{first.dataset.num_classes}/{first.dataset.mpp}')
  identity = json.dumps({'checkpoints': [str(pathlib.Path(p).resolve()) for p in checkpoints],
                         'which': str(which), 'tta_views': tta_views, **({} if refine else {'refine': False})})
  return model_predictor(models, method=methods.get(first), tta_views=tta_views), first, identity


def expand_inputs(entries: list[str], mpps: list[str]) -> list:
  """--input entries (files, folders, globs) -> `InputSpec`s with their --mpp; raises ValueError if empty."""
  if mpps and len(mpps) not in (1, len(entries)):
    raise ValueError(f'--mpp has {len(mpps)} values for {len(entries)} --input flags; give one or one per input')
  specs = []
  for i, entry in enumerate(entries):
    mpp = float(mpps[0] if len(mpps) == 1 else mpps[i]) if mpps else None
    path = pathlib.Path(entry)
    if path.is_dir():
      files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in slide_lib.INPUT_SUFFIXES),
                     key=natural_key)
      if not files:
        raise ValueError(f'{path}: folder holds no image or slide files ({", ".join(slide_lib.INPUT_SUFFIXES)})')
    elif glob.has_magic(entry):
      files = sorted(pathlib.Path(p) for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
      if not files:
        raise ValueError(f'{entry}: no file matches this pattern')
    else:
      files = [path]
    specs += [InputSpec(f, mpp) for f in files]
  return specs
