"""Metrics: hand-built cases with known answers, matching semantics, and the real fixtures."""

import math

import numpy as np
import pytest
import scipy.io as sio

from dualunet_jax import metrics


def _disk_map(shape, centres, radius=3, ids=None):
  """int32 instance map with one disk per centre (ids 1..N unless given)."""
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  out = np.zeros(shape, np.int32)
  for i, (cy, cx) in enumerate(centres):
    out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (ids[i] if ids is not None else i + 1)
  return out


CENTRES = [(10, 10), (10, 30), (30, 10), (30, 30)]
CLASSES = np.array([1, 2, 1, 2], np.int32)


def _result(gt, gcls, pred, pcls, k=2, **kw):
  acc = metrics.MetricsAccumulator(k, 12.0, **kw)
  acc.add(gt, gcls, (pred, pcls))
  return acc.result()


def test_perfect_prediction_gives_ones():
  gt = _disk_map((40, 40), CENTRES)
  r = _result(gt, CLASSES, gt, CLASSES)
  for key in ('f1_d', 'precision_d', 'recall_d', 'f1_c_1', 'f1_c_2', 'f1_c_mean', 'dice', 'pixel_accuracy', 'aji',
              'aji_pooled', 'bdq', 'acc_c', 'r2'):
    assert r[key] == 1.0, key
  for key in ('bpq', 'bsq', 'mpq', 'mpq_pooled', 'mpq_plus'):
    assert r[key] == pytest.approx(1.0, abs=1e-5), key
  assert r['n_gt'] == r['n_pred'] == 4 and r['n_images'] == 1


def test_shifted_prediction_within_radius():
  gt = _disk_map((40, 40), CENTRES, radius=5)
  pred = np.roll(gt, 2, axis=1)  # 2 px shift: detection perfect, IoU of radius-5 disks (81 px) drops
  r = _result(gt, CLASSES, pred, CLASSES)
  assert r['f1_d'] == 1.0
  area = np.sum(gt == 1)
  inter = np.sum((gt == 1) & (pred == 1))
  iou = inter / (2 * area - inter)
  assert 0.5 < iou < 1
  assert r['bsq'] == pytest.approx(iou, abs=1e-5)
  assert r['dice'] == pytest.approx(inter / area)
  assert r['aji'] == pytest.approx(iou)


def test_one_missed_and_one_extra():
  gt = _disk_map((40, 40), CENTRES)
  pred = _disk_map((40, 40), CENTRES[:3] + [(20, 20)])  # misses (30, 30) class 2, adds one at the centre
  pcls = np.array([1, 2, 1, 2], np.int32)
  r = _result(gt, CLASSES, pred, pcls)
  assert r['precision_d'] == r['recall_d'] == r['f1_d'] == 0.75
  # class 1: 2 tp, nothing else -> 1; class 2: 1 tp, fp_d = 1, fn_d = 1 -> 2/(2+1+1)
  assert r['f1_c_1'] == 1.0 and r['f1_c_2'] == pytest.approx(0.5)
  assert r['bdq'] == pytest.approx(3 / (3 + 0.5 + 0.5))
  assert r['pq_2'] == pytest.approx(1 / (1 + 0.5 + 0.5), abs=1e-5)
  assert r['r2'] == 1.0  # one image: constant GT counts predicted exactly


def test_wrong_class():
  gt = _disk_map((40, 40), CENTRES)
  pcls = np.array([1, 2, 1, 1], np.int32)  # last nucleus predicted class 1 instead of 2
  r = _result(gt, CLASSES, gt, pcls)
  assert r['f1_d'] == 1.0 and r['acc_c'] == 0.75
  # class 1: tp 2, fp_dt 1 -> 4/(4+2); class 2: tp 1, fn_dt 1 -> 2/(2+2)
  assert r['f1_c_1'] == pytest.approx(4 / 6) and r['f1_c_2'] == pytest.approx(0.5)
  assert r['pixel_accuracy'] == pytest.approx(1 - 29 / 1600)
  # class 1: 2 TP 1 FP -> 2/2.5; class 2: 1 TP 1 FN -> 1/1.5
  assert r['mpq'] == pytest.approx((2 / 2.5 + 1 / 1.5) / 2, abs=1e-5)


