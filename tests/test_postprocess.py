"""Post-processing: known answers on tiny maps, exact equality of the fast path with the plain restatement of
the reference (`_postprocess_reference`) on real fixtures, the exact cropped h-maxima, and the process pool."""

import numpy as np
import pytest
import scipy.io as sio
import scipy.ndimage as ndi
from skimage import morphology

from dualunet_jax import postprocess as pp

FIELDS = ('instance_map', 'classes', 'class_map', 'counts')


def _assert_same(a: pp.Instances, b: pp.Instances):
  for f in FIELDS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
  np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)


def _gauss(shape, points, sigma):
  d = np.zeros(shape, np.float32)
  for y, x in points:
    d[y, x] += 1
  d = ndi.gaussian_filter(d, sigma)
  return d / d.max()


def _disks(shape, centres, radius, classes):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  cm = np.zeros(shape, np.int32)
  for (cy, cx), c in zip(centres, classes):
    cm[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = c
  return cm


def _onehot(cm, k):
  return np.eye(k + 1, dtype=np.float32)[cm]


def test_two_separate_nuclei():
  centres = [(10, 10), (30, 30)]
  cm = _disks((40, 40), centres, 4, [1, 2])
  out = pp.postprocess(_onehot(cm, 2), _gauss((40, 40), centres, 2))
  assert out.num_instances == 2
  np.testing.assert_array_equal(out.classes, [1, 2])
  np.testing.assert_allclose(out.centroids, centres, atol=1e-5)
  np.testing.assert_array_equal(out.counts, [1, 1])
  np.testing.assert_array_equal(out.class_map, cm)  # isolated nuclei keep every pixel
  assert out.instance_map.dtype == np.int32 and out.centroids.dtype == np.float32


def test_touching_nuclei_split_with_two_pixel_gap_and_unmarked_component_dropped():
  centres = [(20, 14), (20, 24)]  # overlapping radius-6 disks: one foreground blob, two density peaks
  cm = _disks((40, 60), centres, 6, [1, 1])
  cm[5:9, 50:54] = 2  # a foreground blob without a density peak
  out = pp.postprocess(_onehot(cm, 2), _gauss((40, 60), centres, 2))
  assert out.num_instances == 2 and (out.instance_map[5:9, 50:54] == 0).all()
  # The cut removes the pixels on both sides of the watershed line: no two labels touch even diagonally.
  inst = out.instance_map
  a, b = inst == 1, inst == 2
  assert not (ndi.binary_dilation(a, structure=np.ones((3, 3))) & b).any()
  assert (cm[20, :] > 0).sum() - (inst[20, :] > 0).sum() == 2  # a 2-px gap on the row through both centres


def test_majority_vote_tie_goes_to_smaller_class_and_class_map_input():
  cm = np.zeros((20, 20), np.int32)
  cm[5:9, 5:9] = 3
  cm[5:9, 7:9] = 2  # 8 pixels class 3, 8 pixels class 2
  dens = _gauss((20, 20), [(6, 6)], 1)
  out = pp.postprocess(cm, dens, num_classes=3)  # int class map input
  np.testing.assert_array_equal(out.classes, [2])
  np.testing.assert_array_equal(out.counts, [0, 1, 0])
  _assert_same(out, pp.postprocess(_onehot(cm, 3), dens))


def test_rescale_maps_negative_densities_to_minus_one_one():
  d = np.array([[-0.5, 0.0], [0.25, 1.0]], np.float32)
  np.testing.assert_allclose(pp.rescale(d), [[-1, -1 / 3], [0, 1]], atol=1e-6)
  np.testing.assert_allclose(pp.rescale(d - d.min()), [[0, 1 / 3], [0.5, 1]], atol=1e-6)
  # A dynamic of 0.1 of the range survives h = 0.15 only when the map has a negative pixel ([-1, 1]: 0.2).
  base = _gauss((30, 30), [(15, 8)], 2) + 0.1 * _gauss((30, 30), [(15, 22)], 2)
  pos = pp.markers_from_density(base)
  neg = pp.markers_from_density(base - 0.01 * (np.arange(30)[None, :] == 0))
  assert pos.max() == 1 and neg.max() == 2


def test_adjacent_seeds_merge_into_one_marker():
  # One 8-connected plateau = two 4-connected h-maxima components: A = {(5,5)} and B = {(6,6),(7,6),(7,5),(7,4)}.
  # Seeds at the truncated centres (5,5) and (6,5) are 4-adjacent, so they merge into one marker (step 4).
  d = np.zeros((12, 12), np.float32)
  for y, x in ((5, 5), (6, 6), (7, 6), (7, 5), (7, 4)):
    d[y, x] = 1.0
  markers = pp.markers_from_density(d)
  assert markers.max() == 1 and set(map(tuple, np.argwhere(markers))) == {(5, 5), (6, 5)}
  d[7, 4] = d[7, 5] = 0.0  # B = {(6,6),(7,6)}: seed (6,6), diagonal to (5,5) -> two markers
  assert pp.markers_from_density(d).max() == 2


@pytest.mark.parametrize('shift', [0.0, -0.02])
def test_h_maxima_matches_skimage(shift):
  rng = np.random.default_rng(0)
  pts = rng.integers(0, 128, (60, 2))
  base = _gauss((128, 128), pts, 3)
  smooth_noise = ndi.gaussian_filter(rng.normal(0, 1, base.shape), 2).astype(np.float32)
  for noise in (0.0, 0.02, 0.1):
    r = pp.rescale(base + noise * smooth_noise / smooth_noise.std() + shift)
    for h in (0.15, 0.05, 0.5):
      np.testing.assert_array_equal(pp.h_maxima(r, h), morphology.h_maxima(r, h), err_msg=f'{noise} {h}')
  flat = np.full((8, 8), 0.3, np.float32)
  np.testing.assert_array_equal(pp.h_maxima(flat, 0.15), morphology.h_maxima(flat, 0.15))


def _fixture_outputs(fixtures_dir, sigma=5.0):
  out = []
  for path in sorted((fixtures_dir / 'masks').glob('*.mat')):
    mat = sio.loadmat(path)
    inst = mat['inst_map'].astype(np.int64)
    ids = np.unique(inst)[1:]
    lut = np.zeros(inst.max() + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1)
    cls = np.array([0, 1, 2, 3, 3, 4, 4, 4])[mat['inst_type'].reshape(-1).astype(int)]
    cm = np.concatenate([[0], cls])[lut[inst]]
    yy, xx = np.divmod(np.arange(inst.size), inst.shape[1])
    flat = lut[inst].ravel()
    n = ids.size
    cnt = np.bincount(flat, minlength=n + 1)[1:]
    pts = np.stack([np.bincount(flat, yy, n + 1)[1:] / cnt, np.bincount(flat, xx, n + 1)[1:] / cnt], 1)
    out.append((cm, _gauss(inst.shape, np.floor(pts).astype(int), sigma)))
  return out


def test_fast_path_equals_reference_restatement_on_fixtures(fixtures_dir):
  rng = np.random.default_rng(1)
  for cm, dens in _fixture_outputs(fixtures_dir):
    probs = _onehot(cm, 4)
    # Clean oracle density, a realistic smooth perturbation (with negative values: the [-1, 1] mapping), and
    # noisy class probabilities (argmax changes near boundaries).
    noisy_dens = dens + 0.05 * ndi.gaussian_filter(rng.normal(0, 1, dens.shape), 1.5).astype(np.float32)
    noisy_probs = probs + 0.6 * rng.random(probs.shape, np.float32)
    for p, d in ((probs, dens), (probs, noisy_dens), (noisy_probs, noisy_dens)):
      for kw in ({}, {'h': 0.05}, {'relabel_connectivity': 2}, {'marker': 'peak_local_max', 'min_distance': 2}):
        _assert_same(pp.postprocess(p, d, **kw), pp._postprocess_reference(p, d, **kw))


def test_batch_and_pool_match_single(fixtures_dir):
  outs = _fixture_outputs(fixtures_dir)
  probs = np.stack([_onehot(cm, 4) for cm, _ in outs])
  dens = np.stack([d for _, d in outs])
  single = [pp.postprocess(p, d) for p, d in zip(probs, dens)]
  for workers in (1, 2):
    for a, b in zip(pp.postprocess_batch(probs, dens, workers=workers), single):
      _assert_same(a, b)
  with pp.PostProcessor(workers=1) as proc:
    fut = proc.submit({'class_probs': probs[0], 'density': dens[0]})
    _assert_same(fut.result(), single[0])


def test_config_helpers_and_errors():
  import configs.default as default_config  # pylint: disable=import-outside-toplevel
  cfg = default_config.get_config()
  kw = pp.from_config(cfg.postprocess)
  assert kw == {'marker': 'hmaxima', 'h': 0.15, 'min_distance': 3, 'threshold': 0.1, 'compactness': 1.0,
                'relabel_connectivity': 1, 'backend': 'auto'}
  with pp.PostProcessor.from_config(cfg.postprocess, workers=1) as proc:
    assert proc.workers == 1 and proc.kwargs == kw
  cm = np.zeros((8, 8), np.int32)
  with pytest.raises(pp.PostprocessError):
    pp.postprocess(cm, np.zeros((8, 8), np.float32), marker='nope')
  with pytest.raises(pp.PostprocessError):
    pp.postprocess(cm, np.zeros((9, 8), np.float32))
  with pytest.raises(pp.PostprocessError):
    pp.postprocess(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32))
  empty = pp.postprocess(cm, np.zeros((8, 8), np.float32), num_classes=2)
  assert empty.num_instances == 0 and empty.counts.tolist() == [0, 0] and empty.centroids.shape == (0, 2)
