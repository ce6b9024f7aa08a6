"""Evaluation of a model on a split: device inference, host post-processing in worker processes overlapped
with the device, dataset-level metrics and overlays (robustness protocols: `robustness.py`).

    evaluate(model, source, config) -> {'f1_d': ..., 'f1_c_mean': ..., 'dice': ..., 'bpq': ..., ...}
"""

import collections
import json
import os
import pathlib
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from scipy import ndimage
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualunet_jax import methods
from dualunet_jax import metrics as metrics_lib
from dualunet_jax import postprocess as postprocess_lib
from dualunet_jax.data import pipeline, schema

Forward = Callable[[jax.Array], dict[str, jax.Array]]


def make_forward(model: nnx.Module, mesh: Mesh | None = None, method: Any = None) -> Forward:
  """A jitted `images float|uint8[B, H, W, 3] -> {name: float32[B, H, W, C]}` of `model` in eval mode: the
  method's maps (`Method.forward_maps`: softmax class probabilities and the method's other maps, covering
  the whole image), with the model state replicated over `mesh` (default: all devices) so batches sharded
  on its 'data' axis fit it. `method` defaults to DualU-Net."""
  method = method or methods.get(methods.DEFAULT)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh or pipeline.default_mesh(), P()))

  @jax.jit
  def forward(state, images):
    m = nnx.merge(graphdef, state)
    m.eval()
    return method.forward_maps(m, images)

  return lambda images: forward(state, images)


class _Transformed:
  """A random-access view of `source` with `transform(record, index)` applied on read."""

  def __init__(self, source: Any, transform: Callable[[dict, int], dict]):
    self.source, self.transform = source, transform

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return self.transform(self.source[i], i)


