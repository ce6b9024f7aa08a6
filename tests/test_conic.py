"""CoNIC challenge scoring (`dualunet_jax/conic.py`): mPQ+ and R² against an independent restatement written
the way the challenge's `compute_stats.py` works (per image, per class, an explicit IoU matrix from loops over
instance masks), on CoNIC-format files cut from real CoNSeP tiles; hand-made cases with known values; the
dataset accumulator's `mpq_plus`; counts.csv; the CLI."""

import csv
import json
import pathlib

import numpy as np
import pytest
import scipy.io
from scipy import ndimage

from dualunet_jax import conic
from dualunet_jax import metrics as metrics_lib

# CoNSeP's merged classes (other, inflammatory, epithelial, spindle) put into CoNIC's 6-class slots (the
# challenge's default K = 6) so the 6-class code path is the one tested, and two slots (plasma, eosinophil)
# stay empty on both sides: classes absent everywhere (PQ+ 0, constant R² columns) are exercised too.
# Raw type ids in the assembled .mat files are 1, 2, 3, 5 (3, 4 -> epithelial; 5, 6, 7 -> spindle).
RAW_TO_CONIC = np.array([0, 1, 3, 2, 2, 6, 6, 6], np.int64)  # other -> neutrophil slot, inflammatory ->
#                                                                lymphocyte, epithelial, spindle -> connective
TILES = ('test_1', 'test_2')
OFFSETS = ((0, 0), (0, 744), (372, 372), (744, 100))  # 256² patches from each 1000² tile


# ------------------------------------------------------------------------------------- the restatement


def _remap(inst):
  """Ids 1..M in sorted order (the challenge's `remap_label`)."""
  out = np.zeros(inst.shape, np.int64)
  for new, old in enumerate(sorted(set(np.unique(inst).tolist()) - {0}), start=1):
    out[inst == old] = new
  return out


def _one_class_stats(true_inst, pred_inst):
  """(tp, fp, fn, Σiou) of two instance maps: IoU matrix by loops over masks (bounding boxes to go faster),
  then every pair with IoU > 0.5."""
  n_t, n_p = int(true_inst.max()), int(pred_inst.max())
  iou = np.zeros((n_t, n_p))
  boxes = ndimage.find_objects(true_inst)
  for t in range(1, n_t + 1):
    t_mask = true_inst == t
    for p in set(np.unique(pred_inst[boxes[t - 1]][t_mask[boxes[t - 1]]]).tolist()) - {0}:
      p_mask = pred_inst == p
      inter = np.logical_and(t_mask, p_mask).sum()
      iou[t - 1, p - 1] = inter / np.logical_or(t_mask, p_mask).sum()
  rows, cols = np.nonzero(iou > 0.5)
  tp = len(rows)
  return tp, n_p - len(set(cols.tolist())), n_t - len(set(rows.tolist())), float(iou[rows, cols].sum())


def restated_mpq_plus(true, pred, num_classes):
  totals = np.zeros((num_classes, 4))
  for t, p in zip(true, pred):
    for c in range(1, num_classes + 1):
      totals[c - 1] += _one_class_stats(_remap(t[..., 0] * (t[..., 1] == c)), _remap(p[..., 0] * (p[..., 1] == c)))
  pqs = []
  for tp, fp, fn, s in totals:
    pqs.append(tp / (tp + 0.5 * fp + 0.5 * fn + 1.0e-6) * (s / (tp + 1.0e-6)))
  return float(np.mean(pqs)), pqs


def restated_counts(labels, num_classes):
  """Per patch and class: the instances with a pixel in [16:240, 16:240], each under its (single) class."""
  out = []
  for patch in labels:
    centre = patch[16:240, 16:240]
    row = [0] * num_classes
    for i in set(np.unique(centre[..., 0]).tolist()) - {0}:
      classes = set(np.unique(centre[..., 1][centre[..., 0] == i]).tolist()) - {0}
      assert len(classes) == 1, 'restated counts need one class per instance'
      row[classes.pop() - 1] += 1
    out.append(row)
  return np.array(out)


