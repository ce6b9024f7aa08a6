"""HoVer-Net post-processing (vqdang/hover_net `models/hovernet/post_proc.py`: `__proc_np_hv`, `process`).

JAX-free (numpy / scipy / scikit-image): host worker processes import it. OpenCV is not a dependency; its four
calls are restated and checked in tests/test_postprocess_hv.py:

  cv2.normalize(x, 0, 1, NORM_MINMAX, CV_32F)  `minmax`: x * s + (0 - min * s) in float64 with
                                               s = 1 / (max - min) (0 for a constant map), then float32
  cv2.Sobel(f32, CV_64F, 1, 0, ksize=21)       `sobel`: separable correlation, 21-tap derivative along the
                                               axis, 21-tap binomial smoothing across it (`sobel_kernels`,
                                               OpenCV's getSobelKernels), border REFLECT_101 (scipy 'mirror')
  cv2.GaussianBlur(x, (3, 3), 0)               `blur3`: [1, 2, 1] / 4 both ways (OpenCV's fixed 3-tap table
                                               for sigma 0), REFLECT_101
  cv2.morphologyEx(m, MORPH_OPEN, ellipse 5x5) `open_ellipse`: erosion with the border counted as set
                                               (OpenCV's default border for erosion), then dilation

Steps (`instance_map_from_maps`), all at the official defaults:
  1. blb = NP prob >= 0.5; 4-connected components; components < 10 px removed.
  2. h, v = minmax(HV channel 0 / 1); sh = 1 - minmax(Sobel_x(h)), sv = 1 - minmax(Sobel_y(v)) (kernel 21).
  3. energy = max(sh, sv) - (1 - blb), clipped at 0.
  4. dist = -blur3((1 - energy) * blb).
  5. marker = blb - (energy >= 0.4), clipped at 0; holes filled; opened with the 5x5 ellipse; 4-connected
     components; components < 10 px removed.
  6. watershed(dist, marker, mask=blb) (skimage, 4-connected).
Then (`process`): type of each instance = the most frequent non-background TP argmax over its pixels (ties ->
smaller type), or 0 when all its pixels are background (the official picks the most frequent type and
falls back to the second when that is 0). The official type probability (share of the winning type) is not
part of `postprocess.Instances`.

Differences from the official output, by design: instances are renumbered 1..M in raster order of their first
pixel (the official keeps the marker numbers, with gaps); centroids are (y, x) means (the official cv2
moments give the same mean as (x, y)). The official drops from its info dict (not from the map) instances
whose first contour has < 3 points; an instance grown from an opened marker always contains a 5x5 ellipse,
so that cannot happen here and is not restated.

`_postprocess_hv_reference` is a plain restatement with the official per-instance loop; `postprocess_hv` gives
the identical output with the per-instance work vectorised (`bincount`) and the whole-image steps sharing the
helpers above; tests/test_postprocess_hv.py checks they agree and `benchmarks/postprocess_hv_throughput.py`
measures both.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import scipy.ndimage as ndi
from skimage import segmentation

from dualunet_jax import postprocess_kernels
from dualunet_jax.postprocess import Instances, PostprocessError, use_kernels

_CROSS = ndi.generate_binary_structure(2, 1)
DEFAULTS = dict(np_threshold=0.5, energy_threshold=0.4, sobel_ksize=21, min_size=10, marker_min_size=10,
                opening_ksize=5, blur=True)


# ----------------------------------------------------------------------------------------------- OpenCV

def minmax(x: np.ndarray) -> np.ndarray:
  """cv2.normalize(x, None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F): float32 in [0, 1]."""
  x = np.asarray(x, np.float64)
  lo, hi = float(x.min()), float(x.max())
  scale = 1.0 / (hi - lo) if hi - lo > np.finfo(np.float64).eps else 0.0
  return (x * scale + (0.0 - lo * scale)).astype(np.float32)


def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
  """OpenCV's order-1 Sobel kernels (getSobelKernels, unnormalised): (derivative, smoothing), float64[ksize].

  smoothing = binomial row C(ksize - 1, i); derivative = C(ksize - 2, i - 1) - C(ksize - 2, i) (the binomial
  of one order less, differenced), running from -1 to +1. ksize 3 gives [-1, 0, 1] and [1, 2, 1].
  """
  if ksize < 3 or ksize % 2 == 0:
    raise PostprocessError(f'sobel_ksize must be odd and >= 3, got {ksize}')
  smooth = np.array([math.comb(ksize - 1, i) for i in range(ksize)], np.float64)
  lower = [math.comb(ksize - 2, i) for i in range(ksize - 1)] + [0]
  deriv = np.array([(lower[i - 1] if i else 0) - lower[i] for i in range(ksize)], np.float64)
  return deriv, smooth


def sobel(x: np.ndarray, axis: int, ksize: int) -> np.ndarray:
  """cv2.Sobel(x, CV_64F, dx, dy, ksize) of float[H, W]: derivative along `axis` (1 = x = dx, 0 = y = dy).
  Float64, the row (x) pass first as OpenCV's separable filter engine."""
  deriv, smooth = sobel_kernels(ksize)
  kx, ky = (deriv, smooth) if axis == 1 else (smooth, deriv)
  out = ndi.correlate1d(np.asarray(x, np.float64), kx, axis=1, mode='mirror')
  return ndi.correlate1d(out, ky, axis=0, mode='mirror')


