"""The CoNIC framework and HistoNeXt as methods: built from their configs through the registry, full-size
parameter counts by abstract evaluation, and the shared loss / maps / TTA contract on tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import conic, histonext_consep
from dualunet_jax import methods
from dualunet_jax.methods import base


def test_full_size_models_from_their_configs():
  config = conic.get_config()
  method = methods.get(config)
  model = method.abstract_model(config, 6)
  assert method.name == 'conic' and base.margin_of(model) == 0
  # SE-ResNeXt-50 trunk (timm, 25,510,896) + merged decoder and heads, tests/test_conic_net.py
  assert method.parameter_counts(model)['total'] == 31_622_587
  config = histonext_consep.get_config()
  method = methods.get(config)
  model = method.abstract_model(config, 4)
  assert method.name == 'histonext' and base.margin_of(model) == 95
  assert 80e6 < method.parameter_counts(model)['total'] < 85e6  # paper: HistoNeXt-Tiny 82.6 M


def test_conic_framework_on_consep_keeps_the_paper_recipe_with_consep_data():
  import pytest
  from configs import consep
  on_consep, on_conic = conic.get_config('consep'), conic.get_config()
  assert on_consep.dataset.to_dict() == consep.get_config().dataset.to_dict()
  for section in ('method', 'model', 'loss', 'augment', 'train', 'targets', 'postprocess'):
    assert on_consep[section] == on_conic[section], section  # only the data differ
  with pytest.raises(ValueError, match='conic or consep'):
    conic.get_config('pannuke')


def test_conic_tiny_loss_maps_and_targets(fixtures_dir):
  from dualunet_jax import models
  from dualunet_jax.data import consep
  config = conic.get_config()
  config.model.width_multiplier = 0.125
  config.model.cardinality = 1
  method = methods.get(config)
  model = models.fill_random(method.abstract_model(config, 4))
  record = consep.read_tile(fixtures_dir / 'imgs' / 'patch1.png', fixtures_dir / 'masks' / 'patch1.mat')
  inst, cls = record['instance_map'][:64, :64], record['instance_classes']
  from dualunet_jax.data import targets
  inst, old = targets.relabel_contiguous(inst)
  t = method.make_targets(inst, np.maximum(cls[old - 1], 1), config)
  assert t['hv'].shape == (64, 64, 2) and np.abs(t['hv']).max() <= 1.0
  batch = {k: jnp.asarray(v[None]) for k, v in t.items()}
  batch['image'] = jnp.asarray(record['image'][None, :64, :64])
  model.eval()
  outputs = model(batch['image'])
  total, parts = method.loss(outputs, batch, jnp.ones((5,)) / 5, config)
  assert np.isfinite(float(total)) and set(parts) >= {'np_ce', 'hv_mse', 'tp_dice', 'total'}
  # The paper's weights: total = 2 CE_np + 2 Dice_np + 2 MSE + 2 MSGE + 3 CE_tp + 1 Dice_tp.
  want = 2 * (parts['np_ce'] + parts['np_dice'] + parts['hv_mse'] + parts['hv_msge']) + 3 * parts['tp_ce'] \
      + parts['tp_dice']
  np.testing.assert_allclose(float(total), float(want), rtol=1e-5)
  maps = method.maps(outputs)
  assert maps['class_probs'].shape == (1, 64, 64, 5) and maps['hv'].shape == (1, 64, 64, 2)
  np.testing.assert_allclose(np.asarray(maps['class_probs']).sum(-1), 1.0, atol=1e-5)


def test_histonext_losses_hand_values():
  from dualunet_jax.methods import hovernet
  # One foreground pixel with p = softmax([0, ln 3])[1] = 0.75 and one background pixel with p = 0.25.
  logits = jnp.asarray([[[[0.0, np.log(3.0)], [np.log(3.0), 0.0]]]], jnp.float32)  # [1, 1, 2, 2]
  fg = jnp.asarray([[[1, 0]]])
  want = (-(0.25 ** 0.5) * np.log(0.75) - (0.25 ** 4) * np.log(0.75)) / 2
  np.testing.assert_allclose(float(hovernet.asymmetric_np_loss(logits, fg)), want, rtol=1e-5)
  # Clipping: a confident, right pixel costs at most the clipped value.
  sure = jnp.asarray([[[[0.0, 20.0]]]], jnp.float32)
  np.testing.assert_allclose(float(hovernet.asymmetric_np_loss(sure, jnp.asarray([[[1]]]))),
                             -(0.05 ** 0.5) * np.log(0.95), rtol=1e-5)
  # Focal: p_t = 0.75 -> -0.25 * 0.25^2 * ln 0.75.
  onehot = jnp.asarray([[[[0.0, 1.0]]]], jnp.float32)
  np.testing.assert_allclose(float(hovernet.focal_tp_loss(logits[:, :, :1], onehot)),
                             -0.25 * 0.25 ** 2 * np.log(0.75), rtol=1e-5)


def test_histonext_config_selects_its_losses():
  from dualunet_jax.methods import hovernet
  config = histonext_consep.get_config()
  rng = np.random.default_rng(0)
  outputs = {'np': jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32),
             'hv': jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 2)), jnp.float32),
             'tp': jnp.asarray(rng.normal(size=(1, 8, 8, 5)), jnp.float32)}
  class_map = jnp.asarray(rng.integers(0, 5, (1, 8, 8)), jnp.int32)
  hv = jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 2)), jnp.float32)
  total, parts = hovernet.hovernet_loss(outputs, class_map, hv, config.loss)
  assert set(parts) == {'np_asl', 'hv_mse', 'hv_msge', 'tp_focal', 'total'}
  np.testing.assert_allclose(float(total), float(parts['np_asl'] + parts['hv_mse'] + parts['hv_msge']
                                                 + parts['tp_focal']), rtol=1e-6)



def _trained_encoder_paths(config) -> tuple[set[tuple], set[tuple]]:
  """Paths (below `encoder`) of the encoder parameters the optimizers of phase 1 and phase 2 update."""
  from flax import nnx
  from dualunet_jax import trainer
  model = methods.get(config).abstract_model(config, 4)
  out = []
  for phase in (1, 2):
    state = nnx.state(model, nnx.All(nnx.Param, trainer.trainable_filter(config, phase)))
    paths = [tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(state)]
    assert any(p[0] != 'encoder' for p in paths)  # the decoders train in both phases
    out.append({p[1:] for p in paths if p[0] == 'encoder'})
  return out[0], out[1]


def test_phase1_freezes_what_each_paper_freezes():
  """HoVer-Net: the official phase 1 (net_desc.py, freeze=True) trains the stem, d0's shortcut and block-end
  BatchNorm and conv_bot, nothing else of the encoder; CoNIC and HistoNeXt freeze their whole encoder."""
  from configs import hovernet_consep
  config = hovernet_consep.tiny(hovernet_consep.get_config('fast'))
  config.model.encoder_blocks = (1, 2, 1, 1)  # small, and d0 / d1 with one and several units
  phase1, everything = _trained_encoder_paths(config)
  assert {p[:2] if p[0] == 'd0' else p[:1] for p in phase1} == {
      ('conv0',), ('conv0_bn',), ('d0', 'shortcut'), ('d0', 'blk_bna'), ('conv_bot',)}
  assert phase1 < everything and {p[0] for p in everything} >= {'d0', 'd1', 'd2', 'd3'}
  conic_config, histonext_config = conic.get_config(), histonext_consep.get_config()
  conic_config.model.width_multiplier = histonext_config.model.width_multiplier = 0.125
  conic_config.model.cardinality = 1
  for config in (conic_config, histonext_config):
    phase1, everything = _trained_encoder_paths(config)
    assert phase1 == set() and everything


def test_random_fill_keeps_dropout_streams_valid():
  # Benchmarks and plumbing tests fill abstract models with stand-in values: the CoNIC decoder's dropout
  # must still draw (valid keys, counters from zero) in training mode, and differently per call.
  from dualunet_jax import models
  config = conic.get_config('consep')
  config.model.width_multiplier = 0.125
  config.model.cardinality = 1
  model = models.fill_random(methods.get(config).abstract_model(config, 4))
  model.train()
  image = jnp.full((1, 64, 64, 3), 128, jnp.uint8)
  first, second = model(image), model(image)
  assert first['np'].shape == (1, 64, 64, 2)
  assert not np.allclose(first['np'], second['np'])  # the dropout masks differ between calls
  model.eval()
  np.testing.assert_array_equal(model(image)['np'], model(image)['np'])


def test_ensemble_of_two_methods_with_different_margins(fixtures_dir):
  """CoNIC (same-size outputs) + HoVer-Net fast (46 px of context per side), as `eval --ensemble` and
  benchmarks/run_a_budget.sh's conic_x_hovernet average them: each member sees the context it needs, and the
  maps are the mean of each method's own whole-image maps."""
  from configs import hovernet_consep
  from dualunet_jax import evaluation, models
  from dualunet_jax.data import consep
  conic_config = conic.get_config()
  conic_config.model.width_multiplier, conic_config.model.cardinality = 0.125, 1
  hover_config = hovernet_consep.tiny(hovernet_consep.get_config('fast'))
  hover_config.model.encoder_blocks = (1, 1, 1, 1)
  members = []
  for seed, config in enumerate((conic_config, hover_config)):
    method = methods.get(config)
    model = models.fill_random(method.abstract_model(config, 4), seed=seed)
    model.eval()
    members.append((method, model))
  assert [base.margin_of(m) for _, m in members] == [0, 46]
  images = consep.read_tile(fixtures_dir / 'imgs' / 'patch1.png', fixtures_dir / 'masks' / 'patch1.mat')['image']
  images = jnp.asarray(images[None, :40, :48])
  ensemble = evaluation.make_forward([m for _, m in members], member_methods=[meth for meth, _ in members])(images)
  singles = [nnx.jit(meth.forward_maps)(m, images) for meth, m in members]
  assert set(ensemble) == set(singles[0]) == set(singles[1])
  for name, value in ensemble.items():
    assert value.shape[:3] == (1, 40, 48)
    np.testing.assert_allclose(np.asarray(value), (np.asarray(singles[0][name]) + np.asarray(singles[1][name])) / 2,
                               atol=1e-5)
