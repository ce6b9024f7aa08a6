"""The fast post-processing paths (numpy, and the compiled kernels when numba is installed) are *identical* to
the plain restatement of the reference (`_postprocess_reference`) and their `h_maxima` to scikit-image's: on
real CoNSeP Test oracle maps cut into PanNuke-sized 256² crops, on a trained model's maps, and on hundreds of
small adversarial maps (plateaus, equal and nested peaks, steps of exactly h, constant, empty and negative maps,
tiny and non-square tiles). Each kernel is also checked against the library call it restates."""

import pathlib

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage import morphology, segmentation

from dualunet_jax import postprocess as pp
from dualunet_jax import postprocess_kernels as kernels

DATA = pathlib.Path(__file__).resolve().parent / 'data'
FIELDS = ('instance_map', 'classes', 'class_map', 'counts')
SHAPES = ((1, 1), (1, 7), (6, 1), (2, 3), (5, 5), (9, 4), (16, 16), (23, 31), (40, 33), (64, 48))
BACKENDS = ('numpy', pytest.param('numba', marks=pytest.mark.skipif(
    not kernels.available(), reason='numba is not installed (the `fast` extra): only the numpy path is tested')))


def _assert_same(a: pp.Instances, b: pp.Instances, msg: str = ''):
  for f in FIELDS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f'{f} {msg}')
  np.testing.assert_array_equal(a.centroids, b.centroids, err_msg=f'centroids {msg}')


