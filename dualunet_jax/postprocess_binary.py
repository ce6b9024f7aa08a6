"""Binary segmentation -> nucleus instances: connected components of the thresholded foreground.

The post-processing of the binary methods ('unet', 'unetpp'; methods/binary.py). JAX-free (numpy / scipy /
scikit-image): it runs in the host worker processes of `postprocess.PostProcessor`.

  1. fg = maps['fg'] > fg_threshold (0.5)
  2. instances = connected components of fg (4-connected by default), numbered 1..M in raster order
  3. optional (`split=True`): a distance-transform watershed splits touching nuclei: markers are the
     `peak_local_max` peaks of the Euclidean distance transform at least `split_min_distance` apart (one per
     component at least), flooded on -distance within fg, then renumbered in raster order of first pixel
  4. every instance is class 1; centroid = mean (y, x); no size filter, no hole filling

Why the split is off by default: the seed-003 protocol scores the binary mask (pixel precision, recall,
Dice, IoU), which a split does not change, and plain components are the instances these models actually
predict. A distance-transform split is a heuristic with a free parameter that the paper does not give; it
over-segments elongated and irregular nuclei (spindle cells) as readily as it separates touching round ones.
It is there to measure what splitting buys (`--config.postprocess.split=True`), not as part of the method.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import scipy.ndimage as ndi
from skimage import feature, segmentation

from dualunet_jax import postprocess as postprocess_lib
from dualunet_jax.postprocess import Instances, PostprocessError

_STRUCTURE = {1: ndi.generate_binary_structure(2, 1), 2: ndi.generate_binary_structure(2, 2)}


def _raster_order(labels: np.ndarray) -> tuple[np.ndarray, int]:
  """Renumbers the non-zero labels of int[H, W] to 1..M in raster order of their first pixel."""
  flat = labels.ravel()
  ids, first = np.unique(flat, return_index=True)
  keep = ids != 0
  ids, first = ids[keep], first[keep]
  lut = np.zeros(int(ids.max(initial=0)) + 1, np.int32)
  lut[ids[np.argsort(first)]] = np.arange(1, ids.size + 1, dtype=np.int32)
  return lut[labels], int(ids.size)


def instances_from_mask(fg: np.ndarray, *, connectivity: int = 1, split: bool = False,
                        min_distance: int = 3) -> Instances:
  """Instances (all class 1) of a boolean foreground mask; steps 2-4 of the module docstring.

  Args:
    fg: bool[H, W].
    connectivity: 1 = 4-neighbours (as the project's evaluation relabelling), 2 = 8-neighbours.
    split: distance-transform watershed split of touching nuclei.
    min_distance: minimum distance in pixels between two split markers.
  Returns:
    `postprocess.Instances` with K = 1: int32 instance map 1..M (raster order), int32[M] classes (all 1),
    float32[M, 2] (y, x) centroids, int32 class map (1 on nuclei), int64[1] count.
  """
  if connectivity not in _STRUCTURE:
    raise PostprocessError(f'connectivity must be 1 or 2, got {connectivity}')
  fg = np.asarray(fg, bool)
  if fg.ndim != 2:
    raise PostprocessError(f'foreground must be [H, W], got shape {fg.shape}')
  inst, n = ndi.label(fg, structure=_STRUCTURE[connectivity])
  if split and n:
    dist = ndi.distance_transform_edt(fg)
    # One peak per component at least: the labels keep peaks of different components apart.
    peaks = feature.peak_local_max(dist, min_distance=int(min_distance), labels=inst, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    ws = segmentation.watershed(-dist, markers, mask=fg, connectivity=connectivity)
    unreached = fg & (ws == 0)  # a component without a peak (never seen, but cheap to rule out) stays whole
    ws[unreached] = inst[unreached] + ws.max()
    inst, n = _raster_order(ws)
  inst = inst.astype(np.int32)
  # DualU-Net's vectorised vote gives centroids and counts of all instances at once; with a one-class map
  # every vote is class 1.
  vote = postprocess_lib._vote  # pylint: disable=protected-access
  classes, centroids, counts = vote(inst, n, fg.astype(np.int32), 1)
  return Instances(inst, classes, centroids, (inst > 0).astype(np.int32), counts)


def postprocess_binary_maps(maps: Mapping[str, np.ndarray], *, fg_threshold: float = 0.5, connectivity: int = 1,
                            split: bool = False, split_min_distance: int = 3) -> Instances:
  """The binary methods' post-processing of one tile's maps: `instances_from_mask(maps['fg'] > fg_threshold)`.

  Args:
    maps: {'fg': float[H, W, 1] (or [H, W]) foreground probability, ...}.
    fg_threshold: foreground threshold (0.5 = the sigmoid decision).
    connectivity, split, split_min_distance: `instances_from_mask` (connectivity, split, min_distance).
  """
  fg = np.asarray(maps['fg'])
  if fg.ndim == 3 and fg.shape[-1] == 1:
    fg = fg[..., 0]
  return instances_from_mask(fg > fg_threshold, connectivity=connectivity, split=split,
                             min_distance=split_min_distance)


def from_config(postprocess_config: Mapping[str, Any]) -> dict[str, Any]:
  """`postprocess_binary_maps` keyword arguments held by `config.postprocess`: `fg_threshold`, `split`,
  `split_min_distance` (own names: DualU-Net's `threshold` and `min_distance` mean other things), and the
  shared `relabel_connectivity` as the connectivity."""
  keys = ('fg_threshold', 'split', 'split_min_distance')
  kwargs = {k: postprocess_config[k] for k in keys if k in postprocess_config}
  if 'relabel_connectivity' in postprocess_config:
    kwargs['connectivity'] = postprocess_config['relabel_connectivity']
  return kwargs
