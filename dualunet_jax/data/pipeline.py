"""Host-side input pipeline (grain): record -> crop / resize -> targets -> global, data-sharded batches.

Train: `train_loader(config, source, mesh=..., start_step=...)` streams an infinite sequence of batches. The
order is a pure function of `config.seed`: epoch `e` visits the records in the permutation
`default_rng([seed, 0, e])`, cut into global batches of `config.train.batch_size` (the last partial batch of
each pass is dropped); host `h` of `P` takes rows `h*B/P:(h+1)*B/P` of every global batch. The random crop
of a record is a pure function of `(seed, epoch, record index)`. So resuming at `start_step` just slices the
lazy grain `MapDataset` of batches: no skipped record is read, and the batches are bit-identical to an
uninterrupted run's (independently of `num_workers`).

Type-aware sampling (`config.dataset.type_multipliers`, HistoNeXt): pass `e` instead draws its crops, with
replacement, from a grid of crop windows over all training tiles weighted by the multiplier of each window's
dominant nucleus type (`TypeAwareSampler`), from `default_rng([seed, 2, e])`: as deterministic and resumable as
the permutation, but building the loader reads every training record once (the windows' types).

Targets (class map, Gaussian centroid density) are computed here, on the host, from the cropped instance map:
the scipy Gaussian filter is cheap, the centroids must be those of the *visible* part of each cropped nucleus,
and the device-side dihedral augmentation commutes with the rendering up to the 1-px centroid floor (see
`augment.py`). Device-side augmentation then moves image and targets together.

Eval: `eval_batches` yields whole tiles in source order, no augmentation (see its docstring for mixed sizes).

Resize (`config.dataset.resize > 0`, the reference CoNSeP parity mode): square tiles are resized to
resize x resize before cropping (so train crops and whole-tile evaluation see the same scale), the image with
PyTorch's antialiased bicubic (Keys a = -0.5, PIL taps renormalised inside the image) and rounded back to
uint8 (<= 0.5/255 from the reference's float resize), the instance map with PyTorch's legacy nearest
(src = floor(dst * src_size / dst_size)). Only the rows/columns inside the crop are computed.
"""

from collections.abc import Iterator, Mapping, Sequence
import functools
from typing import Any

import grain
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dualunet_jax.data import schema, targets

Record = Mapping[str, Any]
Batch = dict[str, np.ndarray]


class PipelineError(ValueError):
  """Raised for configurations or sources the pipeline cannot serve (e.g. fewer records than a batch)."""