def blur3(x: np.ndarray) -> np.ndarray:
  """cv2.GaussianBlur(x, (3, 3), 0) of float64[H, W]."""
  k = np.array([0.25, 0.5, 0.25])
  return ndi.correlate1d(ndi.correlate1d(x, k, axis=0, mode='mirror'), k, axis=1, mode='mirror')


def ellipse(ksize: int) -> np.ndarray:
  """cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)) as bool[k, k]."""
  r = c = ksize // 2
  out = np.zeros((ksize, ksize), bool)
  for i in range(ksize):
    dy = i - r
    if r == 0:
      out[i] = True
      continue
    dx = int(round(c * math.sqrt((r * r - dy * dy) / (r * r))))  # saturate_cast rounds to nearest
    out[i, max(c - dx, 0):min(c + dx + 1, ksize)] = True
  return out


def open_ellipse(m: np.ndarray, ksize: int) -> np.ndarray:
  """cv2.morphologyEx(m, MORPH_OPEN, ellipse(k)) of a binary map: erosion (outside counts as set) then
  dilation (outside counts as unset), bool[H, W]."""
  se = ellipse(ksize)
  eroded = ndi.binary_erosion(m, structure=se, border_value=1)
  return ndi.binary_dilation(eroded, structure=se, border_value=0)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
  """The official (skimage) remove_small_objects on a label map: labels with < min_size pixels -> 0."""
  if min_size <= 0 or labels.max(initial=0) == 0:
    return labels
  sizes = np.bincount(labels.ravel())
  too_small = sizes < min_size
  too_small[0] = False
  return np.where(too_small[labels], 0, labels)


def fill_holes(m: np.ndarray) -> np.ndarray:
  """scipy `binary_fill_holes(m)` (4-connected background) by one labelling: background components that do not
  touch the border are holes. bool[H, W]; ~5x faster than the iterated dilation of scipy."""
  bg, n = ndi.label(~m, structure=_CROSS)
  if n == 0:
    return m.copy()
  outside = np.zeros(n + 1, bool)
  for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
    outside[edge] = True
  outside[0] = True  # label 0 = the pixels of m
  return m | ~outside[bg]


# ----------------------------------------------------------------------------------------------- steps 1-6

