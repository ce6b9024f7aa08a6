"""Training targets from instance maps: the per-pixel class map and the Gaussian centroid density map.

Host side (numpy / scipy): used by the input pipeline, the oracle and evaluation. Everything is vectorised
over instances (`np.bincount`, `scipy.ndimage` label-wise reductions), so both targets of a 1000x1000
CoNSeP tile with ~600 nuclei take well under 0.1 s on one core (most of it the Gaussian filter).

Reference (`../shared/reference/dualunet_reference.md` §3.5):
- `segmentation_mask` [K+1, H, W]: channel `label` += instance mask, channel 0 = 1 - clamp(sum, max 1). With a
  non-overlapping instance map (what every dataset here stores) overlap counts of 2 cannot happen and that
  tensor is exactly `one_hot(class_map, K + 1)`, so we store the int32 class map and one-hot it on device.
- `centroid_gaussian` [H, W]: a unit delta at the floored (clamped) centre of each nucleus, accumulated with
  `+= 1`, `scipy.ndimage.gaussian_filter(sigma, mode='reflect', truncate=4.0)` in float32, divided by the
  global max.
  The reference centres are bounding-box centres (`centroid='bbox'`); the paper describes centres of mass
  (`centroid='mass'`, our default, see `config.targets.centroid`).

Deliberate difference: targets here are computed from the (already transformed) instance map, so the
reference's +1 px shift of box centres under flips/rotations (§3.4, a continuous-coordinate box quirk) is not
reproduced.
"""

from typing import Literal

import numpy as np
import scipy.ndimage as ndi

CentroidMethod = Literal['mass', 'bbox']
CENTROID_METHODS = ('mass', 'bbox')


def _as_instance_map(instance_map: np.ndarray) -> np.ndarray:
  instance_map = np.asarray(instance_map)
  if instance_map.ndim != 2:
    raise ValueError(f'instance_map must be 2-D [H, W], got shape {instance_map.shape}')
  if not np.issubdtype(instance_map.dtype, np.integer):
    raise TypeError(f'instance_map must have an integer dtype, got {instance_map.dtype}')
  if instance_map.size and instance_map.min() < 0:
    raise ValueError('instance_map has negative ids; 0 is background and nuclei are numbered from 1')
  return instance_map


