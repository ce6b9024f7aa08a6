"""Model outputs -> nucleus instances: density peaks as markers, compact watershed, majority-vote classes.

Host side (numpy / scipy / scikit-image), one tile at a time, parallel over tiles with a process pool.

`postprocess` is the reference algorithm (`../shared/reference/dualunet_reference.md` §4, steps 1-10):

  1. r = skimage `rescale_intensity(density)` (float32; maps to [0, 1], or to [-1, 1] when the density has a
     negative pixel, which halves the effective h; a constant map is clipped to that range).
  2. hmax = skimage `h_maxima(r, h)` (3x3 footprint; empty when h > ptp(r)).
  3. one seed pixel per 4-connected hmax component, at its truncated (floored) mean (y, x).
  4. markers = 4-connected components of the seed map (adjacent seeds merge), 1..M.
  5. A = argmax_c class_probs, fg = A > 0.
  6. dist = `distance_transform_edt(fg)`.
  7. ws = skimage `watershed(-dist, markers, mask=fg, compactness)` (4-connected flooding); foreground
     components without a marker stay 0 (cells without a detected centre are dropped).
  8. ws *= ~`find_boundaries(ws, mode='outer')` (a 2-px cut where two instances touch).
  9. relabel the connected components of ws > 0 (connectivity 1 = 4-neighbours as the reference eval,
     2 = 8-neighbours as the reference `inference.py`).
  10. class of each instance = majority vote of A over its pixels (ties -> smaller class), centroid = mean
      (y, x); no size filter, no hole filling.

The reference used OpenCV for steps 3-4; they are restated with `scipy.ndimage.label` (same components, same
raster order of labels; label values never influence the segmentation). `_postprocess_reference` keeps a plain
whole-image restatement; `postprocess` gives the identical output faster (checked in
tests/test_postprocess.py and tests/test_postprocess_exact.py):
- `h_maxima` never reconstructs: a pixel is selected iff the component of {r > T} around it (T = its value
  minus h, in float32) holds no pixel of the reconstruction seed above T, which local certificates decide
  for almost every local maximum (exact, see its docstring);
- seeds, the boundary cut, majority vote and centroids are vectorised (`bincount`, array shifts), with no
  per-instance masks.
- the watershed runs only on foreground components with two or more marker labels, on their bounding box,
  unless two markers of one component tie (then one whole-image call); see `_watershed`.
With numba installed (the `fast` extra; `backend='auto'` or 'numba'), compiled exact restatements of skimage's
reconstruction (step 2: h-maxima without certificates) and watershed and of scipy's distance transform
(steps 6-7, inside the component logic above) replace the library calls (postprocess_kernels.py); 'numpy'
forces the path above. The output is the same either way (tested).

`marker='peak_local_max'` (not in the reference) replaces steps 2-4 by skimage `peak_local_max(r,
min_distance, threshold_abs=threshold, exclude_border=False)`, one marker per peak.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi
from numpy.lib.stride_tricks import sliding_window_view
from skimage import exposure, feature, morphology, segmentation

from dualunet_jax import postprocess_kernels as kernels

MARKERS = ('hmaxima', 'peak_local_max')
BACKENDS = ('auto', 'numba', 'numpy')
_CROSS = ndi.generate_binary_structure(2, 1)
_SQUARE = ndi.generate_binary_structure(2, 2)


class PostprocessError(ValueError):
  """Bad inputs or options for post-processing."""


@dataclasses.dataclass(frozen=True)
class Instances:
  """Nucleus instances of one tile.

  Attributes:
    instance_map: int32[H, W], 0 = background, instances 1..M in raster order of their first pixel.
    classes: int32[M], class (1..K) of instance i + 1.
    centroids: float32[M, 2], (y, x) centre of mass of instance i + 1.
    class_map: int32[H, W], 0 = background, else the class of the covering instance.
    counts: int64[K], number of instances of class 1..K.
  """
  instance_map: np.ndarray
  classes: np.ndarray
  centroids: np.ndarray
  class_map: np.ndarray
  counts: np.ndarray

  @property
  def num_instances(self) -> int:
    return int(self.classes.shape[0])


def from_config(postprocess_config: Mapping[str, Any]) -> dict[str, Any]:
  """The `postprocess` keyword arguments held by `config.postprocess` (the `workers` field is left out)."""
  keys = ('marker', 'h', 'min_distance', 'threshold', 'compactness', 'relabel_connectivity', 'backend')
  return {k: postprocess_config[k] for k in keys if k in postprocess_config}


def use_kernels(backend: str) -> bool:
  """Whether `backend` ('auto' | 'numba' | 'numpy') runs the compiled kernels (postprocess_kernels.py)."""
  if backend not in BACKENDS:
    raise PostprocessError(f'backend must be one of {BACKENDS}, got {backend!r}')
  if backend == 'numba' and not kernels.available():
    raise PostprocessError('backend numba needs numba installed (pip install "dualunet-jax[fast]") and '
                           f'${kernels.DISABLE_ENV} unset')
  return backend == 'numba' or (backend == 'auto' and kernels.available())


# ----------------------------------------------------------------------------------------------- steps


def _argmax_classes(class_probs: np.ndarray) -> tuple[np.ndarray, int | None]:
  """A = per-pixel class int[H, W] and K (None when class_probs is already a class map)."""
  class_probs = np.asarray(class_probs)
  if class_probs.ndim == 3:
    return np.argmax(class_probs, axis=-1).astype(np.int32), class_probs.shape[-1] - 1
  if class_probs.ndim == 2 and np.issubdtype(class_probs.dtype, np.integer):
    if class_probs.size and class_probs.min() < 0:
      raise PostprocessError('a class map must have values >= 0 (0 = background)')
    return class_probs.astype(np.int32, copy=False), None
  raise PostprocessError(f'class_probs must be float[H, W, C] probabilities or an int[H, W] class map, got '
                         f'shape {class_probs.shape} dtype {class_probs.dtype}')


def rescale(density: np.ndarray) -> np.ndarray:
  """Step 1: skimage `rescale_intensity` semantics on a float32 map ([0,1], or [-1,1] if any value < 0)."""
  return exposure.rescale_intensity(np.asarray(density, np.float32))


# h-maxima certificates, cheapest first: straight 8-direction rays of these lengths (kill only), then the
# component inside square windows of these radii (kill, or decide when closed), then whole-image labels.
_RAYS = (3, 12)
_WINDOWS = (6, 24, 64)
_MAX_WHOLE_IMAGE_LABELS = 16  # beyond this many undecided pixels, skimage's global computation is cheaper
_DIRECTIONS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
_SLICES_8 = np.zeros((3, 3, 3), bool)
_SLICES_8[1] = True  # 8-connectivity inside each 2-D slice of a stack, none across slices


def _thresholds(m: np.ndarray, hf: np.float32) -> np.ndarray:
  """T(m) = the largest float32 x with fl32(m - x) >= hf, elementwise for float32 m[N] (hf > 0).

  fl32(z) >= hf iff z >= mid = (pred(hf) + hf) / 2 (round to nearest even: a tie rounds up iff hf's last
  mantissa bit is 0), so T = the largest float32 <= m - mid; float64 holds m - mid exactly unless m and hf
  are ~2^29 apart in scale, and the result is checked, with an exact bisection where the check fails.
  """
  mid = (np.float64(np.nextafter(hf, np.float32(0))) + np.float64(hf)) / 2
  v = m.astype(np.float64) - mid
  x = v.astype(np.float32)
  x = np.where(x > v, np.nextafter(x, np.float32(-np.inf)), x)
  ok = ((m - x) >= hf) & ((m - np.nextafter(x, np.float32(np.inf))) < hf)
  if not ok.all():
    bad = np.flatnonzero(~ok)
    x[bad] = _bisect_thresholds(m[bad], hf)
  return x


def _bisect_thresholds(m: np.ndarray, hf: np.float32) -> np.ndarray:
  """`_thresholds` by bisection over the float32 order (int keys: -|bits| for negatives, bits otherwise)."""
  def key(x):
    u = x.view(np.uint32).astype(np.int64)
    return np.where(u >> 31, -(u & 0x7FFFFFFF), u)

  def value(k):
    return np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32).view(np.float32)

  lo = np.full(m.shape, key(np.array([-np.finfo(np.float32).max], np.float32))[0])  # fl32(m - lo) >= hf
  hi = key(m)  # fl32(m - m) = 0 < hf
  while True:
    act = hi - lo > 1
    if not act.any():
      return value(lo)
    mid = (lo + hi) // 2
    good = (m - value(mid)) >= hf
    lo = np.where(act & good, mid, lo)
    hi = np.where(act & ~good, mid, hi)


def _padded(x: np.ndarray, k: int) -> np.ndarray:
  out = np.full((x.shape[0] + 2 * k, x.shape[1] + 2 * k), -np.inf, np.float32)
  out[k:k + x.shape[0], k:k + x.shape[1]] = x
  return out


def _ray_kills(rp: np.ndarray, sp: np.ndarray, k: int, cy: np.ndarray, cx: np.ndarray,
               t: np.ndarray) -> np.ndarray:
  """bool[N]: a straight 8-connected path of <= k pixels from (cy, cx) stays above t[i] and reaches s > t[i].

  rp, sp: r and s padded by k with -inf.
  """
  d = np.arange(1, k + 1)
  yy = cy[:, None, None] + k + _DIRECTIONS[:, 0, None] * d  # [N, 8, k]
  xx = cx[:, None, None] + k + _DIRECTIONS[:, 1, None] * d
  tt = t[:, None, None]
  connected = np.minimum.accumulate(rp[yy, xx], axis=2) > tt
  return (connected & (sp[yy, xx] > tt)).any(axis=(1, 2))


def _window_decisions(rp: np.ndarray, sp: np.ndarray, k: int, cy: np.ndarray, cx: np.ndarray,
                      t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The component of {r > t[i]} holding (cy, cx) inside its (2k+1)^2 window, all windows in one 3-D label.

  Returns (dead bool[N]: it holds a pixel with s > t[i]; closed bool[N]: it stays off the window's outer ring,
  so it is the whole-image component). rp, sp: r and s padded by k with -inf.
  """
  size = (2 * k + 1, 2 * k + 1)
  wr = sliding_window_view(rp, size)[cy, cx]  # [N, 2k+1, 2k+1]
  ws = sliding_window_view(sp, size)[cy, cx]
  tt = t[:, None, None]
  lab, _ = ndi.label(wr > tt, structure=_SLICES_8)
  comp = lab == lab[:, k:k + 1, k:k + 1]
  dead = (comp & (ws > tt)).any(axis=(1, 2))
  ring = comp[:, 0].any(1) | comp[:, -1].any(1) | comp[:, :, 0].any(1) | comp[:, :, -1].any(1)
  return dead, ~ring


