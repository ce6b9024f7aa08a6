"""Tests for dualunet_jax.data.targets: centroids, the reference density map, class maps, real fixtures."""

import numpy as np
import pytest
import scipy.io as sio
import scipy.ndimage as ndi

from dualunet_jax.data import targets

# CoNSeP raw type -> merged class (reference §3.2): 1 other, 2 inflammatory, 3/4 epithelial, 5/6/7 spindle.
CONSEP_MERGE = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.int32)


def test_relabel_contiguous_keeps_order():
  m = np.array([[0, 7, 7], [30, 0, 2], [2, 0, 0]], np.int32)
  new, old = targets.relabel_contiguous(m)
  np.testing.assert_array_equal(old, [2, 7, 30])
  np.testing.assert_array_equal(new, [[0, 2, 2], [3, 0, 1], [1, 0, 0]])
  assert new.dtype == np.int32
  # Huge ids take the sort path and agree.
  new2, old2 = targets.relabel_contiguous(np.where(m > 0, m + 2**30, 0))
  np.testing.assert_array_equal(new2, new)
  np.testing.assert_array_equal(old2, old + 2**30)
  empty, none = targets.relabel_contiguous(np.zeros((4, 4), np.int32))
  assert empty.max() == 0 and none.size == 0


def test_centroids_l_shape_mass_vs_bbox():
  m = np.zeros((10, 10), np.int32)
  m[2:8, 1] = 1  # vertical bar, rows 2..7
  m[7, 1:6] = 1  # foot, cols 1..5
  ys, xs = np.nonzero(m)
  mass = targets.instance_centroids(m, 'mass')
  bbox = targets.instance_centroids(m, 'bbox')
  np.testing.assert_allclose(mass[0], [ys.mean(), xs.mean()], atol=1e-6)
  # Inclusive box rows 2..7, cols 1..5 -> y1 + (y2 - y1) / 2.
  np.testing.assert_allclose(bbox[0], [4.5, 3.0])
  # The mass is pulled towards the corner of the L, the box centre is not.
  assert mass[0, 0] > bbox[0, 0] and mass[0, 1] < bbox[0, 1]
  assert mass.dtype == bbox.dtype == np.float32


def test_centroids_absent_id_is_nan_and_bad_method():
  m = np.zeros((5, 5), np.int32)
  m[1, 1] = 2
  c = targets.instance_centroids(m)
  assert np.isnan(c[0]).all() and np.allclose(c[1], [1, 1])
  assert np.isnan(targets.instance_centroids(m, 'bbox')[0]).all()
  with pytest.raises(ValueError):
    targets.instance_centroids(m, 'median')
  with pytest.raises(ValueError, match='contiguous'):
    targets.make_targets(m, np.array([1, 1]), sigma=2.0)


def test_density_single_point():
  sigma = 3.0
  d = targets.density_map(np.array([[20.7, 30.2]]), (64, 64), sigma)
  assert d.dtype == np.float32 and d.shape == (64, 64)
  assert d[20, 30] == 1.0 and np.unravel_index(d.argmax(), d.shape) == (20, 30)
  # Symmetric about the floored point.
  patch = d[20 - 12:20 + 13, 30 - 12:30 + 13]
  np.testing.assert_allclose(patch, patch[::-1], rtol=1e-6)
  np.testing.assert_allclose(patch, patch[:, ::-1], rtol=1e-6)
  np.testing.assert_allclose(patch, patch.T, rtol=1e-6)
  # The unnormalised Gaussian sums to 1, so the map sums to 1 / (its peak value) = 1 / k(0)^2.
  radius = int(4.0 * sigma + 0.5)
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  np.testing.assert_allclose(d.sum(), 1.0 / k[radius] ** 2, rtol=1e-4)


def test_density_close_points_lower_isolated_peaks():
  # Reference quirk: global-max normalisation. Two overlapping cells push the max above an isolated peak.
  d = targets.density_map(np.array([[10, 10], [10, 12], [40, 40]], np.float32), (64, 64), 3.0)
  assert d.max() == 1.0
  assert d[40, 40] < 0.9
  alone = targets.density_map(np.array([[40, 40]]), (64, 64), 3.0)
  assert alone[40, 40] == 1.0
  # Coincident points accumulate (+= 1): same shape as one point after normalisation.
  twice = targets.density_map(np.array([[40.2, 40.9], [40.0, 40.0]]), (64, 64), 3.0)
  np.testing.assert_allclose(twice, alone, rtol=1e-6)


