"""HistoNeXt type-aware sampling (`config.dataset.type_multipliers`): crops drawn by their dominant type."""

import itertools

import jax
import numpy as np
import pytest

from configs import default, histonext_consep
from dualunet_jax.data import consep, pipeline

TILES = (19, 24, 26, 27)  # CoNSeP Train tiles with windows of every dominant type, 'other' the rarest
CROP = 256


def _config(**dataset):
  config = default.get_config()
  config.seed = 7
  config.dataset.num_classes = 4
  config.dataset.crop_size = CROP
  config.dataset.num_workers = 0
  config.dataset.type_multipliers = histonext_consep.get_config().dataset.type_multipliers
  config.train.batch_size = 4
  config.dataset.update(dataset)
  return config


@pytest.fixture(scope='module')
def records(consep_official) -> list[dict]:
  root = consep_official / 'Train'
  return [consep.read_tile(root / 'Images' / f'train_{i}.png', root / 'Labels' / f'train_{i}.mat') for i in TILES]


def _dominant(class_map: np.ndarray, num_classes: int = 4) -> int:
  counts = np.bincount(class_map.ravel(), minlength=num_classes + 1)[1:]
  return int(counts.argmax()) + 1 if counts.any() else 0


def _take(it, n):
  return [jax.device_get(b) for b in itertools.islice(it, n)]


def test_dominant_type_is_the_class_with_most_pixels():
  cls = np.zeros((10, 12), np.int32)
  cls[0:3, 0:3] = 1  # 9 px of class 1 ...
  cls[3:5, 0:5] = 2  # ... 10 px of class 2 in the first window
  cls[6:10, 8:12] = 3  # 16 px of class 3 in the bottom-right corner only
  y0, x0, dominant = pipeline.dominant_types(cls, (6, 6), 4, 3)
  # Offsets 0, 4 (+ the last, 4) down; 0, 4, 6 (the far edge) across.
  assert list(zip(y0, x0)) == [(0, 0), (0, 4), (0, 6), (4, 0), (4, 4), (4, 6)]
  np.testing.assert_array_equal(dominant, [2, 2, 0, 2, 3, 3])  # (0, 4) holds 2 px of class 2
  for y, x, d in zip(y0, x0, dominant):
    assert d == _dominant(cls[y:y + 6, x:x + 6], 3)
  cls[0:3, 0:4] = 1  # a tie (10 / 10) goes to the lower class
  assert pipeline.dominant_types(cls, (6, 6), 4, 3)[2][0] == 1


def test_crops_follow_the_multipliers_on_real_consep(records):
  config = _config()
  multipliers = np.asarray(config.dataset.type_multipliers)
  assert multipliers.tolist() == [4.0, 1.0, 1.0, 1.0]  # the paper's CoNSeP values on the four merged classes
  sampler = pipeline.TypeAwareSampler(records, config)
  n = np.bincount(sampler.dominant, minlength=5)
  assert n[1:].min() > 20  # every type is there to be sampled
  expected = np.concatenate([[1.0], multipliers]) * n / (np.concatenate([[1.0], multipliers]) * n).sum()
  np.testing.assert_allclose(sampler.expected_fractions(4), expected)
  uniform = n / n.sum()
  tol = 0.015  # ~4.5 standard deviations of a fraction over 20000 draws
  assert np.abs(uniform - expected).max() > 5 * tol  # uniform sampling could not pass the check below
  drawn = np.bincount(sampler.dominant[sampler.draws(0, 20000)], minlength=5) / 20000
  np.testing.assert_allclose(drawn, expected, atol=tol)
  assert uniform[1] < 0.15 and drawn[1] > 2.5 * uniform[1]  # rare 'other' (x4) is seen far more often

  # The loader's crops are exactly the drawn windows (so their dominant type is the patch's), in the order of
  # the draws: with 4 records and batch 4 each step is one pass, step s = draws(s, 4).
  batches = _take(pipeline.train_loader(config, records), 3)
  for step, batch in enumerate(batches):
    for row, p in enumerate(sampler.draws(step, 4)):
      tile = records[sampler.tile[p]]['image']
      window = tile[sampler.y0[p]:sampler.y0[p] + CROP, sampler.x0[p]:sampler.x0[p] + CROP]
      np.testing.assert_array_equal(batch['image'][row], window)
      assert _dominant(batch['class_map'][row]) == sampler.dominant[p]


def test_deterministic_per_seed_and_resumable(records):
  config = _config()
  first = _take(pipeline.train_loader(config, records), 4)
  second = _take(pipeline.train_loader(config, records, start_step=2), 2)
  for a, b in zip(first[2:], second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = pipeline.TypeAwareSampler(records, _config())
  np.testing.assert_array_equal(other.draws(3, 100), pipeline.TypeAwareSampler(records, config).draws(3, 100))
  config.seed += 1
  assert not np.array_equal(pipeline.TypeAwareSampler(records, config).draws(3, 100), other.draws(3, 100))


def test_empty_multipliers_keep_uniform_random_crops(records):
  # () is the default: the loader is the one without the field at all (existing runs unchanged).
  config = _config(type_multipliers=())
  legacy = _config()
  del legacy.dataset['type_multipliers']
  for a, b in zip(_take(pipeline.train_loader(config, records), 2), _take(pipeline.train_loader(legacy, records), 2)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Multipliers of 1 (the weight of windows without a nucleus): every window equally likely.
  sampler = pipeline.TypeAwareSampler(records, _config(type_multipliers=(1.0, 1.0, 1.0, 1.0)))
  np.testing.assert_allclose(sampler.probabilities, 1.0 / len(sampler))


@pytest.mark.parametrize('dataset, message', [
    ({'type_multipliers': (4.0, 1.0)}, 'one per class'),
    ({'type_multipliers': (4.0, -1.0, 1.0, 1.0)}, '>= 0'),
    ({'class_balanced_sampling': True}, 'set one of them'),
])
def test_bad_multipliers_are_refused(dataset, message):
  record = {'image': np.zeros((8, 8, 3), np.uint8), 'instance_map': np.zeros((8, 8), np.int32),
            'instance_classes': np.zeros((0,), np.int32)}
  with pytest.raises(pipeline.PipelineError, match=message):
    pipeline.TypeAwareSampler([record], _config(**dataset))
