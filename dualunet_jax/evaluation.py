"""Evaluation of a model on a split: device inference, host post-processing in worker processes overlapped
with the device, dataset-level metrics and overlays (robustness protocols: `robustness.py`).

    evaluate(model, source, config) -> {'f1_d': ..., 'f1_c_mean': ..., 'dice': ..., 'bpq': ..., ...}
"""

import collections
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
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


def make_forward(model: nnx.Module | Sequence[nnx.Module], mesh: Mesh | None = None, method: Any = None,
                 member_methods: Sequence[Any] | None = None) -> Forward:
  """A jitted `images float|uint8[B, H, W, 3] -> {name: float32[B, H, W, C]}` of `model` in eval mode: the
  method's maps (`Method.forward_maps`: softmax class probabilities and the method's other maps, covering
  the whole image), with the model state replicated over `mesh` (default: all devices) so batches sharded
  on its 'data' axis fit it. `method` defaults to DualU-Net.

  An ensemble (a sequence of models, encoders may differ; `member_methods` gives each one's method, default
  `method`): the members' maps are averaged (`inference.engine.average_maps`, as `predict`'s ensembles), the
  image reflect-padded by the largest margin as `forward_maps` does."""
  method = method or methods.get(methods.DEFAULT)
  if not isinstance(model, nnx.Module):
    return _ensemble_forward(list(model), mesh, list(member_methods or [method] * len(model)))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh or pipeline.default_mesh(), P()))

  @jax.jit
  def forward(state, images):
    m = nnx.merge(graphdef, state)
    m.eval()
    return method.forward_maps(m, images)

  return lambda images: forward(state, images)


def _ensemble_forward(models: list[nnx.Module], mesh: Mesh | None, member_methods: list[Any]) -> Forward:
  from dualunet_jax.inference import engine
  from dualunet_jax.methods import base
  for m in models:
    m.eval()
  splits = [nnx.split(m) for m in models]
  graphdefs = [g for g, _ in splits]
  margins = [base.margin_of(m) for m in models]
  states = jax.device_put([s for _, s in splits], NamedSharding(mesh or pipeline.default_mesh(), P()))

  @jax.jit
  def forward(states, images):
    m = max(margins)
    if m:
      images = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode='reflect')
    return engine.average_maps(member_methods, graphdefs, states, margins, images)

  return lambda images: forward(states, images)


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
             desc: str = 'evaluate', per_image: list | None = None,
             conic_output: str | os.PathLike | None = None) -> dict[str, float]:
  """Dataset-level metrics of `model` on `source` (metrics.py documents each average).

  Post-processing runs in `config.postprocess.workers` processes while the device computes the next batch.
  `transform(record, index)` rewrites each record first (robustness views). `per_image`, when a list, receives
  one dict per image (name, counts of GT and predicted nuclei).

  Besides the instance metrics: `pixel_{precision,recall,dice,iou}` of the foreground mask the method's
  post-processing uses, pooled over the split (the two-stage enhancement paper's metrics). A refinement run
  (`refinement.py`) is scored twice from one forward pass: the refined maps (the plain keys) and the stage-1
  maps (every key again with the prefix `stage1_`).

  CoNIC (`config.dataset.name == 'conic'`, 256² patches): `r2` is the challenge's R², of the nuclei in the
  central 224² of each patch (`conic.counts_in_centre`, = counts.csv); the whole-patch R² (what `r2` means on
  every other dataset, e.g. CoNSeP's 1000² tiles) is kept as `r2_whole_patch`. `conic_output`, a folder,
  receives the predictions in the challenge's format for its own scoring script: `pred_labels.npy` int32[N, H,
  W, 2] (instance map, class map) and `pred_counts.csv` (central counts on CoNIC, whole-image counts on other
  datasets; columns `config.dataset.class_names`).
  """
  from tqdm import tqdm
  from dualunet_jax import conic, refinement

  mesh = mesh or pipeline.default_mesh()
  method = methods.get(config)
  is_models = isinstance(model, nnx.Module) or (isinstance(model, (list, tuple)) and
                                                 all(isinstance(m, nnx.Module) for m in model))
  forward = make_forward(model, mesh, method) if is_models else model
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
  is_conic = config.dataset.name == 'conic'
  centre_counts = {v: ([], []) for v in variants}  # CoNIC: (GT, predicted) central counts per image
  conic_dir = pathlib.Path(conic_output) if conic_output else None
  conic_labels = None  # pred_labels.npy, memory-mapped (all patches need not fit in memory)
  written_counts = []
  overlays = pathlib.Path(overlays_dir) if overlays_dir and num_overlays else None
  if overlays is not None:
    overlays.mkdir(parents=True, exist_ok=True)
  window = collections.deque()
  with postprocess_lib.PostProcessor(config.postprocess.workers, method.postprocess_fn,
                                     **method.postprocess_kwargs(config)) as processor:

    def drain(limit):
      nonlocal conic_labels
      while len(window) > limit:
        index, record, futures = window.popleft()
        results = {v: f.result() for v, f in futures.items()}
        if is_conic:  # the ground truth's central counts, once per image (the same for every variant)
          gt_centre = conic.counts_in_centre(_labels(record[schema.INSTANCE_MAP], record[schema.INSTANCE_CLASSES]),
                                             num_classes)[0]
        for v, result in results.items():
          accumulators[v].add(record[schema.INSTANCE_MAP], record[schema.INSTANCE_CLASSES], result)
          if is_conic:
            centre_counts[v][0].append(gt_centre)
            centre_counts[v][1].append(conic.counts_in_centre(_labels(result.instance_map, result.classes),
                                                              num_classes)[0])
        instances = results['']
        if conic_dir is not None:
          pred = _labels(instances.instance_map, instances.classes)
          written_counts.append(centre_counts[''][1][-1] if is_conic else  # central counts, computed above
                                conic.counts_in_centre(pred, num_classes, crop=0)[0])
          if conic_labels is None:
            conic_dir.mkdir(parents=True, exist_ok=True)
            conic_labels = np.lib.format.open_memmap(conic_dir / 'pred_labels.npy', mode='w+', dtype=np.int32,
                                                     shape=(n, *pred.shape))
          if pred.shape != conic_labels.shape[1:]:
            raise ValueError(f'{conic_dir / "pred_labels.npy"}: image {index} is {pred.shape[:2]}, the first was '
                             f'{conic_labels.shape[1:3]}; the CoNIC format needs one patch size')
          conic_labels[index] = pred
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
    if is_conic and centre_counts[v][0]:
      out[v + 'r2_whole_patch'] = out[v + 'r2']
      out[v + 'r2'] = conic.multi_r2(np.stack(centre_counts[v][0]), np.stack(centre_counts[v][1]))
  if conic_labels is not None:
    conic_labels.flush()
    conic.write_counts(conic_dir / 'pred_counts.csv', np.stack(written_counts), tuple(config.dataset.class_names))
  return out


def _labels(instance_map: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """int32[H, W, 2] (instance map, class map) of instances 1..M with classes int[M]: the CoNIC format."""
  instance_map = np.asarray(instance_map, np.int32)
  lut = np.concatenate([[0], np.asarray(classes, np.int32).reshape(-1)]).astype(np.int32)
  return np.stack([instance_map, lut[instance_map]], -1)


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