def restated_r2(true, pred):
  per_class = []
  for c in range(true.shape[1]):
    y, f = [float(v) for v in true[:, c]], [float(v) for v in pred[:, c]]
    mean = sum(y) / len(y)
    ss_tot = sum((v - mean) ** 2 for v in y)
    ss_res = sum((a - b) ** 2 for a, b in zip(y, f))
    per_class.append((1.0 if ss_res == 0 else 0.0) if ss_tot == 0 else 1 - ss_res / ss_tot)
  return sum(per_class) / len(per_class)


# ------------------------------------------------------------------------------------- data


@pytest.fixture(scope='module')
def conic_dir(consep_official, tmp_path_factory):
  """images.npy, labels.npy (int32) and counts.csv of 8 real 256² CoNSeP patches in the CoNIC layout."""
  from PIL import Image
  images, labels = [], []
  for tile in TILES:
    image = np.asarray(Image.open(consep_official / 'Test' / 'Images' / f'{tile}.png').convert('RGB'))
    mat = scipy.io.loadmat(consep_official / 'Test' / 'Labels' / f'{tile}.mat')
    inst, cls = mat['inst_map'].astype(np.int64), RAW_TO_CONIC[mat['type_map']]
    for y, x in OFFSETS:
      images.append(image[y:y + 256, x:x + 256])
      labels.append(np.stack([inst[y:y + 256, x:x + 256], cls[y:y + 256, x:x + 256]], -1))
  out = tmp_path_factory.mktemp('conic')
  labels = np.stack(labels).astype(np.int32)
  np.save(out / 'images.npy', np.stack(images).astype(np.uint8))
  np.save(out / 'labels.npy', labels)
  with open(out / 'counts.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(conic.CLASS_NAMES)
    writer.writerows(restated_counts(labels, 6).tolist())
  return out


def perturb(labels, seed, mixed=False):
  """Predictions from GT: dropped, shifted, eroded, re-classed, merged and split nuclei. Unless `mixed`, each
  predicted instance takes one class (its majority); `mixed` re-classes half of some nuclei's pixels."""
  rng = np.random.default_rng(seed)
  out = []
  for patch in labels:
    inst, cls = patch[..., 0].astype(np.int64).copy(), patch[..., 1].astype(np.int64).copy()
    ids = np.unique(inst)[1:]
    for i in ids:
      mask = inst == i
      r = rng.random()
      if not mask.any():  # covered by an earlier shifted nucleus
        continue
      if r < 0.12:  # missed
        inst[mask], cls[mask] = 0, 0
      elif r < 0.24:  # shifted by up to 3 px
        dy, dx = rng.integers(-3, 4, 2)
        moved = np.roll(mask, (dy, dx), (0, 1))
        c = cls[mask][0]
        inst[mask], cls[mask] = 0, 0
        inst[moved], cls[moved] = i, c
      elif r < 0.34:  # eroded: IoU around and below 0.5 for small nuclei
        keep = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 4)))
        inst[mask & ~keep], cls[mask & ~keep] = 0, 0
      elif r < 0.44:  # wrong class
        cls[mask] = rng.choice([1, 2, 3, 6])
      elif r < 0.50:  # split into left / right halves
        xs = np.nonzero(mask)[1]
        inst[mask & (np.arange(mask.shape[1])[None] > np.median(xs))] = inst.max() + 1
      elif r < 0.56:  # merged with a touching neighbour
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
        near = set(np.unique(inst[ring]).tolist()) - {0}
        if near:
          inst[inst == min(near)] = i
      elif mixed and r < 0.64:  # half of its pixels another class
        ys = np.nonzero(mask)[0]
        cls[mask & (np.arange(mask.shape[0])[:, None] > np.median(ys))] = rng.choice([1, 2, 3, 6])
    if not mixed:
      lut = np.zeros(inst.max() + 1, np.int64)
      present = np.unique(inst)[1:]
      lut[present] = np.array([np.bincount(cls[inst == i]).argmax() for i in present], np.int64)
      cls = lut[inst]
    out.append(np.stack([inst, cls], -1))
  return np.stack(out).astype(np.int32)