class Prefix:
  """The first `n` records of `source`."""

  def __init__(self, source: Any, n: int):
    self.source, self.n = source, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def _host(x: jax.Array) -> np.ndarray:
  """A global array as a full numpy array on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def predict_maps(forward: Forward, source: Any, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                 ) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
  """Yields (record, maps {name: float32[H, W, C]}) for each record, in order.

  The record's `image` and `instance_map` are those of the evaluated grid (`pipeline.eval_batches`: whole
  tiles, resized in the reference's parity mode). The next batch is dispatched to the devices before the
  current one is copied back (asynchronous dispatch keeps the device busy while the host post-processes).
  """
  pending = None
  for batch, records in pipeline.eval_batches(config, source, batch_size=config.eval.batch_size, mesh=mesh):
    outputs = forward(batch['image'])
    if pending is not None:
      yield from _emit(*pending)
    pending = (batch, records, outputs)
  if pending is not None:
    yield from _emit(*pending)


def _emit(batch, records, outputs):
  maps = {name: _host(value) for name, value in outputs.items()}
  images, instance_maps, class_maps = (_host(batch[k]) for k in ('image', 'instance_map', 'class_map'))
  for j, record in enumerate(records):
    # The evaluated grid was relabelled 1..N (a resize can drop tiny nuclei, shifting ids), so each nucleus
    # takes its class from the evaluated class map, which is constant over a nucleus.
    inst = instance_maps[j]
    n = int(inst.max())
    classes = ndimage.maximum(class_maps[j], labels=inst, index=np.arange(1, n + 1)).astype(np.int32) if n \
        else np.zeros((0,), np.int32)
    evaluated = dict(record, image=images[j], instance_map=inst, instance_classes=classes)
    yield evaluated, {name: value[j] for name, value in maps.items()}


def evaluate(model: nnx.Module | Forward, source: Any, config: ml_collections.ConfigDict, *,
             mesh: Mesh | None = None, max_images: int = 0, overlays_dir: str | os.PathLike | None = None,
             num_overlays: int = 0, transform: Callable[[dict, int], dict] | None = None,
             desc: str = 'evaluate', per_image: list | None = None) -> dict[str, float]:
  """Dataset-level metrics of `model` on `source` (metrics.py documents each average).

  Post-processing runs in `config.postprocess.workers` processes while the device computes the next batch.
  `transform(record, index)` rewrites each record first (robustness views). `per_image`, when a list, receives
  one dict per image (name, counts of GT and predicted nuclei).

  Besides the instance metrics: `pixel_{precision,recall,dice,iou}` of the foreground mask the method's
  post-processing uses, pooled over the split (the two-stage enhancement paper's metrics). A refinement run
  (`refinement.py`) is scored twice from one forward pass: the refined maps (the plain keys) and the stage-1
  maps (every key again with the prefix `stage1_`).
  """
  from tqdm import tqdm
  from dualunet_jax import refinement

  mesh = mesh or pipeline.default_mesh()
  method = methods.get(config)
  forward = make_forward(model, mesh, method) if isinstance(model, nnx.Module) else model
  num_classes = config.dataset.num_classes
  n = len(source) if not max_images else min(max_images, len(source))
  source = Prefix(source, n)
  if transform is not None:
    source = _Transformed(source, transform)
  new_accumulator = lambda: metrics_lib.MetricsAccumulator(num_classes, match_radius=config.eval.match_radius,
                                                           class_names=tuple(config.dataset.class_names))
  two_stage = refinement.is_two_stage(config)
  variants = ('', refinement.STAGE1_PREFIX) if two_stage else ('',)  # key prefix of each scored version
  accumulators = {v: new_accumulator() for v in variants}
  pixels = {v: refinement.PixelMetrics() for v in variants}
  overlays = pathlib.Path(overlays_dir) if overlays_dir and num_overlays else None
  if overlays is not None:
    overlays.mkdir(parents=True, exist_ok=True)
  window = collections.deque()
  with postprocess_lib.PostProcessor(config.postprocess.workers, method.postprocess_fn,
                                     **method.postprocess_kwargs(config)) as processor:

    def drain(limit):
      while len(window) > limit:
        index, record, futures = window.popleft()
        results = {v: f.result() for v, f in futures.items()}
        for v, result in results.items():
          accumulators[v].add(record[schema.INSTANCE_MAP], record[schema.INSTANCE_CLASSES], result)
        instances = results['']
        if per_image is not None:
          per_image.append({'name': schema.decode_text(record[schema.NAME]),
                            'n_gt': int(len(record[schema.INSTANCE_CLASSES])),
                            'n_pred': int(len(instances.classes)),
                            'pred_counts': [int(c) for c in instances.counts]})
        if overlays is not None and index < num_overlays:
          save_overlay(overlays / f'{index:04d}_{schema.decode_text(record[schema.NAME])}.png', record, instances,
                       num_classes)

    bar = tqdm(total=n, desc=desc, unit='img', leave=False, disable=jax.process_index() != 0)
    for index, (record, maps) in enumerate(predict_maps(forward, source, config, mesh=mesh)):
      versions = {'': refinement.refined(maps)}
      if two_stage:
        versions[refinement.STAGE1_PREFIX] = refinement.unrefined(maps)
      gt_fg = np.asarray(record[schema.INSTANCE_MAP]) > 0
      for v, version in versions.items():
        pixels[v].add(refinement.foreground_mask(method.name, version), gt_fg)
      window.append((index, record, {v: processor.submit(version) for v, version in versions.items()}))
      drain(limit=4 * max(1, processor.workers))  # bounded: host memory stays flat
      bar.update(1)
    drain(limit=0)
    bar.close()
  out: dict[str, float] = {}
  for v in variants:
    out.update({v + k: value for k, value in {**accumulators[v].result(), **pixels[v].result()}.items()})
  return out


# ------------------------------------------------------------------------------------------- overlays

# Class 0 unused; then red, green, yellow, cyan, magenta, orange, white: all visible on H&E's pink and purple.
CLASS_COLOURS = np.array([(0, 0, 0), (255, 0, 0), (0, 200, 0), (255, 230, 0), (0, 230, 230), (255, 0, 255),
                          (255, 140, 0), (255, 255, 255)], np.uint8)


def class_colour(c: int) -> tuple[int, int, int]:
  return tuple(int(v) for v in CLASS_COLOURS[c % len(CLASS_COLOURS)])


def _outline(image: np.ndarray, instance_map: np.ndarray, class_of_label: np.ndarray) -> np.ndarray:
  from skimage.segmentation import find_boundaries
  out = image.copy()
  edges = find_boundaries(instance_map, mode='inner')
  out[edges] = CLASS_COLOURS[class_of_label[instance_map[edges]] % len(CLASS_COLOURS)]
  return out


def save_overlay(path: pathlib.Path, record: dict, instances: Any, num_classes: int) -> None:
  """Side by side: ground-truth outlines | predicted outlines, coloured by class."""
  from PIL import Image
  image = record[schema.IMAGE]
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  gt_classes = np.concatenate([[0], np.asarray(record[schema.INSTANCE_CLASSES])])
  pred_classes = np.concatenate([[0], np.asarray(instances.classes)])
  gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
  panel = np.concatenate([_outline(image, record[schema.INSTANCE_MAP], gt_classes), gap,
                          _outline(image, instances.instance_map, pred_classes)], axis=1)
  tmp = path.with_suffix('.tmp.png')
  Image.fromarray(panel).save(tmp)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- reporting

def format_table(results: dict[str, float], class_names: tuple[str, ...]) -> str:
  """A plain-text table: the headline metrics, then precision/recall/F1 per class."""
  lines = []
  headline = [('detection F1', 'f1_d'), ('detection precision', 'precision_d'), ('detection recall', 'recall_d'),
              ('mean class F1', 'f1_c_mean'), ('Dice (binary)', 'dice'), ('pixel accuracy', 'pixel_accuracy'),
              ('AJI', 'aji'), ('bPQ', 'bpq'), ('bDQ', 'bdq'), ('bSQ', 'bsq'), ('mPQ (PanNuke)', 'mpq'),
              ('mPQ (pooled, reference)', 'mpq_pooled'), ('mPQ+ (CoNIC)', 'mpq_plus'), ('R² counts', 'r2')]
  for label, key in headline:
    if key in results and results[key] is not None:
      lines.append(f'  {label:<26s} {results[key]:.4f}')
  lines.append(f"  {'class':<16s} {'F1':>7s} {'PQ':>7s}   (PQ pooled over the split, as the reference's mPQ)")
  for name in class_names:
    cells = [results.get(f'{m}_{name}') for m in ('f1_c', 'pq')]
    lines.append(f'  {name:<16s} ' + ' '.join(f'{v:7.4f}' if isinstance(v, float) else f"{'-':>7s}"
                                                for v in cells))
  return '\n'.join(lines)


def json_safe(value: Any) -> Any:
  """Strict JSON: NaN/inf (an undefined metric, e.g. a class absent from the split) become null, numpy
  scalars become Python numbers."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: pathlib.Path, payload: dict) -> None:
  """Atomic, strict JSON write (temporary file, then rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False))
  os.replace(tmp, path)
