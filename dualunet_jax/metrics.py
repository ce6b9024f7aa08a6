"""Dataset-level nucleus metrics: detection / classification F1, Dice, pixel accuracy, AJI, the PQ family,
CoNIC mPQ+ and R².

Streaming: `MetricsAccumulator.add` (or `image_stats` in a worker + `add_stats`) per image, `result()` once.
Definitions follow the reference (`../shared/reference/dualunet_reference.md` §5) unless stated:

- Points: GT centres are centres of mass of the GT instances (`gt_centroid='mass'`); the reference used
  bounding-box centres y1 + (y2 - y1) / 2 (`gt_centroid='bbox'`). Predicted centres are the centres of mass of
  the predicted instances (as the reference).
- Pairing (`pair_coordinates`, HoVer-Net): Hungarian assignment on the full Euclidean distance matrix FIRST,
  then pairs farther than `match_radius` are dropped. Per image; counts pooled over the dataset.
- Empty images: the reference injects a dummy (0, 0) point of class 0 into an image without GT points and
  into one without predictions (two such dummies pair with each other, a free TP). Not done by default;
  `dummy_points=True` restores it for parity.
- GT instances of class 0 (unlabelled) count for detection and segmentation, never for classification.
- PQ maps: the instance maps themselves (the reference re-rasterised COCO polygons and relabelled the class
  map's 4-connected components, which equals the instance map after the boundary cut of 4-connected relabels).

Keys of `result()` (averaging in brackets):
  n_images, n_gt, n_pred
  f1_d, precision_d, recall_d      detection, TP/FP/FN pooled over the dataset
  acc_c                            fraction of paired nuclei with the right class [pooled]
  f1_c_<name>, f1_c_mean           HoVer-Net per-class F1 (weights 2, 2, 1, 1) from pooled counts; the mean is
                                   over the classes where it is defined (a class absent from GT and predictions
                                   everywhere gives NaN)
  dice                             binary Dice of GT vs predicted foreground [per image, averaged; an image
                                   with neither counts 1] (README "Dice", the reference's `hn_dice`)
  pixel_accuracy                   argmax-class agreement over K+1 classes incl. background [per image,
                                   averaged] (the reference's mislabelled "dice")
  aji                              AJI (HoVer-Net `get_fast_aji`) [per image, averaged over images with GT or
                                   predictions]; aji_pooled = Σ intersections / Σ unions over the dataset
  bpq, bdq, bsq                    class-agnostic PQ [per image, averaged over ALL images; an image with no GT
                                   and no prediction gets 0, as the reference]; bpq_nonempty: the same averaged
                                   over images with GT only (PanNuke convention)
  mpq                              PanNuke mPQ: PQ per image and class where the class is in the GT (else
                                   skipped, NaN), nan-mean over classes per image, mean over those images
  mpq_tissue, bpq_tissue           only with tissues: PanNuke's final mean over tissues of the per-tissue means
  mpq_pooled, pq_<name>            the reference's mPQ: per class TP/FP/FN/ΣIoU pooled over the dataset, PQ_c
                                   = DQ_c·SQ_c (0 without TP), mean over classes 1..K
  mpq_plus                         CoNIC mPQ+: the same pooling with CoNIC's epsilons (1e-6 in DQ and SQ)
  r2                               CoNIC multi-class R²: per class sklearn `r2_score` of per-image GT vs
                                   predicted counts, averaged over classes (constant GT counts: 1 if predicted
                                   exactly, else 0, as sklearn's force_finite)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.optimize

PQ_IOU = 0.5
HOVERNET_F1_WEIGHTS = (2.0, 2.0, 1.0, 1.0)


class MetricsError(ValueError):
  """Inconsistent inputs to a metric (shapes, classes)."""


# ----------------------------------------------------------------------------------------------- helpers


def _contiguous(instance_map: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(int32[H, W] ids 1..N, int32[N] classes) from any non-negative ids.

  `classes` is either indexed by id - 1 (length >= max id, entries of absent ids ignored) or, when the ids are
  not contiguous and its length equals the number of distinct ids, given in sorted-id order (CoNSeP `.mat`
  `inst_type`). None gives class 0 (unlabelled) everywhere.
  """
  instance_map = np.asarray(instance_map)
  if instance_map.ndim != 2 or not np.issubdtype(instance_map.dtype, np.integer):
    raise MetricsError(f'instance maps must be int[H, W], got {instance_map.dtype}{list(instance_map.shape)}')
  max_id = int(instance_map.max(initial=0))
  present = np.bincount(instance_map.ravel(), minlength=max_id + 1) > 0
  present[0] = False
  ids = np.flatnonzero(present)
  lut = np.zeros(max_id + 1, np.int32)
  lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
  new_map = lut[instance_map]
  if classes is None:
    return new_map, np.zeros(ids.size, np.int32)
  classes = np.asarray(classes).reshape(-1).astype(np.int32)
  if classes.size >= max_id:
    new_classes = classes[ids - 1]
  elif classes.size == ids.size:
    new_classes = classes
  else:
    raise MetricsError(f'{classes.size} classes for an instance map with {ids.size} instances (max id {max_id})')
  return new_map, new_classes


