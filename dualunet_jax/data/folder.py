"""A generic folder format for your own annotated tiles (e.g. Ki-67, other stains, other organs).

Layout (`config.dataset.manual_dir` = ROOT; folder names lower case as written):

    ROOT/
      images/<stem>.png|.jpg|.jpeg|.tif|.tiff   the tile: RGB, 8 or 16 bit (RGBA: alpha dropped; grayscale is
                                                rejected)
      labels/<stem>.png|.tif|.tiff|.npy|.mat    the instance map, same height and width: 0 background, one
                                                non-negative integer id per nucleus (any ids; they are
                                                renumbered 1..N). A .mat holds it under `inst_map`.
      classes/<stem>.csv                        optional: one row per nucleus, header `id,class`
      classes/<stem>.png|.tif|.tiff|.npy        optional: a class map (0 background, 1..K); each nucleus
                                                gets the most frequent non-zero class under it

Every image needs its label file (same stem); everything else is optional. The class of a nucleus comes from
the first source present: `classes/<stem>.csv`, then `classes/<stem>.<png|tif|npy>`, then `inst_type`
(N x 1, HoVer-Net style) in the label .mat; without any, every nucleus is class 1 when there is one class and
0 (unlabelled: trained as foreground, ignored by class metrics) otherwise. Class ids must lie in 0..K, where
the K class names come from `config.dataset.class_names` (id k is `class_names[k - 1]`). Nuclei missing from
a csv get 0.

Splits: if ROOT holds sub-folders that each have an `images/` folder (e.g. `train/`, `test/`, `val/`), each
is a split named after it; otherwise ROOT itself is the single split `train`. Example:

    ki67/
      train/
        images/  slide1_001.png  slide1_002.png
        labels/  slide1_001.png  slide1_002.npy       (16-bit PNG / int32 .npy instance maps)
        classes/ slide1_001.csv  slide1_002.csv       (id,class with 1 = Ki-67 negative, 2 = positive)
      test/
        images/  slide9_001.png
        labels/  slide9_001.mat                       (inst_map + inst_type)

    python -m dualunet_jax.train ... --config.dataset.name=folder --config.dataset.manual_dir=ki67 \
        --config.dataset.num_classes=2 --config.dataset.class_names="('negative','positive')"

Records (`schema`): image uint8[H, W, 3], instance_map int32 ids 1..N, instance_classes int32[N] in 0..K,
name = file stem, tissue '', mpp = the builder config's `mpp` (`config.dataset.source_mpp` when set, else 0:
unknown).

Prepared copies are kept apart in the TFDS data_dir: the builder config name is the folder's name plus a
hash of its absolute path, the class names and the mpp (`<data_dir>/folder/<name>-<hash>/1.0.0`), so two
folders, or one folder read with other classes, never overwrite each other. A changed folder content under
the same path is not detected: delete that directory to rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dualunet_jax.data import _common, readers
from dualunet_jax.data.readers import DatasetError

LABEL_SUFFIXES = ('.png', '.tif', '.tiff', '.npy', '.mat')
CLASS_MAP_SUFFIXES = ('.png', '.tif', '.tiff', '.npy')
LAYOUT = """\
  <manual_dir>/[<split>/]images/<stem>.png|jpg|tif     RGB tile
  <manual_dir>/[<split>/]labels/<stem>.png|tif|npy|mat  instance map (.mat key inst_map)
  <manual_dir>/[<split>/]classes/<stem>.csv|png|tif|npy optional classes (csv header id,class)"""


def _read_2d(path: pathlib.Path, key: str = 'inst_map') -> tuple[np.ndarray, dict[str, Any]]:
  """A 2-D label array from png/tif/npy/mat (and the .mat contents, else {})."""
  suffix = path.suffix.lower()
  if suffix == '.mat':
    data = readers.read_mat(path, required=(key,))
    return np.asarray(data[key]), data
  if suffix == '.npy':
    return readers.read_npy(path), {}
  try:
    if suffix in ('.tif', '.tiff'):
      import tifffile
      return tifffile.imread(path), {}
    from PIL import Image
    with Image.open(path) as im:
      return np.asarray(im), {}
  except Exception as e:
    raise DatasetError(f'{path}: cannot decode label image ({type(e).__name__}: {e})') from e


def read_item(image_path: readers.PathLike, label_path: readers.PathLike,
              classes_dir: readers.PathLike | None, num_classes: int, mpp: float = 0.0) -> dict[str, Any]:
  """One image + label (+ optional classes) of the folder format as a `schema` record.

  Args:
    image_path: the tile.
    label_path: its instance map (png/tif/npy/mat).
    classes_dir: the `classes/` folder (may not exist).
    num_classes: K; class ids must lie in 0..K.
    mpp: microns per pixel to store.
  """
  image_path, label_path = pathlib.Path(image_path), pathlib.Path(label_path)
  image = readers.read_image(image_path)
  raw, mat = _read_2d(label_path)
  instance_map, old_ids = readers.relabel_contiguous(readers.as_instance_map(raw, label_path))
  n = len(old_ids)
  stem = image_path.stem
  classes_dir = pathlib.Path(classes_dir) if classes_dir else None
  csv = readers.find_by_stem(classes_dir, stem, ('.csv',)) if classes_dir else None
  class_map_path = readers.find_by_stem(classes_dir, stem, CLASS_MAP_SUFFIXES) if classes_dir else None
  if csv is not None:
    rows = readers.read_csv_rows(csv)
    if rows and ('id' not in rows[0] or 'class' not in rows[0]):
      raise DatasetError(f'{csv}: columns {sorted(rows[0])}; expected a header `id,class`')
    try:
      ids = [int(float(r['id'])) for r in rows]
      cls = [int(float(r['class'])) for r in rows]
    except ValueError as e:
      raise DatasetError(f'{csv}: non-numeric id or class ({e})') from e
    classes, source = readers.classes_from_table(old_ids, ids, cls, csv), csv
  elif class_map_path is not None:
    class_map, _ = _read_2d(class_map_path)
    class_map = readers.as_instance_map(class_map, class_map_path)
    if class_map.shape != instance_map.shape:
      raise DatasetError(f'{class_map_path}: class map is {class_map.shape}, '
                         f'instance map {instance_map.shape}')
    classes, source = readers.majority_class(instance_map, class_map, n), class_map_path
  elif 'inst_type' in mat:
    classes, source = readers.classes_from_inst_type(mat['inst_type'], old_ids, label_path), label_path
  else:
    classes, source = np.full(n, 1 if num_classes == 1 else 0, np.int32), label_path
  if classes.size and (classes.min() < 0 or classes.max() > num_classes):
    bad = int(classes.max() if classes.max() > num_classes else classes.min())
    raise DatasetError(f'{source}: class id {bad} outside 0..{num_classes} '
                       f'(config.dataset.class_names has {num_classes} names)')
  return readers.make_record(image, instance_map, classes, name=stem, mpp=mpp,
                             source=f'{image_path} / {label_path}')


def find_splits(root: readers.PathLike) -> dict[str, pathlib.Path]:
  """{split name: folder holding images/ and labels/}: sub-folders with images/, else {'train': root}."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'folder dataset', LAYOUT)
  subs = {c.name: c for c in sorted(root.iterdir()) if c.is_dir() and (c / 'images').is_dir()}
  if subs:
    return subs
  if (root / 'images').is_dir():
    return {'train': root}
  raise DatasetError(f'folder dataset: {root} holds no images/ folder (nor split folders with one). '
                     f'Expected layout:\n{LAYOUT}')


