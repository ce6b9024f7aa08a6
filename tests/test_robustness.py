"""Robustness protocols (dualunet_jax/robustness.py): stress levels on a real fixture, the paper's copies,
and `evaluate_stress` end to end with a small image-driven forward (no model compile: fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualunet_jax import robustness
from dualunet_jax.data import schema, stain

_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))


@pytest.fixture(scope='module')
def records(fixtures_dir):
  from dualunet_jax.data import consep
  return [consep.read_tile(fixtures_dir / 'imgs' / f'patch{k}.png', fixtures_dir / 'masks' / f'patch{k}.mat')
          for k in (1, 2)]


def _measures(image):
  """Mean tissue L*, mean H and E concentrations, grey standard deviation."""
  tissue = stain.tissue_mask(image)
  conc = stain.optical_density(image[tissue]) @ _HED_FROM_RGB
  grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return {'L': robustness.mean_lightness(image), 'H': conc[:, 0].mean(), 'E': conc[:, 1].mean(),
          'contrast': grey.std()}


# level family -> (measure, direction): what each level must change, and which way.
_EXPECTED = {'darker': ('L', -1), 'lighter': ('L', +1), 'more_h': ('H', +1), 'less_h': ('H', -1),
             'more_e': ('E', +1), 'less_e': ('E', -1), 'contrast': ('contrast', -1)}


def test_every_level_moves_the_image_in_its_direction_and_keeps_ground_truth(records):
  record = records[0]
  clean = _measures(record[schema.IMAGE])
  previous = {}
  for name, level in robustness.STRESS_LEVELS.items():
    out = level(record, 0)
    assert out[schema.IMAGE].dtype == np.uint8 and out[schema.IMAGE].shape == record[schema.IMAGE].shape
    assert out[schema.INSTANCE_MAP] is record[schema.INSTANCE_MAP]  # ground truth untouched
    assert out[schema.INSTANCE_CLASSES] is record[schema.INSTANCE_CLASSES]
    np.testing.assert_array_equal(level(record, 0)[schema.IMAGE], out[schema.IMAGE])  # deterministic
    family, grade = name.rsplit('_', 1) if name != 'clean' else ('clean', '0')
    if family == 'clean':
      assert out[schema.IMAGE] is record[schema.IMAGE] or np.array_equal(out[schema.IMAGE], record[schema.IMAGE])
      continue
    diff = np.abs(out[schema.IMAGE].astype(int) - record[schema.IMAGE])
    if family == 'jpeg':
      assert 0.5 < diff.mean() < 12, (name, diff.mean())  # artefacts, not a colour shift
      continue
    measure, sign = _EXPECTED[family]
    value = _measures(out[schema.IMAGE])[measure]
    assert sign * (value - clean[measure]) > 0, (name, measure, clean[measure], value)
    if family in previous:  # graded: level 2 goes further than level 1
      assert sign * (value - previous[family]) > 0, (name, value, previous[family])
    previous[family] = value


def test_stain_shift_leaves_the_other_stain_alone(records):
  image = records[0][schema.IMAGE]
  tissue = stain.tissue_mask(image)
  conc = lambda x: (stain.optical_density(x[tissue]) @ _HED_FROM_RGB).mean(0)
  before, after = conc(image), conc(robustness.scale_stain(image, 0, 1.5))
  assert after[0] > 1.3 * before[0]
  assert abs(after[1] - before[1]) < 0.05 * abs(before[1]) + 0.01  # eosin: uint8 rounding only


def test_paper_copies_are_deterministic_and_distinct(records):
  import ml_collections
  config = ml_collections.ConfigDict({'seed': 42})
  copies = [robustness.paper_transform(config, repeat)(records[1], 7) for repeat in (0, 3)]
  again = robustness.paper_transform(config, 3)(records[1], 7)
  for key in (schema.IMAGE, schema.INSTANCE_MAP):
    np.testing.assert_array_equal(again[key], copies[1][key])  # a pure function of (seed, repeat, index)
  assert not np.array_equal(copies[0][schema.IMAGE], copies[1][schema.IMAGE])
  assert not np.array_equal(copies[0][schema.IMAGE], records[1][schema.IMAGE])
  # The ground truth moves with the image: the same nuclei, in a dihedral view.
  assert np.array_equal(np.unique(copies[0][schema.INSTANCE_MAP]), np.unique(records[1][schema.INSTANCE_MAP]))


def test_level_names():
  assert robustness.level_names('paper') == robustness.PAPER_LEVELS and len(robustness.PAPER_LEVELS) == 5
  assert robustness.level_names('stress')[0] == 'clean'
  assert robustness.level_names('clean, darker_2') == ('clean', 'darker_2')
  with pytest.raises(ValueError, match='darkest'):
    robustness.level_names('clean,darkest')


def _forward(images):
  """A stand-in model driven by the image: dark pixels are nuclei (class 1) and density peaks. So a darker
  input changes the prediction, as it would a real model's."""
  darkness = 1.0 - images.astype(jnp.float32).mean(-1) / 255.0
  fg = jax.nn.sigmoid((darkness - 0.55) * 25.0)
  probs = jnp.stack([1.0 - fg, fg, jnp.zeros_like(fg), jnp.zeros_like(fg), jnp.zeros_like(fg)], -1)
  return {'class_probs': probs, 'density': fg[..., None]}


def test_evaluate_stress_table(records):
  from configs import consep
  config = consep.get_config()
  config.eval.batch_size = 2
  config.postprocess.workers = 1
  levels = ['clean', 'darker_3', 'lighter_2']
  norm = stain.Normalizer('reinhard', stain.fit_statistics(r[schema.IMAGE] for r in records))
  plain = robustness.evaluate_stress(jax.jit(_forward), records, config, levels=levels)
  normed = robustness.evaluate_stress(jax.jit(_forward), records, config, levels=levels, normalizer=norm)
  assert list(plain['levels']) == levels and plain['stain_norm'] == 'none' and normed['stain_norm'] == 'reinhard'
  for row in plain['levels'].values():
    assert set(robustness.STRESS_KEYS) <= set(row) and all(0.0 <= row[k] <= 1.0 for k in robustness.STRESS_KEYS)
  rows = plain['levels']
  assert rows['darker_3']['mean_L'] < rows['clean']['mean_L'] - 10 < rows['lighter_2']['mean_L'] - 20
  assert rows['darker_3']['dice'] != rows['clean']['dice']  # the perturbed images reached the forward
  # Normalised per tile to the statistics of these very tiles, every level looks alike again.
  lightness = [r['mean_L'] for r in normed['levels'].values()]
  assert max(lightness) - min(lightness) < 3.0, lightness
  table = robustness.format_stress_table(plain)
  assert 'darker_3' in table and 'optical density x2.2' in table and 'dF1d' in table
  assert len(table.splitlines()) == 2 + len(levels)
