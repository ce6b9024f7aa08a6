"""Compiled kernels for the host post-processing: exact restatements of three library steps (optional numba).

The three steps that dominate `postprocess` on 256² tiles, each restated so that its output is *identical* to
the library call it replaces (same values, same tie-breaking), compiled with numba when it is installed
(`pip install "dualunet-jax[fast]"`; wheels for Linux, macOS and Windows):

- `reconstruct_dilation(seed, mask)`: skimage `reconstruction(seed, mask, method='dilation')` with the 3x3
  footprint, for float32 seed <= mask: rec(p) = max over 8-connected paths q -> p of min(seed(q), mask along
  the path), by Vincent's hybrid scan + queue algorithm. Only min / max of input values: bit-exact.
- `distance_transform_edt(fg)`: scipy `distance_transform_edt(fg)` (float64). scipy returns sqrt(dy² + dx²)
  to the nearest background pixel of its exact feature transform; the squared distance is an integer that
  every exact EDT agrees on, so an integer lower-envelope EDT (Felzenszwalb & Huttenlocher) followed by the
  same float64 sqrt gives the same values.
- `watershed(image, markers, mask, compactness)`: skimage `watershed(image, markers, mask=mask,
  compactness=compactness)` with connectivity 1 and no watershed line. skimage floods from a binary heap
  ordered by (value, age), a pushed pixel's cost raised to at least its parent's; ages are unique except for
  the markers (all age 0), so the only ties are between markers of equal value, which the heap's exact
  push / pop discipline resolves. That discipline, the neighbour order (up, left, right, down on the image
  padded by one pixel) and the float64 cost `image + compactness * sqrt(dy² + dx²)` are reproduced here, so
  even those ties break the same way.

`available()` says whether the compiled kernels can be used; the numpy path in postprocess.py stays the
fallback and both are tested against the plain reference (tests/test_postprocess_exact.py). Without numba
the functions below still run (as slow pure Python), which the tests use to check them on small inputs.
"""

from __future__ import annotations

import os

import numpy as np

try:  # optional dependency: the `fast` extra
  import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
  numba = None

# Set to 1 to force the numpy path everywhere (e.g. to compare the two on a machine that has numba).
DISABLE_ENV = 'DUALUNET_JAX_NO_NUMBA'


def available() -> bool:
  """True when numba is installed and not disabled by $DUALUNET_JAX_NO_NUMBA=1."""
  return numba is not None and os.environ.get(DISABLE_ENV, '') not in ('1', 'true', 'True')


def _jit(fn):
  return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


# ------------------------------------------------------------------------------------ greyscale reconstruction


@_jit
def _reconstruct(seed, mask):  # pragma: no cover - compiled
  # Vincent (1993)'s hybrid algorithm: a raster and an anti-raster scan, then FIFO propagation from the
  # pixels that can still raise a neighbour. Only min / max of input values: exact.
  h, w = seed.shape
  rec = seed.copy()
  for y in range(h):  # raster scan over the neighbours already visited (above and to the left)
    for x in range(w):
      v = rec[y, x]
      for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        yy = y + dy
        xx = x + dx
        if 0 <= yy and 0 <= xx < w and rec[yy, xx] > v:
          v = rec[yy, xx]
      rec[y, x] = v if v < mask[y, x] else mask[y, x]
  cap = h * w + 16
  queue = np.empty(cap, np.int64)
  head = 0
  tail = 0
  for y in range(h - 1, -1, -1):  # anti-raster scan; queue the pixels whose later neighbours can still rise
    for x in range(w - 1, -1, -1):
      v = rec[y, x]
      for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
        yy = y + dy
        xx = x + dx
        if yy < h and 0 <= xx < w and rec[yy, xx] > v:
          v = rec[yy, xx]
      v = v if v < mask[y, x] else mask[y, x]
      rec[y, x] = v
      for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
        yy = y + dy
        xx = x + dx
        if yy < h and 0 <= xx < w and rec[yy, xx] < v and rec[yy, xx] < mask[yy, xx]:
          queue[tail] = y * w + x
          tail += 1
          break
  while head < tail:
    p = queue[head]
    head += 1
    y = p // w
    x = p - y * w
    v = rec[y, x]
    for dy in range(-1, 2):
      yy = y + dy
      if yy < 0 or yy >= h:
        continue
      for dx in range(-1, 2):
        xx = x + dx
        if xx < 0 or xx >= w or (dy == 0 and dx == 0):
          continue
        if rec[yy, xx] < v and rec[yy, xx] != mask[yy, xx]:
          rec[yy, xx] = v if v < mask[yy, xx] else mask[yy, xx]
          if tail == cap:  # reuse the consumed front, else grow
            if head > 0:
              queue[:tail - head] = queue[head:tail]
              tail -= head
              head = 0
            else:
              cap *= 2
              bigger = np.empty(cap, np.int64)
              bigger[:tail] = queue[:tail]
              queue = bigger
          queue[tail] = yy * w + xx
          tail += 1
  return rec