def _adversarial_density(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """float32[H, W]: one of several hostile families for h-maxima and marker extraction."""
  h, w = shape
  kind = rng.integers(9)
  if kind == 0:  # constant (zero or not)
    return np.full(shape, rng.choice([0.0, 0.3, -2.0]), np.float32)
  if kind == 1:  # white noise, possibly negative
    return rng.normal(rng.choice([0.0, 0.5]), 1.0, shape).astype(np.float32)
  d = np.zeros(shape, np.float32)
  for _ in range(rng.integers(1, 8)):  # peaks: equal heights half the time, touching and nested
    y, x = rng.integers(0, h), rng.integers(0, w)
    d[y, x] += 1.0 if rng.random() < 0.5 else rng.random()
  d = ndi.gaussian_filter(d, rng.uniform(0.6, 3.0)).astype(np.float32)
  if kind == 2:  # plateaus and equal peaks: few grey levels
    q = rng.choice([2, 3, 4, 7, 20])
    d = np.round(d / max(d.max(), 1e-12) * q) / q
  elif kind == 3:  # levels exactly 0.05 apart: float32 differences of 0.15 = h sit on the rounding edge
    d = (np.round(d / max(d.max(), 1e-12) * 20) * 0.05).astype(np.float32)
  elif kind == 4:  # negative values: rescaled to [-1, 1]
    d = d - rng.uniform(0, 0.5) * d.max()
  elif kind == 5:  # nested maxima: small bumps and noise on plateaus
    d = np.round(d / max(d.max(), 1e-12) * 4) / 4 + 0.1 * rng.random(shape) * (rng.random(shape) < 0.2)
  elif kind == 6:  # smooth noise around the peaks (trained-model-like)
    d = d + 0.05 * ndi.gaussian_filter(rng.normal(0, 1, shape), 1.0)
  elif kind == 7:  # a spiral-like ridge: long winding paths between maxima
    yy, xx = np.mgrid[:h, :w]
    d = d + 0.3 * np.sin(0.7 * np.hypot(yy - h / 2, xx - w / 2) + np.arctan2(yy - h / 2, xx - w / 2))
  return d.astype(np.float32)


def _blobs(rng: np.random.Generator, shape: tuple[int, int], k: int) -> np.ndarray:
  """int32[H, W] class map of touching random disks (0 = background), sometimes all foreground."""
  if rng.random() < 0.1:
    return np.full(shape, rng.integers(0, k + 1), np.int32)
  cm = np.zeros(shape, np.int32)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  for _ in range(rng.integers(1, 10)):
    cy, cx, rad = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.uniform(1, 8)
    cm[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2] = rng.integers(1, k + 1)
  return cm


@pytest.mark.parametrize('backend', BACKENDS)
def test_h_maxima_identical_to_skimage_on_adversarial_maps(backend):
  rng = np.random.default_rng(0)
  for i in range(400):
    shape = SHAPES[i % len(SHAPES)]
    r = pp.rescale(_adversarial_density(rng, shape))
    for h in (0.15, float(rng.choice([0.05, 0.3, 1.0, 1e-3]))):
      np.testing.assert_array_equal(pp.h_maxima(r, h, backend=backend), morphology.h_maxima(r, h),
                                    err_msg=f'map {i} h {h}')


def test_h_maxima_threshold_search_is_exact():
  # T(m) = the largest float32 x with fl32(m - x) >= h: checked against its definition, at both neighbours.
  rng = np.random.default_rng(1)
  for hf in map(np.float32, (0.15, 0.05, 0.125, 1e-3, 3.0)):
    m = np.concatenate([rng.uniform(-1, 1, 2000), hf + rng.normal(0, 1e-7, 200), hf + rng.normal(0, 1e-25, 50),
                        [0.0, -0.0, 1.0, -1.0, hf, -hf, 2 * hf]]).astype(np.float32)
    t = pp._thresholds(m, hf)
    assert ((m - t) >= hf).all() and ((m - np.nextafter(t, np.float32(np.inf))) < hf).all()
    np.testing.assert_array_equal(t, pp._bisect_thresholds(m, hf))


@pytest.mark.parametrize('backend', BACKENDS)
def test_postprocess_identical_to_reference_on_adversarial_maps(backend):
  rng = np.random.default_rng(2)
  options = ({}, {'relabel_connectivity': 2}, {'compactness': 0.0}, {'compactness': 0.5, 'h': 0.05},
             {'marker': 'peak_local_max', 'min_distance': 1, 'threshold': 0.05}, {'marker': 'peak_local_max'})
  for i in range(240):
    shape = SHAPES[i % len(SHAPES)]
    k = int(rng.integers(1, 5))
    cm = _blobs(rng, shape, k)
    dens = _adversarial_density(rng, shape)
    probs = np.eye(k + 1, dtype=np.float32)[cm] + 0.3 * rng.random(shape + (k + 1,), np.float32)
    kw = options[i % len(options)]
    for p in (cm, probs):
      want = pp._postprocess_reference(p, dens, num_classes=k, **kw)
      _assert_same(pp.postprocess(p, dens, num_classes=k, backend=backend, **kw), want, f'map {i} {kw}')


@pytest.mark.parametrize('backend', BACKENDS)
def test_postprocess_identical_to_reference_on_trained_model_maps(backend):
  # Outputs of a width-1/8 DualU-Net trained 300 steps on CoNSeP Train (F1d 0.53 on Test) for four 256² Test
  # crops: argmax class map and the density (rounded to float16 to keep the file small). Rough maps: ~3,000
  # local maxima per crop and negative values, so nearly every maximum needs a certificate.
  z = np.load(DATA / 'postprocess_model_maps.npz')
  for cm, dens, name in zip(z['class_map'].astype(np.int32), z['density'].astype(np.float32), z['crops']):
    r = pp.rescale(dens)
    np.testing.assert_array_equal(pp.h_maxima(r, 0.15, backend=backend), morphology.h_maxima(r, 0.15),
                                  err_msg=name)
    for kw in ({}, {'h': 0.05}, {'relabel_connectivity': 2}, {'compactness': 0.0}):
      want = pp._postprocess_reference(cm, dens, num_classes=4, **kw)
      _assert_same(pp.postprocess(cm, dens, num_classes=4, backend=backend, **kw), want, f'{name} {kw}')


def _consep_oracle_crops(consep_dir: pathlib.Path):
  """(name, class map int32[256, 256], density float32[256, 256]) of the 126 crops: the 14 Test tiles' oracle
  maps (merged classes, sigma-5 mass-centre density computed on the whole tile) cut at y, x in {0, 256, 512}."""
  from dualunet_jax import oracle  # pylint: disable=import-outside-toplevel
  from dualunet_jax.data import consep  # pylint: disable=import-outside-toplevel
  for rec in consep.iter_split(str(consep_dir), 'test'):
    probs, dens = oracle.oracle_outputs(rec['instance_map'], rec['instance_classes'], 4, sigma=5.0)
    cm = np.argmax(probs, axis=-1).astype(np.int32)
    for y in (0, 256, 512):
      for x in (0, 256, 512):
        yield f"{rec['name']}[{y}:{y + 256}, {x}:{x + 256}]", cm[y:y + 256, x:x + 256], dens[y:y + 256, x:x + 256]


def test_postprocess_identical_to_reference_on_consep_256_crops(consep_official):
  # The defect this file guards against: on 16 of these 126 crops the old cropped reconstruction selected
  # border pixels of rescaled density 0.03-0.05 (test_10[256:512, 256:512]: 71 instances instead of 69).
  counts = {}
  backends = ['numpy'] + (['numba'] if kernels.available() else [])  # one reference run serves both
  for name, cm, dens in _consep_oracle_crops(consep_official):
    ref = pp._postprocess_reference(cm, dens, num_classes=4)
    for backend in backends:
      _assert_same(pp.postprocess(cm, dens, num_classes=4, backend=backend), ref, f'{name} {backend}')
    counts[name] = ref.num_instances
  assert len(counts) == 126 and counts['test_10[256:512, 256:512]'] == 69


@pytest.mark.parametrize('rays,windows,max_labels', [((), (), 10 ** 9), ((), (2, 5), 10 ** 9), ((2,), (), 0)])
def test_h_maxima_each_certificate_alone_is_exact(monkeypatch, rays, windows, max_labels):
  # Every stage decides on its own: windows only, whole-image labels only, and skimage past the cap.
  monkeypatch.setattr(pp, '_RAYS', rays)
  monkeypatch.setattr(pp, '_WINDOWS', windows)
  monkeypatch.setattr(pp, '_MAX_WHOLE_IMAGE_LABELS', max_labels)
  rng = np.random.default_rng(3)
  for i in range(60):
    r = pp.rescale(_adversarial_density(rng, SHAPES[i % len(SHAPES)]))
    np.testing.assert_array_equal(pp.h_maxima(r, 0.15), morphology.h_maxima(r, 0.15), err_msg=f'map {i}')


def test_watershed_components_split_tie_and_whole_paths():
  from skimage import segmentation  # pylint: disable=import-outside-toplevel
  fg = np.zeros((40, 60), bool)
  fg[2:9, 2:9] = True  # no marker: stays 0
  fg[2:9, 20:27] = True  # one marker
  fg[20:27, 2:20] = True  # two markers at distances 4 and 2: split path
  fg[20:27, 30:58] = True  # two markers at equal distance 4: the heap's global tie order decides
  markers = np.zeros(fg.shape, np.int32)
  for i, (y, x) in enumerate([(5, 23), (23, 5), (21, 14), (23, 36), (23, 50)], start=1):
    markers[y, x] = i
  dist = ndi.distance_transform_edt(fg)
  assert dist[23, 5] != dist[21, 14] and dist[23, 36] == dist[23, 50]
  for compactness in (0.0, 1.0):
    want = segmentation.watershed(-dist, markers, mask=fg, compactness=compactness)
    np.testing.assert_array_equal(pp._watershed(fg, markers, compactness), want)
    no_tie = np.where(markers == 5, 0, markers)  # without the tie: one call on the bounding box of the split
    want = segmentation.watershed(-dist, no_tie, mask=fg, compactness=compactness)
    np.testing.assert_array_equal(pp._watershed(fg, no_tie, compactness), want)
  assert (pp._watershed(fg, markers, 1.0)[2:9, 2:9] == 0).all()


# ----------------------------------------------------------------------------------------------- kernels
# The kernels are checked against the library calls they restate; without numba they run as plain Python
# (slow but the same code), so these tests run everywhere, on small maps.


def test_kernel_reconstruction_equals_skimage():
  rng = np.random.default_rng(4)
  for i in range(120):
    shape = SHAPES[i % len(SHAPES)]
    r = pp.rescale(_adversarial_density(rng, shape))
    seed = r - np.float32(rng.choice([0.15, 0.05, 1e-3])) - 2 * np.finfo(np.float32).resolution * np.abs(r)
    np.testing.assert_array_equal(kernels.reconstruct_dilation(seed, r),
                                  morphology.reconstruction(seed, r, method='dilation'), err_msg=f'map {i}')


def test_kernel_distance_transform_equals_scipy():
  rng = np.random.default_rng(5)
  for i in range(120):
    shape = SHAPES[i % len(SHAPES)]
    fg = _blobs(rng, shape, 1) > 0 if i % 2 else rng.random(shape) < rng.uniform(0.2, 0.97)
    got = kernels.distance_transform_edt(fg)
    if fg.all():
      assert got is None  # scipy's own rule for an image without background; the caller uses scipy
    else:
      np.testing.assert_array_equal(got, ndi.distance_transform_edt(fg), err_msg=f'map {i}')


def test_kernel_watershed_equals_skimage_including_marker_ties():
  rng = np.random.default_rng(6)
  for i in range(120):
    shape = SHAPES[i % len(SHAPES)]
    fg = _blobs(rng, shape, 1) > 0
    dist = ndi.distance_transform_edt(fg)
    image = -np.round(dist) if i % 2 else -dist  # rounded: many equal costs, markers that tie
    markers = np.zeros(shape, np.int32)
    n = int(rng.integers(0, 9))
    markers[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    for compactness in (0.0, 1.0, 0.37):
      np.testing.assert_array_equal(kernels.watershed(image, markers, fg, compactness),
                                    segmentation.watershed(image, markers, mask=fg, compactness=compactness),
                                    err_msg=f'map {i} compactness {compactness}')


def test_backend_choice_and_errors(monkeypatch):
  assert not pp.use_kernels('numpy')
  with pytest.raises(pp.PostprocessError, match='backend must be one of'):
    pp.use_kernels('cuda')
  monkeypatch.setenv(kernels.DISABLE_ENV, '1')
  assert not kernels.available() and not pp.use_kernels('auto')
  with pytest.raises(pp.PostprocessError, match='needs numba installed'):
    pp.use_kernels('numba')
  assert pp.from_config({'h': 0.15, 'backend': 'numpy', 'workers': 2}) == {'h': 0.15, 'backend': 'numpy'}
