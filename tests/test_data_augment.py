"""Device-side augmentation: geometric consistency of image and targets, colour ops, determinism, jit."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi

from dualunet_jax.data import augment, targets


def _config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(flips=False, rot90=False, hed_scale=0.0, hed_shift=0.0,
                                       color_jitter=0.0, blur_sigma=0.0, elastic_alpha=0.0,
                                       elastic_sigma=4.0))
  cfg.update(overrides)
  return cfg


def _sample(rng: np.random.Generator, size: tuple[int, int] = (48, 48), n: int = 5) -> dict[str, np.ndarray]:
  """Noise image; well-separated square nuclei of classes 1..3 at random positions; host targets."""
  h, w = size
  inst = np.zeros(size, np.int32)
  centres = []
  while len(centres) < n:
    c = rng.integers(4, [h - 7, w - 7])
    if all(np.abs(c - d).max() > 12 for d in centres):
      centres.append(c)
  for i, (y, x) in enumerate(centres):
    inst[y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = i + 1  # odd/even sides: fractional centroids
  classes = rng.integers(1, 4, n).astype(np.int32)
  t = targets.make_targets(inst, classes, sigma=2.0, centroid='mass')
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  image[..., 0] = (t['class_map'] * 60).astype(np.uint8)  # paint class into red: alignment check
  return {'image': image, 'class_map': t['class_map'], 'density': t['density'], 'instance_map': inst}


def _batch(size=(48, 48), b=8, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  samples = [_sample(rng, size) for _ in range(b)]
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _d4(x: np.ndarray):
  for k, flip in itertools.product(range(4), (False, True)):
    y = np.flip(x, 1) if flip else x
    yield np.rot90(y, k, axes=(0, 1))


def test_identity_when_all_off():
  batch = _batch()
  out = augment.augment_batch(jax.random.key(0), batch, _config())
  assert out['image'].dtype == jnp.float32
  np.testing.assert_allclose(out['image'], batch['image'] / np.float32(255), atol=1e-6)
  for k in ('class_map', 'density', 'instance_map'):
    np.testing.assert_array_equal(out[k], batch[k])
    assert out[k].dtype == batch[k].dtype


def test_dihedral_moves_image_and_targets_together():
  batch = _batch()
  out = jax.device_get(augment.augment_batch(jax.random.key(3), batch, _config(flips=True, rot90=True)))
  changed = 0
  for i in range(batch['image'].shape[0]):
    image = np.rint(out['image'][i] * 255).astype(np.uint8)
    # The noise image identifies the group element; every other array must have undergone the same one.
    matches = [j for j, g in enumerate(_d4(batch['image'][i])) if np.array_equal(g, image)]
    assert len(matches) == 1
    j = matches[0]
    changed += j != 0
    for k in ('class_map', 'density', 'instance_map'):
      np.testing.assert_array_equal(list(_d4(batch[k][i]))[j], out[k][i])
    np.testing.assert_array_equal(image[..., 0], out['class_map'][i] * 60)
    # Density peaks sit on the transformed centroids (to the 1-px floor).
    cents = targets.instance_centroids(out['instance_map'][i], 'mass')
    d = out['density'][i]
    peaks = np.argwhere((d == ndi.maximum_filter(d, 5)) & (d > 0.5))
    assert len(peaks) == len(cents)
    dist = np.abs(cents[:, None, :] - peaks[None, :, :]).max(-1).min(1)
    assert dist.max() <= 1.0, dist
  assert changed >= 3


def test_non_square_rot90_keeps_shape():
  batch = _batch(size=(40, 56), b=6)
  out = augment.augment_batch(jax.random.key(1), batch, _config(flips=True, rot90=True))
  assert out['image'].shape == (6, 40, 56, 3) and out['class_map'].shape == (6, 40, 56)
  image = np.rint(np.asarray(out['image'][0]) * 255).astype(np.uint8)
  x = batch['image'][0]
  candidates = [x, x[::-1], x[:, ::-1], x[::-1, ::-1]]
  assert any(np.array_equal(c, image) for c in candidates)


def test_deterministic_per_key_and_jit():
  batch = _batch(b=4)
  batch['valid'] = np.array([True, True, True, False])  # per-sample scalars pass through
  cfg = _config(flips=True, rot90=True, hed_scale=0.05, hed_shift=0.05, color_jitter=0.2, blur_sigma=1.0,
                elastic_alpha=2.0)
  fn = jax.jit(lambda key, b: augment.augment_batch(key, b, cfg))
  a = fn(jax.random.key(7), batch)
  b = fn(jax.random.key(7), batch)
  c = fn(jax.random.key(8), batch)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['image'], c['image'])
  np.testing.assert_array_equal(a['valid'], batch['valid'])
  assert float(a['image'].min()) >= 0.0 and float(a['image'].max()) <= 1.0


def test_hed_jitter_zero_is_identity_and_in_range():
  batch = _batch(b=4)
  batch['image'][0, :4, :4] = 0  # extremes: black and white pixels survive the log/exp round trip
  batch['image'][0, 4:8, :4] = 255
  zero = augment.augment_batch(jax.random.key(0), batch, _config(hed_scale=0.0, hed_shift=1e-12))
  np.testing.assert_allclose(zero['image'], batch['image'] / 255.0, atol=1 / 255)
  out = augment.augment_batch(jax.random.key(0), batch, _config(hed_scale=0.2, hed_shift=0.2))
  assert float(out['image'].min()) >= 0.0 and float(out['image'].max()) <= 1.0
  assert np.abs(np.asarray(out['image']) - batch['image'] / 255.0).max() > 2 / 255
  np.testing.assert_array_equal(out['density'], batch['density'])  # colour ops leave targets alone


def test_hed_matches_skimage():
  skcolor = pytest.importorskip('skimage.color')
  rgb = np.random.default_rng(0).random((64, 3)).astype(np.float32)
  ref = skcolor.rgb2hed(rgb)
  ours = np.asarray(augment.rgb_to_hed(rgb))
  pos = ref > 0  # skimage clamps negative stains to 0; we do not (exact inverse)
  np.testing.assert_allclose(ours[pos], ref[pos], atol=1e-5)
  np.testing.assert_allclose(augment.hed_to_rgb(ref), skcolor.hed2rgb(ref), atol=1e-5)


def test_elastic_keeps_maps_aligned():
  batch = _batch(b=4)
  out = jax.device_get(augment.augment_batch(jax.random.key(2), batch, _config(elastic_alpha=3.0,
                                                                                    elastic_sigma=4.0)))
  assert not np.array_equal(out['class_map'], batch['class_map'])
  for i in range(4):
    # Class and instance maps use the same nearest resampling: still consistent with each other.
    inst, cls = out['instance_map'][i], out['class_map'][i]
    lut = np.zeros(inst.max() + 1, np.int32)
    lut[batch['instance_map'][i].ravel()] = batch['class_map'][i].ravel()
    np.testing.assert_array_equal(lut[inst], cls)
    # Inside flat class regions the (bilinear) painted image agrees with the (nearest) class map.
    flat = (ndi.maximum_filter(cls, 3) == ndi.minimum_filter(cls, 3))
    red = out['image'][i][..., 0] * 255
    assert np.mean(np.abs(red[flat] - cls[flat] * 60) < 1.0) > 0.98
    assert out['density'][i].max() > 0.5  # peaks moved, not erased


def test_color_jitter_and_blur_in_range():
  batch = _batch(b=2)
  out = augment.augment_batch(jax.random.key(4), batch, _config(color_jitter=0.5, blur_sigma=2.0))
  img = np.asarray(out['image'])
  assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
  assert np.abs(img - batch['image'] / 255.0).max() > 0.05
  np.testing.assert_array_equal(out['class_map'], batch['class_map'])


# ---------------------------------------------------------------------------------------------- stain presets
_NEW_OPS = dict(stain_mix=0.3, gamma=0.7, brightness=0.5, contrast=0.5, saturation=0.8, hue=0.5)


@pytest.mark.parametrize('op', list(_NEW_OPS) + ['strong'])
def test_new_colour_ops_keep_targets_and_range(op):
  batch = _batch(b=4)
  batch['image'][0, :4, :4] = 0  # black and white pixels: the log/pow/exp paths stay finite
  batch['image'][0, 4:8, :4] = 255
  cfg = _config(stain_preset='strong') if op == 'strong' else _config(**{op: _NEW_OPS[op]})
  out = jax.device_get(augment.augment_batch(jax.random.key(11), batch, cfg))
  img = out['image']
  assert img.dtype == np.float32 and np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
  assert np.abs(img - batch['image'] / 255.0).mean() > 0.01, op  # it did something
  for k in ('class_map', 'density', 'instance_map'):
    np.testing.assert_array_equal(out[k], batch[k])  # colour never moves or edits targets


def test_stain_presets_resolve():
  paper = augment.resolve_stain_preset({'stain_preset': 'paper'})
  assert paper == dict(dict.fromkeys(augment.STAIN_FIELDS, 0.0), hed_scale=0.02, hed_shift=0.02)
  assert augment.resolve_stain_preset({'stain_preset': 'strong'}) == augment.STAIN_PRESETS['strong']
  assert set(augment.resolve_stain_preset({'stain_preset': 'none'}).values()) == {0.0}
  # A field that is set overrides the preset; None (an unset placeholder) does not.
  tweaked = augment.resolve_stain_preset({'stain_preset': 'strong', 'gamma': 0.9, 'hue': None})
  assert tweaked == dict(augment.STAIN_PRESETS['strong'], gamma=0.9)
  # Configs without a preset (written before presets, or 'custom') use their fields as they are.
  legacy = augment.resolve_stain_preset(_config(hed_scale=0.05, color_jitter=0.1))
  assert legacy == dict(dict.fromkeys(augment.STAIN_FIELDS, 0.0), hed_scale=0.05, color_jitter=0.1)
  assert augment.resolve_stain_preset({'stain_preset': 'custom', 'gamma': 0.2})['gamma'] == 0.2
  with pytest.raises(ValueError, match='stain_preset'):
    augment.resolve_stain_preset({'stain_preset': 'wide'})
  with pytest.raises(ValueError, match='gamma'):
    augment.resolve_stain_preset({'stain_preset': 'paper', 'gamma': -0.1})
  # The reference configs keep the paper's augmentation, also through the command-line placeholders.
  from configs import consep, default, pannuke
  for module in (default, consep, pannuke):
    assert augment.resolve_stain_preset(module.get_config().augment) == paper


def test_paper_preset_is_the_papers_hed_jitter_bit_for_bit():
  batch = _batch(b=3)
  key = jax.random.key(5)
  legacy = _config(flips=True, rot90=True, hed_scale=0.02, hed_shift=0.02)  # the pre-preset config fields
  preset = ml_collections.ConfigDict(dict(flips=True, rot90=True, stain_preset='paper'))
  np.testing.assert_array_equal(augment.augment_batch(key, batch, preset)['image'],
                                augment.augment_batch(key, batch, legacy)['image'])
  # The draws are today's: per-sample key -> 4th of 6 sub-keys -> scale, shift (no flips, to compare pixels).
  out = np.asarray(augment.augment_batch(key, batch, {'stain_preset': 'paper'})['image'])
  for i, k in enumerate(jax.random.split(key, 3)):
    ks, kt = jax.random.split(jax.random.split(k, 6)[3])
    a = jax.random.uniform(ks, (3,), jnp.float32, 0.98, 1.02)
    b = jax.random.uniform(kt, (3,), jnp.float32, -0.02, 0.02)
    expected = augment.hed_to_rgb(augment.rgb_to_hed(batch['image'][i] / np.float32(255)) * a + b)
    np.testing.assert_allclose(out[i], expected, atol=1e-5)  # jit vs eager: float rounding (another draw: >1e-2)


def _tissue_lightness(images: np.ndarray) -> np.ndarray:
  """Per image: mean tissue L* and L* of the darkest 5 % tissue pixels (the nuclei)."""
  from dualunet_jax.data import stain
  rows = []
  for im in images:
    lightness = stain.rgb_to_lab(im[stain.tissue_mask(im)])[:, 0]
    rows.append((lightness.mean(), np.percentile(lightness, 5)))
  return np.array(rows)


def test_strong_covers_a_wider_stain_range_than_paper(fixtures_dir):
  from PIL import Image
  images = np.stack([np.asarray(Image.open(fixtures_dir / 'imgs' / f'patch{k}.png').convert('RGB'))
                     for k in (1, 2, 3)])
  images = np.repeat(images[:, ::2, ::2], 8, axis=0)  # 24 draws (half resolution: colour only)
  batch = {'image': images, 'class_map': np.zeros(images.shape[:3], np.int32)}
  spread = {}
  for preset in ('paper', 'strong'):
    out = augment.augment_batch(jax.random.key(0), batch, {'stain_preset': preset})
    lab = _tissue_lightness(np.rint(np.asarray(out['image']) * 255).astype(np.uint8))
    spread[preset] = lab.max(0) - lab.min(0)
  # Measured (key 0): mean L* spread paper 28, strong 47; nuclear (darkest 5 %) L* spread paper 17, strong 43.
  assert spread['strong'][0] > 1.3 * spread['paper'][0], spread
  assert spread['strong'][1] > 1.5 * spread['paper'][1], spread


def test_strong_preset_jits_and_is_deterministic():
  batch = _batch(b=2)
  fn = jax.jit(lambda key, b: augment.augment_batch(key, b, {'stain_preset': 'strong', 'flips': True}))
  a, b, c = fn(jax.random.key(1), batch), fn(jax.random.key(1), batch), fn(jax.random.key(2), batch)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])
