"""Tests for the synthetic H&E nuclei renderer and its TFDS builder."""

import functools

import ml_collections
import numpy as np
import pytest

from dualunet_jax.data import schema
from dualunet_jax.data import synthetic


def _instance_stats(record) -> dict[str, np.ndarray]:
  """Per instance: class, area (px), mean grey level, elongation (sqrt of the inertia eigenvalue ratio)."""
  inst = record[schema.INSTANCE_MAP].ravel()
  n = len(record[schema.INSTANCE_CLASSES])
  size = record[schema.INSTANCE_MAP].shape[0]
  yy, xx = (g.ravel().astype(np.float64) for g in np.mgrid[:size, :size])
  count = functools.partial(np.bincount, inst, minlength=n + 1)
  area = count()
  grey = count(record[schema.IMAGE].reshape(-1, 3).mean(1)) / np.maximum(area, 1)
  mx, my = count(xx) / np.maximum(area, 1), count(yy) / np.maximum(area, 1)
  cxx = count(xx * xx) / np.maximum(area, 1) - mx ** 2
  cyy = count(yy * yy) / np.maximum(area, 1) - my ** 2
  cxy = count(xx * yy) / np.maximum(area, 1) - mx * my
  root = np.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
  mean = (cxx + cyy) / 2
  elongation = np.sqrt((mean + root) / np.maximum(mean - root, 1e-3))
  return {'cls': record[schema.INSTANCE_CLASSES], 'area': area[1:], 'grey': grey[1:],
          'elongation': elongation[1:]}


@functools.lru_cache(maxsize=None)
def _tiles(num_classes: int, n: int = 10, size: int = 256):
  return tuple(synthetic.make_records(n, seed=7, size=size, num_classes=num_classes))


def test_deterministic_per_seed_split_index():
  a = synthetic.render_tile(3, size=96, index=5)
  b = synthetic.render_tile(3, size=96, index=5)
  for key in schema.KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a[schema.IMAGE], synthetic.render_tile(3, size=96, index=6)[schema.IMAGE])
  assert not np.array_equal(a[schema.IMAGE], synthetic.render_tile(4, size=96, index=5)[schema.IMAGE])
  test_split = synthetic.render_tile(3, size=96, index=5, split='test')
  assert not np.array_equal(a[schema.IMAGE], test_split[schema.IMAGE])


@pytest.mark.parametrize('num_classes,size', [(1, 64), (3, 128), (5, 256)])
def test_schema_layout(num_classes, size):
  r = synthetic.render_tile(1, size=size, num_classes=num_classes, index=2, split='test')
  assert set(r) == set(schema.KEYS)
  assert r[schema.IMAGE].dtype == np.uint8 and r[schema.IMAGE].shape == (size, size, 3)
  assert r[schema.INSTANCE_MAP].dtype == np.int32 and r[schema.INSTANCE_MAP].shape == (size, size)
  assert r[schema.INSTANCE_CLASSES].dtype == np.int32 and r[schema.INSTANCE_CLASSES].ndim == 1
  assert r[schema.NAME] == 'synthetic_test_000002' and r[schema.TISSUE] == 'synthetic'
  assert r[schema.MPP] == np.float32(0.5)
  n = len(r[schema.INSTANCE_CLASSES])
  assert n >= 1
  assert r[schema.INSTANCE_CLASSES].min() >= 1 and r[schema.INSTANCE_CLASSES].max() <= num_classes


def test_ids_contiguous_and_every_id_visible():
  for r in _tiles(3):
    inst, n = r[schema.INSTANCE_MAP], len(r[schema.INSTANCE_CLASSES])
    np.testing.assert_array_equal(np.unique(inst), np.arange(n + 1))
    assert np.bincount(inst.ravel())[1:].min() >= synthetic.MIN_PIXELS