def h_maxima(r: np.ndarray, h: float, *, backend: str = 'auto') -> np.ndarray:
  """skimage `h_maxima(r, h)` (3x3 footprint) for a float32 [H, W] r and a python float h > 0, bit-identical.

  skimage selects p iff fl32(r(p) - rec(p)) >= h, rec = greyscale reconstruction by dilation of the seed
  s = r - h - 2e-6|r| (float32, its `resolution` term) under r. For float32 x < r(p), rec(p) > x iff the
  8-connected component of {r > x} holding p holds a pixel with s > x. With T = the largest float32 such that
  fl32(r(p) - T) >= h (`_thresholds`), p is therefore selected iff C(p) = that component at level T holds no
  pixel with s > T (T < r(p) always). Decided without any reconstruction:
  - p needs s <= T on its 3x3 neighbourhood (so r there <= r(p) + ~3e-6(|r| + h)): a local-maximum filter;
  - T >= max(s): selected; T < min(r) (C(p) is the whole image, holding argmax s): not selected;
  - the rest by certificates: a straight path above T to a pixel with s > T (not selected), the component in
    a window around p (holding s > T: not selected; off the window's ring: it is C(p), exact), and finally
    whole-image labels (or skimage itself when many pixels are still undecided).
  With the compiled kernels (`backend`, see `use_kernels`), rec itself is computed exactly instead
  (`postprocess_kernels.reconstruct_dilation`) and compared as skimage does.
  Other inputs (dtypes, h, non-finite values) go to skimage unchanged.

  Args:
    r: float32[H, W] rescaled density.
    h: the h-maxima height.
    backend: 'auto' | 'numba' | 'numpy'.

  Returns:
    uint8[H, W], 1 on the pixels of maxima of dynamic >= h.
  """
  r = np.asarray(r)
  if r.dtype != np.float32 or r.ndim != 2 or type(h) is not float or not 0 < h < np.inf:  # noqa: E721
    return morphology.h_maxima(r, h)
  out = np.zeros(r.shape, np.uint8)
  if r.size == 0 or h > np.ptp(r):  # skimage's own test, same operands
    return out
  if not np.isfinite(r).all():
    return morphology.h_maxima(r, h)
  s = r - h - 2 * np.finfo(np.float32).resolution * np.abs(r)  # skimage's seed, bit for bit
  if use_kernels(backend):
    return ((r - kernels.reconstruct_dilation(s, r)) >= h).astype(np.uint8)  # skimage's residue test
  hgt, wid = r.shape
  hf = np.float32(h)
  rf, sf = r.ravel(), s.ravel()
  rmin, smax = rf.min(), sf.max()
  eps = np.float32(2e-5 * (float(np.abs(rf).max()) + h))  # > the float32 slack of the bounds above
  # Superset of the selectable pixels: no neighbour more than eps higher, and T >= min(rmin, smax).
  mr = ndi.maximum_filter(r, size=3, mode='nearest')
  cand = np.flatnonzero((mr <= r + eps) & (r >= min(rmin, smax) + hf - eps))
  if cand.size == 0:
    return out
  cy, cx = np.divmod(cand, wid)
  s1 = np.pad(s, 1, mode='edge')
  ms = s1[cy, cx]
  for dy in range(3):
    for dx in range(3):
      np.maximum(ms, s1[cy + dy, cx + dx], out=ms)
  t = _thresholds(rf[cand], hf)
  ok = ms <= t
  cand, t, cy, cx = cand[ok], t[ok], cy[ok], cx[ok]
  selected = t >= smax
  nontrivial = ~selected & (t >= rmin)
  todo = np.flatnonzero(nontrivial)
  if todo.size:
    dead = np.zeros(cand.size, bool)
    for k in _RAYS:
      kills = _ray_kills(_padded(r, k), _padded(s, k), k, cy[todo], cx[todo], t[todo])
      dead[todo[kills]] = True
      todo = todo[~kills]
    for k in _WINDOWS:
      if todo.size == 0:
        break
      k = min(k, max(hgt, wid))  # a window this wide covers the image: every component is closed
      d, closed = _window_decisions(_padded(r, k), _padded(s, k), k, cy[todo], cx[todo], t[todo])
      dead[todo[d]] = True
      todo = todo[~d & ~closed]
    if todo.size > _MAX_WHOLE_IMAGE_LABELS:
      return morphology.h_maxima(r, h)
    for i in todo:
      lab, _ = ndi.label(r > t[i], structure=_SQUARE)
      dead[i] = bool((s[lab == lab[cy[i], cx[i]]] > t[i]).any())
    selected[nontrivial] = ~dead[nontrivial]
  out.ravel()[cand[selected]] = 1
  return out


