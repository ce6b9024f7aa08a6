"""Lizard (Graham et al. 2021): colon H&E regions at 20x (~0.5 µm/px), and CoNIC, its 256x256 patches.

Both use 6 classes: neutrophil, epithelial, lymphocyte, plasma, eosinophil, connective (ids 1..6).

Lizard, expected `manual_dir` (the unzipped `lizard_images{1,2}.zip` and `lizard_labels.zip`; names matched
case-insensitively, searched in manual_dir and up to two folder levels below it):

    <manual_dir>/Lizard_Images1/*.png  <manual_dir>/Lizard_Images2/*.png
    <manual_dir>/Lizard_Labels/Labels/*.mat     inst_map, id (N,1), class (N,1) [bbox, centroid unused]
    <manual_dir>/Lizard_Labels/info.csv         optional: Filename, Source, Split

Records: image uint8[H, W, 3] (whole region, sizes vary), instance_map int32 ids 1..N (relabelled),
instance_classes int32[N] looked up through `id`/`class` (ids missing from the table get 0, unlabelled),
name = file stem, tissue '', mpp 0.5. Splits: `train` holds every image (Lizard has no official test split);
when info.csv (any *.csv beside Labels/ with `filename` and `split` columns) is present, `fold1`..`fold3` hold
its cross-validation folds too (images not listed there stay only in `train`).

CoNIC, expected `manual_dir`:

    <manual_dir>/images.npy     uint8 (N, 256, 256, 3)
    <manual_dir>/labels.npy     (N, 256, 256, 2): instance map, class map (0 background, 1..6)
    <manual_dir>/counts.csv     optional: per-patch counts, columns neutrophil..connective
    <manual_dir>/patch_info.csv optional: the source of each patch (first column used as the record name)

Records: image uint8[256, 256, 3], instance_map int32 ids 1..N, instance_classes the majority class of each
instance in the class map, name from patch_info.csv (else `conic_{index:05d}`), tissue '', mpp 0.5. One split,
`train`, in file order, so record i is patch i: the schema has no counts key, so the CoNIC R² metric reads
`conic_counts(manual_dir)` (int32[N, 6]), whose row i belongs to record i.
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from dualunet_jax.data import _common, readers
from dualunet_jax.data.readers import DatasetError

CLASS_NAMES = ('neutrophil', 'epithelial', 'lymphocyte', 'plasma', 'eosinophil', 'connective')
MPP = 0.5

LIZARD_LAYOUT = """\
  <manual_dir>/Lizard_Images1/*.png  <manual_dir>/Lizard_Images2/*.png
  <manual_dir>/Lizard_Labels/Labels/*.mat   (keys inst_map, id, class)
  <manual_dir>/Lizard_Labels/info.csv       (optional: Filename, Source, Split)"""
CONIC_LAYOUT = """\
  <manual_dir>/images.npy   uint8 (N, 256, 256, 3)
  <manual_dir>/labels.npy   (N, 256, 256, 2) instance map, class map
  <manual_dir>/counts.csv   (optional) neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective"""


# ----------------------------------------------------------------------------------------------- Lizard


def _dirs_below(root: pathlib.Path, depth: int = 2) -> list[pathlib.Path]:
  out, level = [root], [root]
  for _ in range(depth):
    level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir()]
    out += level
  return out


def find_lizard(root: readers.PathLike) -> tuple[list[pathlib.Path], pathlib.Path, pathlib.Path | None]:
  """(image folders, Labels/ folder, info csv or None) of a Lizard download under `root`."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'Lizard', LIZARD_LAYOUT)
  dirs = _dirs_below(root)
  image_dirs = [d for d in dirs if d.name.lower().startswith('lizard_images') and readers.list_images(d)]
  labels = [d for d in dirs if d.name.lower() == 'labels' and d.parent.name.lower() == 'lizard_labels']
  labels = labels or [d for d in dirs if d.name.lower() == 'labels' and any(d.glob('*.mat'))]
  if not image_dirs:
    raise DatasetError(f'Lizard: no Lizard_Images1/ or Lizard_Images2/ folder with .png images under {root}. '
                       f'Expected layout:\n{LIZARD_LAYOUT}')
  if not labels:
    raise DatasetError(f'Lizard: no Lizard_Labels/Labels/ folder under {root}. '
                       f'Expected layout:\n{LIZARD_LAYOUT}')
  info = None
  for csv in sorted(labels[0].parent.glob('*.csv')):
    rows = readers.read_csv_rows(csv)
    if rows and 'filename' in rows[0] and 'split' in rows[0]:
      info = csv
      break
  return image_dirs, labels[0], info


def read_lizard_tile(image_path: readers.PathLike, mat_path: readers.PathLike) -> dict[str, Any]:
  """One Lizard image + .mat (`inst_map`, `id`, `class`) as a `schema` record (classes 1..6, mpp 0.5)."""
  image_path, mat_path = pathlib.Path(image_path), pathlib.Path(mat_path)
  image = readers.read_image(image_path)
  data = readers.read_mat(mat_path, required=('inst_map', 'id', 'class'))
  instance_map, old_ids = readers.relabel_contiguous(readers.as_instance_map(data['inst_map'], mat_path))
  classes = readers.classes_from_table(old_ids, data['id'], data['class'], mat_path)
  if classes.size and classes.max() > len(CLASS_NAMES):
    raise DatasetError(f'{mat_path}: class id {int(classes.max())} outside 1..{len(CLASS_NAMES)}')
  return readers.make_record(image, instance_map, classes, name=image_path.stem, mpp=MPP,
                             source=f'{image_path} / {mat_path}')


def lizard_splits(root: readers.PathLike) -> dict[str, list[tuple[pathlib.Path, pathlib.Path]]]:
  """{split: [(image, mat), ...]}: `train` = all images; `fold{k}` from the info csv when present."""
  image_dirs, labels_dir, info = find_lizard(root)
  pairs = []
  for image in sorted((p for d in image_dirs for p in readers.list_images(d)), key=readers.natural_key):
    mat = labels_dir / f'{image.stem}.mat'
    if not mat.is_file():
      raise DatasetError(f'Lizard: label file {mat} does not exist (needed for {image})')
    pairs.append((image, mat))
  splits = {'train': pairs}
  if info is not None:
    fold_of = {}
    for row in readers.read_csv_rows(info):
      try:
        fold_of[pathlib.Path(row['filename']).stem] = int(float(row['split']))
      except ValueError as e:
        raise DatasetError(f'{info}: split {row["split"]!r} of {row["filename"]!r} is not a number') from e
    for fold in sorted(set(fold_of.values())):
      splits[f'fold{fold}'] = [p for p in pairs if fold_of.get(p[0].stem) == fold]
  return splits


class Lizard(_common.NucleiBuilder, skip_registration=True):
  """Lizard as TFDS (array_record): split `train` (all images) and `fold1..3` from the info csv."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Whole regions, ids relabelled, classes from the id/class table.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download lizard_images1.zip, lizard_images2.zip and lizard_labels.zip from '
      'https://warwick.ac.uk/fac/cross_fac/tia/data/lizard , unzip them into one folder and set '
      f'config.dataset.manual_dir to it:\n{LIZARD_LAYOUT}')
  HOMEPAGE = 'https://warwick.ac.uk/fac/cross_fac/tia/data/lizard'
  CITATION = ('Graham et al., Lizard: A Large-Scale Dataset for Colonic Nuclear Instance Segmentation, '
              'ICCVW 2021.')

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(pairs)
            for name, pairs in lizard_splits(self.manual_path(dl_manager)).items()}

  def _generate_examples(self, pairs):
    for image, mat in pairs:
      yield image.stem, read_lizard_tile(image, mat)


# ----------------------------------------------------------------------------------------------- CoNIC


def _conic_file(root: pathlib.Path, name: str, required: bool = True) -> pathlib.Path | None:
  path = readers.find_child(root, name)
  if path is None and required:
    raise DatasetError(f'CoNIC: file {root / name} does not exist. Expected layout:\n{CONIC_LAYOUT}')
  return path


def iter_conic(root: readers.PathLike) -> Iterator[dict[str, Any]]:
  """CoNIC records in file order (record i = patch i = row i of `conic_counts`)."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'CoNIC', CONIC_LAYOUT)
  images_path, labels_path = _conic_file(root, 'images.npy'), _conic_file(root, 'labels.npy')
  images = readers.read_npy(images_path, mmap=True)
  labels = readers.read_npy(labels_path, mmap=True)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise DatasetError(f'{images_path}: shape {images.shape}; expected (N, H, W, 3)')
  if labels.ndim != 4 or labels.shape[-1] != 2 or labels.shape[:3] != images.shape[:3]:
    raise DatasetError(f'{labels_path}: shape {labels.shape}; expected (N, H, W, 2) matching images.npy '
                       f'{images.shape}')
  names = None
  info_path = _conic_file(root, 'patch_info.csv', required=False)
  if info_path is not None:
    rows = readers.read_csv_rows(info_path)
    if len(rows) != images.shape[0]:
      raise DatasetError(f'{info_path}: {len(rows)} rows but images.npy holds {images.shape[0]} patches')
    names = [next(iter(r.values()), '') for r in rows]
  for i in range(images.shape[0]):
    image = readers.to_rgb_uint8(np.asarray(images[i]), images_path)
    label = np.asarray(labels[i])
    instance_map, _ = readers.relabel_contiguous(readers.as_instance_map(label[..., 0], labels_path))
    class_map = readers.as_instance_map(label[..., 1], labels_path)
    if class_map.max(initial=0) > len(CLASS_NAMES):
      raise DatasetError(f'{labels_path} [{i}]: class id {int(class_map.max())} '
                         f'outside 0..{len(CLASS_NAMES)}')
    classes = readers.majority_class(instance_map, class_map, int(instance_map.max()))
    name = names[i] if names and names[i] else f'conic_{i:05d}'
    yield readers.make_record(image, instance_map, classes, name=name, mpp=MPP, source=f'{labels_path} [{i}]')


def conic_counts(manual_dir: readers.PathLike) -> np.ndarray:
  """CoNIC `counts.csv` as int32[N, 6] (columns in CLASS_NAMES order), row i = record i of split `train`."""
  root = pathlib.Path(manual_dir)
  path = _conic_file(root, 'counts.csv')
  rows = readers.read_csv_rows(path)
  if rows and any(c not in rows[0] for c in CLASS_NAMES):
    raise DatasetError(f'{path}: columns {sorted(rows[0])}; expected {", ".join(CLASS_NAMES)}')
  try:
    return np.array([[int(float(r[c])) for c in CLASS_NAMES] for r in rows], np.int32).reshape(-1, 6)
  except ValueError as e:
    raise DatasetError(f'{path}: non-numeric count ({e})') from e


class Conic(_common.NucleiBuilder, skip_registration=True):
  """CoNIC patches as TFDS (array_record): one split `train`, in file order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Patches in file order; classes by majority of the class channel.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download the CoNIC challenge patches (https://conic-challenge.grand-challenge.org) and set '
      f'config.dataset.manual_dir to the folder holding them:\n{CONIC_LAYOUT}')
  HOMEPAGE = 'https://conic-challenge.grand-challenge.org'
  CITATION = 'Graham et al., CoNIC Challenge, Medical Image Analysis 92 (2024) 103047.'

  def _split_generators(self, dl_manager):
    root = self.manual_path(dl_manager)
    _conic_file(root, 'images.npy'), _conic_file(root, 'labels.npy')  # fail before TFDS starts writing
    return {'train': self._generate_examples(root)}

  def _generate_examples(self, root):
    for i, record in enumerate(iter_conic(root)):
      yield i, record
