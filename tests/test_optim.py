"""The reference optimiser: torch.optim.Adam with coupled L2 decay and MultiStepLR, restated in numpy."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from dualunet_jax import optim


def _train_config(**overrides):
  config = default.get_config().train
  for k, v in overrides.items():
    config[k] = v
  return config


def test_learning_rate_scales_linearly_with_global_batch():
  assert optim.learning_rate(_train_config(batch_size=8)) == pytest.approx(2e-4)
  assert optim.learning_rate(_train_config(batch_size=32)) == pytest.approx(8e-4)


def test_step_decay_matches_multisteplr_per_epoch():
  steps_per_epoch = 4
  schedule = optim.lr_schedule(_train_config(), steps_per_epoch)
  # Epoch e (from 1) trains at 2e-4 * 0.1^(milestones < e): epochs 1-70 full, 71-90 x0.1, 91-100 x0.01.
  for epoch, expected in [(1, 2e-4), (70, 2e-4), (71, 2e-5), (90, 2e-5), (91, 2e-6), (100, 2e-6)]:
    first, last = (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1
    assert float(schedule(first)) == pytest.approx(expected, rel=1e-6), epoch
    assert float(schedule(last)) == pytest.approx(expected, rel=1e-6), epoch


def test_coupled_weight_decay_equals_torch_adam_restated():
  """torch.optim.Adam(weight_decay=wd): g <- g + wd * p before the moments (not AdamW's decoupled decay)."""
  config = _train_config(weight_decay=0.1, learning_rate=1e-2)
  tx = optim.make_optimizer(config, steps_per_epoch=100)
  rng = np.random.default_rng(0)
  p = rng.normal(size=5).astype(np.float32)
  grads = [rng.normal(size=5).astype(np.float32) for _ in range(3)]
  params = jnp.asarray(p)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)

  lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
  m = v = np.zeros(5, np.float64)
  q = p.astype(np.float64)
  for t, g in enumerate(grads, start=1):
    g = g + wd * q
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    q = q - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  np.testing.assert_allclose(np.asarray(params), q, rtol=1e-5, atol=1e-6)

  # AdamW (decoupled) would give a different result: the test can tell the two apart.
  adamw = optax.adamw(lr, weight_decay=wd)
  s2, q2 = adamw.init(jnp.asarray(p)), jnp.asarray(p)
  for g in grads:
    u, s2 = adamw.update(jnp.asarray(g), s2, q2)
    q2 = optax.apply_updates(q2, u)
  assert np.max(np.abs(np.asarray(q2) - q)) > 1e-5