def _hmaxima_markers(r: np.ndarray, h: float, backend: str = 'auto') -> np.ndarray:
  """Steps 2-4: int32[H, W] markers 1..M from the h-maxima of the rescaled map."""
  hmax = h_maxima(r, h, backend=backend)  # uint8, all zero when h > ptp(r)
  idx = np.flatnonzero(hmax)
  if not (hmax[1:] & hmax[:-1]).any() and not (hmax[:, 1:] & hmax[:, :-1]).any():
    # Usual case: isolated pixels, each its own component, seed and marker (numbered in raster order).
    markers = np.zeros(r.size, np.int32)
    markers[idx] = np.arange(1, idx.size + 1, dtype=np.int32)
    return markers.reshape(r.shape)
  comps, n = ndi.label(hmax, structure=_CROSS)
  seeds = np.zeros(r.shape, np.uint8)
  if n:
    idx = np.flatnonzero(comps)
    lab = comps.ravel()[idx]
    yy, xx = np.divmod(idx, r.shape[1])
    cnt = np.bincount(lab, minlength=n + 1)[1:]
    # int() truncation of the float mean, as the reference's cv2 centroid -> int() (coordinates >= 0).
    cy = (np.bincount(lab, weights=yy, minlength=n + 1)[1:] / cnt).astype(np.int64)
    cx = (np.bincount(lab, weights=xx, minlength=n + 1)[1:] / cnt).astype(np.int64)
    seeds[cy, cx] = 1
  markers, _ = ndi.label(seeds, structure=_CROSS)
  return markers.astype(np.int32)