def test_density_and_every_class_present():
  counts = [len(r[schema.INSTANCE_CLASSES]) for r in _tiles(3)]
  assert 10 <= min(counts) and max(counts) <= 70, counts
  for k in (3, 5):
    classes = np.concatenate([r[schema.INSTANCE_CLASSES] for r in _tiles(k, n=6)])
    assert set(np.unique(classes)) == set(range(1, k + 1))
  assert all(set(r[schema.INSTANCE_CLASSES]) == {1} for r in _tiles(1, n=3, size=128))


def test_class_statistics_as_designed():
  stats = [_instance_stats(r) for r in _tiles(3)]
  cat = {key: np.concatenate([s[key] for s in stats]) for key in stats[0]}
  whole = cat['area'] >= 40  # mostly unoccluded, not cut by the border
  mean = {key: [cat[key][whole & (cat['cls'] == c)].mean() for c in (1, 2, 3)]
          for key in ('area', 'grey', 'elongation')}
  lymph, epi, spindle = 0, 1, 2
  assert mean['area'][lymph] < 0.6 * mean['area'][epi], mean
  assert mean['area'][spindle] < 0.6 * mean['area'][epi], mean
  assert mean['elongation'][spindle] > 2 * max(mean['elongation'][lymph], mean['elongation'][epi]), mean
  assert mean['grey'][lymph] < mean['grey'][spindle] < mean['grey'][epi], mean


def test_touching_same_class_nuclei_exist():
  touching = 0
  for r in _tiles(3):
    inst, cls = r[schema.INSTANCE_MAP], np.concatenate([[0], r[schema.INSTANCE_CLASSES]])
    for a, b in ((inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:])):
      pairs = (a > 0) & (b > 0) & (a != b) & (cls[a] == cls[b])
      touching += len(np.unique(a[pairs] * 100000 + b[pairs]))
  assert touching >= 10


def test_invalid_arguments():
  with pytest.raises(ValueError):
    synthetic.render_tile(0, num_classes=synthetic.MAX_CLASSES + 1)
  with pytest.raises(ValueError):
    synthetic.render_tile(0, num_classes=0)


def test_config_names_encode_parameters():
  base = dict(train_size=4, test_size=2, tile_size=64, num_classes=3, seed=0)
  names = {synthetic.make_config(**base).name}
  changes = (('train_size', 5), ('test_size', 3), ('tile_size', 128), ('num_classes', 4), ('seed', 1))
  for key, value in changes:
    names.add(synthetic.make_config(**{**base, key: value}).name)
  assert len(names) == 6
  default = synthetic.make_config(train_size=512, test_size=64, tile_size=256, num_classes=3, seed=42)
  assert default is synthetic.Synthetic.BUILDER_CONFIGS[0]


def test_tfds_builder_round_trip(tmp_path):
  import tensorflow_datasets as tfds

  dataset = ml_collections.ConfigDict({'synthetic_train_size': 4, 'synthetic_test_size': 2,
                                       'synthetic_tile_size': 64, 'num_classes': 3})
  builder = synthetic.builder_from_config(dataset, str(tmp_path), seed=11)
  assert builder.builder_config.name == 'train4_test2_size64_k3_seed11'
  builder.download_and_prepare()
  source = tfds.data_source(f'synthetic/{builder.builder_config.name}', data_dir=str(tmp_path))
  assert {split: len(source[split]) for split in ('train', 'test')} == {'train': 4, 'test': 2}
  for split, index in (('train', 0), ('train', 3), ('test', 1)):
    got, want = source[split][index], synthetic.render_tile(11, size=64, index=index, split=split)
    for key in (schema.IMAGE, schema.INSTANCE_MAP, schema.INSTANCE_CLASSES):
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == want[key].dtype
    assert schema.decode_text(got[schema.NAME]) == want[schema.NAME]
    assert schema.decode_text(got[schema.TISSUE]) == 'synthetic'
    assert np.float32(got[schema.MPP]) == np.float32(0.5)
  # Seed from the dataset config when not given; 0 when it has none.
  assert synthetic.builder_from_config(dataset, str(tmp_path)).builder_config.seed == 0
