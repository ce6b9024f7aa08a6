"""PanNuke (Gamper et al. 2019/2020): 7,901 H&E patches of 256x256 px at 40x in three folds, 19 tissues.

Expected `manual_dir` (the three unzipped `fold_{1,2,3}.zip`; folder names matched case-insensitively, and one
extra wrapping folder per fold, e.g. `fold_1/Fold 1/...`, is accepted):

    <manual_dir>/Fold 1/images/fold1/images.npy   float (N, 256, 256, 3) RGB 0..255
    <manual_dir>/Fold 1/images/fold1/types.npy    (N,) tissue names
    <manual_dir>/Fold 1/masks/fold1/masks.npy     float (N, 256, 256, 6)
    ... Fold 2/.../fold2/..., Fold 3/.../fold3/...

or the Kaggle copy: `<manual_dir>/Part N/Images/{images,types}.npy` and `<manual_dir>/Part N/Masks/masks.npy`.
Folds that are absent are simply not offered as splits. The .npy files are memory-mapped (a fold's masks are
~8 GB as float64), so preparing needs little RAM.

Mask channels 0..4 hold instance ids of neoplastic, inflammatory, connective, dead and epithelial nuclei; ids
repeat across channels, so each channel's ids are renumbered after the previous channels' (like CellViT,
torch-em and cellseg-models); where channels overlap the later channel wins. Channel 5 (background) is unused.

Records (`schema`): image uint8[256, 256, 3] (float values truncated like the reference's `.astype(uint8)`),
instance_map int32 ids 1..N, instance_classes = channel + 1 in 1..5, name `fold{n}_{index:04d}` (index in the
fold's arrays), tissue from types.npy, mpp 0.25. Splits `fold1`, `fold2`, `fold3`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dualunet_jax.data import _common, readers, schema
from dualunet_jax.data.readers import DatasetError

CLASS_NAMES = ('neoplastic', 'inflammatory', 'connective', 'dead', 'epithelial')
MPP = 0.25
FOLDS = (1, 2, 3)

LAYOUT = """\
  <manual_dir>/Fold N/images/foldN/images.npy   (N, 256, 256, 3)
  <manual_dir>/Fold N/images/foldN/types.npy    (N,)
  <manual_dir>/Fold N/masks/foldN/masks.npy     (N, 256, 256, 6)       for N in 1, 2, 3
  or the Kaggle copy: <manual_dir>/Part N/Images/{images,types}.npy, <manual_dir>/Part N/Masks/masks.npy"""


def _path(base: pathlib.Path | None, *parts: str) -> pathlib.Path | None:
  """Case-insensitive `base / parts...`, or None where a component is missing."""
  for part in parts:
    if base is None:
      return None
    base = readers.find_child(base, part)
  return base


def fold_files(root: readers.PathLike, fold: int) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path] | None:
  """(images.npy, types.npy, masks.npy) of fold `fold` under `root` (official or Kaggle layout), or None."""
  root = pathlib.Path(root)
  bases = [root] + ([c for c in sorted(root.iterdir()) if c.is_dir()] if root.is_dir() else [])
  for base in bases:
    official = _path(base, f'Fold {fold}')
    if official is not None:
      images_dir = _path(official, 'images', f'fold{fold}')
      masks_dir = _path(official, 'masks', f'fold{fold}')
      return ((images_dir or official / 'images' / f'fold{fold}') / 'images.npy',
              (images_dir or official / 'images' / f'fold{fold}') / 'types.npy',
              (masks_dir or official / 'masks' / f'fold{fold}') / 'masks.npy')
    kaggle = _path(base, f'Part {fold}')
    if kaggle is not None:
      images_dir = _path(kaggle, 'Images') or kaggle / 'Images'
      masks_dir = _path(kaggle, 'Masks') or kaggle / 'Masks'
      return images_dir / 'images.npy', images_dir / 'types.npy', masks_dir / 'masks.npy'
  return None


def find_folds(root: readers.PathLike) -> dict[int, tuple[pathlib.Path, pathlib.Path, pathlib.Path]]:
  """The folds present under `root`: {fold: (images.npy, types.npy, masks.npy)}; raises if there are none."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'PanNuke', LAYOUT)
  folds = {f: paths for f in FOLDS if (paths := fold_files(root, f)) is not None}
  if not folds:
    raise DatasetError(f'PanNuke: {root} holds no "Fold N/" (or Kaggle "Part N/") folder. '
                       f'Expected layout:\n{LAYOUT}')
  return folds