def test_non_contiguous_ids():
  ids = [7, 3, 120, 41]
  gt = _disk_map((40, 40), CENTRES, ids=ids)
  # Classes in sorted-id order (CoNSeP .mat convention): ids 3, 7, 41, 120.
  sorted_classes = np.array([CLASSES[1], CLASSES[0], CLASSES[3], CLASSES[2]])
  pred = _disk_map((40, 40), CENTRES)
  r = _result(gt, sorted_classes, pred, CLASSES)
  assert r['f1_c_mean'] == 1.0 and r['bpq'] == pytest.approx(1, abs=1e-5)
  # Classes indexed by id - 1.
  by_id = np.zeros(120, np.int32)
  by_id[np.array(ids) - 1] = CLASSES
  assert _result(gt, by_id, pred, CLASSES)['f1_c_mean'] == 1.0


def test_empty_cases():
  gt = _disk_map((40, 40), CENTRES)
  empty = np.zeros((40, 40), np.int32)
  none = np.zeros(0, np.int32)
  r = _result(gt, CLASSES, empty, none)  # no predictions
  assert r['f1_d'] == 0.0 and r['recall_d'] == 0.0 and math.isnan(r['precision_d'])
  assert r['dice'] == 0.0 and r['aji'] == 0.0 and r['bpq'] == 0.0 and r['mpq'] == 0.0
  r = _result(empty, none, gt, CLASSES)  # empty GT
  assert r['f1_d'] == 0.0 and r['precision_d'] == 0.0 and r['bpq'] == 0.0
  assert math.isnan(r['mpq']) and math.isnan(r['bpq_nonempty'])
  r = _result(empty, none, empty, none)  # both empty
  assert r['dice'] == 1.0 and r['bpq'] == 0.0 and math.isnan(r['aji']) and math.isnan(r['f1_d'])
  # The reference's dummy points pair with each other: one free TP.
  r = _result(empty, none, empty, none, dummy_points=True)
  assert r['f1_d'] == 1.0


def test_hungarian_then_radius_differs_from_radius_restricted_matching():
  # GT a=(8,20), b=(14,12); predictions p=(16,12), q=(24,18). Distances a-p 11.3, b-q 11.7 (both within 12),
  # but the full-matrix Hungarian prefers a-q + b-p = 16.1 + 2.0 < a-p + b-q = 23.0, then cuts a-q: 1 TP, where
  # a matching restricted to the radius (or a greedy one) would keep 2.
  gt = np.array([[8, 20], [14, 12]], float)
  pred = np.array([[16, 12], [24, 18]], float)
  paired, ua, ub = metrics.pair_coordinates(gt, pred, 12)
  assert [tuple(p) for p in paired] == [(1, 0)] and list(ua) == [0] and list(ub) == [1]
  # Inclusive radius.
  paired, _, _ = metrics.pair_coordinates(np.array([[0, 0]], float), np.array([[0, 12]], float), 12)
  assert len(paired) == 1


def test_classification_f1_formula():
  confusion = np.zeros((3, 3), np.int64)
  confusion[1, 1], confusion[1, 2], confusion[2, 1], confusion[2, 2] = 5, 1, 2, 3
  un_g = np.array([0, 1, 0])
  un_p = np.array([0, 0, 2])
  # class 1: tp 5, fp_dt 2, fn_dt 1, fp_d 0, fn_d 1 -> 10 / (10 + 4 + 2 + 0 + 1)
  assert metrics.f1_classification(confusion, un_g, un_p, 1) == pytest.approx(10 / 17)
  # class 2: tp 3, fp_dt 1, fn_dt 2, fp_d 2, fn_d 0 -> 6 / (6 + 2 + 4 + 2)
  assert metrics.f1_classification(confusion, un_g, un_p, 2) == pytest.approx(6 / 14)


def test_pooled_vs_per_image_averaging():
  gt = _disk_map((40, 40), CENTRES)
  acc = metrics.MetricsAccumulator(2, 12.0)
  acc.add(gt, CLASSES, (gt, CLASSES))  # perfect
  acc.add(gt, CLASSES, (np.zeros_like(gt), np.zeros(0, np.int32)))  # nothing predicted
  r = acc.result()
  assert r['f1_d'] == pytest.approx(2 * 4 / (2 * 4 + 4))  # pooled counts
  assert r['dice'] == pytest.approx(0.5) and r['bpq'] == pytest.approx(0.5, abs=1e-5)  # per image means
  assert r['mpq_pooled'] == pytest.approx(4 / (4 + 2), abs=1e-5)  # per class TP 2, FN 2
  # R²: counts per class (2, 2) vs (2, 0): constant truth, wrong prediction -> 0.
  assert r['r2'] == 0.0


