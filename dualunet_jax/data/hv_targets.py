"""HoVer-Net training targets (host numpy): the HV distance maps and the NP map of an instance map.

`hv_map` is the official `gen_instance_hv_map` (vqdang/hover_net `models/hovernet/targets.py`), vectorised over
instances. Per instance, with (Y, X) its pixels and (my, mx) its centre of mass:

  cy = int(my + 0.5), cx = int(mx + 0.5)        the official rounds the centre half up (int() of a
                                                positive number is floor)
  y = Y + 1 - cy, x = X + 1 - cx                the official grid is `arange(1, side + 1) - com`, so the
                                                centre pixel gets (1, 1), not (0, 0): kept
  x < 0 divided by -min(x), x > 0 by max(x)     negative and positive parts normalised separately, in
                                                float32, to [-1, 0) and (0, 1]; same for y
Channel 0 is x (horizontal), channel 1 is y (vertical); background 0.

The official computes each instance inside its bounding box grown by 2 pixels, which needs the mirror padding
of its training patches; the values do not depend on the box, so here they come from global coordinates and
instances may touch the border. Its `fix_mirror_padding` (relabelling mirrored copies of one nucleus) does
not apply to this project's crops (no mirror padding). Its `remove_small_objects(crop, 30)`, which leaves
instances with fewer than 30 pixels inside the output crop without HV values, is `min_size` / `margin` here.
"""

from __future__ import annotations

import numpy as np

OFFICIAL_MIN_SIZE = 30  # the official remove_small_objects(crop_ann, min_size=30)


def np_map(instance_map: np.ndarray) -> np.ndarray:
  """int[H, W] instance map -> int32[H, W] nuclear-pixel map (1 inside any nucleus)."""
  return (np.asarray(instance_map) > 0).astype(np.int32)


def _normalise(v: np.ndarray, lab: np.ndarray, sizes: int) -> np.ndarray:
  """Per-label split normalisation of float32 v (pixels sorted by label; `sizes` = labels + 1)."""
  lo = np.zeros(sizes, np.float32)
  hi = np.zeros(sizes, np.float32)
  np.minimum.at(lo, lab, v)
  np.maximum.at(hi, lab, v)
  out = np.zeros_like(v)
  neg, pos = v < 0, v > 0
  out[neg] = v[neg] / -lo[lab[neg]]
  out[pos] = v[pos] / hi[lab[pos]]
  return out


def hv_map(instance_map: np.ndarray, *, min_size: int = 0, margin: int = 0) -> np.ndarray:
  """The official horizontal / vertical distance maps of every instance.

  Args:
    instance_map: int[H, W], 0 = background, instances any positive ids.
    min_size: instances with fewer than `min_size` pixels inside the centre region (`margin` pixels in from
      every side: the model's output crop) get no HV values (the official 30); 0 keeps every instance.
    margin: see `min_size`.

  Returns:
    float32[H, W, 2]: channel 0 horizontal (x), channel 1 vertical (y), in [-1, 1].
  """
  inst = np.asarray(instance_map)
  if inst.ndim != 2:
    raise ValueError(f'instance_map must be [H, W], got shape {inst.shape}')
  h, w = inst.shape
  out = np.zeros((h, w, 2), np.float32)
  idx = np.flatnonzero(inst)
  if idx.size == 0:
    return out
  ids, lab = np.unique(inst.ravel()[idx], return_inverse=True)
  n = ids.size
  if min_size > 0:
    centre = inst[margin:h - margin, margin:w - margin]
    inside = np.bincount(np.searchsorted(ids, centre[centre > 0]), minlength=n) if centre.size else np.zeros(n)
    keep = inside[lab] >= min_size
    idx, lab = idx[keep], lab[keep]
    if idx.size == 0:
      return out
  yy, xx = np.divmod(idx, w)
  cnt = np.bincount(lab, minlength=n)
  with np.errstate(invalid='ignore', divide='ignore'):
    my = np.bincount(lab, weights=yy, minlength=n) / cnt
    mx = np.bincount(lab, weights=xx, minlength=n) / cnt
  cy = np.floor(my[lab] + 0.5).astype(np.int64)
  cx = np.floor(mx[lab] + 0.5).astype(np.int64)
  x = (xx + 1 - cx).astype(np.float32)
  y = (yy + 1 - cy).astype(np.float32)
  flat = out.reshape(-1, 2)
  flat[idx, 0] = _normalise(x, lab, n)
  flat[idx, 1] = _normalise(y, lab, n)
  return out