def relabel_contiguous(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Renumbers instance ids to 1..N, keeping their order.

  Args:
    instance_map: int[H, W], 0 = background, any non-negative ids (e.g. CoNSeP .mat `inst_map`, ids not
      contiguous).

  Returns:
    (relabelled int32[H, W], old_ids int64[N]) where new id i + 1 was `old_ids[i]`. Per-instance arrays stored
    in sorted-id order (CoNSeP `inst_type`, `inst_centroid`) stay aligned with the new ids.
  """
  instance_map = _as_instance_map(instance_map)
  max_id = int(instance_map.max()) if instance_map.size else 0
  if max_id <= 4 * instance_map.size + 1024:
    # Lookup table: O(H*W + max_id), no sort.
    present = np.bincount(instance_map.ravel(), minlength=max_id + 1) > 0
    present[0] = False
    old_ids = np.flatnonzero(present).astype(np.int64)
    lut = np.zeros(max_id + 1, np.int32)
    lut[old_ids] = np.arange(1, old_ids.size + 1, dtype=np.int32)
    return lut[instance_map], old_ids
  # Very large ids (e.g. hashed): sort-based.
  ids, inverse = np.unique(instance_map, return_inverse=True)
  has_bg = ids.size > 0 and ids[0] == 0
  new = inverse.reshape(instance_map.shape).astype(np.int32) + (0 if has_bg else 1)
  return new, ids[1:].astype(np.int64) if has_bg else ids.astype(np.int64)


def instance_centroids(instance_map: np.ndarray, method: CentroidMethod = 'mass') -> np.ndarray:
  """Centre (y, x) of every instance id 1..max(instance_map).

  Ids are expected contiguous (`relabel_contiguous` first); an id absent from the map gets a NaN row.

  Args:
    instance_map: int[H, W], 0 = background, nuclei 1..N.
    method: 'mass' = centre of mass of the instance pixels (the paper); 'bbox' = the reference's bounding-box
      centre y1 + (y2 - y1) / 2 with inclusive max indices (§3.5), which `density_map` then floors.

  Returns:
    float32[N, 2] (y, x) in pixel-index coordinates (pixel centres at integers).
  """
  if method not in CENTROID_METHODS:
    raise ValueError(f'centroid method must be one of {CENTROID_METHODS}, got {method!r}')
  instance_map = _as_instance_map(instance_map)
  n = int(instance_map.max()) if instance_map.size else 0
  if n == 0:
    return np.zeros((0, 2), np.float32)
  if method == 'mass':
    w = instance_map.shape[1]
    flat = instance_map.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    yy, xx = np.divmod(np.arange(flat.size, dtype=np.int64), w)
    sy = np.bincount(flat, weights=yy, minlength=n + 1)[1:]
    sx = np.bincount(flat, weights=xx, minlength=n + 1)[1:]
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.stack([sy / counts, sx / counts], axis=1).astype(np.float32)
  # 'bbox': find_objects is one C pass over the map; the list -> array conversion is O(N) and trivial.
  out = np.full((n, 2), np.nan, np.float64)
  slices = ndi.find_objects(instance_map, max_label=n)
  box = np.array([(s[0].start, s[0].stop - 1, s[1].start, s[1].stop - 1) if s is not None
                  else (-1, -1, -1, -1) for s in slices], np.float64).reshape(-1, 4)
  ok = box[:, 0] >= 0
  out[ok, 0] = box[ok, 0] + (box[ok, 1] - box[ok, 0]) / 2
  out[ok, 1] = box[ok, 2] + (box[ok, 3] - box[ok, 2]) / 2
  return out.astype(np.float32)


def density_map(points: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
  """The reference centroid density map (§3.5).

  A unit delta at (floor(y), floor(x)) of every point, clamped to the image and accumulated with `+= 1`,
  filtered by `scipy.ndimage.gaussian_filter(sigma, mode='reflect', truncate=4.0)` in float32 and divided by
  its global maximum when that is > 0. Isolated peaks are therefore exactly 1 unless two nearby cells add up
  above 1, which lowers every other peak (a reference quirk, kept). Not count-preserving.

  Args:
    points: float[N, 2] (y, x) pixel coordinates; N may be 0.
    shape: (H, W) of the output.
    sigma: Gaussian standard deviation in pixels (>= 0; 0 leaves the deltas).

  Returns:
    float32[H, W], zeros when there are no points.
  """
  h, w = (int(s) for s in shape)
  if sigma < 0:
    raise ValueError(f'sigma must be >= 0, got {sigma}')
  points = np.asarray(points, np.float64).reshape(-1, 2)
  if not np.all(np.isfinite(points)):
    raise ValueError('points contain NaN/inf (absent instance ids? relabel the instance map first)')
  out = np.zeros((h, w), np.float32)
  if points.shape[0] == 0 or out.size == 0:
    return out
  iy = np.clip(np.floor(points[:, 0]), 0, h - 1).astype(np.intp)
  ix = np.clip(np.floor(points[:, 1]), 0, w - 1).astype(np.intp)
  np.add.at(out, (iy, ix), 1.0)
  out = ndi.gaussian_filter(out, sigma=float(sigma), mode='reflect', truncate=4.0)  # float32 in, float32 out
  peak = out.max()
  if peak > 0:
    out /= peak
  return out


def density_from_instances(instance_map: np.ndarray, sigma: float,
                           centroid: CentroidMethod = 'mass') -> np.ndarray:
  """`density_map` of the centres of the instances of `instance_map` (any non-negative ids; relabelled
  internally). Returns float32[H, W]."""
  relabelled, _ = relabel_contiguous(instance_map)
  return density_map(instance_centroids(relabelled, centroid), relabelled.shape, sigma)


def class_map(instance_map: np.ndarray, instance_classes: np.ndarray, *, unlabelled_class: int | None = None,
              num_classes: int | None = None) -> np.ndarray:
  """Per-pixel class target: 0 background, else the class of the instance covering the pixel.

  Class 0 ("unlabelled" in the record schema) cannot be a training target: those pixels are foreground, not
  background. Datasets without types train with K = 1 and every nucleus in class 1; pass
  `unlabelled_class=1` to map class-0 instances there, otherwise they raise.

  Args:
    instance_map: int[H, W], 0 = background, nuclei 1..N (contiguous, see `relabel_contiguous`).
    instance_classes: int[N], class of nucleus i + 1, in 1..K.
    unlabelled_class: class given to instances with class 0; None raises instead.
    num_classes: K; when given, classes above K raise.

  Returns:
    int32[H, W] with values in 0..K. `one_hot(class_map, K + 1)` equals the reference's `segmentation_mask`.
  """
  instance_map = _as_instance_map(instance_map)
  classes = np.asarray(instance_classes).reshape(-1).astype(np.int64)
  n = int(instance_map.max()) if instance_map.size else 0
  if n > classes.size:
    raise ValueError(f'instance_map has id {n} but instance_classes has only {classes.size} entries '
                     '(ids must be 1..N; relabel_contiguous the map and reorder the classes with old_ids)')
  if unlabelled_class is not None:
    classes = np.where(classes == 0, int(unlabelled_class), classes)
  if classes.size and classes.min() < 1:
    raise ValueError('instance_classes must be >= 1 for training targets (class 0 = unlabelled; for datasets '
                     'without types use K = 1 and class 1, e.g. unlabelled_class=1)')
  if num_classes is not None and classes.size and classes.max() > num_classes:
    raise ValueError(f'instance class {int(classes.max())} exceeds num_classes={num_classes}')
  lut = np.concatenate([np.zeros(1, np.int32), classes.astype(np.int32)])
  return lut[instance_map]


def make_targets(instance_map: np.ndarray, instance_classes: np.ndarray, *, sigma: float,
                 centroid: CentroidMethod = 'mass', unlabelled_class: int | None = None,
                 num_classes: int | None = None) -> dict[str, np.ndarray]:
  """Both training targets of one record (schema: contiguous ids 1..N, `instance_classes[i]` = class of i+1).

  Returns:
    {'class_map': int32[H, W] (0..K), 'density': float32[H, W] (peak 1, zeros without nuclei)}.
  """
  instance_map = _as_instance_map(instance_map)
  classes = class_map(instance_map, instance_classes, unlabelled_class=unlabelled_class,
                      num_classes=num_classes)
  points = instance_centroids(instance_map, centroid)
  if points.size and np.isnan(points).any():
    raise ValueError('instance_map ids are not contiguous (some id in 1..N is absent); relabel_contiguous it')
  return {'class_map': classes, 'density': density_map(points, instance_map.shape, sigma)}
