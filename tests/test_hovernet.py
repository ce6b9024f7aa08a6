"""HoVer-Net model and method: official parameter counts (abstract evaluation), geometry of both modes, numerical
agreement with a torch restatement of the official net, hand-computed loss values, a few training steps.

The torch restatement lives in tests/_hovernet_torch.py; torch tests skip where torch is absent.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import hovernet_consep
from dualunet_jax import methods
from dualunet_jax import models
from dualunet_jax.data import consep
from dualunet_jax.methods import hovernet as hv_method
from dualunet_jax.models import hovernet
from dualunet_jax.models import preact_resnet
from dualunet_jax.models.dualunet import count_params

TINY = 0.125
# The official table (../shared/reference/seed_systems.md): (mode, K + 1 or None) -> parameters.
OFFICIAL = {('original', 5): 54_744_457, ('original', 6): 54_744_522, ('original', None): 45_028_676,
            ('fast', 6): 37_639_626, ('fast', 5): 37_639_561, ('fast', None): 33_625_412}
OFFICIAL_ENCODER = 25_597_504


def _abstract(fn):
  return nnx.eval_shape(lambda rngs: fn(rngs), nnx.Rngs(0))


def test_parameter_counts_equal_the_official_table():
  # One whole model by abstract evaluation, and the parts every other row is made of (an encoder, one NP-like
  # branch per mode): a branch with C outputs has 65 C parameters in its u0 1x1 (64 C weights + C biases).
  model = _abstract(lambda r: hovernet.HoVerNet(mode='original', num_classes=4, rngs=r))
  assert count_params(model) == OFFICIAL[('original', 5)]
  assert count_params(model.encoder) == OFFICIAL_ENCODER
  assert count_params(model.decoder_tp) - count_params(model.decoder_np) == 65 * 3
  counts = methods.get('hovernet').parameter_counts(model)
  assert (counts['total'], counts['encoder']) == (OFFICIAL[('original', 5)], OFFICIAL_ENCODER)
  assert set(counts) == {'encoder', 'decoder_np', 'decoder_hv', 'decoder_tp', 'total'}
  branch = {'original': count_params(model.decoder_np)}
  enc = preact_resnet.PreActResNet50  # the 'fast' stem pads instead of shrinking: same parameters
  assert count_params(_abstract(lambda r: enc(mode='fast', rngs=r))) == OFFICIAL_ENCODER
  branch['fast'] = count_params(_abstract(lambda r: hovernet.DecoderBranch(
      model.encoder.out_channels, 2, 3, 1.0, dtype=jnp.float32, rngs=r)))
  for (mode, types), expected in OFFICIAL.items():
    total = OFFICIAL_ENCODER + 2 * branch[mode] + (0 if types is None else branch[mode] + 65 * (types - 2))
    assert total == expected, (mode, types)


def test_supported_sides_and_minimum():
  # The fixed skip crops fit sides of 6 mod 8 ('original', 270) and 0 mod 8 ('fast', 256); others are padded
  # up to the next one (the torch tests below check outputs at 270, 256 and a padded 209 x 213).
  assert [hovernet.supported_side(s, 'original') for s in (198, 199, 206, 209, 270, 271)] == [198, 206, 206, 214,
                                                                                             270, 278]
  assert [hovernet.supported_side(s, 'fast') for s in (100, 104, 105, 256)] == [104, 104, 112, 256]


# ------------------------------------------------------------------------------------------- torch agreement


@pytest.fixture(scope='module')
def torch_original():
  """(torch module, the tiny Flax 'original' model with its weights, converted in memory), K + 1 = 5."""
  torch = pytest.importorskip('torch')
  import _hovernet_torch as ht
  from dualunet_jax import convert_hovernet
  net = ht.randomise(ht.HoVerNet(nr_types=5, mode='original', width=TINY), seed=0)
  model = _abstract(lambda r: hovernet.HoVerNet(mode='original', num_classes=4, width_multiplier=TINY, rngs=r))
  convert_hovernet.convert_state_dict(model, ht.state_dict_numpy(net))
  model.eval()
  return torch, net, model


def _torch_forward(torch, net, images):
  with torch.no_grad():
    out = net(torch.from_numpy(images).permute(0, 3, 1, 2).float())
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


def test_matches_torch_restatement_at_270(torch_original):
  torch, net, model = torch_original
  images = np.random.default_rng(1).integers(0, 256, (2, 270, 270, 3), dtype=np.uint8)
  want = _torch_forward(torch, net, images)
  got = jax.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  assert model.margin == 95
  assert {k: v.shape for k, v in got.items()} == {'np': (2, 80, 80, 2), 'hv': (2, 80, 80, 2), 'tp': (2, 80, 80, 5)}
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max())


def test_unsupported_sides_are_reflect_padded_then_cropped(torch_original):
  # 209 x 213 is padded to 214 x 214 (6 mod 8): the outputs are the torch outputs of the reflect-padded image,
  # cropped to 209 - 190 by 213 - 190.
  torch, net, model = torch_original
  images = np.random.default_rng(2).integers(0, 256, (1, 209, 213, 3), dtype=np.uint8)
  want = _torch_forward(torch, net, np.pad(images, ((0, 0), (0, 5), (0, 1), (0, 0)), mode='reflect'))
  got = jax.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  for k in want:
    assert got[k].shape[1:3] == (19, 23)
    np.testing.assert_allclose(np.asarray(got[k]), want[k][:, :19, :23], rtol=1e-4,
                               atol=1e-4 * np.abs(want[k]).max())


# ------------------------------------------------------------------------------------------- losses


def test_xentropy_and_dice_hand_values():
  # Two pixels, 2 classes: probabilities (1/4, 3/4) and (1/2, 1/2); targets class 1 and class 0.
  logits = jnp.asarray([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])
  y = jnp.asarray([[[[0.0, 1.0], [1.0, 0.0]]]])
  ce = -(math.log(0.75) + math.log(0.5)) / 2
  np.testing.assert_allclose(hv_method.xentropy_loss(logits, y), ce, rtol=1e-6)
  # class 0: inter 1/2, sum p 3/4, sum y 1; class 1: inter 3/4, sum p 5/4, sum y 1; smooth 1e-3.
  s = 1e-3
  dice = (1 - (2 * 0.5 + s) / (0.75 + 1 + s)) + (1 - (2 * 0.75 + s) / (1.25 + 1 + s))
  np.testing.assert_allclose(hv_method.dice_loss(logits, y), dice, rtol=1e-6)
  # The official clip: a certain mistake costs -log(1e-7), not +inf.
  np.testing.assert_allclose(hv_method.xentropy_loss(jnp.asarray([[[[0.0, 200.0]]]]), jnp.asarray([[[[1.0, 0.0]]]])),
                             -math.log(1e-7), rtol=1e-4)


def test_msge_hand_values_and_orientation():
  # Target x map = column index (a unit ramp), y map 0, prediction 0, one focus pixel away from the border.
  # d/dx of the ramp under the 5x5 kernel x / (x^2 + y^2) is sum x^2 / (x^2 + y^2) = 4.8 (|x| = 1) + 7.2
  # (|x| = 2) = 12, so the loss is 12^2 / (2 channels x 1 pixel) = 72; the PyTorch port's transposed kernel
  # takes d/dy of the x map, 0 for a ramp along x.
  target = jnp.zeros((1, 9, 9, 2)).at[..., 0].set(jnp.arange(9.0)[None, None, :])
  focus = jnp.zeros((1, 9, 9)).at[0, 4, 4].set(1.0)
  pred = jnp.zeros_like(target)
  np.testing.assert_allclose(hv_method.msge_loss(pred, target, focus), 72.0, rtol=1e-5)
  np.testing.assert_allclose(hv_method.msge_loss(pred, target, focus, pytorch_kernels=True), 0.0, atol=1e-6)
  # The same ramp as the y map (rows): now the paper's kernels see it through channel 1.
  target_y = jnp.zeros((1, 9, 9, 2)).at[..., 1].set(jnp.arange(9.0)[None, :, None])
  np.testing.assert_allclose(hv_method.msge_loss(pred, target_y, focus), 72.0, rtol=1e-5)
  np.testing.assert_allclose(hv_method.msge_loss(pred, target_y, focus, pytorch_kernels=True), 0.0, atol=1e-6)


def test_msge_matches_the_official_torch_formula():
  # The official `msge_loss` (torch.meshgrid 'ij' kernels) restated in torch equals pytorch_kernels=True.
  torch = pytest.importorskip('torch')
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  pred, true = (rng.normal(size=(2, 12, 10, 2)).astype(np.float32) for _ in range(2))
  focus = (rng.random((2, 12, 10)) > 0.5).astype(np.float32)
  r = torch.arange(-2, 3, dtype=torch.float32)
  h, v = torch.meshgrid(r, r, indexing='ij')
  kh, kv = (h / (h * h + v * v + 1.0e-15)).view(1, 1, 5, 5), (v / (h * h + v * v + 1.0e-15)).view(1, 1, 5, 5)

  def grad(hv):
    hv = torch.from_numpy(hv)
    return torch.cat([F.conv2d(hv[..., 0].unsqueeze(1), kh, padding=2),
                      F.conv2d(hv[..., 1].unsqueeze(1), kv, padding=2)], 1).permute(0, 2, 3, 1)

  f = torch.from_numpy(focus)[..., None].repeat(1, 1, 1, 2)
  want = float((f * (grad(pred) - grad(true)) ** 2).sum() / (f.sum() + 1.0e-8))
  got = float(hv_method.msge_loss(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(focus), pytorch_kernels=True))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_total_loss_weights_and_centre_crop():
  # The method crops the input-size targets by the output margin; each configured weight scales its term.
  rng = np.random.default_rng(0)
  b, side, out, k = 2, 20, 10, 4
  outputs = {'np': jnp.asarray(rng.normal(size=(b, out, out, 2)), jnp.float32),
             'hv': jnp.asarray(rng.normal(size=(b, out, out, 2)), jnp.float32),
             'tp': jnp.asarray(rng.normal(size=(b, out, out, k + 1)), jnp.float32)}
  class_map = rng.integers(0, k + 1, (b, side, side)).astype(np.int32)
  hv_t = rng.uniform(-1, 1, (b, side, side, 2)).astype(np.float32)
  batch = {'class_map': jnp.asarray(class_map), 'hv': jnp.asarray(hv_t), 'instance_map': jnp.asarray(class_map)}
  weights = dict(zip(hv_method.LOSS_WEIGHTS, (2.0, 2.0, 2.0, 2.0, 3.0, 1.0)))
  config = ml_collections.ConfigDict({'loss': weights})
  method = methods.get('hovernet')
  total, parts = method.loss(outputs, batch, jnp.ones(k + 1), config)
  c = class_map[:, 5:15, 5:15]
  fg = (c > 0).astype(np.int32)
  assert float(parts['hv_mse']) == pytest.approx(float(np.mean((np.asarray(outputs['hv']) - hv_t[:, 5:15, 5:15]) ** 2)),
                                                 rel=1e-5)
  np.testing.assert_allclose(parts['np_ce'], hv_method.xentropy_loss(outputs['np'], jax.nn.one_hot(fg, 2)),
                             rtol=1e-6)
  np.testing.assert_allclose(parts['tp_dice'], hv_method.dice_loss(outputs['tp'], jax.nn.one_hot(c, k + 1)),
                             rtol=1e-6)
  want = sum(w * float(parts[name]) for name, w in zip(('np_ce', 'np_dice', 'hv_mse', 'hv_msge', 'tp_ce', 'tp_dice'),
                                                        weights.values()))
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(parts['total']) == float(total)


# ------------------------------------------------------------------------------------------- training


def test_loss_decreases_on_a_real_crop(fixtures_dir):
  # A tiny 'fast' HoVer-Net, built and fed through the method interface on a real fixture crop (targets from
  # `make_targets`), takes a few Adam steps: the loss goes down.
  config = hovernet_consep.tiny(hovernet_consep.get_config('fast'))
  config.model.encoder_blocks = (1, 1, 1, 1)  # compiles faster; same geometry, heads and loss
  method = methods.get(config)
  mat = sorted((fixtures_dir / 'masks').glob('*.mat'))[1]
  record = consep.read_tile(fixtures_dir / 'imgs' / f'{mat.stem}.png', mat)
  side = config.dataset.crop_size
  images, targets = [], []
  for y0, x0 in ((0, 0), (152, 152)):
    inst = record['instance_map'][y0:y0 + side, x0:x0 + side]
    ids = np.unique(inst[inst > 0])
    relabelled = np.where(inst > 0, np.searchsorted(ids, inst) + 1, 0).astype(np.int32)
    targets.append(method.make_targets(relabelled, record['instance_classes'][ids - 1], config))
    images.append(record['image'][y0:y0 + side, x0:x0 + side])
  batch = {k: jnp.asarray(np.stack([t[k] for t in targets])) for k in targets[0]}
  assert batch['hv'].shape == (2, side, side, 2) and float(jnp.abs(batch['hv']).max()) == 1.0
  images = jnp.asarray(np.stack(images))
  # Abstract build + host-random values: a concrete init compiles one program per parameter shape (~30 s here).
  graphdef, state = nnx.split(method.abstract_model(config, 4))
  model = nnx.merge(graphdef, models.random_state(state, seed=0))
  assert model.margin == 46
  with pytest.raises(ValueError, match='needs sides >= 100'):
    model(images[:, :99])
  # Eval-mode BatchNorm (the host-random running statistics) keeps the step a pure function of the parameters:
  # tracing and compiling it costs a third of the train-mode nnx step on this CPU, and it is most of the test.
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-3)

  @functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})  # halves compile time
  def step(params, opt_state):
    loss_fn = lambda p: method.loss(nnx.merge(graphdef, p, rest)(images), batch, jnp.ones(5), config)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(6):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_encoder_blocks_keep_the_geometry():
  # Fewer residual units per stage (config.model.encoder_blocks) change parameters, not the valid-convolution
  # geometry: the official margin and 270 -> 80 outputs (the units are same-padded).
  from dualunet_jax.models import hovernet as hovernet_model
  shallow = nnx.eval_shape(lambda r: hovernet_model.HoVerNet(
      mode='original', num_classes=2, width_multiplier=0.125, encoder_blocks=(1, 1, 1, 1), rngs=r), nnx.Rngs(0))
  assert shallow.margin == 95
  assert [len(b.units) for b in (shallow.encoder.d0, shallow.encoder.d1, shallow.encoder.d2, shallow.encoder.d3)] \
      == [1, 1, 1, 1]
  out = jax.eval_shape(lambda m, x: m(x), shallow, jax.ShapeDtypeStruct((1, 270, 270, 3), jnp.uint8))
  assert {k: v.shape for k, v in out.items()} == {'np': (1, 80, 80, 2), 'hv': (1, 80, 80, 2), 'tp': (1, 80, 80, 3)}
