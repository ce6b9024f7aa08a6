"""The CoNIC challenge's scoring (Graham et al. 2024) on arrays in the official format: mPQ+ and multi-class R².

    python -m dualunet_jax.conic --true=DIR_or_labels.npy --pred=pred_labels.npy [--true_counts=counts.csv] \
        [--pred_counts=pred_counts.csv] [--num_classes=6] [--output=scores.json]

Format: labels int[N, H, W, 2], channel 0 the instance map (0 background), channel 1 the class map (0
background, 1..K); CoNIC patches are 256² with K = 6 (`CLASS_NAMES`). `--true=DIR` reads `DIR/labels.npy` and,
when present, `DIR/counts.csv`; counts not given are counted from the labels with `counts_in_centre`.

Definitions (the challenge's `compute_stats.py` / `stats_utils.py`, restated):

- mPQ+ (`pq_plus`): for each class c, the instances of c are the instance ids restricted to the pixels the
  class map labels c (an instance's class is its pixels' class, pixel by pixel: an instance whose pixels carry
  two classes is one instance of each). Within class c, GT and predicted instances pair at IoU > 0.5 (unique by
  construction), and TP, FP, FN and the sum of the pairs' IoUs are pooled over ALL images. Then DQ_c = TP /
  (TP + FP/2 + FN/2 + 1e-6), SQ_c = ΣIoU / (TP + 1e-6), PQ+_c = DQ_c·SQ_c (0 for a class absent everywhere),
  and mPQ+ = the mean over classes 1..K.
- R² (`multi_r2`): per class, sklearn's `r2_score` of per-patch counts (constant true counts: 1 if predicted
  exactly, else 0, sklearn's force_finite), averaged over classes. Counts are of the nuclei present in the
  CENTRAL 224² of each 256² patch (`counts_in_centre`: crop 16 px per side; the challenge's counts.csv).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

CLASS_NAMES = ('neutrophil', 'epithelial', 'lymphocyte', 'plasma', 'eosinophil', 'connective')
PATCH = 256
CENTRE_CROP = 16  # 256 - 2·16 = 224
MATCH_IOU = 0.5
EPS = 1e-6


class ConicError(ValueError):
  """Inputs that are not in the CoNIC format (shapes, dtypes, classes, columns)."""


def check_labels(labels: np.ndarray, what: str = 'labels') -> np.ndarray:
  """`labels` (not copied: a memory-mapped .npy stays on disk) after checking it is int[N, H, W, 2]; errors
  name `what` (e.g. the file). One [H, W, 2] patch becomes [1, H, W, 2]."""
  labels = labels if isinstance(labels, np.ndarray) else np.asarray(labels)
  if labels.ndim == 3 and labels.shape[-1] == 2:
    labels = labels[None]
  if labels.ndim != 4 or labels.shape[-1] != 2:
    raise ConicError(f'{what}: shape {labels.shape}; expected (N, H, W, 2) = instance map, class map')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ConicError(f'{what}: dtype {labels.dtype}; expected integer instance ids and classes')
  return labels


def _patch(labels: np.ndarray, i: int, num_classes: int, what: str) -> np.ndarray:
  """Patch i as int64[H, W, 2], its ids and classes checked."""
  patch = np.asarray(labels[i], np.int64)
  if patch.size and patch.min() < 0:
    raise ConicError(f'{what} [{i}]: negative instance id or class ({int(patch.min())})')
  if patch.size and patch[..., 1].max() > num_classes:
    raise ConicError(f'{what} [{i}]: class {int(patch[..., 1].max())} outside 0..{num_classes}')
  return patch


# ----------------------------------------------------------------------------------------------- mPQ+


def _class_instances(inst: np.ndarray, cls: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(int64[H·W] labels 1..M of the (instance, class) pairs present, 0 elsewhere; int64[M] their classes)."""
  key = np.where((inst > 0) & (cls > 0), inst * (k + 1) + cls, 0).ravel()
  uniq, label = np.unique(key, return_inverse=True)
  if uniq[0] != 0:  # no background pixel: shift so that 0 stays free
    uniq, label = np.concatenate([[0], uniq]), label + 1
  return label.reshape(-1), uniq[1:] % (k + 1)