def mass_centroids(instance_map: np.ndarray, n: int) -> np.ndarray:
  """float64[n, 2] (y, x) centres of mass of ids 1..n (contiguous)."""
  flat = instance_map.ravel()
  idx = np.flatnonzero(flat)
  lab = flat[idx]
  yy, xx = np.divmod(idx, instance_map.shape[1])
  cnt = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.stack([np.bincount(lab, yy, n + 1)[1:] / cnt, np.bincount(lab, xx, n + 1)[1:] / cnt], 1)


def bbox_centroids(instance_map: np.ndarray, n: int) -> np.ndarray:
  """float64[n, 2] (y, x) bounding-box centres y1 + (y2 - y1) / 2 (inclusive max), the reference's GT points."""
  import scipy.ndimage as ndi
  out = np.full((n, 2), np.nan)
  for i, sl in enumerate(ndi.find_objects(instance_map, max_label=n)):
    if sl is not None:
      out[i] = (sl[0].start + (sl[0].stop - 1 - sl[0].start) / 2, sl[1].start + (sl[1].stop - 1 - sl[1].start) / 2)
  return out


def pair_coordinates(set_a: np.ndarray, set_b: np.ndarray,
                     radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """HoVer-Net `pair_coordinates`: Hungarian matching on Euclidean distance, THEN a radius cut.

  The assignment minimises the total distance over the full rectangular matrix; pairs longer than `radius`
  are then dropped (both points become unpaired). This can pair fewer points than a greedy or
  radius-restricted matching would.

  Args:
    set_a: float[N, 2] points (e.g. GT, (y, x)).
    set_b: float[M, 2] points (e.g. predictions).
    radius: maximum pair distance (inclusive), in pixels.

  Returns:
    (paired int64[P, 2] rows (index in a, index in b), unpaired_a int64[N - P], unpaired_b int64[M - P]).
  """
  a = np.asarray(set_a, np.float64).reshape(-1, 2)
  b = np.asarray(set_b, np.float64).reshape(-1, 2)
  if a.shape[0] == 0 or b.shape[0] == 0:
    return np.zeros((0, 2), np.int64), np.arange(a.shape[0]), np.arange(b.shape[0])
  dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  ia, ib = scipy.optimize.linear_sum_assignment(dist)
  keep = dist[ia, ib] <= radius
  paired = np.stack([ia[keep], ib[keep]], 1).astype(np.int64)
  unpaired_a = np.setdiff1d(np.arange(a.shape[0]), paired[:, 0])
  unpaired_b = np.setdiff1d(np.arange(b.shape[0]), paired[:, 1])
  return paired, unpaired_a, unpaired_b


def f1_detection(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
  """(F1, precision, recall) = (2TP/(2TP+FP+FN), TP/(TP+FP), TP/(TP+FN)); 0/0 gives NaN."""
  with np.errstate(invalid='ignore', divide='ignore'):
    return (float(np.divide(2 * tp, 2 * tp + fp + fn)), float(np.divide(tp, tp + fp)), float(np.divide(tp, tp + fn)))


def f1_classification(confusion: np.ndarray, unpaired_gt: np.ndarray, unpaired_pred: np.ndarray, cls: int,
                      weights: Sequence[float] = HOVERNET_F1_WEIGHTS) -> float:
  """HoVer-Net's per-type F1 from pooled counts (reference §5).

  F1_t = 2 tp / (2 tp + w0 fp_dt + w1 fn_dt + w2 fp_d + w3 fn_d) with, over paired nuclei, tp = both t,
  fp_dt = predicted t but GT not t, fn_dt = GT t but predicted not t, and fp_d / fn_d the unpaired
  predictions / GT of class t (tn is always 0 after HoVer-Net's restriction to pairs involving t).

  Args:
    confusion: int[C, C] counts of paired nuclei, [GT class, predicted class].
    unpaired_gt, unpaired_pred: int[C] counts of unpaired GT / predictions per class.
    cls: the class t.
    weights: (w0, w1, w2, w3).

  Returns:
    F1_t; NaN when the class occurs nowhere.
  """
  tp = confusion[cls, cls]
  fp_dt = confusion[:, cls].sum() - tp
  fn_dt = confusion[cls, :].sum() - tp
  den = 2 * tp + weights[0] * fp_dt + weights[1] * fn_dt + weights[2] * unpaired_pred[cls] + \
      weights[3] * unpaired_gt[cls]
  return float(2 * tp / den) if den > 0 else float('nan')


def overlaps(gt: np.ndarray, pred: np.ndarray, n_gt: int,
             n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Sparse intersections of two contiguous instance maps, one bincount (no per-instance masks).

  Returns:
    (gt_idx int64[P] (0-based), pred_idx int64[P], inter int64[P], gt_area int64[n_gt], pred_area int64[n_pred])
    for every pair with a non-empty intersection.
  """
  g = gt.ravel().astype(np.int64)
  p = pred.ravel().astype(np.int64)
  gt_area = np.bincount(g, minlength=n_gt + 1)[1:]
  pred_area = np.bincount(p, minlength=n_pred + 1)[1:]
  both = (g > 0) & (p > 0)
  key = (g[both] - 1) * n_pred + (p[both] - 1)
  uniq, inter = np.unique(key, return_counts=True)
  return uniq // max(n_pred, 1), uniq % max(n_pred, 1), inter, gt_area, pred_area


def fast_pq(tp: int, fp: int, fn: int, iou_sum: float) -> tuple[float, float, float]:
  """HoVer-Net `get_fast_pq` summary: DQ = TP/(TP + FP/2 + FN/2), SQ = ΣIoU/(TP + 1e-6), PQ = DQ·SQ; 0 when
  there is nothing at all (reference: an image without GT and prediction gets PQ = 0)."""
  den = tp + 0.5 * fp + 0.5 * fn
  dq = tp / den if den > 0 else 0.0
  sq = iou_sum / (tp + 1e-6)
  return dq, sq, dq * sq


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """sklearn `r2_score` for one output (force_finite: constant y_true gives 1 if exact else 0)."""
  y_true = np.asarray(y_true, np.float64)
  y_pred = np.asarray(y_pred, np.float64)
  ss_res = ((y_true - y_pred) ** 2).sum()
  ss_tot = ((y_true - y_true.mean()) ** 2).sum()
  if ss_tot == 0:
    return 1.0 if ss_res == 0 else 0.0
  return float(1 - ss_res / ss_tot)


# ----------------------------------------------------------------------------------------------- per image


@dataclasses.dataclass
class ImageStats:
  """Everything the dataset-level metrics need from one image (small and picklable)."""
  n_gt: int
  n_pred: int
  tp: int
  fp: int
  fn: int
  confusion: np.ndarray  # int64[K+1, K+1] paired (GT class, predicted class), GT class 0 excluded
  unpaired_gt: np.ndarray  # int64[K+1]
  unpaired_pred: np.ndarray  # int64[K+1]
  dice: float
  pixel_accuracy: float
  aji: float  # NaN without GT and predictions
  aji_inter: int
  aji_union: int
  bdq: float
  bsq: float
  bpq: float
  pq_tp: np.ndarray  # int64[K] class-wise PQ counts (IoU > 0.5 matches within class)
  pq_fp: np.ndarray
  pq_fn: np.ndarray
  pq_iou: np.ndarray  # float64[K]
  gt_counts: np.ndarray  # int64[K]
  pred_counts: np.ndarray  # int64[K]
  tissue: str = ''


def _aji(gi: np.ndarray, pj: np.ndarray, inter: np.ndarray, gt_area: np.ndarray,
         pred_area: np.ndarray) -> tuple[int, int]:
  """HoVer-Net `get_fast_aji` numerator and denominator from sparse overlaps.

  Each GT takes its highest-IoU prediction (lowest id on ties; a prediction may serve several GT); unpaired
  GT and every prediction never chosen are added to the union."""
  union = gt_area[gi] + pred_area[pj] - inter
  iou = inter / union
  # Best prediction per GT: sort by (gt, -iou, pred) and take the first row of every GT.
  order = np.lexsort((pj, -iou, gi))
  first = np.ones(order.size, bool)
  first[1:] = gi[order][1:] != gi[order][:-1]
  best = order[first]
  total_inter = int(inter[best].sum())
  total_union = int(union[best].sum())
  paired_gt = np.zeros(gt_area.size, bool)
  paired_gt[gi[best]] = True
  used_pred = np.zeros(pred_area.size, bool)
  used_pred[pj[best]] = True
  total_union += int(gt_area[~paired_gt].sum()) + int(pred_area[~used_pred].sum())
  return total_inter, total_union


def image_stats(gt_instance_map: np.ndarray, gt_classes: np.ndarray | None, pred_instance_map: np.ndarray,
                pred_classes: np.ndarray | None, *, num_classes: int, match_radius: float = 12.0,
                gt_class_map: np.ndarray | None = None, pred_class_map: np.ndarray | None = None,
                pred_centroids: np.ndarray | None = None, gt_centroid: str = 'mass', dummy_points: bool = False,
                tissue: str = '') -> ImageStats:
  """Per-image statistics (see the module docstring for the definitions).

  Args:
    gt_instance_map: int[H, W], 0 background, any non-negative ids.
    gt_classes: int classes of the GT instances (indexed by id - 1, or in sorted-id order for non-contiguous
      ids; see `_contiguous`); None = unlabelled.
    pred_instance_map: int[H, W] predicted instances.
    pred_classes: their classes, same convention.
    num_classes: K.
    match_radius: detection pairing radius in pixels.
    gt_class_map, pred_class_map: int[H, W] class maps for pixel accuracy; derived from the instance maps
      and classes when None.
    pred_centroids: float[M, 2] (y, x) for the predicted ids 1..M (e.g. `Instances.centroids`); centres of
      mass of the predicted instances when None.
    gt_centroid: 'mass' | 'bbox' (the reference's GT points).
    dummy_points: inject the reference's (0, 0) class-0 dummies into empty point sets.
    tissue: tissue name (PanNuke per-tissue means).
  """
  k = int(num_classes)
  gt_raw = np.asarray(gt_instance_map)
  pred_raw = np.asarray(pred_instance_map)
  if gt_raw.shape != pred_raw.shape:
    raise MetricsError(f'GT shape {gt_raw.shape} != prediction shape {pred_raw.shape}')
  pred_ids_contiguous = pred_centroids is not None
  gt, gcls = _contiguous(gt_raw, gt_classes)
  pred, pcls = _contiguous(pred_raw, pred_classes)
  ng, npred = gcls.size, pcls.size
  if (gcls.size and gcls.max() > k) or (pcls.size and pcls.max() > k):
    raise MetricsError(f'a class exceeds num_classes={k}')

  # ---- detection / classification on points
  gpts = mass_centroids(gt, ng) if gt_centroid == 'mass' else bbox_centroids(gt, ng)
  if gt_centroid not in ('mass', 'bbox'):
    raise MetricsError(f"gt_centroid must be 'mass' or 'bbox', got {gt_centroid!r}")
  if pred_ids_contiguous:
    ppts = np.asarray(pred_centroids, np.float64).reshape(-1, 2)
    if ppts.shape[0] != npred or int(pred_raw.max(initial=0)) != npred:
      raise MetricsError('pred_centroids must have one row per predicted id 1..M (contiguous ids)')
  else:
    ppts = mass_centroids(pred, npred)
  gpc, ppc = gcls.astype(np.int64), pcls.astype(np.int64)
  if dummy_points and ng == 0:
    gpts, gpc = np.zeros((1, 2)), np.zeros(1, np.int64)
  if dummy_points and npred == 0:
    ppts, ppc = np.zeros((1, 2)), np.zeros(1, np.int64)
  paired, un_g, un_p = pair_coordinates(gpts, ppts, match_radius)
  confusion = np.zeros((k + 1, k + 1), np.int64)
  pg, pp = gpc[paired[:, 0]], ppc[paired[:, 1]]
  labelled = pg > 0
  np.add.at(confusion, (pg[labelled], pp[labelled]), 1)
  unpaired_gt = np.bincount(gpc[un_g], minlength=k + 1)[:k + 1]
  unpaired_gt[0] = 0
  unpaired_pred = np.bincount(ppc[un_p], minlength=k + 1)[:k + 1]

  # ---- pixel metrics
  gfg, pfg = gt > 0, pred > 0
  den = int(gfg.sum()) + int(pfg.sum())
  dice = 2.0 * int((gfg & pfg).sum()) / den if den else 1.0
  if gt_class_map is None:
    gt_class_map = np.concatenate([[0], gcls])[gt]
  if pred_class_map is None:
    pred_class_map = np.concatenate([[0], pcls])[pred]
  pixel_accuracy = float(np.mean(np.asarray(gt_class_map) == np.asarray(pred_class_map)))

  # ---- instance metrics from sparse overlaps
  gi, pj, inter, garea, parea = overlaps(gt, pred, ng, npred)
  if ng == 0 and npred == 0:
    aji, a_in, a_un = float('nan'), 0, 0
  else:
    a_in, a_un = _aji(gi, pj, inter, garea, parea)
    aji = a_in / a_un
  iou = inter / (garea[gi] + parea[pj] - inter)
  match = iou > PQ_IOU  # unique by construction
  mg, mp, miou = gi[match], pj[match], iou[match]
  tp = int(match.sum())
  bdq, bsq, bpq = fast_pq(tp, npred - tp, ng - tp, float(miou.sum()))
  same = gcls[mg] == pcls[mp]
  pq_tp = np.bincount(gcls[mg][same], minlength=k + 1)[1:k + 1].astype(np.int64)
  pq_iou = np.bincount(gcls[mg][same], weights=miou[same], minlength=k + 1)[1:k + 1]
  gt_counts = np.bincount(gcls, minlength=k + 1)[1:k + 1].astype(np.int64)
  pred_counts = np.bincount(pcls, minlength=k + 1)[1:k + 1].astype(np.int64)
  return ImageStats(
      n_gt=ng, n_pred=npred, tp=len(paired), fp=len(un_p), fn=len(un_g), confusion=confusion,
      unpaired_gt=unpaired_gt.astype(np.int64), unpaired_pred=unpaired_pred.astype(np.int64), dice=dice,
      pixel_accuracy=pixel_accuracy, aji=aji, aji_inter=a_in, aji_union=a_un, bdq=bdq, bsq=bsq, bpq=bpq,
      pq_tp=pq_tp, pq_fp=pred_counts - pq_tp, pq_fn=gt_counts - pq_tp, pq_iou=pq_iou, gt_counts=gt_counts,
      pred_counts=pred_counts, tissue=tissue)


# ----------------------------------------------------------------------------------------------- dataset


class MetricsAccumulator:
  """Streams images and reports the dataset-level metrics (see the module docstring for every key).

      acc = MetricsAccumulator(num_classes=4, class_names=('other', 'inflammatory', 'epithelial', 'spindle'))
      for record, instances in ...:
        acc.add(record['instance_map'], record['instance_classes'], instances)
      metrics = acc.result()
  """

  def __init__(self, num_classes: int, match_radius: float = 12.0, *, class_names: Sequence[str] | None = None,
               gt_centroid: str = 'mass', dummy_points: bool = False):
    if class_names is not None and len(class_names) != num_classes:
      raise MetricsError(f'{len(class_names)} class names for {num_classes} classes')
    self.num_classes = int(num_classes)
    self.match_radius = float(match_radius)
    self.class_names = tuple(class_names) if class_names is not None else tuple(
        str(i) for i in range(1, num_classes + 1))
    self.gt_centroid = gt_centroid
    self.dummy_points = dummy_points
    self.stats: list[ImageStats] = []

  def add(self, gt_instance_map: np.ndarray, gt_classes: np.ndarray | None, pred: Any,
          gt_class_map: np.ndarray | None = None, pred_class_map: np.ndarray | None = None,
          tissue: str = '') -> ImageStats:
    """Adds one image.

    Args:
      gt_instance_map, gt_classes: the GT (see `image_stats`).
      pred: a `postprocess.Instances`, or (pred_instance_map, pred_classes).
      gt_class_map, pred_class_map: optional int[H, W] class maps for pixel accuracy.
      tissue: tissue name for the PanNuke per-tissue means.
    """
    if hasattr(pred, 'instance_map'):
      pmap, pcls, pcen = pred.instance_map, pred.classes, pred.centroids
      pred_class_map = pred.class_map if pred_class_map is None else pred_class_map
    else:
      (pmap, pcls), pcen = pred, None
    stats = image_stats(gt_instance_map, gt_classes, pmap, pcls, num_classes=self.num_classes,
                        match_radius=self.match_radius, gt_class_map=gt_class_map, pred_class_map=pred_class_map,
                        pred_centroids=pcen, gt_centroid=self.gt_centroid, dummy_points=self.dummy_points,
                        tissue=tissue)
    self.stats.append(stats)
    return stats

  def add_stats(self, stats: ImageStats | Iterable[ImageStats]) -> None:
    """Adds statistics computed elsewhere (e.g. by `image_stats` in a worker process)."""
    self.stats.extend([stats] if isinstance(stats, ImageStats) else stats)

  def result(self) -> dict[str, float]:
    """The dataset-level metrics (floats; NaN where undefined)."""
    s = self.stats
    k = self.num_classes
    out: dict[str, float] = {'n_images': float(len(s)), 'n_gt': float(sum(x.n_gt for x in s)),
                             'n_pred': float(sum(x.n_pred for x in s))}
    tp, fp, fn = (sum(getattr(x, a) for x in s) for a in ('tp', 'fp', 'fn'))
    out['f1_d'], out['precision_d'], out['recall_d'] = f1_detection(tp, fp, fn)
    confusion = sum((x.confusion for x in s), np.zeros((k + 1, k + 1), np.int64))
    un_g = sum((x.unpaired_gt for x in s), np.zeros(k + 1, np.int64))
    un_p = sum((x.unpaired_pred for x in s), np.zeros(k + 1, np.int64))
    n_paired = confusion.sum()
    out['acc_c'] = float(np.trace(confusion) / n_paired) if n_paired else float('nan')
    f1s = [f1_classification(confusion, un_g, un_p, c) for c in range(1, k + 1)]
    for name, f1 in zip(self.class_names, f1s):
      out[f'f1_c_{name}'] = f1
    out['f1_c_mean'] = _nanmean(f1s)
    out['dice'] = _nanmean([x.dice for x in s])
    out['pixel_accuracy'] = _nanmean([x.pixel_accuracy for x in s])
    out['aji'] = _nanmean([x.aji for x in s])
    a_un = sum(x.aji_union for x in s)
    out['aji_pooled'] = sum(x.aji_inter for x in s) / a_un if a_un else float('nan')
    out['bpq'] = _nanmean([x.bpq for x in s])
    out['bdq'] = _nanmean([x.bdq for x in s])
    out['bsq'] = _nanmean([x.bsq for x in s])
    out['bpq_nonempty'] = _nanmean([x.bpq for x in s if x.n_gt > 0])
    # PanNuke mPQ: per image and class where the GT has the class.
    per_image = []
    for x in s:
      pqs = [fast_pq(x.pq_tp[c], x.pq_fp[c], x.pq_fn[c], x.pq_iou[c])[2] for c in range(k) if x.gt_counts[c] > 0]
      per_image.append(float(np.mean(pqs)) if pqs else float('nan'))
    out['mpq'] = _nanmean(per_image)
    tissues = [x.tissue for x in s]
    if any(tissues):
      names = sorted(set(tissues))
      out['mpq_tissue'] = _nanmean([_nanmean([m for m, t in zip(per_image, tissues) if t == n]) for n in names])
      bpq_ne = [x.bpq if x.n_gt > 0 else float('nan') for x in s]
      out['bpq_tissue'] = _nanmean([_nanmean([b for b, t in zip(bpq_ne, tissues) if t == n]) for n in names])
    # Pooled class-wise PQ: the reference's mPQ and CoNIC's mPQ+.
    ptp, pfp, pfn = (sum((getattr(x, a) for x in s), np.zeros(k, np.int64)) for a in ('pq_tp', 'pq_fp', 'pq_fn'))
    piou = sum((x.pq_iou for x in s), np.zeros(k))
    pooled, plus = [], []
    for c in range(k):
      dq, sq, pq = fast_pq(ptp[c], pfp[c], pfn[c], piou[c])
      pooled.append(pq if ptp[c] > 0 else 0.0)
      dq_p = ptp[c] / (ptp[c] + 0.5 * pfp[c] + 0.5 * pfn[c] + 1e-6)
      plus.append(dq_p * piou[c] / (ptp[c] + 1e-6))
      out[f'pq_{self.class_names[c]}'] = pooled[-1]
    out['mpq_pooled'] = float(np.mean(pooled)) if k else float('nan')
    out['mpq_plus'] = float(np.mean(plus)) if k else float('nan')
    if s:
      gc = np.stack([x.gt_counts for x in s])
      pc = np.stack([x.pred_counts for x in s])
      out['r2'] = float(np.mean([r2_score(gc[:, c], pc[:, c]) for c in range(k)]))
    else:
      out['r2'] = float('nan')
    return {key: float(v) for key, v in out.items()}


def _nanmean(values: Iterable[float]) -> float:
  arr = np.asarray(list(values), np.float64)
  arr = arr[~np.isnan(arr)]
  return float(arr.mean()) if arr.size else float('nan')


def evaluate(pairs: Iterable[tuple[np.ndarray, np.ndarray | None, Any]], num_classes: int,
             match_radius: float = 12.0, **kwargs: Any) -> dict[str, float]:
  """Convenience: metrics over (gt_instance_map, gt_classes, pred) triples (pred as in `MetricsAccumulator.add`)."""
  acc = MetricsAccumulator(num_classes, match_radius, **kwargs)
  for gt_map, gt_cls, pred in pairs:
    acc.add(gt_map, gt_cls, pred)
  return acc.result()