# ------------------------------------------------------------------------------------- real patches


@pytest.mark.parametrize('seed,mixed', [(0, False), (1, True)])
def test_mpq_plus_equals_the_restatement_on_real_patches(conic_dir, seed, mixed):
  true = np.load(conic_dir / 'labels.npy')
  pred = perturb(true, seed, mixed)
  result = conic.pq_plus(true, pred)
  expected, per_class = restated_mpq_plus(true, pred, 6)
  assert result.mpq_plus == pytest.approx(expected, abs=1e-12)
  np.testing.assert_allclose(result.pq, per_class, atol=1e-12)
  assert 0.2 < result.mpq_plus < 0.6  # real perturbations: neither perfect nor empty
  assert result.tp[[3, 4]].sum() == 0 and result.pq[3] == 0  # empty slots score 0, as the challenge
  # Perfect predictions: every class present at 1 (up to the epsilons), the others (empty slots and CoNSeP's
  # 'other', absent from these tiles) at 0.
  present = np.isin(np.arange(1, 7), true[..., 1])
  assert present.sum() == 3
  perfect = conic.pq_plus(true, true)
  np.testing.assert_allclose(perfect.pq, np.where(present, 1.0, 0.0), atol=1e-5)


def test_accumulator_mpq_plus_equals_conic_on_real_patches(conic_dir):
  # One class per predicted instance (what post-processing gives): the accumulator's instance-level matching
  # and the challenge's per-class maps then pair the same nuclei.
  true = np.load(conic_dir / 'labels.npy')
  pred = perturb(true, 2)
  acc = metrics_lib.MetricsAccumulator(6, class_names=conic.CLASS_NAMES)
  for t, p in zip(true, pred):
    gi, pi = np.unique(t[..., 0])[1:], np.unique(p[..., 0])[1:]
    gcls = [int(np.bincount(t[..., 1][t[..., 0] == i]).argmax()) for i in gi]
    pcls = [int(np.bincount(p[..., 1][p[..., 0] == i]).argmax()) for i in pi]
    acc.add(t[..., 0], gcls, (p[..., 0], pcls))
  assert acc.result()['mpq_plus'] == pytest.approx(conic.pq_plus(true, pred).mpq_plus, abs=1e-12)


def test_centre_counts_equal_counts_csv_and_r2_equals_the_restatement(conic_dir):
  from dualunet_jax.data import lizard
  true = np.load(conic_dir / 'labels.npy')
  csv_counts = lizard.conic_counts(conic_dir)
  np.testing.assert_array_equal(conic.counts_in_centre(true), csv_counts)
  # The 16 px border matters: whole-patch counts differ on real patches.
  whole = conic.counts_in_centre(true, crop=0)
  assert (whole >= csv_counts).all() and (whole > csv_counts).any()
  pred = perturb(true, 3)
  pred_counts = conic.counts_in_centre(pred)
  np.testing.assert_array_equal(pred_counts, restated_counts(pred, 6))
  r2 = conic.multi_r2(csv_counts, pred_counts)
  assert r2 == pytest.approx(restated_r2(csv_counts, pred_counts), abs=1e-12)
  assert conic.multi_r2(csv_counts, csv_counts) == 1.0


def test_cli_scores_a_conic_folder_and_writes_json(conic_dir, tmp_path, capsys):
  true = np.load(conic_dir / 'labels.npy')
  pred = perturb(true, 4)
  np.save(tmp_path / 'pred_labels.npy', pred)
  conic.write_counts(tmp_path / 'pred_counts.csv', conic.counts_in_centre(pred))
  assert conic.main([f'--true={conic_dir}', f'--pred={tmp_path / "pred_labels.npy"}',
                     f'--pred_counts={tmp_path / "pred_counts.csv"}', f'--output={tmp_path / "s.json"}']) == 0
  written = json.loads((tmp_path / 's.json').read_text())
  assert written['mpq_plus'] == pytest.approx(restated_mpq_plus(true, pred, 6)[0], abs=1e-12)
  assert written['r2'] == pytest.approx(restated_r2(restated_counts(true, 6), restated_counts(pred, 6)), abs=1e-12)
  assert written['n_patches'] == 8 and 'pq_plus_connective' in written
  assert 'mPQ+' in capsys.readouterr().out