def image_pq_counts(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """float64[K, 4] (TP, FP, FN, ΣIoU) per class of one patch (labels int[H, W, 2], checked)."""
  k = num_classes
  g, gcls = _class_instances(true[..., 0], true[..., 1], k)
  p, pcls = _class_instances(pred[..., 0], pred[..., 1], k)
  ng, npr = gcls.size, pcls.size
  garea = np.bincount(g, minlength=ng + 1)[1:]
  parea = np.bincount(p, minlength=npr + 1)[1:]
  both = (g > 0) & (p > 0)
  gi, pj = g[both] - 1, p[both] - 1
  same = gcls[gi] == pcls[pj]  # a pixel of different classes joins no pair (their class-c maps differ)
  pair, inter = np.unique(gi[same] * max(npr, 1) + pj[same], return_counts=True)
  gi, pj = pair // max(npr, 1), pair % max(npr, 1)
  iou = inter / (garea[gi] + parea[pj] - inter)
  match = iou > MATCH_IOU
  tp = np.bincount(gcls[gi[match]], minlength=k + 1)[1:]
  iou_sum = np.bincount(gcls[gi[match]], weights=iou[match], minlength=k + 1)[1:]
  fp = np.bincount(pcls, minlength=k + 1)[1:] - tp
  fn = np.bincount(gcls, minlength=k + 1)[1:] - tp
  return np.stack([tp, fp, fn, iou_sum], 1).astype(np.float64)


@dataclasses.dataclass
class PQPlus:
  """mPQ+ and its parts; per-class arrays are float64[K] (classes 1..K)."""
  mpq_plus: float
  pq: np.ndarray
  dq: np.ndarray
  sq: np.ndarray
  tp: np.ndarray
  fp: np.ndarray
  fn: np.ndarray
  iou_sum: np.ndarray


def pq_from_counts(counts: np.ndarray) -> PQPlus:
  """`PQPlus` of pooled float[K, 4] (TP, FP, FN, ΣIoU), with the challenge's epsilons."""
  tp, fp, fn, iou_sum = np.asarray(counts, np.float64).T
  dq = tp / (tp + 0.5 * fp + 0.5 * fn + EPS)
  sq = iou_sum / (tp + EPS)
  pq = dq * sq
  return PQPlus(float(pq.mean()) if pq.size else float('nan'), pq, dq, sq, tp, fp, fn, iou_sum)


def pq_plus(true_labels: np.ndarray, pred_labels: np.ndarray, num_classes: int = 6, *,
            names: tuple[str, str] = ('true labels', 'predicted labels')) -> PQPlus:
  """CoNIC mPQ+ of int[N, H, W, 2] ground truth vs predictions (see the module docstring); `names` (e.g. the
  files) name the inputs in errors."""
  true = check_labels(true_labels, names[0])
  pred = check_labels(pred_labels, names[1])
  if true.shape != pred.shape:
    raise ConicError(f'{names[1]}: shape {pred.shape} differs from {names[0]} {true.shape}')
  total = np.zeros((num_classes, 4))
  for i in range(true.shape[0]):
    total += image_pq_counts(_patch(true, i, num_classes, names[0]), _patch(pred, i, num_classes, names[1]),
                             num_classes)
  return pq_from_counts(total)


# ----------------------------------------------------------------------------------------------- R²


def counts_in_centre(labels: np.ndarray, num_classes: int = 6, crop: int = CENTRE_CROP, *,
                     what: str = 'labels') -> np.ndarray:
  """int64[N, K] nuclei per class present in the centre of each patch (crop [crop:H-crop, crop:W-crop]).

  An instance counts once if any of its pixels is in the centre, for the class most of its centre pixels
  carry (ties: the lower class; an instance without a class there is not counted). CoNIC's instances have
  one class, so this is the challenge's counts.csv (224² centre of 256² patches).

  Args:
    labels: int[N, H, W, 2] (or one [H, W, 2]).
  """
  labels = check_labels(labels, what)
  k = num_classes
  out = np.zeros((labels.shape[0], k), np.int64)
  for i in range(labels.shape[0]):
    patch = _patch(labels, i, k, what)[crop:labels.shape[1] - crop, crop:labels.shape[2] - crop]
    inst, cls = patch[..., 0].ravel(), patch[..., 1].ravel()
    ids, label = np.unique(inst, return_inverse=True)
    votes = np.bincount(label * (k + 1) + cls, minlength=ids.size * (k + 1)).reshape(ids.size, k + 1)
    votes = votes[ids > 0, 1:]
    has = votes.sum(1) > 0
    out[i] = np.bincount(votes[has].argmax(1), minlength=k)[:k]
  return out


def r2_per_class(true_counts: np.ndarray, pred_counts: np.ndarray) -> np.ndarray:
  """float64[K]: sklearn `r2_score` of each column (force_finite: a constant true column gives 1 if predicted
  exactly, else 0)."""
  t = np.asarray(true_counts, np.float64)
  p = np.asarray(pred_counts, np.float64)
  if t.ndim != 2 or t.shape != p.shape:
    raise ConicError(f'counts: true {t.shape} and predicted {p.shape} must both be [N, K]')
  ss_res = ((t - p) ** 2).sum(0)
  ss_tot = ((t - t.mean(0)) ** 2).sum(0)
  with np.errstate(divide='ignore', invalid='ignore'):
    r2 = 1.0 - ss_res / ss_tot
  return np.where(ss_tot > 0, r2, np.where(ss_res == 0, 1.0, 0.0))


def multi_r2(true_counts: np.ndarray, pred_counts: np.ndarray) -> float:
  """CoNIC multi-class R²: the mean over classes of `r2_per_class` of int[N, K] per-patch counts."""
  return float(r2_per_class(true_counts, pred_counts).mean())


# ----------------------------------------------------------------------------------------------- files


def read_counts(path: str | pathlib.Path, class_names: Sequence[str] = CLASS_NAMES) -> np.ndarray:
  """int64[N, K] from a counts CSV with a header naming every class (columns in `class_names` order)."""
  path = pathlib.Path(path)
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise ConicError(f'{path}: cannot read ({e.strerror or e})') from e
  header = [c.strip() for c in rows[0]] if rows else []
  missing = [c for c in class_names if c not in header]
  if missing:
    raise ConicError(f'{path}: columns {header}; missing {", ".join(missing)}')
  try:
    return np.array([[int(float({k.strip(): v for k, v in r.items()}[c])) for c in class_names] for r in rows],
                    np.int64).reshape(-1, len(class_names))
  except (TypeError, ValueError) as e:
    raise ConicError(f'{path}: non-numeric count ({e})') from e


def write_counts(path: str | pathlib.Path, counts: np.ndarray, class_names: Sequence[str] = CLASS_NAMES) -> None:
  """Writes int[N, K] counts as a CSV with the class names as header (the challenge's counts.csv layout)."""
  counts = np.asarray(counts)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(class_names)
    writer.writerows(counts.astype(np.int64).tolist())


def load_labels(path: str | pathlib.Path, num_classes: int) -> np.ndarray:
  """A labels .npy (or a folder holding labels.npy), memory-mapped, shape and dtype checked."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / 'labels.npy'
  try:
    array = np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConicError(f'{path}: cannot read as .npy ({e})') from e
  return check_labels(array, str(path))


def class_names_for(num_classes: int) -> tuple[str, ...]:
  return CLASS_NAMES if num_classes == len(CLASS_NAMES) else tuple(f'class_{i}' for i in range(1, num_classes + 1))


def score(true_labels: np.ndarray, pred_labels: np.ndarray, *, num_classes: int = 6,
          true_counts: np.ndarray | None = None, pred_counts: np.ndarray | None = None,
          class_names: Sequence[str] | None = None,
          names: tuple[str, str] = ('true labels', 'predicted labels')) -> dict:
  """{'mpq_plus', 'pq_plus_<class>', 'r2', 'r2_<class>', 'n_patches'}; counts default to `counts_in_centre`."""
  class_names = tuple(class_names or class_names_for(num_classes))
  result = pq_plus(true_labels, pred_labels, num_classes, names=names)
  true_counts = (counts_in_centre(true_labels, num_classes, what=names[0]) if true_counts is None
                 else np.asarray(true_counts))
  pred_counts = (counts_in_centre(pred_labels, num_classes, what=names[1]) if pred_counts is None
                 else np.asarray(pred_counts))
  n = np.shape(true_labels)[0]
  for what, counts in (('true counts', true_counts), ('predicted counts', pred_counts)):
    if counts.shape != (n, num_classes):
      raise ConicError(f'{what}: shape {counts.shape}; expected ({n}, {num_classes}), one row per patch')
  r2 = r2_per_class(true_counts, pred_counts)
  out = {'n_patches': int(n), 'mpq_plus': result.mpq_plus, 'r2': float(r2.mean())}
  out.update({f'pq_plus_{c}': float(v) for c, v in zip(class_names, result.pq)})
  out.update({f'r2_{c}': float(v) for c, v in zip(class_names, r2)})
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dualunet_jax.conic', description=__doc__.splitlines()[0])
  parser.add_argument('--true', required=True, help='labels.npy, or a CoNIC folder holding labels.npy')
  parser.add_argument('--pred', required=True, help='predicted labels .npy (N, H, W, 2)')
  parser.add_argument('--true_counts', help='counts.csv (default: DIR/counts.csv, else counted from --true)')
  parser.add_argument('--pred_counts', help='predicted counts CSV (default: counted from --pred)')
  parser.add_argument('--num_classes', type=int, default=len(CLASS_NAMES))
  parser.add_argument('--output', help='write the scores as JSON here')
  args = parser.parse_args(argv)
  names = class_names_for(args.num_classes)
  try:
    true = load_labels(args.true, args.num_classes)
    pred = load_labels(args.pred, args.num_classes)
    if true.shape != pred.shape:
      raise ConicError(f'{args.pred}: shape {pred.shape} differs from {args.true} {true.shape}')
    true_counts_path = args.true_counts
    if true_counts_path is None and pathlib.Path(args.true).is_dir() and (pathlib.Path(args.true) /
                                                                          'counts.csv').is_file():
      true_counts_path = pathlib.Path(args.true) / 'counts.csv'
    true_counts = read_counts(true_counts_path, names) if true_counts_path else None
    pred_counts = read_counts(args.pred_counts, names) if args.pred_counts else None
    for path, counts in ((true_counts_path, true_counts), (args.pred_counts, pred_counts)):
      if counts is not None and counts.shape[0] != true.shape[0]:
        raise ConicError(f'{path}: {counts.shape[0]} rows but the labels hold {true.shape[0]} patches')
    scores = score(true, pred, num_classes=args.num_classes, true_counts=true_counts, pred_counts=pred_counts,
                   class_names=names, names=(str(args.true), str(args.pred)))
  except ConicError as e:
    print(f'dualunet-conic: error: {e}', file=sys.stderr)
    return 2
  print(f"mPQ+ {scores['mpq_plus']:.4f}   R² {scores['r2']:.4f}   ({scores['n_patches']} patches)")
  for c in names:
    print(f"  {c:<12s} PQ+ {scores[f'pq_plus_{c}']:.4f}   R² {scores[f'r2_{c}']:.4f}")
  if args.output:
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=2, sort_keys=True))
  return 0


if __name__ == '__main__':
  sys.exit(main())
