"""MoNuSeg 2018 (Kumar et al.): 1000x1000 H&E tiles from TCGA at 40x, nuclei outlined as polygons, no classes.

Expected `manual_dir` (the two unzipped archives; folder names matched case-insensitively, searched in
manual_dir and one level below):

    <manual_dir>/MoNuSeg 2018 Training Data/Tissue Images/TCGA-*.tif
    <manual_dir>/MoNuSeg 2018 Training Data/Annotations/TCGA-*.xml
    <manual_dir>/MoNuSegTestData/TCGA-*.tif  TCGA-*.xml

Any folder holding `Tissue Images/` + `Annotations/` is the train split; a folder named `MoNuSegTestData`
(holding .tif + .xml side by side) is the test split; at least one must be present.

Annotations are Aperio ImageScope XML: each `Region` is one nucleus, its `Vertices/Vertex@X,@Y` a polygon in
pixel coordinates, rasterised with `skimage.draw.polygon` (row = Y, col = X), each with its own id in file
order; where polygons overlap the later one wins, and ids left with no pixels are dropped.

Records (`schema`): image uint8[1000, 1000, 3] (alpha dropped), instance_map int32 ids 1..N,
instance_classes all 1 (one class, `nucleus`), name = file stem, tissue '', mpp from the root's
`MicronsPerPixel` attribute (0.25 when absent or unparsable). Splits `train` and `test`.
"""

from __future__ import annotations

import pathlib
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from dualunet_jax.data import _common, readers
from dualunet_jax.data.readers import DatasetError

CLASS_NAMES = ('nucleus',)
MPP = 0.25

LAYOUT = """\
  <manual_dir>/MoNuSeg 2018 Training Data/Tissue Images/TCGA-*.tif
  <manual_dir>/MoNuSeg 2018 Training Data/Annotations/TCGA-*.xml
  <manual_dir>/MoNuSegTestData/TCGA-*.tif, TCGA-*.xml"""


def rasterise_xml(xml_path: readers.PathLike, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
  """Rasterises an ImageScope XML into an instance map.

  Args:
    xml_path: the annotation file.
    shape: (H, W) of the image.
  Returns:
    (int32[H, W] ids 1..N contiguous, microns per pixel from the file or 0.25).
  """
  from skimage.draw import polygon

  xml_path = pathlib.Path(xml_path)
  if not xml_path.is_file():
    raise DatasetError(f'{xml_path}: annotation file does not exist')
  try:
    root = ET.parse(xml_path).getroot()
  except ET.ParseError as e:
    raise DatasetError(f'{xml_path}: malformed XML ({e})') from e
  try:
    mpp = float(root.get('MicronsPerPixel', '') or 0)
  except ValueError:
    mpp = 0.0
  inst = np.zeros(shape, np.int64)
  next_id = 0
  for region in root.iter('Region'):
    try:
      xy = np.array([(float(v.get('X')), float(v.get('Y'))) for v in region.iter('Vertex')], np.float64)
    except (TypeError, ValueError) as e:
      raise DatasetError(f'{xml_path}: Region {region.get("Id")!r} has a Vertex without numeric X/Y') from e
    if len(xy) < 3:
      continue  # not an area
    rr, cc = polygon(xy[:, 1], xy[:, 0], shape=shape)
    next_id += 1
    inst[rr, cc] = next_id
  instance_map, _ = readers.relabel_contiguous(inst)
  return instance_map, (mpp if mpp > 0 else MPP)


def read_tile(image_path: readers.PathLike, xml_path: readers.PathLike) -> dict[str, Any]:
  """One MoNuSeg tile + XML as a `schema` record (all classes 1)."""
  image_path = pathlib.Path(image_path)
  image = readers.read_image(image_path)
  instance_map, mpp = rasterise_xml(xml_path, image.shape[:2])
  classes = np.ones(int(instance_map.max()), np.int32)
  return readers.make_record(image, instance_map, classes, name=image_path.stem, mpp=mpp,
                             source=f'{image_path} / {xml_path}')


def _pairs(image_dir: pathlib.Path, xml_dir: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
  images = [p for p in readers.list_images(image_dir) if p.suffix.lower() in ('.tif', '.tiff', '.png')]
  if not images:
    raise DatasetError(f'MoNuSeg: {image_dir} holds no .tif images. Expected layout:\n{LAYOUT}')
  pairs = []
  for image in images:
    xml = readers.find_by_stem(xml_dir, image.stem, ('.xml',))
    if xml is None:
      raise DatasetError(f'MoNuSeg: annotation file {xml_dir / (image.stem + ".xml")} does not exist '
                         f'(needed for {image})')
    pairs.append((image, xml))
  return pairs


def find_splits(root: readers.PathLike) -> dict[str, list[tuple[pathlib.Path, pathlib.Path]]]:
  """{'train': [(tif, xml), ...], 'test': [...]} for the splits present under `root`."""
  root = pathlib.Path(root)
  readers.require_dir(root, 'MoNuSeg', LAYOUT)
  candidates = [root] + [c for c in sorted(root.iterdir()) if c.is_dir()]
  splits = {}
  for d in candidates:
    tissue, annotations = readers.find_child(d, 'Tissue Images'), readers.find_child(d, 'Annotations')
    if 'train' not in splits and tissue is not None and annotations is not None:
      splits['train'] = _pairs(tissue, annotations)
    if 'test' not in splits and d.name.lower() == 'monusegtestdata':
      splits['test'] = _pairs(d, d)
  if not splits:
    raise DatasetError(f'MoNuSeg: {root} holds neither a "Tissue Images/" + "Annotations/" folder pair nor '
                       f'MoNuSegTestData/. Expected layout:\n{LAYOUT}')
  return splits


class Monuseg(_common.NucleiBuilder, skip_registration=True):
  """MoNuSeg 2018 as TFDS (array_record), splits `train` and `test` (those present)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Polygons rasterised in file order (later wins); one class.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download "MoNuSeg 2018 Training Data.zip" and "MoNuSegTestData.zip" from '
      'https://monuseg.grand-challenge.org/Data/ , unzip both into one folder and set '
      f'config.dataset.manual_dir to it:\n{LAYOUT}')
  HOMEPAGE = 'https://monuseg.grand-challenge.org/Data/'
  CITATION = 'Kumar et al., A Multi-Organ Nucleus Segmentation Challenge, IEEE TMI 39(5) (2020) 1380-1391.'

  def _split_generators(self, dl_manager):
    splits = find_splits(self.manual_path(dl_manager))
    return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

  def _generate_examples(self, pairs):
    for image, xml in pairs:
      yield image.stem, read_tile(image, xml)