def masks_to_instances(masks: np.ndarray,
                       source: readers.PathLike = 'masks') -> tuple[np.ndarray, np.ndarray]:
  """PanNuke class-channel masks -> one instance map with unique contiguous ids and their classes.

  Args:
    masks: float or int [H, W, 6]; channels 0..4 instance ids per class (ids may repeat across channels).
  Returns:
    (int32[H, W] ids 1..N, int32[N] classes = channel + 1).
  """
  inst = np.zeros(masks.shape[:2], np.int64)
  classes = []
  for c in range(len(CLASS_NAMES)):
    channel, _ = readers.relabel_contiguous(readers.as_instance_map(masks[..., c], source))
    n = int(channel.max())
    inst = np.where(channel > 0, channel.astype(np.int64) + len(classes), inst)
    classes.extend([c + 1] * n)
  instance_map, old_ids = readers.relabel_contiguous(inst)  # drops ids fully covered by a later channel
  return instance_map, np.asarray(classes, np.int32)[old_ids - 1] if old_ids.size else np.zeros(0, np.int32)


def iter_fold(root: readers.PathLike, fold: int) -> Iterator[dict[str, Any]]:
  """Records of one fold in array order (memory-mapped reads)."""
  folds = find_folds(root)
  if fold not in folds:
    raise DatasetError(f'PanNuke: fold {fold} is not under {root}; found folds {sorted(folds)}. '
                       f'Expected layout:\n{LAYOUT}')
  images_path, types_path, masks_path = folds[fold]
  images = readers.read_npy(images_path, mmap=True)
  masks = readers.read_npy(masks_path, mmap=True)
  # Tissue names are a small string array; old copies store it as objects, which need pickle to load.
  types = readers.read_npy(types_path, allow_pickle=True)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise DatasetError(f'{images_path}: shape {images.shape}; expected (N, H, W, 3)')
  if masks.ndim != 4 or masks.shape[-1] != 6 or masks.shape[:3] != images.shape[:3]:
    raise DatasetError(f'{masks_path}: shape {masks.shape}; expected (N, H, W, 6) matching images.npy '
                       f'{images.shape}')
  if types.shape != (images.shape[0],):
    raise DatasetError(f'{types_path}: shape {types.shape}; expected ({images.shape[0]},) like images.npy')
  for i in range(images.shape[0]):
    image = np.asarray(images[i])
    if np.issubdtype(image.dtype, np.floating):
      image = np.clip(image, 0, 255).astype(np.uint8)  # the reference's .astype(uint8) on float 0..255
    image = readers.to_rgb_uint8(image, images_path)
    instance_map, classes = masks_to_instances(np.asarray(masks[i]), masks_path)
    yield readers.make_record(image, instance_map, classes, name=f'fold{fold}_{i:04d}',
                              tissue=schema.decode_text(types[i]), mpp=MPP,
                              source=f'{masks_path} [{i}]')


class Pannuke(_common.NucleiBuilder, skip_registration=True):
  """PanNuke as TFDS (array_record), splits `fold1`, `fold2`, `fold3` (those present in manual_dir)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Channels 0-4 merged into one instance map; classes = channel + 1.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download fold_1.zip, fold_2.zip and fold_3.zip from '
      'https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke , unzip them'
      f' into one folder and set config.dataset.manual_dir to it:\n{LAYOUT}')
  HOMEPAGE = 'https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke'
  CITATION = 'Gamper et al., PanNuke Dataset Extension, Insights and Baselines, arXiv:2003.10778 (2020).'

  def _split_generators(self, dl_manager):
    root = self.manual_path(dl_manager)
    return {f'fold{f}': self._generate_examples(root, f) for f in find_folds(root)}

  def _generate_examples(self, root, fold):
    for record in iter_fold(root, fold):
      yield record['name'], record
