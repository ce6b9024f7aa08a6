"""Tile grid, ownership stitching and contours; tiled == whole-image prediction on a real CoNSeP tile."""

import numpy as np
import pytest

from dualunet_jax import inference
from dualunet_jax.inference import tiling


@pytest.mark.parametrize('hw,tile,overlap', [((1000, 1000), 256, 64), ((300, 517), 128, 32), ((90, 40), 128, 32),
                                             ((257, 129), 128, 0)])
def test_cores_partition_image_and_margins_hold(hw, tile, overlap):
  grid = tiling.TileGrid.create(*hw, tile, overlap)
  cover = np.zeros(hw, np.int32)
  for t in grid.tiles():
    cy0, cx0, cy1, cx1 = t.core
    cover[cy0:cy1, cx0:cx1] += 1
    assert (t.height, t.width) == grid.tile_shape
    if not grid.single:  # every core lies >= margin inside its tile
      assert cy0 - t.y0 >= grid.margin and cx0 - t.x0 >= grid.margin
      assert t.y0 + t.height - cy1 >= grid.margin and t.x0 + t.width - cx1 >= grid.margin
  assert (cover == 1).all()  # every pixel owned by exactly one tile
  # Ownership of continuous centroids: exactly one owner inside the image, none outside.
  rng = np.random.default_rng(0)
  y = rng.uniform(-5, hw[0] + 5, 500)
  x = rng.uniform(-5, hw[1] + 5, 500)
  owners = sum(t.owns(y, x).astype(int) for t in grid.tiles())
  inside = (y >= 0) & (y < hw[0]) & (x >= 0) & (x < hw[1])
  np.testing.assert_array_equal(owners, inside.astype(int))


def test_tissue_selection_and_bad_geometry():
  grid = tiling.TileGrid.create(1000, 1000, 256, 64)
  mask = np.zeros((100, 100), bool)
  mask[:20, :20] = True  # top-left 200x200 px
  assert {(t.row, t.col) for t in grid.select(mask)} == {(0, 0), (0, 1), (1, 0), (1, 1)}
  with pytest.raises(ValueError, match='even'):
    tiling.TileGrid.create(10, 10, 256, 63)
  with pytest.raises(ValueError, match='tile_size > overlap'):
    tiling.TileGrid.create(10, 10, 64, 64)


def test_contour_is_closed_ccw_and_bounds_the_mask():
  mask = np.zeros((12, 15), bool)
  mask[2:9, 3:13] = True
  mask[5, 1:3] = True
  ring = tiling.contour(mask)
  assert ring.shape[1] == 2 and len(ring) >= 4 and np.array_equal(ring[0], ring[-1])
  x, y = ring[:, 0], ring[:, 1]
  assert np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) > 0
  assert x.min() >= 1 and x.max() <= 13 and y.min() >= 2 and y.max() <= 9
  one = tiling.contour(np.ones((1, 1), bool))
  assert len(one) == 5 and np.array_equal(one[0], one[-1])


def _instance_match(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
  """Fraction of instances of `a` with an IoU > 0.5 partner in `b`, and per-`b` match counts."""
  na, nb = int(a.max()), int(b.max())
  fg = (a > 0) & (b > 0)
  key = a[fg].astype(np.int64) * (nb + 1) + b[fg]
  uk, inter = np.unique(key, return_counts=True)
  ia, ib = uk // (nb + 1), uk % (nb + 1)
  area_a, area_b = np.bincount(a.ravel(), minlength=na + 1), np.bincount(b.ravel(), minlength=nb + 1)
  good = inter / (area_a[ia] + area_b[ib] - inter) > 0.5
  return len(np.unique(ia[good])) / na, np.bincount(ib[good], minlength=nb + 1)


def test_tiled_matches_whole_image_on_real_consep(consep_official, tmp_path):
  """Oracle maps of a 1000x1000 CoNSeP tile, predicted in 256-px tiles vs in one piece."""
  from dualunet_jax.data import consep, targets
  image = consep_official / 'Test' / 'Images' / 'test_1.png'
  rec = consep.read_tile(image, consep_official / 'Test' / 'Labels' / 'test_1.mat')
  t = targets.make_targets(rec['instance_map'], rec['instance_classes'], sigma=5.0)
  probs = np.eye(5, dtype=np.float32)[t['class_map']]
  oracle = inference.MapsPredictor({'test_1': {'class_probs': probs, 'density': t['density'][..., None]}})
  results = {}
  for name, tile_size in (('tiled', 256), ('whole', 1024)):
    opt = inference.Options(model_mpp=0.25, class_names=consep.CLASS_NAMES, tile_size=tile_size, overlap=64,
                            batch_size=8, workers=1, formats=('csv', 'maps'), progress=False)
    summary = inference.predict([inference.InputSpec(image, mpp=0.25)], oracle, tmp_path / name, opt)
    results[name] = np.load(tmp_path / name / 'test_1_instances.npy')
    assert summary[0]['tiles'] == (36 if name == 'tiled' else 1)
  whole, tiled = results['whole'], results['tiled']
  assert whole.shape == tiled.shape == (1000, 1000)
  n_gt = int(rec['instance_map'].max())
  assert whole.max() > 0.8 * n_gt
  matched, per_tiled = _instance_match(whole, tiled)
  assert matched >= 0.99, matched
  assert per_tiled.max() <= 1
  # No nucleus reported twice at a seam: duplicates would sit on top of each other.
  import csv
  from scipy.spatial import cKDTree
  rows = list(csv.DictReader(open(tmp_path / 'tiled' / 'test_1.csv')))
  assert len(rows) == tiled.max() and len(rows) <= 1.03 * whole.max()
  xy = np.array([[float(r['x']), float(r['y'])] for r in rows])
  dist, _ = cKDTree(xy).query(xy, 2)
  assert dist[:, 1].min() > 3.0
