"""CoNSeP (Graham et al. 2019, HoVer-Net): 41 H&E colorectal tiles of 1000x1000 px at 40x (0.25 µm/px).

Expected `manual_dir` (the unpacked `consep_dataset.zip`; `Images`/`Labels` and the top folder name are
matched case-insensitively):

    <manual_dir>/CoNSeP/Train/Images/train_{1..27}.png   <manual_dir>/CoNSeP/Train/Labels/train_{1..27}.mat
    <manual_dir>/CoNSeP/Test/Images/test_{1..14}.png     <manual_dir>/CoNSeP/Test/Labels/test_{1..14}.mat

`manual_dir` may also be the `CoNSeP/` folder itself. Each .mat must hold `inst_map` (ids 0..N) and
`inst_type` (N x 1, raw types 1..7); pre-2020 copies with `Labels/*.npy` (H x W x 2: instance, type) are read
too (classes by majority vote of the type channel). Raw types are merged as in the paper and the reference
(`ACTUAL_CONSEP_NUCLEI_MAP`): 1 other, 2 inflammatory, 3+4 epithelial, 5+6+7 spindle.

Records (`schema`): image uint8[1000, 1000, 3] (alpha dropped), instance_map int32 ids 1..N,
instance_classes int32[N] in 1..4, name = file stem (`test_3`), tissue '', mpp 0.25. Splits `train` (27
tiles, 15,555 nuclei in the assembled copy) and `test` (14 tiles, 8,777 nuclei).
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dualunet_jax.data import _common, readers
from dualunet_jax.data.readers import DatasetError

CLASS_NAMES = ('other', 'inflammatory', 'epithelial', 'spindle')
MPP = 0.25
# Raw CoNSeP type (index) -> merged class; 0 stays 0 (unlabelled).
MERGE = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.int32)
SPLITS = {'train': 'Train', 'test': 'Test'}

LAYOUT = """\
  <manual_dir>/CoNSeP/Train/Images/train_{1..27}.png   <manual_dir>/CoNSeP/Train/Labels/train_{1..27}.mat
  <manual_dir>/CoNSeP/Test/Images/test_{1..14}.png     <manual_dir>/CoNSeP/Test/Labels/test_{1..14}.mat
  (manual_dir may also be the CoNSeP/ folder itself; .mat keys inst_map, inst_type)"""


def read_tile(image_path: readers.PathLike, mat_path: readers.PathLike) -> dict[str, Any]:
  """Reads one CoNSeP tile and its label file into a `schema` record (merged classes 1..4, mpp 0.25).

  Args:
    image_path: the .png tile (RGB or RGBA).
    mat_path: the .mat with `inst_map` and `inst_type`, or a legacy .npy (H, W, 2) instance + type map.
  Returns:
    The record dict; raises `DatasetError` naming the file on missing or malformed input.
  """
  image_path, mat_path = pathlib.Path(image_path), pathlib.Path(mat_path)
  image = readers.read_image(image_path)
  if mat_path.suffix.lower() == '.npy':
    label = readers.read_npy(mat_path)
    if label.ndim != 3 or label.shape[-1] < 2:
      raise DatasetError(f'{mat_path}: legacy CoNSeP label of shape {label.shape}; expected (H, W, 2)')
    inst = readers.as_instance_map(label[..., 0], mat_path)
    instance_map, _ = readers.relabel_contiguous(inst)
    raw = readers.majority_class(instance_map, label[..., 1].astype(np.int64), int(instance_map.max()))
  else:
    data = readers.read_mat(mat_path, required=('inst_map', 'inst_type'))
    inst = readers.as_instance_map(data['inst_map'], mat_path)
    instance_map, old_ids = readers.relabel_contiguous(inst)
    raw = readers.classes_from_inst_type(data['inst_type'], old_ids, mat_path)
  classes = readers.map_classes(raw, MERGE, mat_path)
  return readers.make_record(image, instance_map, classes, name=image_path.stem, mpp=MPP,
                             source=f'{image_path} / {mat_path}')


def find_root(root: readers.PathLike) -> pathlib.Path:
  """The folder holding `Train/` and `Test/`: `root` itself or its `CoNSeP/` (`consep/`) child."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'CoNSeP', LAYOUT)
  for cand in (root, readers.find_child(root, 'CoNSeP', 'consep', 'consep_dataset')):
    if cand is not None and (readers.find_child(cand, 'Train') or readers.find_child(cand, 'Test')):
      return cand
  raise DatasetError(f'CoNSeP: {root} holds neither Train/ and Test/ nor a CoNSeP/ folder with them. '
                     f'Expected layout:\n{LAYOUT}')


def list_split(root: readers.PathLike, split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image, label) path pairs of a split ('Train' / 'Test', any case), natural order; checks every pair."""
  base = find_root(root)
  folder_name = SPLITS.get(split.lower(), split)
  split_dir = readers.find_child(base, folder_name)
  if split_dir is None:
    raise DatasetError(f'CoNSeP: folder {base / folder_name} does not exist. Expected layout:\n{LAYOUT}')
  images_dir = readers.find_child(split_dir, 'Images')
  labels_dir = readers.find_child(split_dir, 'Labels')
  if images_dir is None or labels_dir is None:
    missing = split_dir / ('Images' if images_dir is None else 'Labels')
    raise DatasetError(f'CoNSeP: folder {missing} does not exist. Expected layout:\n{LAYOUT}')
  images = [p for p in readers.list_images(images_dir) if p.suffix.lower() == '.png'] or \
      readers.list_images(images_dir)
  if not images:
    raise DatasetError(f'CoNSeP: {images_dir} holds no .png images. Expected layout:\n{LAYOUT}')
  pairs = []
  for image in images:
    label = readers.find_by_stem(labels_dir, image.stem, ('.mat', '.npy'))
    if label is None:
      raise DatasetError(f'CoNSeP: label file {labels_dir / (image.stem + ".mat")} does not exist '
                         f'(needed for {image})')
    pairs.append((image, label))
  return pairs


def iter_split(root: readers.PathLike, split: str) -> Iterator[dict[str, Any]]:
  """Yields the records of a CoNSeP split in natural file order (train_1, train_2, ..., train_27).

  Args:
    root: the folder holding Train/ and Test/, or its parent holding CoNSeP/ (or consep/).
    split: 'Train' | 'Test' (or 'train' | 'test').
  """
  for image, label in list_split(root, split):
    yield read_tile(image, label)


# ----------------------------------------------------------------------------------------------- TFDS


class Consep(_common.NucleiBuilder, skip_registration=True):
  """CoNSeP as TFDS (array_record), splits `train` and `test`, full 1000x1000 tiles."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Full tiles, classes merged to other/inflammatory/epithelial/spindle.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download consep_dataset.zip from https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/ , unzip it '
      f'and set config.dataset.manual_dir to the unpacked folder:\n{LAYOUT}')
  HOMEPAGE = 'https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/'
  CITATION = 'Graham et al., HoVer-Net, Medical Image Analysis 58 (2019) 101563.'

  def _split_generators(self, dl_manager):
    root = self.manual_path(dl_manager)
    return {split: self._generate_examples(list_split(root, folder)) for split, folder in SPLITS.items()}

  def _generate_examples(self, pairs):
    for image, label in pairs:
      yield image.stem, read_tile(image, label)
