"""Tests for dualunet_jax.losses: hand-computed values, dtype/jit/grad behaviour, reference class weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dualunet_jax import losses

REF_WEIGHTS = np.array([0.01528006, 0.88228494, 0.05587566, 0.01648045, 0.03007891], np.float32)


def _two_pixels():
  # B=1, H=1, W=2, C=2. Pixel 0: logits (0, log 3) -> p = (1/4, 3/4), target 1. Pixel 1: (0, 0) -> (1/2, 1/2),
  # target 0.
  logits = jnp.array([[[[0.0, np.log(3.0)], [0.0, 0.0]]]], jnp.float32)
  onehot = jnp.array([[[[0.0, 1.0], [1.0, 0.0]]]], jnp.float32)
  return logits, onehot


def test_ce_by_hand_not_divided_by_weights():
  logits, onehot = _two_pixels()
  w = jnp.array([0.2, 0.6])
  got = losses.weighted_soft_cross_entropy(logits, onehot, w)
  # mean over 2 pixels of (-0.6 log 3/4, -0.2 log 1/2); dividing by sum of weights (0.8) would give 4/3 more.
  want = (-0.6 * np.log(0.75) - 0.2 * np.log(0.5)) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Unit weights: the plain mean cross-entropy.
  np.testing.assert_allclose(losses.weighted_soft_cross_entropy(logits, onehot, jnp.ones(2)),
                             (-np.log(0.75) - np.log(0.5)) / 2, rtol=1e-6)


def test_dice_by_hand():
  logits, onehot = _two_pixels()
  w = np.array([0.2, 0.6])
  # class 0: p = (1/4, 1/2), y = (0, 1): tp = 1/2, sum p = 3/4, sum y = 1.
  # class 1: p = (3/4, 1/2), y = (1, 0): tp = 3/4, sum p = 5/4, sum y = 1.
  s0 = (2 * 0.2 * 0.5 + 1) / (0.2 * 1.75 + 1)
  s1 = (2 * 0.6 * 0.75 + 1) / (0.6 * 2.25 + 1)
  got = losses.soft_dice_loss(logits, onehot, jnp.asarray(w))
  np.testing.assert_allclose(got, 1 - (s0 + s1) / 2, rtol=1e-6)
  # eps -> 0 with a perfect prediction gives 0; weights cancel.
  perfect = 50.0 * (2 * onehot - 1)
  assert float(losses.soft_dice_loss(perfect, onehot, jnp.asarray(w), eps=1e-9)) < 1e-6


def test_mse_and_channel_axis():
  d = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
  g = jnp.zeros((1, 2, 2))
  np.testing.assert_allclose(losses.density_mse(d, g), 30.0 / 4)
  np.testing.assert_allclose(losses.density_mse(d[..., None], g), 30.0 / 4)
  with pytest.raises(ValueError):
    losses.density_mse(d, jnp.zeros((1, 2, 3)))


def _random_batch(seed, b=2, h=8, w=8, c=5):
  # numpy, not jax.random: compiling threefry costs seconds on a loaded CPU.
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(3.0 * rng.standard_normal((b, h, w, c)), jnp.float32)
  class_map = jnp.asarray(rng.integers(0, c, (b, h, w)), jnp.int32)
  density = jnp.asarray(rng.uniform(size=(b, h, w, 1)), jnp.float32)
  target = jnp.asarray(rng.uniform(size=(b, h, w)), jnp.float32)
  return logits, class_map, density, target


def test_dual_loss_parts_jit_grad_bf16():
  logits, class_map, density, target = _random_batch(0)
  w = jnp.asarray(REF_WEIGHTS)
  cfg = ml_collections.ConfigDict(
      {'ce_weight': 1.0, 'dice_weight': 2.0, 'mse_weight': 0.5, 'classification': 'ce'})

  @jax.jit
  def run(lg, d):
    onehot = jax.nn.one_hot(class_map, 5)
    separate = {'ce': losses.weighted_soft_cross_entropy(lg, onehot, w),
                'dice': losses.soft_dice_loss(lg, onehot, w), 'mse': losses.density_mse(d, target)}
    value_and_grad = jax.value_and_grad(
        lambda a, b: losses.dual_loss(a, b, class_map, target, w, cfg), (0, 1), has_aux=True)
    (total, parts), grads = value_and_grad(lg, d)
    bf16_total, bf16_parts = losses.dual_loss(lg.astype(jnp.bfloat16), d.astype(jnp.bfloat16), class_map,
                                              target, w, cfg)
    return total, parts, separate, grads, bf16_total, bf16_parts

  total, parts, separate, (g_logits, g_density), total_bf16, parts_bf16 = run(logits, density)
  for name in ('ce', 'dice', 'mse'):
    np.testing.assert_allclose(parts[name], separate[name], rtol=1e-6)
  np.testing.assert_allclose(total, parts['ce'] + 2 * parts['dice'] + 0.5 * parts['mse'], rtol=1e-6)
  np.testing.assert_allclose(parts['total'], total)
  assert np.isfinite(g_logits).all() and np.isfinite(g_density).all()
  assert np.abs(g_logits).sum() > 0 and g_density.shape == density.shape
  # bfloat16 logits/density: the loss is computed (and returned) in float32, close to the f32 value.
  assert total_bf16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in parts_bf16.values())
  np.testing.assert_allclose(total_bf16, total, rtol=2e-2)


def test_dual_loss_defaults_and_errors():
  logits, class_map, density, target = _random_batch(1, c=3)
  w = np.ones(3, np.float32) / 3
  total, parts = jax.jit(lambda *a: losses.dual_loss(*a, w))(logits, density, class_map, target)
  np.testing.assert_allclose(total, parts['ce'] + parts['dice'] + parts['mse'], rtol=1e-6)
  with pytest.raises(ValueError, match='class_weights'):
    losses.dual_loss(logits, density, class_map, target, jnp.ones(4))
  with pytest.raises(ValueError, match='classification'):
    losses.dual_loss(logits, density, class_map, target, jnp.ones(3), {'classification': 'hinge'})


def test_focal_gamma_zero_is_ce_and_down_weights_easy_pixels():
  logits, class_map, _, _ = _random_batch(2)
  w = jnp.asarray(REF_WEIGHTS)
  zeros = jnp.zeros((2, 8, 8))

  @jax.jit
  def run(lg):
    onehot = jax.nn.one_hot(class_map, 5)
    focal0 = {'classification': 'focal', 'focal_gamma': 0.0}
    _, parts = losses.dual_loss(lg, zeros, class_map, zeros, w, focal0)
    grad = jax.grad(lambda a: losses.weighted_focal_loss(a, onehot, w, gamma=1.5))(lg)
    return (losses.weighted_soft_cross_entropy(lg, onehot, w), losses.weighted_focal_loss(lg, onehot, w, 0.0),
            losses.weighted_focal_loss(lg, onehot, w, 2.0), parts['ce'], grad)

  ce, focal0, focal2, dual_focal0, grad = run(logits)
  np.testing.assert_allclose(focal0, ce, rtol=1e-6)
  np.testing.assert_allclose(dual_focal0, ce, rtol=1e-6)
  assert 0 < float(focal2) < float(ce)
  assert np.isfinite(grad).all()


def test_asymmetric_loss_by_hand():
  # One pixel, two classes, target class 1; z = (0.5, 1.0).
  z = jnp.array([[[[0.5, 1.0]]]])
  y = jnp.array([[[[0.0, 1.0]]]])
  w = jnp.array([0.3, 0.7])
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  p0, p1 = sig(0.5), sig(1.0)
  pm = max(p0 - 0.05, 0.0)
  want = -(0.3 * pm**4 * np.log(1 - pm) + 0.7 * (1 - p1) ** 1 * np.log(p1))
  got = losses.asymmetric_loss(z, y, w, gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # gamma 0, no clip: weighted one-vs-all binary cross-entropy.
  bce = -(0.3 * np.log(1 - p0) + 0.7 * np.log(p1))
  np.testing.assert_allclose(losses.asymmetric_loss(z, y, w, 0.0, 0.0, 0.0), bce, rtol=1e-5)
  logits, class_map, _, _ = _random_batch(3)
  onehot = jax.nn.one_hot(class_map, 5)
  g = jax.jit(jax.grad(lambda lg: losses.asymmetric_loss(lg, onehot, jnp.ones(5))))(logits)
  assert np.isfinite(g).all()


def test_pixel_class_counts():
  cm = np.array([[0, 0, 1], [3, 3, 3]])
  np.testing.assert_array_equal(losses.pixel_class_counts(cm, 3), [2, 1, 0, 3])
  assert losses.pixel_class_counts(cm, 3).dtype == np.int64
  with pytest.raises(ValueError):
    losses.pixel_class_counts(cm, 2)


def test_class_weights_reference_fractions():
  # Implied CoNSeP-train pixel fractions (reference §2), rounded to 0.01 %: misc 0.15 % carries up to ~3 % of
  # rounding error, and it holds ~88 % of the weight mass; the other weights move with the normalisation.
  fractions = np.array([85.3, 0.15, 2.33, 7.91, 4.33]) / 100
  w = losses.class_weights_from_counts(np.round(fractions * 1e9).astype(np.int64), background_factor=10.0)
  assert w.dtype == np.float32 and abs(w.sum() - 1) < 1e-6
  np.testing.assert_allclose(w, REF_WEIGHTS, rtol=0.02)


def test_class_weights_back_solved_counts():
  # w_c ~ 1 / count_c (x10 for background): invert, scale to 27 CoNSeP tiles at 1024 x 1024 pixels and round.
  inv = 1.0 / REF_WEIGHTS.astype(np.float64)
  inv[0] *= 10.0
  counts = np.round(inv / inv.sum() * 27 * 1024 * 1024).astype(np.int64)
  w = losses.class_weights_from_counts(counts, 10.0)
  np.testing.assert_allclose(w, REF_WEIGHTS, atol=1e-6)


def test_save_load_class_weights(tmp_path):
  counts = np.array([100, 3, 7], np.int64)
  w = losses.class_weights_from_counts(counts)
  path = tmp_path / 'sub' / 'class_weights.json'
  losses.save_class_weights(path, w, counts)
  w2, c2 = losses.load_class_weights(path)
  np.testing.assert_array_equal(w2, w)
  np.testing.assert_array_equal(c2, counts)
  assert [p.name for p in path.parent.iterdir()] == ['class_weights.json']  # no temp file left behind
  np.save(tmp_path / 'ref.npy', REF_WEIGHTS)
  w3, c3 = losses.load_class_weights(tmp_path / 'ref.npy')
  np.testing.assert_array_equal(w3, REF_WEIGHTS)
  assert c3 is None