def test_density_border_clamp_and_empty():
  d = targets.density_map(np.array([[-3.5, 70.0], [63.9, -0.2]]), (64, 64), 2.0)
  assert d[0, 63] == 1.0 and d[63, 0] == 1.0
  # Same as points placed on the border pixels.
  ref = targets.density_map(np.array([[0, 63], [63, 0]]), (64, 64), 2.0)
  np.testing.assert_array_equal(d, ref)
  empty = targets.density_map(np.zeros((0, 2)), (8, 9), 5.0)
  assert empty.shape == (8, 9) and empty.dtype == np.float32 and not empty.any()
  with pytest.raises(ValueError):
    targets.density_map(np.array([[np.nan, 1.0]]), (8, 8), 1.0)


def test_density_matches_reference_recipe():
  # The reference: [1, H, W] float32 mask, gaussian_filter with a scalar sigma (the size-1 axis included).
  rng = np.random.default_rng(0)
  pts = rng.uniform(-2, 66, size=(12, 2))
  mask = np.zeros((1, 64, 64), np.float32)
  for y, x in pts:
    mask[0, int(np.clip(y, 0, 63)), int(np.clip(x, 0, 63))] += 1
  ref = ndi.gaussian_filter(mask, sigma=5)
  ref = ref / ref.max()
  np.testing.assert_array_equal(targets.density_map(pts, (64, 64), 5.0), ref[0])


def test_class_map_and_errors():
  m = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 3]], np.int32)
  np.testing.assert_array_equal(targets.class_map(m, np.array([2, 1, 3])), [[0, 2, 2], [1, 1, 0], [0, 0, 3]])
  with pytest.raises(ValueError, match='>= 1'):
    targets.class_map(m, np.array([2, 0, 3]))
  np.testing.assert_array_equal(targets.class_map(m, np.zeros(3, np.int32), unlabelled_class=1), m > 0)
  with pytest.raises(ValueError, match='entries'):
    targets.class_map(m, np.array([1, 1]))
  with pytest.raises(ValueError, match='num_classes'):
    targets.class_map(m, np.array([1, 2, 4]), num_classes=3)
  big = np.zeros((20, 20), np.int32)
  big[5, 5:9] = 1
  out = targets.make_targets(big, np.array([2]), sigma=1.0, centroid='bbox')
  assert out['class_map'].dtype == np.int32 and out['density'].dtype == np.float32
  np.testing.assert_array_equal(out['class_map'], 2 * big)
  assert out['density'][5, 6] == 1.0  # bbox centre (5, 6.5) floors to (5, 6)


def _load_fixtures(fixtures_dir):
  paths = sorted((fixtures_dir / 'masks').glob('patch*.mat'))
  if not paths:
    pytest.skip(f'no .mat fixtures in {fixtures_dir}')
  return [sio.loadmat(p) for p in paths]


def test_real_fixtures(fixtures_dir):
  for mat in _load_fixtures(fixtures_dir):
    inst_map = mat['inst_map']
    assert len(np.unique(inst_map)) - 1 < inst_map.max()  # ids really are non-contiguous
    relabelled, old_ids = targets.relabel_contiguous(inst_map)
    n = old_ids.size
    assert relabelled.max() == n == mat['inst_type'].shape[0]
    # .mat per-instance arrays are in sorted-id order, centroids as (x, y).
    expected = mat['inst_centroid'][:, ::-1]
    centroids = targets.instance_centroids(relabelled, 'mass')
    np.testing.assert_allclose(centroids, expected, atol=0.5)
    # type_map holds the raw CoNSeP types (1..7) per instance; merge both the same way (reference §3.2).
    classes = CONSEP_MERGE[mat['inst_type'].ravel()]
    cmap = targets.class_map(relabelled, classes, num_classes=4)
    np.testing.assert_array_equal(cmap, CONSEP_MERGE[mat['type_map']])
    # One peak per nucleus, on the floored centre of interior ones. Near the border the 'reflect' mode adds
    # a mirror image of the cell, which pulls its peak onto the edge (reference behaviour).
    density = targets.make_targets(relabelled, classes, sigma=5.0, centroid='mass')['density']
    assert density.max() == 1.0
    peaks = np.argwhere((density == ndi.maximum_filter(density, size=3)) & (density > 0.05))
    assert len(peaks) == n
    dist = np.linalg.norm(peaks[None, :, :] - np.floor(centroids)[:, None, :], axis=-1).min(axis=1)
    interior = (np.minimum(centroids, np.array(inst_map.shape) - 1 - centroids) > 15).all(axis=1)
    assert interior.sum() >= n // 2
    assert (dist[interior] <= 1.0).all()
    assert (dist <= 4.0).all()