def test_r2_matches_sklearn_definition():
  t = np.array([3, 5, 2, 8.0])
  p = np.array([2.5, 5, 3, 7.0])
  assert metrics.r2_score(t, p) == pytest.approx(1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum())


def _load_fixture(path):
  mat = sio.loadmat(path)
  inst = mat['inst_map'].astype(np.int32)
  types = mat['inst_type'].reshape(-1).astype(np.int32)
  merged = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.int32)[types]
  return inst, merged


def test_fixtures_gt_vs_itself_and_removed(fixtures_dir):
  acc_self = metrics.MetricsAccumulator(4, 12.0)
  acc_rm = metrics.MetricsAccumulator(4, 12.0)
  n_total = n_removed = 0
  for path in sorted((fixtures_dir / 'masks').glob('*.mat')):
    inst, cls = _load_fixture(path)
    acc_self.add(inst, cls, (inst, cls))
    ids = np.unique(inst)[1:]  # sorted ids, aligned with cls
    drop = ids[::5]  # remove every fifth instance from the prediction
    keep = ~np.isin(ids, drop)
    pred = np.where(np.isin(inst, drop), 0, inst)
    acc_rm.add(inst, cls, (pred, cls[keep]))
    n_total += ids.size
    n_removed += drop.size
  r = acc_self.result()
  for key in ('f1_d', 'f1_c_mean', 'dice', 'pixel_accuracy', 'aji', 'r2'):
    assert r[key] == 1.0, key
  for key in ('bpq', 'mpq', 'mpq_pooled', 'mpq_plus'):
    assert r[key] == pytest.approx(1.0, abs=1e-5), key
  r = acc_rm.result()
  tp = n_total - n_removed
  assert r['n_gt'] == n_total and r['n_pred'] == tp
  assert r['precision_d'] == 1.0
  assert r['recall_d'] == pytest.approx(tp / n_total)
  assert r['f1_d'] == pytest.approx(2 * tp / (2 * tp + n_removed))
  assert r['acc_c'] == 1.0


def _brute_pq_aji(gt, pred):
  """Per-instance-mask restatement of HoVer-Net get_fast_pq / get_fast_aji (contiguous ids)."""
  ng, npr = int(gt.max()), int(pred.max())
  inter = np.zeros((ng, npr))
  union = np.zeros((ng, npr))
  for i in range(1, ng + 1):
    t = gt == i
    for j in range(1, npr + 1):
      p = pred == j
      inter[i - 1, j - 1] = (t & p).sum()
      union[i - 1, j - 1] = (t | p).sum()
  iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  tp = int((iou > 0.5).sum())
  dq = tp / (tp + 0.5 * (npr - tp) + 0.5 * (ng - tp))
  pq = dq * iou[iou > 0.5].sum() / (tp + 1e-6)
  best = np.argmax(iou, axis=1)
  paired = np.flatnonzero(iou.max(axis=1) > 0)
  c = inter[paired, best[paired]].sum()
  u = union[paired, best[paired]].sum()
  u += sum((gt == i + 1).sum() for i in range(ng) if i not in paired)
  u += sum((pred == j + 1).sum() for j in range(npr) if j not in set(best[paired]))
  return pq, c / u


def test_pq_and_aji_match_brute_force(fixtures_dir):
  import scipy.ndimage as ndi
  inst, cls = _load_fixture(fixtures_dir / 'masks' / 'patch1.mat')
  gt, _ = metrics._contiguous(inst, cls)
  # A perturbed prediction: shifted, eroded instances, two merged by a bridge, and a spurious blob.
  pred = np.roll(gt, (1, 2), axis=(0, 1))
  pred = np.where(ndi.binary_erosion(pred > 0), pred, 0)
  pred[100:104, 100:110] = pred.max() + 1
  pred, _ = metrics._contiguous(pred, None)
  s = metrics.image_stats(gt, None, pred, None, num_classes=1)
  pq, aji = _brute_pq_aji(gt, pred)
  assert s.bpq == pytest.approx(pq, abs=1e-9)
  assert s.aji == pytest.approx(aji, abs=1e-9)