# ------------------------------------------------------------------------------------- hand-made cases


def _square(labels, i, y, x, size, inst_id, cls, w=None):
  labels[i, y:y + size, x:x + (w or size)] = (inst_id, cls)


def test_known_values():
  true = np.zeros((1, 256, 256, 2), np.int32)
  for c in (1, 2):
    _square(true, 0, 30, 40 * c, 10, c, c)
  _square(true, 0, 100, 100, 10, 3, 2)  # a second nucleus of class 2
  assert conic.pq_plus(true, true, 2).mpq_plus == pytest.approx(1.0, abs=1e-5)
  missed = true.copy()
  missed[missed[..., 0] == 3] = 0  # one of the two class-2 nuclei missed: DQ 2/3, SQ 1
  result = conic.pq_plus(true, missed, 2)
  np.testing.assert_allclose(result.pq, [1.0, 2 / 3], atol=1e-5)
  assert (result.tp, result.fn) == (pytest.approx([1, 1]), pytest.approx([0, 1]))
  # IoU exactly 0.5 is no match; 0.6 is, with SQ 0.6.
  half, more = np.zeros_like(true), np.zeros_like(true)
  _square(half, 0, 30, 40, 10, 7, 1, w=5)
  _square(more, 0, 30, 40, 10, 7, 1, w=6)
  assert conic.pq_plus(true, half, 2).pq[0] == 0.0
  assert conic.pq_plus(true, more, 2).pq[0] == pytest.approx(0.6, abs=1e-5)
  # Pixel-level classes: a nucleus half class 1, half class 2 is one nucleus of each.
  split = np.zeros_like(true)
  _square(split, 0, 30, 40, 10, 5, 1)
  split[0, 35:40, 40:50, 1] = 2
  r = conic.pq_plus(split, split, 2)
  assert list(r.tp) == [1, 1] and r.mpq_plus == pytest.approx(1.0, abs=1e-5)


def test_centre_counts_known_values():
  labels = np.zeros((2, 256, 256, 2), np.int32)
  _square(labels, 0, 0, 0, 10, 1, 1)  # wholly in the 16 px border: not counted
  _square(labels, 0, 10, 100, 10, 2, 2)  # straddles the border: counted
  _square(labels, 0, 240, 100, 10, 3, 3)  # bottom border: not counted
  _square(labels, 1, 100, 100, 10, 4, 3)
  _square(labels, 1, 100, 6, 12, 5, 3)  # x 6..17: two columns inside
  np.testing.assert_array_equal(conic.counts_in_centre(labels, 3), [[0, 1, 0], [0, 0, 2]])


def test_r2_known_values():
  assert conic.multi_r2([[1], [2], [3]], [[1], [2], [4]]) == pytest.approx(0.5)
  assert conic.multi_r2([[2, 1], [2, 2], [2, 3]], [[2, 1], [2, 2], [2, 3]]) == 1.0  # constant, exact
  assert conic.multi_r2([[2, 1], [2, 2], [2, 3]], [[2, 1], [2, 2], [3, 3]]) == 0.5  # constant, missed: 0
  assert conic.multi_r2([[1], [2], [3]], [[2], [2], [2]]) == pytest.approx(0.0)