def reconstruct_dilation(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """float32[H, W]: greyscale reconstruction by dilation (3x3 footprint) of seed under mask (seed <= mask)."""
  return _reconstruct(np.ascontiguousarray(seed, np.float32), np.ascontiguousarray(mask, np.float32))


# ------------------------------------------------------------------------------------ Euclidean distance


@_jit
def _edt_squared(fg):  # pragma: no cover - compiled
  h, w = fg.shape
  big = np.int64(1) << 40  # > any squared distance; marks "no background in this column"
  g = np.empty((h, w), np.int64)
  for x in range(w):  # 1-D distance to the nearest background pixel of the column
    last = -1
    for y in range(h):
      if not fg[y, x]:
        last = y
      g[y, x] = y - last if last >= 0 else big
    last = -1
    for y in range(h - 1, -1, -1):
      if not fg[y, x]:
        last = y
      if last >= 0 and last - y < g[y, x]:
        g[y, x] = last - y
  out = np.empty((h, w), np.int64)
  v = np.empty(w, np.int64)
  z = np.empty(w + 1, np.float64)
  f = np.empty(w, np.int64)
  for y in range(h):  # lower envelope of the parabolas (x - q)² + g(q)² over the row's finite sites
    k = -1
    for q in range(w):
      if g[y, q] >= big:
        continue
      f[q] = g[y, q] * g[y, q]
      while True:
        if k < 0:
          k = 0
          v[0] = q
          z[0] = -np.inf
          z[1] = np.inf
          break
        p = v[k]
        s = ((f[q] + q * q) - (f[p] + p * p)) / (2.0 * (q - p))
        if s <= z[k]:
          k -= 1
          continue
        k += 1
        v[k] = q
        z[k] = s
        z[k + 1] = np.inf
        break
    if k < 0:
      for x in range(w):
        out[y, x] = -1  # no background anywhere in the image
      continue
    j = 0
    for x in range(w):
      while z[j + 1] < x:
        j += 1
      d = x - v[j]
      out[y, x] = d * d + f[v[j]]
  return out


def distance_transform_edt(fg: np.ndarray) -> np.ndarray | None:
  """float64[H, W] = scipy `distance_transform_edt(fg)`; None when fg has no background pixel (scipy's own
  rule applies there, and the caller uses scipy)."""
  fg = np.ascontiguousarray(fg, np.bool_)
  if fg.size == 0 or fg.all():
    return None
  sq = _edt_squared(fg)
  return np.sqrt(sq.astype(np.float64))


# ------------------------------------------------------------------------------------ watershed


# skimage's watershed heap (heap_general.pxi) is a binary heap of pointers to items, ordered by (value, age):
# push = append + sift up, pop = swap the last pointer into the root + sift down. Here the items themselves sit
# at their heap positions (the same swaps moving the data instead of pointers), so every comparison and every
# tie resolves as in skimage, with less indirection.


@_jit
def _smaller(values, ages, a, b):  # pragma: no cover - compiled
  if values[a] != values[b]:
    return values[a] < values[b]
  return ages[a] < ages[b]


@_jit
def _swap(values, ages, index, source, a, b):  # pragma: no cover - compiled
  values[a], values[b] = values[b], values[a]
  ages[a], ages[b] = ages[b], ages[a]
  index[a], index[b] = index[b], index[a]
  source[a], source[b] = source[b], source[a]


@_jit
def _push(values, ages, index, source, items, value, age, idx, src):  # pragma: no cover - compiled
  values[items] = value
  ages[items] = age
  index[items] = idx
  source[items] = src
  child = items
  while child > 0:
    parent = (child + 1) // 2 - 1
    if _smaller(values, ages, child, parent):
      _swap(values, ages, index, source, child, parent)
      child = parent
    else:
      break
  return items + 1


@_jit
def _pop(values, ages, index, source, items):  # pragma: no cover - compiled
  """Moves the root to position `items - 1` (read it there) and restores the heap; returns items - 1."""
  items -= 1
  if items == 0:
    return items
  _swap(values, ages, index, source, 0, items)
  i = 0
  smallest = 0
  while True:
    l = i * 2 + 1
    r = i * 2 + 2
    if l < items:
      if _smaller(values, ages, l, i):
        smallest = l
      if r < items and _smaller(values, ages, r, smallest):
        smallest = r
    else:
      break
    if smallest == i:
      break
    _swap(values, ages, index, source, i, smallest)
    i = smallest
  return items


@_jit
def _watershed_flat(image, marker_locations, mask, output, width, compactness):  # pragma: no cover - compiled
  # Every pixel spreads to its 4 neighbours at most once (when first popped), so 4 x (pixels in the mask)
  # + markers bounds the pushes: the heap never grows.
  n = 4 * int(np.count_nonzero(mask)) + marker_locations.shape[0] + 1
  values = np.empty(n, np.float64)
  ages = np.empty(n, np.int64)
  index = np.empty(n, np.int64)
  source = np.empty(n, np.int64)
  items = 0
  for loc in marker_locations:
    items = _push(values, ages, index, source, items, image[loc], np.int64(0), loc, loc)
  compact = compactness > 0
  offsets = (-width, -1, 1, width)  # skimage's order for connectivity 1: sorted by distance, then raster
  age = np.int64(1)
  while items > 0:
    items = _pop(values, ages, index, source, items)
    e_value = values[items]  # the popped item, until the next push overwrites it
    e_index = index[items]
    e_source = source[items]
    if compact:
      # a pixel can be pushed more than once; it takes the label of its first pop
      if output[e_index] != 0 and e_index != e_source:
        continue
      output[e_index] = output[e_source]
    for o in offsets:
      nb = e_index + o
      if mask[nb] == 0 or output[nb] != 0:
        continue
      age += 1
      val = image[nb]
      if compact:
        dy = float(nb // width - e_source // width)
        dx = float(nb % width - e_source % width)
        val += compactness * np.sqrt(dy * dy + dx * dx)
      else:
        output[nb] = output[e_index]  # plain watershed labels at push time, as skimage
      if val < e_value:  # a pixel costs at least what the pixel it was reached from cost
        val = e_value
      items = _push(values, ages, index, source, items, val, age, nb, e_source)
  return output


def watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray, compactness: float) -> np.ndarray:
  """int32[H, W] = skimage `watershed(image, markers, mask=mask, compactness=compactness)` (connectivity 1).

  Args:
    image: float[H, W] (used as float64, as skimage does).
    markers: int[H, W] marker labels (0 = none); markers outside the mask are dropped, as skimage does.
    mask: bool[H, W] pixels to flood.
    compactness: >= 0; 0 = plain watershed (labels at push time, skimage's fast path).
  """
  h, w = image.shape
  img = np.zeros((h + 2, w + 2), np.float64)
  img[1:-1, 1:-1] = image
  msk = np.zeros((h + 2, w + 2), np.int8)
  msk[1:-1, 1:-1] = mask
  out = np.zeros((h + 2, w + 2), np.int32)
  out[1:-1, 1:-1] = np.where(mask, markers, 0)
  flat = out.ravel()
  locations = np.flatnonzero(flat)
  _watershed_flat(img.ravel(), locations, msk.ravel(), flat, w + 2, float(compactness))
  return out[1:-1, 1:-1].copy()
