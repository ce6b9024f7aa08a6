"""Dataset builders: each official format written small by the test, prepared with TFDS into tmp_path and read
back with `as_data_source`; the real fixtures and the real CoNSeP (skipped where absent); clear errors."""

from __future__ import annotations

import pathlib
import time

import ml_collections
import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from dualunet_jax.data import consep, folder, lizard, monuseg, pannuke, readers, schema, sources
from dualunet_jax.data.readers import DatasetError


# ----------------------------------------------------------------------------------------------- helpers


def _blobs(rng: np.random.Generator, size: int, n: int, first_id: int = 1, step: int = 1) -> np.ndarray:
  """int32[size, size] with n non-overlapping disks, ids first_id, first_id + step, ..."""
  inst = np.zeros((size, size), np.int32)
  yy, xx = np.mgrid[:size, :size]
  cells = int(np.ceil(np.sqrt(n)))
  pitch = size // cells
  for k in range(n):
    cy, cx = (k // cells) * pitch + pitch // 2, (k % cells) * pitch + pitch // 2
    r = rng.integers(3, max(4, pitch // 2 - 1))
    inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = first_id + k * step
  return inst


def _image(rng: np.random.Generator, size: int, channels: int = 3) -> np.ndarray:
  return rng.integers(0, 256, (size, size, channels), dtype=np.uint8)


def _config(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path | str = '', **kw):
  cfg = ml_collections.ConfigDict({'name': name, 'data_dir': str(data_dir), 'manual_dir': str(manual_dir),
                                   'class_names': ('a',), 'num_classes': 1})
  cfg.update(kw)
  return cfg


def _check(record: dict, num_classes: int) -> None:
  """Schema layout: dtypes, shapes, contiguous ids, classes in range."""
  assert set(record) == set(schema.KEYS)
  image, inst, cls = record[schema.IMAGE], record[schema.INSTANCE_MAP], record[schema.INSTANCE_CLASSES]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  assert inst.dtype == np.int32 and inst.shape == image.shape[:2]
  assert cls.dtype == np.int32 and cls.ndim == 1
  ids = np.unique(inst)
  np.testing.assert_array_equal(ids[ids > 0], np.arange(1, len(cls) + 1))
  assert cls.size == 0 or (cls.min() >= 0 and cls.max() <= num_classes)


def _records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


# ----------------------------------------------------------------------------------------------- CoNSeP


def _write_consep(root: pathlib.Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """CoNSeP/{Train,Test}/{Images,Labels}: 2 + 1 tiles of 64 px, raw types 1..7; returns merged classes."""
  merged = {}
  for split, count in (('Train', 2), ('Test', 1)):
    (root / 'CoNSeP' / split / 'Images').mkdir(parents=True)
    (root / 'CoNSeP' / split / 'Labels').mkdir(parents=True)
    for k in range(1, count + 1):
      inst = _blobs(rng, 64, 7)
      raw = rng.permutation(np.arange(1, 8)).astype(np.int32)  # every raw type once
      stem = f'{split.lower()}_{k}'
      image = _image(rng, 64, 4 if k == 1 else 3)  # the first tile is RGBA, like some CoNSeP copies
      Image.fromarray(image).save(root / 'CoNSeP' / split / 'Images' / f'{stem}.png')
      sio.savemat(root / 'CoNSeP' / split / 'Labels' / f'{stem}.mat',
                  {'inst_map': inst, 'type_map': np.zeros_like(inst),
                   'inst_type': raw[:, None].astype(np.float64), 'inst_centroid': np.zeros((7, 2))})
      merged[stem] = consep.MERGE[raw]
  return merged


def test_consep_builder(tmp_path):
  merged = _write_consep(tmp_path / 'raw', np.random.default_rng(0))
  cfg = _config('consep', tmp_path / 'tfds', tmp_path / 'raw')
  test = sources.load_source(cfg, 'test')
  train = sources.load_source(cfg, 'train')
  assert len(train) == 2 and len(test) == 1
  for record in _records(train) + _records(test):
    _check(record, 4)
    name = schema.decode_text(record[schema.NAME])
    np.testing.assert_array_equal(record[schema.INSTANCE_CLASSES], merged[name])
    assert record[schema.MPP] == pytest.approx(0.25)
  assert [schema.decode_text(r[schema.NAME]) for r in _records(train)] == ['train_1', 'train_2']
  assert sources.dataset_info(cfg) == (4, consep.CLASS_NAMES, 0.25)
  # The TFDS copy equals the direct reader, and the CoNSeP/ folder itself is accepted as root.
  direct = next(consep.iter_split(tmp_path / 'raw' / 'CoNSeP', 'Test'))
  np.testing.assert_array_equal(direct[schema.INSTANCE_MAP], test[0][schema.INSTANCE_MAP])
  np.testing.assert_array_equal(direct[schema.IMAGE], test[0][schema.IMAGE])


def test_consep_errors(tmp_path):
  _write_consep(tmp_path, np.random.default_rng(1))
  labels = tmp_path / 'CoNSeP' / 'Train' / 'Labels'
  (labels / 'train_2.mat').unlink()
  with pytest.raises(DatasetError, match=r'train_2\.mat does not exist'):
    list(consep.iter_split(tmp_path, 'Train'))
  sio.savemat(labels / 'train_2.mat', {'inst_type': np.ones((3, 1))})
  with pytest.raises(DatasetError, match=r"train_2\.mat: \.mat file has no key 'inst_map'"):
    list(consep.iter_split(tmp_path, 'Train'))
  (labels / 'train_2.mat').write_bytes(b'not a mat file')
  with pytest.raises(DatasetError, match=r'train_2\.mat: cannot read'):
    list(consep.iter_split(tmp_path, 'Train'))
  with pytest.raises(DatasetError, match='neither Train/ and Test/'):
    list(consep.iter_split(tmp_path / 'CoNSeP' / 'Train', 'Test'))


def test_consep_reader_on_real_fixtures(fixtures_dir):
  """The real CoNSeP-style patches: ids 1..N although the files' ids are not contiguous."""
  counts = []
  for k in (1, 2, 3):
    mat = fixtures_dir / 'masks' / f'patch{k}.mat'
    record = consep.read_tile(fixtures_dir / 'imgs' / f'patch{k}.png', mat)
    _check(record, 4)
    raw = sio.loadmat(fixtures_dir / 'masks' / f'patch{k}.mat')
    assert record[schema.INSTANCE_MAP].shape == (256, 256)
    np.testing.assert_array_equal(record[schema.INSTANCE_MAP] > 0, raw['inst_map'] > 0)
    np.testing.assert_array_equal(record[schema.INSTANCE_CLASSES], consep.MERGE[raw['inst_type'][:, 0]])
    counts.append(len(record[schema.INSTANCE_CLASSES]))
  assert counts == [20, 47, 58]


def test_real_consep(consep_official, tmp_path):
  """The real CoNSeP (assembled official layout): full prepare of both splits, test split counts."""
  start = time.perf_counter()
  cfg = _config('consep', tmp_path / 'tfds', consep_official.parent)
  test = sources.load_source(cfg, 'test')
  elapsed = time.perf_counter() - start
  assert len(test) == 14 and len(sources.load_source(cfg, 'train')) == 27
  classes = np.concatenate([test[i][schema.INSTANCE_CLASSES] for i in range(14)])
  assert len(classes) == 8777
  np.testing.assert_array_equal(np.bincount(classes, minlength=5), [0, 561, 1638, 3214, 3364])
  record = test[0]
  _check(record, 4)
  assert record[schema.IMAGE].shape == (1000, 1000, 3) and schema.decode_text(record[schema.NAME]) == 'test_1'
  print(f'prepared real CoNSeP (27 + 14 tiles) in {elapsed:.1f} s')


# ----------------------------------------------------------------------------------------------- PanNuke


def _write_pannuke(root: pathlib.Path, rng: np.random.Generator, n: int = 2) -> list[np.ndarray]:
  """Fold 1 (official layout) with n patches and Part 2 (Kaggle layout) with 1; ids restart at 1 in every
  channel, so they repeat across channels. Format-only: random blobs, no PanNuke semantics."""
  per_patch_classes = []

  def patches(count):
    images = np.zeros((count, 256, 256, 3), np.float64)
    masks = np.zeros((count, 256, 256, 6), np.float64)
    for i in range(count):
      inst = _blobs(rng, 256, 10)
      cls = rng.integers(0, 5, 10)
      for c in range(5):
        ids = np.flatnonzero(cls == c) + 1
        channel = np.zeros((256, 256))
        for new, old in enumerate(ids, start=1):  # ids 1, 2, ... in every channel
          channel[inst == old] = new
        masks[i, ..., c] = channel
      masks[i, ..., 5] = (inst == 0)
      images[i] = _image(rng, 256).astype(np.float64)
      per_patch_classes.append(np.sort(cls + 1))
    return images, masks

  images, masks = patches(n)
  (root / 'Fold 1' / 'images' / 'fold1').mkdir(parents=True)
  (root / 'Fold 1' / 'masks' / 'fold1').mkdir(parents=True)
  np.save(root / 'Fold 1' / 'images' / 'fold1' / 'images.npy', images)
  tissues = np.array(['Breast', 'Colon'][:n] + ['Lung'] * (n - 2))
  np.save(root / 'Fold 1' / 'images' / 'fold1' / 'types.npy', tissues)
  np.save(root / 'Fold 1' / 'masks' / 'fold1' / 'masks.npy', masks)
  images, masks = patches(1)
  (root / 'Part 2' / 'Images').mkdir(parents=True)
  (root / 'Part 2' / 'Masks').mkdir(parents=True)
  np.save(root / 'Part 2' / 'Images' / 'images.npy', images)
  np.save(root / 'Part 2' / 'Images' / 'types.npy', np.array(['Kidney']))
  np.save(root / 'Part 2' / 'Masks' / 'masks.npy', masks)
  return per_patch_classes


def test_pannuke_builder(tmp_path):
  classes = _write_pannuke(tmp_path / 'raw', np.random.default_rng(2))
  cfg = _config('pannuke', tmp_path / 'tfds', tmp_path / 'raw')
  fold1, fold2 = sources.load_source(cfg, 'fold1'), sources.load_source(cfg, 'fold2')
  with pytest.raises(DatasetError, match="no split 'fold3'; it has fold1, fold2"):
    sources.load_source(cfg, 'fold3')
  records = _records(fold1) + _records(fold2)
  assert len(records) == 3
  for record, expected in zip(records, classes):
    _check(record, 5)
    assert record[schema.INSTANCE_MAP].max() == 10  # repeated per-channel ids became 10 distinct nuclei
    np.testing.assert_array_equal(np.sort(record[schema.INSTANCE_CLASSES]), expected)
  assert [schema.decode_text(r[schema.TISSUE]) for r in records] == ['Breast', 'Colon', 'Kidney']
  assert [schema.decode_text(r[schema.NAME]) for r in records] == ['fold1_0000', 'fold1_0001', 'fold2_0000']


def test_pannuke_channel_relabelling():
  masks = np.zeros((8, 8, 6))
  masks[0:2, 0:2, 0] = 1  # neoplastic id 1
  masks[4:6, 4:6, 1] = 1  # inflammatory id 1 again: a different nucleus
  masks[4:6, 0:2, 4] = 7  # epithelial id 7
  inst, cls = pannuke.masks_to_instances(masks)
  assert inst[0, 0] == 1 and inst[4, 4] == 2 and inst[4, 0] == 3
  np.testing.assert_array_equal(cls, [1, 2, 5])


def test_pannuke_truncated_npy(tmp_path):
  _write_pannuke(tmp_path, np.random.default_rng(3), n=2)
  masks = tmp_path / 'Fold 1' / 'masks' / 'fold1' / 'masks.npy'
  masks.write_bytes(masks.read_bytes()[:100_000])
  with pytest.raises(DatasetError, match=r'masks\.npy: cannot read \.npy file, is it truncated'):
    next(pannuke.iter_fold(tmp_path, 1))
  (tmp_path / 'Fold 1' / 'images' / 'fold1' / 'images.npy').unlink()
  with pytest.raises(DatasetError, match=r'images\.npy: \.npy file does not exist'):
    next(pannuke.iter_fold(tmp_path, 1))


# ------------------------------------------------------------------------------------------ Lizard, CoNIC


def test_lizard_builder(tmp_path):
  rng = np.random.default_rng(4)
  raw = tmp_path / 'raw'
  for d in ('Lizard_Images1', 'Lizard_Images2', 'Lizard_Labels/Labels'):
    (raw / d).mkdir(parents=True)
  expected = {}
  for k, (folder_name, stem) in enumerate([('Lizard_Images1', 'consep_2'), ('Lizard_Images2', 'crag_1'),
                                           ('Lizard_Images1', 'dpath_3')]):
    inst = _blobs(rng, 48, 5, first_id=3, step=4)  # ids 3, 7, 11, ...: not contiguous
    ids = np.array([3, 7, 11, 15, 19])
    order = rng.permutation(5)  # the table lists ids in another order
    cls = rng.integers(1, 7, 5)
    Image.fromarray(_image(rng, 48)).save(raw / folder_name / f'{stem}.png')
    sio.savemat(raw / 'Lizard_Labels' / 'Labels' / f'{stem}.mat',
                {'inst_map': inst, 'id': ids[order][:, None], 'class': cls[order][:, None],
                 'bbox': np.zeros((5, 4)), 'centroid': np.zeros((5, 2))})
    expected[stem] = cls
  (raw / 'Lizard_Labels' / 'info.csv').write_text(
      'Filename,Source,Split\nconsep_2,consep,1\ncrag_1,crag,2\ndpath_3,dpath,1\n')
  cfg = _config('lizard', tmp_path / 'tfds', raw)
  train = _records(sources.load_source(cfg, 'train'))
  assert [schema.decode_text(r[schema.NAME]) for r in train] == ['consep_2', 'crag_1', 'dpath_3']
  for record in train:
    _check(record, 6)
    name = schema.decode_text(record[schema.NAME])
    np.testing.assert_array_equal(record[schema.INSTANCE_CLASSES], expected[name])
    assert record[schema.MPP] == pytest.approx(0.5)
  assert len(sources.load_source(cfg, 'fold1')) == 2 and len(sources.load_source(cfg, 'fold2')) == 1


def test_conic_builder_and_counts(tmp_path):
  rng = np.random.default_rng(5)
  n = 3
  images = np.stack([_image(rng, 256) for _ in range(n)])
  labels = np.zeros((n, 256, 256, 2), np.uint16)
  for i in range(n):
    inst = _blobs(rng, 256, 6, first_id=10)
    labels[i, ..., 0] = inst
    labels[i, ..., 1] = np.where(inst > 0, (inst % 6) + 1, 0)  # ids 10..15 -> classes 5, 6, 1, 2, 3, 4
  np.save(tmp_path / 'images.npy', images)
  np.save(tmp_path / 'labels.npy', labels)
  (tmp_path / 'counts.csv').write_text('neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective\n'
                                       + ''.join(f'{i},1,2,3,4,5\n' for i in range(n)))
  (tmp_path / 'patch_info.csv').write_text('patch_info\n' + ''.join(f'crag_1-{i:04d}\n' for i in range(n)))
  source = sources.load_source(_config('conic', tmp_path / 'tfds', tmp_path), 'train')
  assert len(source) == n
  for i in range(n):
    record = source[i]
    _check(record, 6)
    np.testing.assert_array_equal(record[schema.INSTANCE_CLASSES], [5, 6, 1, 2, 3, 4])
    np.testing.assert_array_equal(record[schema.IMAGE], images[i])
    assert schema.decode_text(record[schema.NAME]) == f'crag_1-{i:04d}'
  counts = lizard.conic_counts(tmp_path)
  assert counts.dtype == np.int32 and counts.shape == (n, 6)
  np.testing.assert_array_equal(counts[:, 0], np.arange(n))  # row i belongs to record i


# ----------------------------------------------------------------------------------------------- MoNuSeg


def _xml(polygons: list[list[tuple[float, float]]], mpp: str | None) -> str:
  regions = ''.join(
      f'<Region Id="{k + 1}"><Vertices>' + ''.join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in poly)
      + '</Vertices></Region>' for k, poly in enumerate(polygons))
  attr = f' MicronsPerPixel="{mpp}"' if mpp is not None else ''
  return f'<?xml version="1.0"?><Annotations{attr}><Annotation Id="1"><Regions>{regions}</Regions>' \
         '</Annotation></Annotations>'


def test_monuseg_builder(tmp_path):
  rng = np.random.default_rng(6)
  train = tmp_path / 'raw' / 'MoNuSeg 2018 Training Data'
  test = tmp_path / 'raw' / 'MoNuSegTestData'
  for d in (train / 'Tissue Images', train / 'Annotations', test):
    d.mkdir(parents=True)
  square = lambda x, y, s: [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]  # noqa: E731
  polygons = [square(2, 2, 10), square(8, 8, 10), square(30, 30, 5), square(31, 31, 2), [(1, 1), (2, 2)]]
  tifffile.imwrite(train / 'Tissue Images' / 'TCGA-A.tif', _image(rng, 48, 4))  # RGBA: alpha dropped
  (train / 'Annotations' / 'TCGA-A.xml').write_text(_xml(polygons, '0.252000'))
  tifffile.imwrite(test / 'TCGA-B.tif', _image(rng, 48))
  (test / 'TCGA-B.xml').write_text(_xml(polygons[:1], None))
  cfg = _config('monuseg', tmp_path / 'tfds', tmp_path / 'raw')
  a, b = sources.load_source(cfg, 'train')[0], sources.load_source(cfg, 'test')[0]
  _check(a, 1)
  _check(b, 1)
  inst = a[schema.INSTANCE_MAP]
  # Later polygons win: the second square covers the first's corner; the fourth sits inside the third.
  assert inst[5, 5] == 1 and inst[10, 10] == 2 and inst[30, 30] == 3 and inst[32, 32] == 4
  np.testing.assert_array_equal(a[schema.INSTANCE_CLASSES], [1, 1, 1, 1])  # the 2-vertex region is skipped
  assert a[schema.MPP] == pytest.approx(0.252) and b[schema.MPP] == pytest.approx(0.25)
  (test / 'TCGA-B.xml').write_text('<Annotations><Region>')
  with pytest.raises(DatasetError, match=r'TCGA-B\.xml: malformed XML'):
    monuseg.read_tile(test / 'TCGA-B.tif', test / 'TCGA-B.xml')


# ----------------------------------------------------------------------------------------------- folder


def _write_folder(root: pathlib.Path, rng: np.random.Generator) -> None:
  """train/: a 16-bit PNG label + csv classes, an .npy label + class map; test/: a .mat with inst_type."""
  for split in ('train', 'test'):
    for d in ('images', 'labels', 'classes'):
      (root / split / d).mkdir(parents=True)
  inst = _blobs(rng, 40, 4, first_id=1000, step=100)  # 1000, 1100, 1200, 1300
  Image.fromarray(_image(rng, 40)).save(root / 'train' / 'images' / 'a_1.png')
  Image.fromarray(inst.astype(np.uint16)).save(root / 'train' / 'labels' / 'a_1.png')
  (root / 'train' / 'classes' / 'a_1.csv').write_text('id,class\n1300,2\n1000,1\n1100,2\n')  # 1200 unlisted
  Image.fromarray(_image(rng, 40)).save(root / 'train' / 'images' / 'a_2.jpg')
  inst2 = _blobs(rng, 40, 2)
  np.save(root / 'train' / 'labels' / 'a_2.npy', inst2)
  class_map = np.where(inst2 == 1, 2, np.where(inst2 == 2, 1, 0)).astype(np.uint8)
  class_map[inst2 == 2] = np.where(rng.random((inst2 == 2).sum()) < 0.2, 2, 1)  # a minority of 2s
  np.save(root / 'train' / 'classes' / 'a_2.npy', class_map)
  tifffile.imwrite(root / 'test' / 'images' / 'b_1.tif', _image(rng, 40))
  sio.savemat(root / 'test' / 'labels' / 'b_1.mat',
              {'inst_map': _blobs(rng, 40, 3), 'inst_type': [[2], [1], [2]]})


def test_folder_builder(tmp_path):
  _write_folder(tmp_path / 'raw', np.random.default_rng(7))
  cfg = _config('folder', tmp_path / 'tfds', tmp_path / 'raw', class_names=('negative', 'positive'),
                num_classes=2)
  train, test = _records(sources.load_source(cfg, 'train')), _records(sources.load_source(cfg, 'test'))
  for record in train + test:
    _check(record, 2)
    assert record[schema.MPP] == 0
  np.testing.assert_array_equal(train[0][schema.INSTANCE_CLASSES], [1, 2, 0, 2])
  np.testing.assert_array_equal(train[1][schema.INSTANCE_CLASSES], [2, 1])
  np.testing.assert_array_equal(test[0][schema.INSTANCE_CLASSES], [2, 1, 2])
  assert sources.dataset_info(cfg) == (2, ('negative', 'positive'), 0.0)
  # Other class names (or another folder) give another prepared copy, never the same directory.
  other = _config('folder', tmp_path / 'tfds', tmp_path / 'raw', class_names=('a', 'b', 'c'), num_classes=3)
  assert sources.get_builder(other).data_path != sources.get_builder(cfg).data_path
  assert not sources.get_builder(other).is_prepared()


def test_folder_errors(tmp_path):
  rng = np.random.default_rng(8)
  root = tmp_path / 'data'
  (root / 'images').mkdir(parents=True)
  (root / 'labels').mkdir()
  Image.fromarray(_image(rng, 16)).save(root / 'images' / 'x.png')
  with pytest.raises(DatasetError, match=r'label file .*labels/x\.png\|\.tif\|\.npy\|\.mat does not exist'):
    folder.list_items(root)
  np.save(root / 'labels' / 'x.npy', _blobs(rng, 16, 1))
  assert folder.find_splits(root) == {'train': root}
  record = folder.read_item(root / 'images' / 'x.png', root / 'labels' / 'x.npy', root / 'classes', 1)
  np.testing.assert_array_equal(record[schema.INSTANCE_CLASSES], [1])  # no class source, K = 1
  (root / 'classes').mkdir()
  (root / 'classes' / 'x.csv').write_text('id,class\n1,5\n')
  with pytest.raises(DatasetError, match=r'x\.csv: class id 5 outside 0\.\.2'):
    folder.read_item(root / 'images' / 'x.png', root / 'labels' / 'x.npy', root / 'classes', 2)


# --------------------------------------------------------------------------------------- readers, sources


def test_read_image_policy(tmp_path):
  rng = np.random.default_rng(9)
  rgba = _image(rng, 8, 4)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(readers.read_image(tmp_path / 'rgba.png'), rgba[..., :3])
  Image.fromarray(rgba[..., 0]).save(tmp_path / 'gray.png')
  with pytest.raises(DatasetError, match=r'gray\.png: grayscale image'):
    readers.read_image(tmp_path / 'gray.png')
  tifffile.imwrite(tmp_path / 'deep.tif', rgba[..., :3].astype(np.uint16) * 257)
  np.testing.assert_array_equal(readers.read_image(tmp_path / 'deep.tif'), rgba[..., :3])
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(DatasetError, match=r'bad\.png: cannot decode image'):
    readers.read_image(tmp_path / 'bad.png')


def test_sources_errors(tmp_path):
  with pytest.raises(DatasetError, match='not a known dataset'):
    sources.get_builder(_config('kumar', tmp_path))
  with pytest.raises(DatasetError, match='manual_dir is empty.*consep_dataset.zip'):
    sources.load_source(_config('consep', tmp_path), 'test')
  with pytest.raises(DatasetError, match=r'(?s)folder .*nowhere does not exist.*Fold N/images'):
    sources.load_source(_config('pannuke', tmp_path, tmp_path / 'nowhere'), 'fold1')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match=r'(?s)empty\..*MoNuSegTestData'):
    sources.load_source(_config('monuseg', tmp_path / 'tfds', tmp_path / 'empty'), 'train')
  (tmp_path / 'empty' / 'README.txt').write_text('not the data')
  with pytest.raises(DatasetError, match=r'(?s)holds neither .*MoNuSegTestData'):
    sources.load_source(_config('monuseg', tmp_path / 'tfds', tmp_path / 'empty'), 'train')
  assert sources.dataset_info(_config('conic', tmp_path))[:2] == (6, lizard.CLASS_NAMES)
  assert sources.dataset_info(_config('monuseg', tmp_path)) == (1, ('nucleus',), 0.25)
  assert sources.dataset_info(_config('pannuke', tmp_path)) == (5, pannuke.CLASS_NAMES, 0.25)


def test_sources_synthetic_and_reuse(tmp_path):
  cfg = _config('synthetic', tmp_path, synthetic_train_size=1, synthetic_test_size=1, synthetic_tile_size=32,
                num_classes=3)
  record = sources.load_source(cfg, 'test', seed=1)[0]
  _check(record, 3)
  assert sources.dataset_info(cfg) == (3, ('lymphocyte', 'epithelial', 'spindle'), 0.5)
  # A prepared dataset is read again without its manual_dir.
  _write_consep(tmp_path / 'raw', np.random.default_rng(10))
  assert len(sources.load_source(_config('consep', tmp_path / 'tfds', tmp_path / 'raw'), 'test')) == 1
  assert len(sources.load_source(_config('consep', tmp_path / 'tfds', ''), 'test')) == 1