def test_wrong_inputs_give_one_line_errors_naming_the_file(tmp_path, capsys):
  good = np.zeros((2, 256, 256, 2), np.int32)
  np.save(tmp_path / 'true.npy', good)
  cases = {'float.npy': (good.astype(np.float32), 'dtype float32'),
           'shape.npy': (good[..., 0], 'expected (N, H, W, 2)'),
           'fewer.npy': (good[:1], 'differs from'),
           'classes.npy': (np.where(np.arange(2)[None, None, None, :] == 1, 9, 0).astype(np.int32) + good,
                           'class 9 outside 0..6')}
  for name, (array, message) in cases.items():
    np.save(tmp_path / name, array)
    assert conic.main([f'--true={tmp_path / "true.npy"}', f'--pred={tmp_path / name}']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / name) in err and message in err, err
  with open(tmp_path / 'counts.csv', 'w') as f:
    f.write('neutrophil,epithelial\n1,2\n')
  assert conic.main([f'--true={tmp_path / "true.npy"}', f'--pred={tmp_path / "true.npy"}',
                     f'--true_counts={tmp_path / "counts.csv"}']) == 2
  err = capsys.readouterr().err.strip()
  assert str(tmp_path / 'counts.csv') in err and 'missing lymphocyte' in err


# ------------------------------------------------------------------ evaluate on a built CoNIC dataset


def test_evaluate_on_a_built_conic_dataset_scores_as_the_challenge(conic_dir, tmp_path):
  """`evaluation.evaluate` on the CoNIC TFDS build of `conic_dir`, fed each patch's oracle maps (its own
  post-processing then gives near-, not exactly, perfect nuclei): its mPQ+ and central-224² R² equal the
  challenge scoring (`conic.score`) of the `pred_labels.npy` / `pred_counts.csv` it writes, against the
  dataset's labels.npy and counts.csv."""
  import jax.numpy as jnp
  from configs import demo
  from dualunet_jax import evaluation, oracle
  from dualunet_jax.data import schema, sources
  config = demo.get_config()
  config.dataset.name = 'conic'
  config.dataset.manual_dir = str(conic_dir)
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.num_classes = 6
  config.dataset.class_names = conic.CLASS_NAMES
  config.eval.batch_size = 4
  config.postprocess.workers = 1
  source = sources.load_source(config.dataset, 'train')  # CoNIC has one split
  images = np.load(conic_dir / 'images.npy')
  assert len(source) == len(images)
  maps = []
  for i in range(len(source)):
    record = source[i]
    np.testing.assert_array_equal(record[schema.IMAGE], images[i])
    maps.append(oracle.oracle_outputs(record[schema.INSTANCE_MAP], record[schema.INSTANCE_CLASSES], 6,
                                      sigma=config.targets.sigma))

  def forward(batch):  # the oracle maps of each patch in the batch (zeros for padded rows)
    batch = np.asarray(batch)
    probs, density = np.zeros((*batch.shape[:3], 7), np.float32), np.zeros((*batch.shape[:3], 1), np.float32)
    for row, image in enumerate(batch):
      hits = [i for i in range(len(images)) if np.array_equal(images[i], image)]
      if hits:
        probs[row], density[row, ..., 0] = maps[hits[0]]
    return {'class_probs': jnp.asarray(probs), 'density': jnp.asarray(density)}

  out = evaluation.evaluate(forward, source, config, conic_output=tmp_path / 'c')
  pred = np.load(tmp_path / 'c' / 'pred_labels.npy')
  true = np.load(conic_dir / 'labels.npy')
  assert pred.shape == true.shape and pred.dtype == np.int32
  pred_counts = conic.read_counts(tmp_path / 'c' / 'pred_counts.csv')
  np.testing.assert_array_equal(pred_counts, conic.counts_in_centre(pred, 6))
  challenge = conic.score(true, pred, num_classes=6, true_counts=conic.read_counts(conic_dir / 'counts.csv'),
                          pred_counts=pred_counts)
  present = [challenge[f'pq_plus_{c}'] for c in ('epithelial', 'lymphocyte', 'connective')]  # the others are empty
  assert 0.7 < min(present) < 1.0  # near-perfect maps, imperfect post-processing: a real score
  assert out['mpq_plus'] == pytest.approx(challenge['mpq_plus'], abs=1e-12)
  assert out['r2'] == pytest.approx(challenge['r2'], abs=1e-12)
  assert out['r2_whole_patch'] != pytest.approx(out['r2'])  # the central crop changes the counts
  assert out['n_images'] == len(true)