# ---------------------------------------------------------------------------------------------- resize
def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=32)
def bicubic_plan(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
  """Taps of PyTorch `_upsample_bicubic2d_aa` (= PIL bicubic, a = -0.5) along one axis.

  Returns:
    (idx int64[dst, T], weights float32[dst, T]): output i = sum_t weights[i, t] * input[idx[i, t]]; taps
    outside the input have weight 0 (the others are renormalised, PIL style).
  """
  scale = src / dst
  fscale = max(scale, 1.0)  # antialias: widen the filter when downsampling
  support = 2.0 * fscale
  centre = (np.arange(dst) + 0.5) * scale
  xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
  xmax = np.minimum(np.trunc(centre + support + 0.5), src).astype(np.int64)
  taps = int(np.ceil(support)) * 2 + 1
  idx = xmin[:, None] + np.arange(taps)[None]
  w = _keys_cubic((idx - centre[:, None] + 0.5) / fscale) * (idx < xmax[:, None])
  w /= w.sum(axis=1, keepdims=True)
  return np.minimum(idx, src - 1), w.astype(np.float32)


def nearest_plan(src: int, dst: int) -> np.ndarray:
  """PyTorch legacy 'nearest' source index of each output: floor(i * src / dst). int64[dst]."""
  return np.minimum((np.arange(dst, dtype=np.int64) * src) // dst, src - 1)


def _resample_axis(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
  """float32 sum over taps t of w[:, t] * take(x, idx[:, t], axis) (taps with all-zero weights skipped)."""
  x = x.astype(np.float32, copy=False)
  shape = [1] * x.ndim
  shape[axis] = -1
  out = None
  for t in range(idx.shape[1]):
    if not w[:, t].any():
      continue
    term = np.take(x, idx[:, t], axis=axis)
    term *= w[:, t].reshape(shape)
    out = term if out is None else out.__iadd__(term)
  return out


def resize_image(image: np.ndarray, size: tuple[int, int], rows: slice = slice(None),
                 cols: slice = slice(None)) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[size] bicubic-aa; `rows`/`cols` select an output window, computed alone."""
  iy, wy = bicubic_plan(image.shape[0], size[0])
  ix, wx = bicubic_plan(image.shape[1], size[1])
  # Columns first only touches the rows the window needs.
  needed = np.unique(iy[rows])
  sub = image[needed]
  remap = np.searchsorted(needed, iy[rows])
  out = _resample_axis(sub, ix[cols], wx[cols], axis=1)
  out = _resample_axis(out, remap, wy[rows], axis=0)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_map(labels: np.ndarray, size: tuple[int, int], rows: slice = slice(None),
               cols: slice = slice(None)) -> np.ndarray:
  """int[H, W] -> [size] legacy nearest (`rows`/`cols` select a window of the output)."""
  iy = nearest_plan(labels.shape[0], size[0])[rows]
  ix = nearest_plan(labels.shape[1], size[1])[cols]
  return labels[iy[:, None], ix[None, :]]


# ---------------------------------------------------------------------------------------------- transforms
def _relabel_targets(instance_map: np.ndarray, instance_classes: np.ndarray, config: Any) -> Batch:
  """Relabels the (cropped) instance map to 1..M and renders the method's targets (`Method.make_targets`:
  centroids etc. of the visible parts).

  Unlabelled nuclei (class 0, e.g. Lizard ids missing from the table): with K = 1 they are class 1; with K > 1
  they keep their instance (and their density peak / HV vectors) but get class 0 in the class map (the loss has
  no ignore label; evaluation reads class 0 from the class map as "unlabelled", ignored by class metrics).
  """
  from dualunet_jax import methods  # pylint: disable=import-outside-toplevel
  inst, old_ids = targets.relabel_contiguous(instance_map)
  classes = np.asarray(instance_classes, np.int32).reshape(-1)[old_ids - 1] if old_ids.size else \
      np.zeros((0,), np.int32)
  num_classes = int(config.dataset.num_classes)
  unlabelled = classes == 0
  out = dict(methods.get(config).make_targets(inst.astype(np.int32), np.where(unlabelled, 1, classes), config))
  if num_classes > 1 and unlabelled.any():
    out['class_map'] = out['class_map'].copy()
    out['class_map'][np.concatenate([[False], unlabelled])[inst]] = 0
  out['instance_map'] = inst.astype(np.int32)
  return out


def _pad_to(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
  ph, pw = size[0] - x.shape[0], size[1] - x.shape[1]
  if ph <= 0 and pw <= 0:
    return x
  pad = [(0, max(ph, 0)), (0, max(pw, 0))] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, pad, mode=mode) if mode == 'reflect' else np.pad(x, pad)


class TrainTransform:
  """Record -> fixed-shape training example, deterministic per (seed, epoch, record index).

  Steps: (optional) resize of the square tile to `config.dataset.resize` -> random crop of
  `config.dataset.crop_size` (0 = the whole tile) -> relabel the instances visible in the crop -> targets.
  Tiles smaller than the crop are padded at the bottom/right: reflect for the image (plausible texture), 0 for
  the maps (background, no nucleus, no density). With `class_balanced_sampling` the crop is centred (+-c/4
  jitter) on a random pixel of a class drawn uniformly from the classes present in the tile (this project's
  simple rare-class sampler), so rare classes are seen about as often as frequent ones. A `window` given by
  the caller (HistoNeXt's type-aware sampling, `TypeAwareSampler`) fixes the crop instead.

  Returns:
    {'image': uint8[c, c, 3], 'class_map': int32[c, c], 'instance_map': int32[c, c], and the method's targets,
    e.g. DualU-Net's 'density': float32[c, c]} (c = crop side; with crop_size 0 the (resized) tile shape).
  """

  def __init__(self, config: Any):
    self.config = config
    self.seed = int(config.seed)
    self.crop = int(config.dataset.crop_size)
    self.resize = int(config.dataset.resize)
    self.balanced = bool(config.dataset.class_balanced_sampling)

  def rng(self, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, 1, int(epoch), int(index)])

  def _balanced_centre(self, record: Record, rng: np.random.Generator, tile: tuple[int, int]):
    """(y, x) in output-tile coordinates of a random pixel of a uniformly drawn present class, or None."""
    inst = np.asarray(record[schema.INSTANCE_MAP])
    classes = np.asarray(record[schema.INSTANCE_CLASSES], np.int32).reshape(-1)
    present = np.unique(classes[classes > 0])
    if present.size == 0:
      return None
    k = rng.choice(present)
    lut = np.concatenate([[False], classes == k])
    ys, xs = np.nonzero(lut[np.minimum(inst, classes.size)])
    if ys.size == 0:
      return None
    j = rng.integers(ys.size)
    sy, sx = tile[0] / inst.shape[0], tile[1] / inst.shape[1]  # source -> (resized) tile coordinates
    return int((ys[j] + 0.5) * sy), int((xs[j] + 0.5) * sx)

  def __call__(self, record: Record, epoch: int = 0, index: int = 0,
               window: tuple[int, int] | None = None) -> Batch:
    """`window`: the crop's top-left corner (y0, x0) in (resized) tile pixels, chosen by the caller (type-aware
    sampling) instead of at random."""
    rng = self.rng(epoch, index)
    image = np.asarray(record[schema.IMAGE])
    inst = np.asarray(record[schema.INSTANCE_MAP])
    h, w = image.shape[:2]
    if self.resize:
      if h != w:
        raise PipelineError(f'config.dataset.resize needs square tiles, got {h}x{w} ({record.get("name")!r})')
      h = w = self.resize
    ch, cw = (self.crop, self.crop) if self.crop else (h, w)
    centre = self._balanced_centre(record, rng, (h, w)) if (self.balanced and self.crop) else None
    if window is not None:
      y0, x0 = int(window[0]), int(window[1])
    elif centre is None:
      y0 = int(rng.integers(0, max(h - ch, 0) + 1))
      x0 = int(rng.integers(0, max(w - cw, 0) + 1))
    else:
      jy, jx = rng.integers(-(ch // 4), ch // 4 + 1, size=2)
      y0 = int(np.clip(centre[0] + jy - ch // 2, 0, max(h - ch, 0)))
      x0 = int(np.clip(centre[1] + jx - cw // 2, 0, max(w - cw, 0)))
    rows, cols = slice(y0, min(y0 + ch, h)), slice(x0, min(x0 + cw, w))
    if self.resize:
      image = resize_image(image, (h, w), rows, cols)
      inst = resize_map(inst, (h, w), rows, cols)
    else:
      image, inst = image[rows, cols], inst[rows, cols]
    image = _pad_to(image, (ch, cw), 'reflect')
    inst = _pad_to(inst, (ch, cw), 'constant')
    out = {'image': np.ascontiguousarray(image, np.uint8)}
    out.update(_relabel_targets(inst, record[schema.INSTANCE_CLASSES], self.config))
    return out


def eval_example(record: Record, config: Any) -> Batch:
  """Whole tile (resized to `config.dataset.resize` when > 0) with its targets; same keys as training."""
  image = np.asarray(record[schema.IMAGE])
  inst = np.asarray(record[schema.INSTANCE_MAP])
  if int(config.dataset.resize):
    r = int(config.dataset.resize)
    image, inst = resize_image(image, (r, r)), resize_map(inst, (r, r))
  out = {'image': np.ascontiguousarray(image, np.uint8)}
  out.update(_relabel_targets(inst, record[schema.INSTANCE_CLASSES], config))
  return out


# ---------------------------------------------------------------------------------------------- type-aware sampling
def _pixel_classes(record: Record) -> np.ndarray:
  """int32[H, W]: the class (1..K) of the nucleus covering each pixel, 0 for background and unlabelled nuclei."""
  inst = np.asarray(record[schema.INSTANCE_MAP])
  classes = np.asarray(record[schema.INSTANCE_CLASSES], np.int32).reshape(-1)
  lut = np.concatenate([np.zeros(1, np.int32), np.maximum(classes, 0)])
  return lut[np.minimum(inst, classes.size)]


def _window_starts(size: int, crop: int, stride: int) -> np.ndarray:
  """Crop offsets 0, stride, 2 stride, ... along one axis, plus the last one (size - crop) so the far edge is
  covered; a single 0 when the tile is no larger than the crop (it is padded)."""
  last = max(size - crop, 0)
  return np.unique(np.append(np.arange(0, last + 1, stride), last))


def dominant_types(class_map: np.ndarray, crop: tuple[int, int], stride: int, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The dominant nucleus type of every crop window of a grid over one tile.

  Args:
    class_map: int[H, W] per-pixel class, 0 background / unlabelled, 1..K nuclei.
    crop: (ch, cw) window size; stride: grid step in pixels.
    num_classes: K.
  Returns:
    (y0 int32[n], x0 int32[n], dominant int32[n]): the windows' top-left corners (row-major) and their
    dominant type, the class with the most nucleus pixels inside (ties: the lower class), 0 when the window
    holds no labelled nucleus pixel. Pixel counts come from one summed-area table per class.
  """
  ys = _window_starts(class_map.shape[0], crop[0], stride)
  xs = _window_starts(class_map.shape[1], crop[1], stride)
  ye = np.minimum(ys + crop[0], class_map.shape[0])
  xe = np.minimum(xs + crop[1], class_map.shape[1])
  counts = np.zeros((num_classes, ys.size, xs.size), np.int64)
  for k in range(1, num_classes + 1):
    table = np.pad(np.cumsum(np.cumsum(class_map == k, axis=0, dtype=np.int64), axis=1), ((1, 0), (1, 0)))
    counts[k - 1] = (table[ye][:, xe] - table[ys][:, xe] - table[ye][:, xs] + table[ys][:, xs])
  dominant = np.where(counts.max(axis=0) > 0, counts.argmax(axis=0) + 1, 0)
  yy, xx = np.meshgrid(ys, xs, indexing='ij')
  return yy.ravel().astype(np.int32), xx.ravel().astype(np.int32), dominant.ravel().astype(np.int32)


class TypeAwareSampler:
  """HistoNeXt type-aware patch sampling (`config.dataset.type_multipliers`).

  The patches are the crop windows of a grid (step `config.dataset.type_sampling_stride`, 0 = crop / 8) over
  every training tile, each labelled once, on the host, with its dominant nucleus type (`dominant_types`: most
  nucleus *pixels*, the paper's rule). A patch is drawn with probability proportional to the multiplier of its
  dominant type (1 for patches without a labelled nucleus), with replacement, so P(dominant type k) =
  m_k n_k / sum_j m_j n_j for n_k patches of type k. Each pass ("epoch" of `len(source)` samples, as without
  sampling) draws its patches from `default_rng([seed, 2, epoch])`: deterministic per seed and resumable like
  the permutation it replaces. Crops are exactly the drawn windows (no jitter, so the crop's dominant type is
  the patch's); the grid step sets how finely crops tile the image.

  Attributes:
    tile, y0, x0, dominant: int32[n] per patch (record index, window corner in (resized) tile pixels, type).
    probabilities: float64[n], summing to 1.
  """

  def __init__(self, source: Sequence[Record], config: Any):
    multipliers = np.asarray(tuple(config.dataset.type_multipliers), np.float64)
    num_classes = int(config.dataset.num_classes)
    if multipliers.shape != (num_classes,):
      raise PipelineError(f'config.dataset.type_multipliers has {multipliers.size} values; it needs one per '
                          f'class ({num_classes}), or none for uniform sampling')
    if not np.all(np.isfinite(multipliers)) or np.any(multipliers < 0) or not np.any(multipliers > 0):
      raise PipelineError(f'config.dataset.type_multipliers must be finite, >= 0 and not all 0, got '
                          f'{tuple(multipliers)}')
    if bool(config.dataset.class_balanced_sampling):
      raise PipelineError('config.dataset.type_multipliers and class_balanced_sampling both choose the crops; '
                          'set one of them')
    self.seed = int(config.seed)
    crop, resize = int(config.dataset.crop_size), int(config.dataset.resize)
    stride = int(config.dataset.get('type_sampling_stride', 0)) or max(crop // 8, 1)
    parts = []
    for i in range(len(source)):
      cls = _pixel_classes(source[i])
      if resize:
        cls = resize_map(cls, (resize, resize))
      size = (crop or cls.shape[0], crop or cls.shape[1])
      y0, x0, dominant = dominant_types(cls, size, stride, num_classes)
      parts.append((np.full(y0.size, i, np.int32), y0, x0, dominant))
    self.tile, self.y0, self.x0, self.dominant = (np.concatenate(p) for p in zip(*parts))
    weights = np.concatenate([[1.0], multipliers])[self.dominant]
    if not weights.sum() > 0:
      raise PipelineError('config.dataset.type_multipliers: every patch of the training split has weight 0')
    self.probabilities = weights / weights.sum()
    self._draws: dict[tuple[int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return int(self.tile.size)

  def expected_fractions(self, num_classes: int) -> np.ndarray:
    """float64[K + 1]: the probability that a drawn patch has dominant type k (0 = none)."""
    return np.bincount(self.dominant, weights=self.probabilities, minlength=num_classes + 1)

  def draws(self, epoch: int, count: int) -> np.ndarray:
    """int64[count]: the patches of pass `epoch` (a pure function of (seed, epoch)); cached for a few passes."""
    key = (int(epoch), int(count))
    if key not in self._draws:
      if len(self._draws) > 4:
        self._draws.clear()
      rng = np.random.default_rng([self.seed, 2, key[0]])
      self._draws[key] = rng.choice(len(self), size=key[1], p=self.probabilities)
    return self._draws[key]


# ---------------------------------------------------------------------------------------------- loaders
def default_mesh() -> Mesh:
  """All devices on one 'data' axis."""
  return Mesh(np.array(jax.devices()), ('data',))


def _global_batch_size(config: Any) -> int:
  bs = int(config.train.batch_size)
  if bs < 1 or bs % jax.process_count():
    raise PipelineError(f'train.batch_size={bs} must be a positive multiple of the process count '
                        f'{jax.process_count()}')
  return bs


def passes_batches(config: Any, source: Sequence[Record]) -> int:
  """Global batches in one pass over `source` (the last partial batch is dropped)."""
  bs = _global_batch_size(config)
  n = len(source) // bs
  if n < 1:
    raise PipelineError(f'the training source has {len(source)} records, fewer than one global batch ({bs})')
  return n


def steps_per_epoch(config: Any, source: Sequence[Record]) -> int:
  """`config.train.steps_per_epoch`, or (0) the global batches in one pass over `source`."""
  if int(config.train.steps_per_epoch) > 0:
    return int(config.train.steps_per_epoch)
  return passes_batches(config, source)


class _TrainSample:
  """Local sample index -> training example (picklable: shipped to grain worker processes).

  Local index i of host h: step s = i // L, row j = i % L; global position g = s * G + h * L + j; pass e =
  g // (N * G) (N batches per pass), record = permutation_e[g % (N * G)].
  """

  def __init__(self, source: Sequence[Record], transform: TrainTransform, num_batches: int, global_bs: int,
               local_bs: int, host: int, sampler: TypeAwareSampler | None = None):
    self.source, self.transform, self.sampler = source, transform, sampler
    self.num_batches, self.global_bs, self.local_bs, self.host = num_batches, global_bs, local_bs, host
    self.num_records = len(source)
    self._perms: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      rng = np.random.default_rng([self.transform.seed, 0, epoch])
      self._perms[epoch] = rng.permutation(self.num_records)
    return self._perms[epoch]

  def _position(self, i: int) -> tuple[int, int]:
    step, j = divmod(int(i), self.local_bs)
    position = step * self.global_bs + self.host * self.local_bs + j
    return divmod(position, self.num_batches * self.global_bs)

  def record_index(self, i: int) -> tuple[int, int]:
    epoch, pos = self._position(i)
    if self.sampler is not None:
      return epoch, int(self.sampler.tile[self.patch_index(i)])
    return epoch, int(self.permutation(epoch)[pos])

  def patch_index(self, i: int) -> int:
    """Type-aware sampling: the index of local sample i's patch in `self.sampler`."""
    epoch, pos = self._position(i)
    return int(self.sampler.draws(epoch, self.num_batches * self.global_bs)[pos])

  def __call__(self, i: int) -> Batch:
    epoch, index = self.record_index(i)
    if self.sampler is None:
      return self.transform(self.source[index], epoch, index)
    p = self.patch_index(i)
    return self.transform(self.source[index], epoch, index, window=(self.sampler.y0[p], self.sampler.x0[p]))


def local_train_dataset(config: Any, source: Sequence[Record], *, start_step: int = 0) -> grain.MapDataset:
  """The lazy, infinite grain MapDataset of this host's local batches, starting at global step `start_step`.

  Element k is the numpy batch {key: [B / process_count, ...]} of step start_step + k.
  """
  global_bs = _global_batch_size(config)
  local_bs = global_bs // jax.process_count()
  sampler = TypeAwareSampler(source, config) if tuple(config.dataset.get('type_multipliers', ())) else None
  fn = _TrainSample(source, TrainTransform(config), passes_batches(config, source), global_bs, local_bs,
                    jax.process_index(), sampler)
  # "Infinite": 2**40 local samples is ~10^12, far beyond any run; range/map/batch/slice are all lazy.
  ds = grain.MapDataset.range(2 ** 40 - (2 ** 40) % local_bs).map(fn)
  return ds.batch(local_bs, drop_remainder=True)[int(start_step):]


def _to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train_loader(config: Any, source: Sequence[Record], *, mesh: Mesh | None = None,
                 start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Infinite iterator of global training batches, sharded over the mesh's 'data' axis.

  Args:
    config: the experiment config (dataset.*, targets.*, train.batch_size global, seed).
    source: random-access records (len + __getitem__), e.g. `sources.load_source(...)` or a list.
    mesh: device mesh with a 'data' axis (default: all devices).
    start_step: global step to start at; yields exactly the batches an uninterrupted run yields from there.

  Yields:
    {'image': uint8[B, c, c, 3], 'class_map': int32[B, c, c], 'density': float32[B, c, c],
     'instance_map': int32[B, c, c]} as global jax.Arrays, B = config.train.batch_size.
    `config.dataset.num_workers` grain worker processes (0 = threads in this process) prefetch
    `config.dataset.prefetch` batches each; one further batch is transferred to devices ahead.
    With crop_size 0 every (resized) tile must have the same shape (batches are stacked); use crops for
    variable-size datasets. Raises PipelineError when the source holds fewer records than one global batch.
  """
  mesh = mesh or default_mesh()
  sharding = NamedSharding(mesh, P('data'))
  workers = int(config.dataset.num_workers)
  prefetch = max(1, int(config.dataset.prefetch))
  ds = local_train_dataset(config, source, start_step=start_step)
  # In workers one thread each (the work is numpy-bound, the workers are the parallelism); in-process a few
  # threads overlap numpy sections that release the GIL.
  threads = 1 if workers > 0 else 2
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
  it_ds = ds.to_iter_dataset(read)
  if workers > 0:
    _ensure_flags_parsed()
    mp = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
    it_ds = it_ds.mp_prefetch(mp)
  return _device_prefetch(iter(it_ds), sharding)


def _ensure_flags_parsed() -> None:
  # grain's multiprocess prefetch reads its absl flags; outside an absl app (tests, notebooks, benchmarks)
  # they are unparsed and reading them raises. Marking them parsed keeps grain's defaults; under `app.run`
  # (our CLIs) this is a no-op.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _device_prefetch(it: Iterator[Batch], sharding: NamedSharding) -> Iterator[dict[str, jax.Array]]:
  """Keeps one batch in flight to the devices (transfers are asynchronous)."""
  try:
    ahead = _to_global(next(it), sharding)
    for batch in it:
      current, ahead = ahead, _to_global(batch, sharding)
      yield current
    yield ahead
  finally:
    close = getattr(it, 'close', None)
    if close is not None:
      close()


def eval_batches(config: Any, source: Sequence[Record], *, batch_size: int,
                 mesh: Mesh | None = None) -> Iterator[tuple[dict[str, jax.Array], list[Record]]]:
  """Whole tiles in source order, each exactly once, no augmentation.

  Consecutive records of the same (resized) shape share a batch; a shape change or the end of the source
  closes the batch early. Every batch is padded (zero images and maps) to `batch_size` rounded up to a
  multiple of the 'data' axis, so at most one compile per tile shape; `batch['valid']` bool[B] marks the
  real rows, which are rows 0..len(records)-1. Mixed-size sources therefore still work (in the worst case,
  alternating sizes, one tile per batch). Every host reads every record (to agree on the grouping) but
  transfers only its rows.

  Yields:
    (batch, records): batch = {'image': uint8[B, H, W, 3], 'class_map': int32[B, H, W], 'density':
    float32[B, H, W], 'instance_map': int32[B, H, W] (on the evaluated grid, relabelled 1..N),
    'valid': bool[B]}
    as global jax.Arrays; records = the source records of the valid rows, in order.
  """
  mesh = mesh or default_mesh()
  sharding = NamedSharding(mesh, P('data'))
  ndev = mesh.shape['data']
  padded = -(-int(batch_size) // ndev) * ndev
  pc, pi = jax.process_count(), jax.process_index()
  if padded % pc:
    raise PipelineError(f'eval batch {padded} is not divisible by the process count {pc}')
  local = padded // pc

  def emit(examples: list[Batch], records: list[Record]):
    n = len(examples)
    stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    full = {k: np.concatenate([v, np.zeros((padded - n, *v.shape[1:]), v.dtype)]) for k, v in stacked.items()}
    full['valid'] = np.arange(padded) < n
    mine = {k: v[pi * local:(pi + 1) * local] for k, v in full.items()}
    return _to_global(mine, sharding), records

  examples, records = [], []
  for i in range(len(source)):
    record = source[i]
    example = eval_example(record, config)
    if examples and (example['image'].shape != examples[0]['image'].shape or len(examples) == batch_size):
      yield emit(examples, records)
      examples, records = [], []
    examples.append(example)
    records.append(record)
  if examples:
    yield emit(examples, records)