def _peak_markers(r: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
  """`peak_local_max` markers: one label per peak, numbered in raster order."""
  peaks = feature.peak_local_max(r, min_distance=int(min_distance), threshold_abs=float(threshold),
                                 exclude_border=False)
  seeds = np.zeros(r.shape, bool)
  seeds[peaks[:, 0], peaks[:, 1]] = True
  flat = np.flatnonzero(seeds)
  markers = np.zeros(r.size, np.int32)
  markers[flat] = np.arange(1, flat.size + 1, dtype=np.int32)
  return markers.reshape(r.shape)


def markers_from_density(density: np.ndarray, *, marker: str = 'hmaxima', h: float = 0.15, min_distance: int = 3,
                         threshold: float = 0.1, backend: str = 'auto') -> np.ndarray:
  """Steps 1-4 (or the `peak_local_max` variant): int32[H, W] markers 1..M from a float[H, W] density."""
  if marker not in MARKERS:
    raise PostprocessError(f'marker must be one of {MARKERS}, got {marker!r}')
  r = rescale(density)
  if marker == 'hmaxima':
    return _hmaxima_markers(r, float(h), backend)
  return _peak_markers(r, min_distance, threshold)


def _watershed(fg: np.ndarray, markers: np.ndarray, compactness: float, backend: str = 'auto') -> np.ndarray:
  """Steps 6-7: skimage `watershed(-distance_transform_edt(fg), markers, mask=fg, compactness)`, identical.

  With the compiled kernels (`use_kernels(backend)`) their exact distance transform and watershed stand in for
  scipy's and skimage's below, which changes nothing else.

  The watershed floods the 4-connected components of fg independently (its connectivity 1), and a component's
  result depends only on the order of its own heap items: items compare by (value, age), ages are unique and
  grow with every push of the whole image, so two runs order a component's items alike as long as no two of
  them share both value and age, i.e. unless two of its markers (all age 0) have equal distances, which is
  the only place where the global heap's layout (every marker of the image) breaks the tie. Hence:
  - a component without markers stays 0, one holding a single marker label takes that label everywhere;
  - components with two or more labels and pairwise different marker distances are flooded together in one
    call on their bounding box (distances from that box grown by 1: the nearest background pixel of a
    component's pixel lies inside it, as the first pixel past the component along its row or column does);
  - if a component's markers tie, the one global call is made, as the reference does.
  """
  compiled = use_kernels(backend)

  def edt(mask):
    dist = kernels.distance_transform_edt(mask) if compiled else None
    return ndi.distance_transform_edt(mask) if dist is None else dist  # None: no background (scipy's rule)

  def flood(image, seeds, mask):
    if compiled:
      return kernels.watershed(image, seeds, mask, compactness)
    return segmentation.watershed(image, seeds, mask=mask, compactness=compactness)

  comps, n = ndi.label(fg, structure=_CROSS)
  ws = np.zeros(fg.shape, np.int32)
  mpos = np.flatnonzero(markers.ravel() * fg.ravel())
  if mpos.size == 0:
    return ws
  mlab = markers.ravel()[mpos]
  mcomp = comps.ravel()[mpos]
  lo = np.full(n + 1, np.iinfo(np.int32).max, np.int32)
  hi = np.zeros(n + 1, np.int32)
  np.minimum.at(lo, mcomp, mlab)
  np.maximum.at(hi, mcomp, mlab)
  multi = hi > lo
  lut = np.where(hi == lo, hi, 0).astype(np.int32)
  lut[0] = 0
  ws = lut[comps]
  if not multi.any():
    return ws
  inside = multi[comps]
  rows = np.flatnonzero(inside.any(axis=1))
  cols = np.flatnonzero(inside.any(axis=0))
  hgt, wid = fg.shape
  y0, y1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, hgt)
  x0, x1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, wid)
  box = fg[y0:y1, x0:x1]
  whole = (y1 - y0) * (x1 - x0) > 0.6 * fg.size or box.all()  # (no background in the box: scipy's own rule)
  dist = edt(fg) if whole else None
  dbox = dist[y0:y1, x0:x1] if whole else edt(box)
  sel = multi[mcomp]
  my, mx = np.divmod(mpos[sel], wid)
  v, c = dbox[my - y0, mx - x0], mcomp[sel]
  order = np.lexsort((v, c))
  v, c = v[order], c[order]
  if ((c[1:] == c[:-1]) & (v[1:] == v[:-1])).any():
    if dist is None:
      dist = edt(fg)
    return flood(-dist, markers, fg)
  ibox = inside[y0:y1, x0:x1]
  sub = flood(-dbox, np.where(ibox, markers[y0:y1, x0:x1], 0), ibox)
  wbox = ws[y0:y1, x0:x1]
  wbox[ibox] = sub[ibox]
  return ws