def _check(maps: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  try:
    probs, fg, hv = (np.asarray(maps[k]) for k in ('class_probs', 'np', 'hv'))
  except KeyError as e:
    raise PostprocessError(f'HoVer-Net maps need class_probs, np and hv; missing {e}') from None
  if fg.ndim == 3 and fg.shape[-1] == 1:
    fg = fg[..., 0]
  if (hv.ndim != 3 or hv.shape[-1] != 2 or probs.ndim != 3 or fg.ndim != 2 or fg.shape != hv.shape[:2]
      or fg.shape != probs.shape[:2]):
    raise PostprocessError(f'expected class_probs [H, W, K+1], np [H, W(, 1)], hv [H, W, 2] of one size; got '
                           f'{probs.shape}, {fg.shape}, {hv.shape}')
  return probs, fg, hv


def instance_map_from_maps(fg_prob: np.ndarray, hv: np.ndarray, *, np_threshold: float = 0.5,
                           energy_threshold: float = 0.4, sobel_ksize: int = 21, min_size: int = 10,
                           marker_min_size: int = 10, opening_ksize: int = 5, blur: bool = True,
                           backend: str = 'auto') -> np.ndarray:
  """Steps 1-6 (the official `__proc_np_hv`): int32[H, W] watershed labels (the marker numbers, with gaps).

  Args:
    fg_prob: float[H, W] nuclear-pixel probability.
    hv: float[H, W, 2] (x, y) distance maps.
    np_threshold, energy_threshold, sobel_ksize, min_size (foreground components), marker_min_size,
      opening_ksize, blur: the official 0.5, 0.4, 21, 10, 10, 5, True (3x3 Gaussian on the landscape).
    backend: 'auto' | 'numba' | 'numpy': the watershed by the compiled kernel (postprocess_kernels.py, the
      same labels) or by skimage.
  """
  blb = np.asarray(fg_prob, np.float32) >= np_threshold
  blb = remove_small(ndi.label(blb, structure=_CROSS)[0], min_size) > 0
  blb_i = blb.astype(np.int32)
  hv = np.asarray(hv, np.float32)
  sh = 1.0 - minmax(sobel(minmax(hv[..., 0]), 1, sobel_ksize))
  sv = 1.0 - minmax(sobel(minmax(hv[..., 1]), 0, sobel_ksize))
  energy = np.maximum(sh, sv) - (1 - blb_i)  # float32 - int32 -> float64, as the official
  energy[energy < 0] = 0
  dist = (1.0 - energy) * blb_i
  dist = -(blur3(dist) if blur else dist)
  marker = blb_i - (energy >= energy_threshold).astype(np.int32)
  marker = fill_holes(marker > 0)
  marker = open_ellipse(marker, opening_ksize)
  marker = remove_small(ndi.label(marker, structure=_CROSS)[0], marker_min_size)
  if use_kernels(backend):
    return postprocess_kernels.watershed(dist, marker, blb, 0.0)
  return segmentation.watershed(dist, markers=marker, mask=blb).astype(np.int32)


def _raster_relabel(ws: np.ndarray) -> tuple[np.ndarray, int]:
  """Labels renumbered 1..M in raster order of their first pixel."""
  ids, first = np.unique(ws.ravel(), return_index=True)
  keep = ids > 0
  ids, first = ids[keep], first[keep]
  lut = np.zeros(int(ws.max(initial=0)) + 1, np.int32)
  lut[ids[np.argsort(first)]] = np.arange(1, ids.size + 1, dtype=np.int32)
  return lut[ws], int(ids.size)


# ----------------------------------------------------------------------------------------------- API

def postprocess_hv(class_probs: np.ndarray, fg_prob: np.ndarray, hv: np.ndarray, *, num_classes: int | None = None,
                   **kwargs: Any) -> Instances:
  """Instances of one tile from HoVer-Net's maps (module docstring).

  Args:
    class_probs: float[H, W, K+1] TP probabilities (only the argmax is used).
    fg_prob: float[H, W] NP foreground probability.
    hv: float[H, W, 2] HV maps (x, y).
    num_classes: K (default C - 1).
    **kwargs: `instance_map_from_maps` options.
  Returns:
    `Instances`; `classes` may hold 0 for an instance whose TP argmax is background on every pixel (official).
  """
  probs = np.asarray(class_probs)
  k = probs.shape[-1] - 1 if num_classes is None else int(num_classes)
  inst, n = _raster_relabel(instance_map_from_maps(fg_prob, hv, **kwargs))
  types = np.argmax(probs, axis=-1)
  idx = np.flatnonzero(inst)
  lab = inst.ravel()[idx].astype(np.int64)
  k1 = probs.shape[-1]
  votes = np.bincount(lab * k1 + types.ravel()[idx], minlength=(n + 1) * k1).reshape(n + 1, k1)[1:]
  nonzero = votes[:, 1:]
  classes = np.where(nonzero.sum(axis=1) > 0, np.argmax(nonzero, axis=1) + 1, 0).astype(np.int32)
  cnt = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
  yy, xx = np.divmod(idx, inst.shape[1])
  cy = np.bincount(lab, weights=yy, minlength=n + 1)[1:] / np.maximum(cnt, 1)
  cx = np.bincount(lab, weights=xx, minlength=n + 1)[1:] / np.maximum(cnt, 1)
  centroids = np.stack([cy, cx], axis=1).astype(np.float32).reshape(n, 2)
  lut = np.concatenate([np.zeros(1, np.int32), classes])
  counts = np.bincount(classes, minlength=k + 1)[1:k + 1].astype(np.int64)
  return Instances(inst, classes, centroids, lut[inst], counts)


def _postprocess_hv_reference(class_probs: np.ndarray, fg_prob: np.ndarray, hv: np.ndarray, *,
                              num_classes: int | None = None, np_threshold: float = 0.5,
                              energy_threshold: float = 0.4, sobel_ksize: int = 21, min_size: int = 10,
                              marker_min_size: int = 10, opening_ksize: int = 5, blur: bool = True,
                              backend: str = 'auto') -> Instances:
  """Plain restatement of the official `__proc_np_hv` + `process` (per-instance loops; tests, benchmark);
  `backend` is accepted for a common signature and ignored (the restatement always calls skimage)."""
  probs = np.asarray(class_probs)
  k = probs.shape[-1] - 1 if num_classes is None else int(num_classes)
  blb = (np.asarray(fg_prob, np.float32) >= np_threshold).astype(np.int32)
  blb = ndi.label(blb)[0]
  for i in range(1, blb.max() + 1):
    if (blb == i).sum() < min_size:
      blb[blb == i] = 0
  blb[blb > 0] = 1
  hv = np.asarray(hv, np.float32)
  h_dir, v_dir = minmax(hv[..., 0]), minmax(hv[..., 1])
  deriv, smooth = sobel_kernels(sobel_ksize)
  kx = np.outer(smooth, deriv)  # 2-D cv2 Sobel kernel, dx = 1
  pad = sobel_ksize // 2
  sobelh = ndi.correlate(np.pad(h_dir.astype(np.float64), pad, mode='reflect'), kx)[pad:-pad, pad:-pad]
  sobelv = ndi.correlate(np.pad(v_dir.astype(np.float64), pad, mode='reflect'), kx.T)[pad:-pad, pad:-pad]
  sobelh = 1 - minmax(sobelh)
  sobelv = 1 - minmax(sobelv)
  overall = np.maximum(sobelh, sobelv)
  overall = overall - (1 - blb)
  overall[overall < 0] = 0
  dist = (1.0 - overall) * blb
  if blur:
    g = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    dist = ndi.correlate(np.pad(dist, 1, mode='reflect'), g)[1:-1, 1:-1]
  dist = -dist
  overall = np.array(overall >= energy_threshold, dtype=np.int32)
  marker = blb - overall
  marker[marker < 0] = 0
  marker = ndi.binary_fill_holes(marker).astype('uint8')
  se = ellipse(opening_ksize)
  r = opening_ksize // 2
  eroded = ndi.binary_erosion(np.pad(marker, r, constant_values=1), structure=se)[r:-r, r:-r]
  marker = ndi.binary_dilation(eroded, structure=se)
  marker = ndi.label(marker)[0]
  for i in range(1, marker.max() + 1):
    if (marker == i).sum() < marker_min_size:
      marker[marker == i] = 0
  pred_inst = segmentation.watershed(dist, markers=marker, mask=blb)
  types = np.argmax(probs, axis=-1).astype(np.int32)

  ids = [i for i in np.unique(pred_inst) if i != 0]
  ids.sort(key=lambda i: np.flatnonzero(pred_inst == i)[0])  # raster order of the first pixel
  inst = np.zeros(pred_inst.shape, np.int32)
  classes = np.zeros(len(ids), np.int32)
  centroids = np.zeros((len(ids), 2), np.float32)
  for new, inst_id in enumerate(ids, start=1):
    region = pred_inst == inst_id
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    rmin, rmax, cmin, cmax = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = region[rmin:rmax, cmin:cmax]
    type_list, type_pixels = np.unique(types[rmin:rmax, cmin:cmax][crop], return_counts=True)
    ranked = sorted(zip(type_list, type_pixels), key=lambda t: t[1], reverse=True)
    inst_type = ranked[0][0]
    if inst_type == 0 and len(ranked) > 1:
      inst_type = ranked[1][0]
    ys, xs = np.nonzero(crop)
    inst[region] = new
    classes[new - 1] = inst_type
    centroids[new - 1] = ys.mean() + rmin, xs.mean() + cmin
  class_map = np.concatenate([np.zeros(1, np.int32), classes])[inst]
  counts = np.array([(classes == c).sum() for c in range(1, k + 1)], np.int64)
  return Instances(inst, classes, centroids, class_map, counts)


def postprocess_hv_maps(maps: Mapping[str, np.ndarray], **kwargs: Any) -> Instances:
  """The method's `postprocess_fn`: `postprocess_hv` of maps {'class_probs': float[H, W, K+1], 'np':
  float[H, W, 1] foreground probability, 'hv': float[H, W, 2]}; kwargs as `instance_map_from_maps` (+
  num_classes)."""
  probs, fg, hv = _check(maps)
  return postprocess_hv(probs, fg, hv, **kwargs)


def oracle_maps(instance_map: np.ndarray, instance_classes: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
  """HoVer-Net's ideal maps of a ground-truth tile: NP = fg, HV = `hv_targets.hv_map`, TP = one-hot classes.

  Args:
    instance_map: int[H, W], instances 1..N (contiguous).
    instance_classes: int[N] in 1..K.
    num_classes: K.
  Returns:
    {'class_probs': float32[H, W, K+1], 'np': float32[H, W, 1], 'hv': float32[H, W, 2]}.
  """
  from dualunet_jax.data import hv_targets  # numpy only
  inst = np.asarray(instance_map)
  lut = np.concatenate([np.zeros(1, np.int64), np.asarray(instance_classes, np.int64).reshape(-1)])
  class_map = lut[inst]
  return {'class_probs': np.eye(num_classes + 1, dtype=np.float32)[class_map],
          'np': (inst > 0).astype(np.float32)[..., None], 'hv': hv_targets.hv_map(inst)}