def list_items(split_dir: readers.PathLike) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image, label) pairs of one split folder, natural order; every image must have its label file."""
  split_dir = pathlib.Path(split_dir)
  images = readers.list_images(split_dir / 'images')
  if not images:
    raise DatasetError(f'folder dataset: {split_dir / "images"} holds no .png/.jpg/.tif images')
  labels_dir = split_dir / 'labels'
  readers.require_dir(labels_dir, 'folder dataset', LAYOUT)
  pairs = []
  for image in images:
    label = readers.find_by_stem(labels_dir, image.stem, LABEL_SUFFIXES)
    if label is None:
      raise DatasetError(f'folder dataset: label file {labels_dir / image.stem}.png|.tif|.npy|.mat does not '
                         f'exist (needed for {image})')
    pairs.append((image, label))
  return pairs


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """`class_names` (K names, class id k = class_names[k - 1]) and the `mpp` to store in the records."""

  class_names: tuple[str, ...] = ('nucleus',)
  mpp: float = 0.0


def make_config(manual_dir: readers.PathLike, class_names: Sequence[str], mpp: float = 0.0) -> FolderConfig:
  """The builder config for a folder; its name (`<folder name>-<hash>`) keys the TFDS data_dir entry."""
  root = pathlib.Path(manual_dir).expanduser().resolve()
  class_names = tuple(str(c) for c in class_names)
  digest = hashlib.sha1(repr((str(root), class_names, float(mpp))).encode()).hexdigest()[:10]
  slug = re.sub(r'[^a-z0-9_]+', '_', root.name.lower()).strip('_')[:40] or 'root'
  return FolderConfig(name=f'{slug}-{digest}', description=f'{root} with classes {class_names}',
                      class_names=class_names, mpp=float(mpp))


class Folder(_common.NucleiBuilder, skip_registration=True):
  """A user folder (module docstring) as TFDS (array_record); construct with `config=make_config(...)`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Generic images/ + labels/ (+ classes/) folder format.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Set config.dataset.manual_dir to your folder:\n{LAYOUT}'

  def _split_generators(self, dl_manager):
    splits = find_splits(self.manual_path(dl_manager))
    return {name: self._generate_examples(d, list_items(d)) for name, d in splits.items()}

  def _generate_examples(self, split_dir, pairs):
    config = self.builder_config
    for image, label in pairs:
      yield image.stem, read_item(image, label, split_dir / 'classes', len(config.class_names), config.mpp)