def cut_touching(ws: np.ndarray) -> np.ndarray:
  """Step 8: `ws * ~find_boundaries(ws, mode='outer', background=0)` without the grey dilations.

  A pixel with label L > 0 is zeroed iff a 4-neighbour differs from L and a 3x3 neighbour holds a non-zero
  label other than L. Out-of-image neighbours mirror the pixel itself (skimage's reflect mode), i.e. never
  differ.
  """
  p = np.pad(ws, 1, mode='edge')  # edge == reflect for a 1-px neighbourhood
  h, w = ws.shape
  diff4 = np.zeros(ws.shape, bool)
  other8 = np.zeros(ws.shape, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == 0 and dx == 0:
        continue
      nb = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
      ne = nb != ws
      if dy == 0 or dx == 0:
        diff4 |= ne
      other8 |= ne & (nb != 0)
  return np.where(diff4 & other8, 0, ws).astype(ws.dtype, copy=False)


def _vote(instance_map: np.ndarray, n: int, a: np.ndarray,
          num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Step 10 for all instances at once: classes int32[n], centroids float32[n, 2], counts int64[K]."""
  idx = np.flatnonzero(instance_map)
  lab = instance_map.ravel()[idx].astype(np.int64)
  cls = a.ravel()[idx].astype(np.int64)
  k1 = max(num_classes, int(cls.max()) if cls.size else 0) + 1
  votes = np.bincount(lab * k1 + cls, minlength=(n + 1) * k1).reshape(n + 1, k1)[1:]
  classes = np.argmax(votes, axis=1).astype(np.int32)  # first maximum -> smaller class on ties
  cnt = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
  yy, xx = np.divmod(idx, instance_map.shape[1])
  with np.errstate(invalid='ignore', divide='ignore'):
    cy = np.bincount(lab, weights=yy, minlength=n + 1)[1:] / cnt
    cx = np.bincount(lab, weights=xx, minlength=n + 1)[1:] / cnt
  centroids = np.stack([cy, cx], axis=1).astype(np.float32).reshape(n, 2)
  counts = np.bincount(classes, minlength=num_classes + 1)[1:num_classes + 1].astype(np.int64)
  return classes, centroids, counts


def _finish(ws: np.ndarray, a: np.ndarray, num_classes: int, relabel_connectivity: int) -> Instances:
  """Steps 8-10 on a watershed label map."""
  if relabel_connectivity not in (1, 2):
    raise PostprocessError(f'relabel_connectivity must be 1 or 2, got {relabel_connectivity}')
  ws = cut_touching(ws)
  inst, n = ndi.label(ws > 0, structure=_CROSS if relabel_connectivity == 1 else _SQUARE)
  inst = inst.astype(np.int32)
  classes, centroids, counts = _vote(inst, n, a, num_classes)
  lut = np.concatenate([np.zeros(1, np.int32), classes])
  return Instances(inst, classes, centroids, lut[inst], counts)


def _check(class_probs: np.ndarray, density: np.ndarray) -> tuple[np.ndarray, int | None, np.ndarray]:
  a, k = _argmax_classes(class_probs)
  density = np.asarray(density)
  if density.ndim == 3 and density.shape[-1] == 1:
    density = density[..., 0]
  if density.shape != a.shape:
    raise PostprocessError(f'density shape {density.shape} does not match class map shape {a.shape}')
  return a, k, density


# ----------------------------------------------------------------------------------------------- API


def postprocess(class_probs: np.ndarray, density: np.ndarray, *, marker: str = 'hmaxima', h: float = 0.15,
                min_distance: int = 3, threshold: float = 0.1, compactness: float = 1.0,
                relabel_connectivity: int = 1, num_classes: int | None = None, backend: str = 'auto') -> Instances:
  """Instances of one tile from the two model outputs (reference §4; see the module docstring).

  Args:
    class_probs: float[H, W, K+1] per-pixel class probabilities (channel 0 background; only the argmax is
      used, so logits work too), or int[H, W] argmax class map (0 = background, 1..K).
    density: float[H, W] (or [H, W, 1]) raw centroid density.
    marker: 'hmaxima' (reference) | 'peak_local_max'.
    h: h-maxima height on the rescaled density.
    min_distance, threshold: `peak_local_max` only (threshold_abs on the rescaled density).
    compactness: compact-watershed compactness (reference 1).
    relabel_connectivity: 1 = 4-connected relabelling (reference eval), 2 = 8-connected (reference inference).
    num_classes: K; defaults to C - 1 for probabilities, to max(class map) for a class map.
    backend: 'auto' (compiled kernels when numba is installed, else numpy) | 'numba' | 'numpy'; the output
      is identical either way.

  Returns:
    `Instances` (int32 instance/class maps, int32[M] classes, float32[M, 2] (y, x) centroids, int64[K]
    counts).
  """
  a, k, density = _check(class_probs, density)
  if num_classes is None:
    num_classes = k if k is not None else int(a.max(initial=0))
  markers = markers_from_density(density, marker=marker, h=h, min_distance=min_distance, threshold=threshold,
                                 backend=backend)
  ws = _watershed(a > 0, markers, compactness, backend)
  return _finish(ws, a, num_classes, relabel_connectivity)


def _postprocess_reference(class_probs: np.ndarray, density: np.ndarray, *, marker: str = 'hmaxima',
                           h: float = 0.15, min_distance: int = 3, threshold: float = 0.1,
                           compactness: float = 1.0, relabel_connectivity: int = 1,
                           num_classes: int | None = None, backend: str = 'auto') -> Instances:
  """Plain whole-image restatement of reference §4 (a per-instance loop; for tests and the benchmark).

  `backend` is accepted so that both functions take the same options, and ignored: the restatement always
  calls the libraries."""
  a, k, density = _check(class_probs, density)
  if num_classes is None:
    num_classes = k if k is not None else int(a.max(initial=0))
  r = exposure.rescale_intensity(np.asarray(density, np.float32))
  if marker == 'hmaxima':
    hmax = morphology.h_maxima(r, h)
    comps, n = ndi.label(hmax, structure=_CROSS)
    seeds = np.zeros(r.shape, np.uint8)
    for i in range(1, n + 1):
      ys, xs = np.nonzero(comps == i)
      seeds[int(ys.mean()), int(xs.mean())] = 255
    markers, _ = ndi.label(seeds, structure=_CROSS)
  else:
    markers = _peak_markers(r, min_distance, threshold)
  fg = a > 0
  dist = ndi.distance_transform_edt(fg)
  ws = segmentation.watershed(-dist, markers, mask=fg, compactness=compactness)
  ws = ws * ~segmentation.find_boundaries(ws, mode='outer', background=0)
  inst, n = ndi.label(ws, structure=_CROSS if relabel_connectivity == 1 else _SQUARE)
  classes = np.zeros(n, np.int32)
  centroids = np.zeros((n, 2), np.float32)
  class_map = np.zeros(a.shape, np.int32)
  for i in range(1, n + 1):
    region = inst == i
    classes[i - 1] = np.bincount(a[region]).argmax()
    ys, xs = np.nonzero(region)
    centroids[i - 1] = ys.mean(), xs.mean()
    class_map[region] = classes[i - 1]
  counts = np.bincount(classes, minlength=num_classes + 1)[1:num_classes + 1].astype(np.int64)
  return Instances(inst.astype(np.int32), classes, centroids, class_map, counts)


# ----------------------------------------------------------------------------------------------- maps API


def postprocess_maps(maps: Mapping[str, np.ndarray], **kwargs: Any) -> Instances:
  """DualU-Net's post-processing of one tile's method maps (`methods.dualunet`): `postprocess` of
  maps['class_probs'] float[H, W, K+1] and maps['density'] float[H, W, 1]."""
  return postprocess(maps['class_probs'], maps['density'], **kwargs)


# ----------------------------------------------------------------------------------------------- parallel


def _call_star(args: tuple[Any, Mapping[str, np.ndarray], dict[str, Any]]) -> Any:
  fn, maps, kwargs = args
  return fn(maps, **kwargs)


def _resolve_workers(workers: int) -> int:
  if workers < 0:
    raise PostprocessError(f'workers must be >= 0, got {workers}')
  return workers or os.cpu_count() or 1


class PostProcessor:
  """A reusable pool for post-processing many tiles while the device computes the next batch.

  `fn(maps, **kwargs) -> Instances` is a method's post-processing (`Method.postprocess_fn`, default
  DualU-Net's `postprocess_maps`): a top-level function, pickled by reference, so the workers import only its
  (JAX-free) module. `workers=1` runs in the calling process (futures complete at submit time); otherwise a
  spawn-context `ProcessPoolExecutor` (safe next to JAX, which must not be forked once initialised). Use as a
  context manager or call `close()`.

      with PostProcessor(workers=2, **from_config(config.postprocess)) as pp:
        futures = [pp.submit({'class_probs': p, 'density': d}) for p, d in zip(probs, dens)]
        instances = [f.result() for f in futures]
  """

  def __init__(self, workers: int = 0, fn: Any = None, **kwargs: Any):
    self.workers = _resolve_workers(int(workers))
    self.fn = fn or postprocess_maps
    self.kwargs = dict(kwargs)
    self._pool = None
    if self.workers > 1:
      self._pool = concurrent.futures.ProcessPoolExecutor(self.workers,
                                                          mp_context=multiprocessing.get_context('spawn'))

  @classmethod
  def from_config(cls, postprocess_config: Mapping[str, Any], **overrides: Any) -> 'PostProcessor':
    """DualU-Net's pool from `config.postprocess` (its `workers` field unless overridden)."""
    kwargs = from_config(postprocess_config)
    kwargs.update(overrides)
    workers = kwargs.pop('workers', postprocess_config.get('workers', 0))
    return cls(workers=workers, **kwargs)

  def submit(self, maps: Mapping[str, np.ndarray], **kwargs: Any) -> concurrent.futures.Future:
    """Future of `fn(maps, **self.kwargs, **kwargs)` for one tile."""
    kw = {**self.kwargs, **kwargs}
    maps = {k: np.asarray(v) for k, v in maps.items()}
    if self._pool is None:
      fut: concurrent.futures.Future = concurrent.futures.Future()
      try:
        fut.set_result(self.fn(maps, **kw))
      except Exception as e:  # pylint: disable=broad-except
        fut.set_exception(e)
      return fut
    return self._pool.submit(_call_star, (self.fn, maps, kw))

  def map(self, maps: Iterable[Mapping[str, np.ndarray]]) -> list[Instances]:
    """`fn` of every tile's maps, in order."""
    futures = [self.submit(m) for m in maps]
    return [f.result() for f in futures]

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> 'PostProcessor':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def postprocess_batch(class_probs: np.ndarray | Sequence[np.ndarray], density: np.ndarray | Sequence[np.ndarray],
                      *, workers: int = 0, **kwargs: Any) -> list[Instances]:
  """`postprocess` of every tile of a batch.

  Args:
    class_probs: float[B, H, W, K+1] (or int[B, H, W] class maps, or a sequence of per-tile arrays).
    density: float[B, H, W] (or [B, H, W, 1], or a sequence).
    workers: 0 = os.cpu_count() processes, 1 = in-process, n = n processes (a pool per call; keep a
      `PostProcessor` alive to amortise the start-up across batches).
    **kwargs: `postprocess` options.

  Returns:
    One `Instances` per tile, in order.
  """
  if len(class_probs) != len(density):
    raise PostprocessError(f'{len(class_probs)} class maps but {len(density)} density maps')
  workers = min(_resolve_workers(int(workers)), max(len(class_probs), 1))
  with PostProcessor(workers=workers, **kwargs) as pp:
    return pp.map({'class_probs': p, 'density': d} for p, d in zip(class_probs, density))
