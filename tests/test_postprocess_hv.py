"""HoVer-Net post-processing: the OpenCV restatements (Sobel 21, normalisation, blur, ellipse opening), the fast
path identical to the plain restatement on real fixtures and noisy maps, the oracle on real fixtures, and the
method's wiring of maps / kwargs / oracle."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi

from configs import hovernet_consep
from dualunet_jax import methods
from dualunet_jax import metrics
from dualunet_jax import postprocess_hv as ph
from dualunet_jax import postprocess_kernels
from dualunet_jax.data import consep
from dualunet_jax.postprocess import PostprocessError

FIELDS = ('instance_map', 'classes', 'centroids', 'class_map', 'counts')
BACKENDS = ('numpy', pytest.param('numba', marks=pytest.mark.skipif(
    not postprocess_kernels.available(), reason='numba is not installed (the `fast` extra)')))


def _records(fixtures_dir):
  return [consep.read_tile(fixtures_dir / 'imgs' / f'{m.stem}.png', m)
          for m in sorted((fixtures_dir / 'masks').glob('*.mat'))]


def _assert_same(a, b):
  for f in FIELDS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


# ------------------------------------------------------------------------------------------- OpenCV pieces


def test_sobel_kernels_are_opencvs():
  # Known small OpenCV kernels, and for any size the identity d_k = [-1, 0, 1] * binomial(k - 3), s_k =
  # binomial(k - 1) (getSobelKernels builds them by repeated [1, 1] smoothing and one differencing).
  assert [k.tolist() for k in ph.sobel_kernels(3)] == [[-1, 0, 1], [1, 2, 1]]
  assert [k.tolist() for k in ph.sobel_kernels(5)] == [[-1, -2, 0, 2, 1], [1, 4, 6, 4, 1]]
  d, s = ph.sobel_kernels(21)
  np.testing.assert_array_equal(d, np.convolve([math.comb(18, i) for i in range(19)], [-1, 0, 1]))
  np.testing.assert_array_equal(s, [math.comb(20, i) for i in range(21)])
  # A unit ramp along x has Sobel_x = sum_j j d_j * sum s = 2^19 * 2^20 inside, and Sobel_y = 0.
  ramp = np.tile(np.arange(64, dtype=np.float32), (40, 1))
  assert (ph.sobel(ramp, 1, 21)[:, 10:-10] == 2.0 ** 39).all()
  assert (ph.sobel(ramp, 0, 21) == 0).all()
  with pytest.raises(PostprocessError):
    ph.sobel_kernels(4)


def test_minmax_ellipse_opening_and_fill_holes():
  x = np.float32([[2, 4], [6, 10]])
  np.testing.assert_array_equal(ph.minmax(x), np.float32([[0, 0.25], [0.5, 1]]))
  assert not ph.minmax(np.full((3, 3), 5.0)).any()  # OpenCV: a constant map normalises to 0
  assert ph.ellipse(5).astype(int).tolist() == [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                                                 [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
  # OpenCV erodes with the outside counted as set: a blob on the border survives the opening.
  m = np.zeros((20, 20), bool)
  m[0:7, 0:7] = True
  m[12, 12] = True  # a lone pixel does not
  opened = ph.open_ellipse(m, 5)
  assert opened[0:6, 0:6].all() and not opened[6, 6] and not opened[12, 12]  # the inner corner is rounded
  assert not ndi.binary_opening(m, ph.ellipse(5))[0, 0]  # scipy's default border would eat the corner
  assert ph.open_ellipse(np.ones((9, 9), bool), 5).all()
  rng = np.random.default_rng(0)
  for _ in range(5):
    m = ndi.binary_opening(rng.random((40, 50)) > 0.45)
    np.testing.assert_array_equal(ph.fill_holes(m), ndi.binary_fill_holes(m))


def test_opencv_agreement_when_available():
  cv2 = pytest.importorskip('cv2')  # not a dependency; checked wherever it is installed
  rng = np.random.default_rng(1)
  x = rng.random((37, 45)).astype(np.float32)
  np.testing.assert_allclose(ph.sobel(x, 1, 21), cv2.Sobel(x, cv2.CV_64F, 1, 0, ksize=21), rtol=1e-9, atol=1e-3)
  np.testing.assert_allclose(ph.sobel(x, 0, 21), cv2.Sobel(x, cv2.CV_64F, 0, 1, ksize=21), rtol=1e-9, atol=1e-3)
  np.testing.assert_array_equal(ph.minmax(x), cv2.normalize(x, None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F))
  np.testing.assert_allclose(ph.blur3(x.astype(np.float64)), cv2.GaussianBlur(x.astype(np.float64), (3, 3), 0))
  np.testing.assert_array_equal(ph.ellipse(5), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)) > 0)
  m = (rng.random((40, 40)) > 0.4).astype(np.uint8)
  np.testing.assert_array_equal(ph.open_ellipse(m > 0, 5), cv2.morphologyEx(m, cv2.MORPH_OPEN, ph.ellipse(5).astype(
      np.uint8)) > 0)


# ------------------------------------------------------------------------------------------- fast == reference


def _noisy(maps, rng):
  return {'class_probs': maps['class_probs'] + rng.random(maps['class_probs'].shape, dtype=np.float32),
          'np': np.clip(maps['np'] + rng.normal(0, 0.3, maps['np'].shape), 0, 1).astype(np.float32),
          'hv': (maps['hv'] + rng.normal(0, 0.25, maps['hv'].shape)).astype(np.float32)}


@pytest.mark.parametrize('backend', BACKENDS)
def test_fast_path_equals_reference(fixtures_dir, backend):
  rng = np.random.default_rng(0)
  for record in _records(fixtures_dir):
    ideal = ph.oracle_maps(record['instance_map'], record['instance_classes'], 4)
    for maps in (ideal, _noisy(ideal, rng), _noisy(ideal, rng)):
      fast = ph.postprocess_hv_maps(maps, backend=backend)
      ref = ph._postprocess_hv_reference(maps['class_probs'], maps['np'][..., 0], maps['hv'])
      _assert_same(fast, ref)
      assert fast.num_instances > 10
      m = fast.num_instances
      assert fast.instance_map.dtype == np.int32 and fast.instance_map.max() == m
      # raster order of first pixels
      firsts = [np.flatnonzero(fast.instance_map.ravel() == i)[0] for i in range(1, m + 1)]
      assert firsts == sorted(firsts)
  # Non-default options go through both paths the same way.
  maps = _noisy(ph.oracle_maps(record['instance_map'], record['instance_classes'], 4), rng)
  opts = dict(np_threshold=0.4, energy_threshold=0.3, sobel_ksize=11, min_size=20, opening_ksize=3, blur=False)
  _assert_same(ph.postprocess_hv_maps(maps, backend=backend, **opts),
               ph._postprocess_hv_reference(maps['class_probs'], maps['np'][..., 0], maps['hv'], **opts))


def test_fast_path_equals_reference_on_consep_at_both_sizes(consep_official):
  """A real 1000² CoNSeP Test tile and its nine 256² crops (PanNuke's size), ideal and noisy maps: the fast
  path equals the plain restatement at every size users run (the fixtures above are 256² only)."""
  rng = np.random.default_rng(1)
  record = next(iter(consep.iter_split(consep_official, 'test')))
  ideal = ph.oracle_maps(record['instance_map'], record['instance_classes'], 4)
  crop = lambda maps: [{k: v[y:y + 256, x:x + 256] for k, v in maps.items()} for y in (0, 256, 512)
                       for x in (0, 256, 512)]
  # The whole noisy tile is left out only for time (its reference takes ~15 s); its crops are in.
  backends = ['numpy'] + (['numba'] if postprocess_kernels.available() else [])  # one reference per map
  for m in [ideal] + crop(ideal) + crop(_noisy(ideal, rng)):
    ref = ph._postprocess_hv_reference(m['class_probs'], m['np'][..., 0], m['hv'])
    for backend in backends:
      _assert_same(ph.postprocess_hv_maps(m, backend=backend), ref)


def test_type_vote_prefers_nuclear_types():
  # One square nucleus whose TP argmax is background on 60 % of it and class 3 / class 2 on 20 % each:
  # the official takes the most frequent non-background type, ties to the smaller: 2.
  inst = np.zeros((40, 40), np.int32)
  inst[10:30, 10:30] = 1
  maps = ph.oracle_maps(inst, np.array([1]), 4)
  probs = np.zeros((40, 40, 5), np.float32)
  probs[..., 0] = 1
  probs[10:14, 10:30] = np.eye(5)[3]
  probs[14:18, 10:30] = np.eye(5)[2]
  maps['class_probs'] = probs
  out = ph.postprocess_hv_maps(maps)
  assert out.classes.tolist() == [2] and out.counts.tolist() == [0, 1, 0, 0]
  np.testing.assert_allclose(out.centroids, [[19.5, 19.5]])
  maps['class_probs'] = np.eye(5, dtype=np.float32)[np.zeros((40, 40), int)]
  assert ph.postprocess_hv_maps(maps).classes.tolist() == [0]  # all background: type 0, as the official
  with pytest.raises(PostprocessError, match='missing'):
    ph.postprocess_hv_maps({'class_probs': probs, 'np': maps['np']})


# ------------------------------------------------------------------------------------------- oracle, method


def test_oracle_on_real_fixtures(fixtures_dir):
  # Ideal NP / HV / TP maps through the official post-processing: measured F1d 0.918 (106 of 125 nuclei
  # found, no false positives: the misses are small or border-cut nuclei whose markers the 5x5 opening
  # removes), every found nucleus typed right.
  acc = metrics.MetricsAccumulator(4, 12.0)
  for record in _records(fixtures_dir):
    inst, cls = record['instance_map'], record['instance_classes']
    acc.add(inst, cls, ph.postprocess_hv_maps(ph.oracle_maps(inst, cls, 4)))
  r = acc.result()
  assert r['f1_d'] > 0.9 and r['precision_d'] == 1.0
  assert r['acc_c'] == 1.0 and r['dice'] > 0.9 and r['bpq'] > 0.75


def test_method_wiring(fixtures_dir):
  config = hovernet_consep.get_config()
  method = methods.get(config)
  assert method.name == 'hovernet' and method.postprocess_fn is ph.postprocess_hv_maps
  assert method.postprocess_kwargs(config) == dict(np_threshold=0.5, energy_threshold=0.4, sobel_ksize=21,
                                                   min_size=10, marker_min_size=10, opening_ksize=5, blur=True,
                                                   backend='auto')
  record = _records(fixtures_dir)[0]
  inst, cls = record['instance_map'], record['instance_classes']
  maps = method.oracle_maps(inst, cls, 4, config)
  assert {k: (v.shape, v.dtype) for k, v in maps.items()} == {
      'class_probs': ((256, 256, 5), np.float32), 'np': ((256, 256, 1), np.float32),
      'hv': ((256, 256, 2), np.float32)}
  assert set(maps) == set(method.map_kinds)
  _assert_same(method.postprocess_fn(maps, **method.postprocess_kwargs(config)), ph.postprocess_hv_maps(maps))
  targets = method.make_targets(inst, cls, config)
  assert {k: v.dtype for k, v in targets.items()} == {'class_map': np.int32, 'instance_map': np.int32,
                                                       'hv': np.float32}
  np.testing.assert_array_equal(targets['class_map'], np.concatenate([[0], cls])[inst])
  # make_targets drops HV of instances with < 30 px inside the 'original' output crop (margin 95).
  inside = np.bincount(inst[95:-95, 95:-95].ravel(), minlength=inst.max() + 1)
  small = np.isin(inst, np.flatnonzero(inside < 30)) & (inst > 0)
  assert small.any() and not targets['hv'][small].any()
  np.testing.assert_array_equal(targets['hv'][~small], maps['hv'][~small])
