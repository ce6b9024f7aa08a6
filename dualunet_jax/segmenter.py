"""One call from Python for every method: an RGB array in, classified nucleus instances out.

    import dualunet_jax
    seg = dualunet_jax.Segmenter.from_workdir('workdirs/consep')            # or .from_checkpoints([...])
    result = seg(image, mpp=0.25)          # image: uint8[H, W, 3] of any size; mpp: its µm/px
    result.instance_map, result.classes, result.class_names, result.centroids, result.class_probabilities

The image is resampled to the model's µm/px, cut into the prediction engine's overlapping tiles
(`inference.tiling.TileGrid`, the same ownership rule: each nucleus is kept by the one tile whose core holds
its centroid), each tile post-processed by the method's own post-processing, and the nuclei are painted
back at the input's resolution. A model with valid convolutions (HoVer-Net) is fed real image context around
each tile, as in `predict`. Nothing touches the disk.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from dualunet_jax.inference import slide as slide_lib
from dualunet_jax.inference import tiling


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """Nuclei of one image, at the input's resolution.

  Attributes:
    instance_map: int32[H, W], 0 = background, nuclei 1..N (in the engine's tile order).
    classes: int32[N], class (1..K) of nucleus i + 1.
    class_names: names of classes 1..K.
    centroids: float32[N, 2], (y, x) centre of mass in input pixels (pixel centres at integers).
    class_probabilities: float32[N, K+1], mean class probabilities over each nucleus (column 0 background).
    areas: int32[N], pixels of each nucleus at the model's resolution.
  """
  instance_map: np.ndarray
  classes: np.ndarray
  class_names: tuple[str, ...]
  centroids: np.ndarray
  class_probabilities: np.ndarray
  areas: np.ndarray

  @property
  def num_nuclei(self) -> int:
    return int(self.classes.shape[0])

  def counts(self) -> dict[str, int]:
    """Nuclei per class name."""
    k = len(self.class_names)
    counts = np.bincount(self.classes, minlength=k + 1)[1:k + 1]
    return {name: int(c) for name, c in zip(self.class_names, counts)}

  @property
  def class_map(self) -> np.ndarray:
    """int32[H, W]: 0 background, else the class of the covering nucleus."""
    return np.concatenate([[0], self.classes]).astype(np.int32)[self.instance_map]


class Segmenter:
  """A trained model (or an ensemble of one method's checkpoints) ready to segment in-memory images.

  Args:
    predictor: an `inference.engine.model_predictor` (any callable with its contract).
    config: the training config of the (first) model: method, classes, µm/px, post-processing.
    tile_size, overlap: the engine's tiling, in model-resolution pixels.
    batch_size: tiles per predictor call.
    stain_norm: an unfitted `data.stain.Normalizer` (the training statistics) or None: each image gets a copy
      fitted on the image itself, applied to every tile before the model.
  """

  def __init__(self, predictor: Any, config: Any, *, tile_size: int = 1024, overlap: int = 128,
               batch_size: int = 4, stain_norm: Any = None):
    from dualunet_jax import methods
    self.predictor = predictor
    self.config = config
    self.method = methods.get(config)
    self.model_mpp = float(config.dataset.mpp)
    k = int(config.dataset.num_classes)
    names = tuple(config.dataset.class_names)
    self.class_names = names if len(names) == k else tuple(f'class_{i}' for i in range(1, k + 1))
    self.tile_size, self.overlap, self.batch_size = int(tile_size), int(overlap), int(batch_size)
    tiling.TileGrid.create(1, 1, self.tile_size, self.overlap)  # validates the geometry now
    self.postprocess_kwargs = self.method.postprocess_kwargs(config)
    self.stain_norm = stain_norm

  @classmethod
  def from_checkpoints(cls, checkpoints: Sequence[str | os.PathLike], *, which: str | int = 'best',
                       tta_views: int = 1, **kwargs: Any) -> 'Segmenter':
    """Workdirs or checkpoint step folders of one method; several are averaged as an ensemble."""
    from dualunet_jax.inference import engine
    predictor, config, _ = engine.checkpoint_predictor([str(c) for c in checkpoints], which=which,
                                                       tta_views=tta_views)
    return cls(predictor, config, **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, *, which: str | int = 'best', tta_views: int = 1,
                   stain_norm: str = 'none', **kwargs: Any) -> 'Segmenter':
    """The checkpoint `which` ('best' | 'last' | step) of a training (or converted) workdir; `stain_norm`
    'reinhard' | 'macenko' normalises images onto the training split's colours (`W/stain_stats.json`)."""
    normalizer = None
    if stain_norm != 'none':
      from dualunet_jax.data import stain
      normalizer = stain.Normalizer(stain_norm, stain.load_statistics(workdir))
    return cls.from_checkpoints([workdir], which=which, tta_views=tta_views, stain_norm=normalizer, **kwargs)

  def __call__(self, image: np.ndarray, mpp: float | None = None) -> Segmentation:
    """Segments one RGB image.

    Args:
      image: uint8[H, W, 3] (uint8[H, W, 4] has its alpha dropped), any size.
      mpp: µm per pixel of `image`; None = the model's own (no resampling).
    Returns:
      `Segmentation` at the input's resolution.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
      raise ValueError(f'image must be uint8[H, W, 3] RGB, got {image.dtype}{list(image.shape)}')
    if mpp is not None and not mpp > 0:
      raise ValueError(f'mpp must be positive, got {mpp}')
    source = slide_lib.ArraySource(pathlib.Path('<array>'), [np.ascontiguousarray(image[..., :3])],
                                   mpp, 'image')
    view = slide_lib.ModelView(source, mpp or self.model_mpp, self.model_mpp)
    grid = tiling.TileGrid.create(view.height, view.width, self.tile_size, self.overlap)
    margin = int(getattr(self.predictor, 'margin', 0) or 0)
    normalizer = None
    if self.stain_norm is not None:  # one mapping for the whole image, fitted on it (at most 2048 px a side)
      import copy
      normalizer = copy.copy(self.stain_norm).fit(source.thumbnail(2048))
    tiles = grid.tiles()
    results = []
    for start in range(0, len(tiles), self.batch_size):
      batch = tiles[start:start + self.batch_size]
      images = [view.read(t.y0 - margin, t.x0 - margin, t.height + 2 * margin, t.width + 2 * margin)
                for t in batch]
      images = np.stack([normalizer(x) for x in images] if normalizer is not None else images)
      maps = {name: np.asarray(value, np.float32) for name, value in self.predictor(images).items()}
      for i, tile in enumerate(batch):
        results.append(tiling.tile_instances({name: value[i] for name, value in maps.items()}, tile,
                                             (grid.height, grid.width), self.method.postprocess_fn,
                                             self.postprocess_kwargs, want_masks=True))
    result = tiling.concat_results(results)
    n = len(result['y'])
    model_map = tiling.paint(result, np.arange(1, n + 1, dtype=np.int32), (0, 0, grid.height, grid.width))
    # Model pixel (r, c) covers input [c * scale, (c + 1) * scale): each input pixel takes its model pixel.
    scale = view.scale
    rows = np.minimum((np.arange(image.shape[0]) / scale).astype(np.int64), grid.height - 1)
    cols = np.minimum((np.arange(image.shape[1]) / scale).astype(np.int64), grid.width - 1)
    k = len(self.class_names)
    probs = result['class_probs'] if n else np.zeros((0, k + 1), np.float32)
    # Engine centroids are continuous model-res coordinates (pixel centres at +0.5).
    centroids = np.stack([result['y'], result['x']], axis=1) * scale - 0.5 if n else np.zeros((0, 2))
    return Segmentation(instance_map=model_map[rows[:, None], cols[None, :]].astype(np.int32),
                        classes=result['cls'].astype(np.int32), class_names=self.class_names,
                        centroids=centroids.astype(np.float32), class_probabilities=probs.astype(np.float32),
                        areas=result['area'].astype(np.int32))
