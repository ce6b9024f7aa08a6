"""Tests for dualunet_jax.models: exact reference parameter counts (abstract, never materialised), forward
shapes/dtypes, odd input sizes, bf16 vs f32, sharded vs single-device forward, train vs eval BatchNorm.

Speed (2-core CPU): full-size models are only built with `nnx.eval_shape`. Tiny models (width 1/8) are also
built abstractly and filled with numpy random values, because a real eager init compiles one XLA program per
distinct parameter shape (tens of seconds on this machine); the initialisers are checked on single layers.
Forwards are compiled at XLA backend optimisation level 0 (about half the compile time; same numerics).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualunet_jax import models
from dualunet_jax.models import dualunet
from dualunet_jax.models import unet_decoder

TINY = 1 / 8
_FAST_COMPILE = {'xla_backend_optimization_level': 0}

# Reference §1.8: per-part trainable parameters.
REFERENCE_PARTS = {
    'resnext50_32x4d': {'encoder': 22_979_904, 'class_decoder': 9_012_928, 'density_decoder': 9_012_928,
                        'density_head': 145},
    'convnext_base': {'encoder': 87_564_416, 'class_decoder': 5_123_776, 'density_decoder': 5_123_776,
                      'density_head': 145},
}
REFERENCE_CLASS_HEAD = {4: 725, 5: 870}
REFERENCE_TOTAL = {('resnext50_32x4d', 4): 41_006_630, ('resnext50_32x4d', 5): 41_006_775,
                   ('convnext_base', 4): 97_812_838, ('convnext_base', 5): 97_812_983}
REFERENCE_TENSORS = {'resnext50_32x4d': 223, 'convnext_base': 404}


def _abstract(encoder: str, num_classes: int, width: float = 1.0, dtype=jnp.float32) -> models.DualUNet:
  return nnx.eval_shape(lambda rngs: models.DualUNet(encoder=encoder, num_classes=num_classes,
                                                     width_multiplier=width, dtype=dtype, rngs=rngs),
                        nnx.Rngs(0))


@functools.cache
def _abstract_shared(encoder: str, num_classes: int, width: float = 1.0) -> models.DualUNet:
  """Cached abstract model for read-only inspection (a full-size abstract build costs seconds here)."""
  return _abstract(encoder, num_classes, width)


def _fill(state: nnx.State, seed: int = 0) -> nnx.State:
  """Concrete random values for an abstract state: He-normal kernels, BN/LN scales U(0.3, 1) (keeps
  eval-mode activations O(1) through the residual stacks, as in trained networks), non-zero biases/stats."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path[-2].key
    shape = leaf.shape
    if name == 'kernel':
      return rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[:-1])), shape).astype(np.float32)
    if name == 'scale':
      return (0.3 + 0.7 * rng.random(shape)).astype(np.float32)
    if name == 'var':
      return (1.0 + 0.2 * rng.random(shape)).astype(np.float32)
    if name == 'gamma':
      return np.full(shape, 0.5, np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(value, state)


def _tiny(encoder: str = 'resnext50_32x4d', num_classes: int = 3, dtype=jnp.float32, train: bool = False):
  """(graphdef, filled state) of a width-1/8 model in eval (default) or train mode."""
  model = _abstract(encoder, num_classes, TINY, dtype)
  model.train() if train else model.eval()
  graphdef, state = nnx.split(model)
  return graphdef, _fill(state)


def _forward(graphdef, state, images):
  """Compiled forward; returns (class_logits, density, new_state)."""

  def f(state, images):
    model = nnx.merge(graphdef, state)
    logits, density = model(images)
    return logits, density, nnx.state(model)

  return jax.jit(f).lower(state, images).compile(_FAST_COMPILE)(state, images)


def _images(shape, seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


@pytest.fixture(scope='module')
def resnext_tiny():
  return _tiny('resnext50_32x4d')


@pytest.fixture(scope='module')
def resnext_tiny_batch4(resnext_tiny):
  """Eval-mode forward of a [4, 64, 64, 3] batch on the default device (shared by several tests)."""
  graphdef, state = resnext_tiny
  images = _images((4, 64, 64, 3))
  logits, density, _ = _forward(graphdef, state, images)
  return images, logits, density


# ------------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize('encoder,num_classes', sorted(REFERENCE_TOTAL))
def test_parameter_counts_match_reference(encoder, num_classes):
  model = _abstract_shared(encoder, num_classes)
  counts = models.parameter_counts(model)
  expected = dict(REFERENCE_PARTS[encoder], class_head=REFERENCE_CLASS_HEAD[num_classes],
                  total=REFERENCE_TOTAL[(encoder, num_classes)])
  assert counts == expected
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(params) == REFERENCE_TENSORS[encoder]
  assert all(p.dtype == jnp.float32 for p in params)


@pytest.mark.parametrize('encoder', ['resnext50_32x4d', 'convnext_base'])
def test_width_multiplier_shrinks_about_60x(encoder):
  ratio = REFERENCE_TOTAL[(encoder, 5)] / models.parameter_counts(_abstract_shared(encoder, 5, TINY))['total']
  assert 50 < ratio < 70


def test_build_model_reads_config_and_rejects_bad_values():
  config = ml_collections.ConfigDict({'encoder': 'convnext_tiny', 'width_multiplier': TINY,
                                      'dtype': 'bfloat16'})
  model = models.abstract_model(config, 4)
  assert model.dtype == jnp.bfloat16 and model.class_head.out_features == 5
  assert [len(stage.blocks) for stage in model.encoder.stages] == [3, 3, 9, 3]
  assert model.encoder.stages[3].blocks[0].fc1.kernel.shape == (96, 384)  # dim 768 / 8, MLP ratio 4
  # bf16 compute, float32 parameters and BatchNorm statistics.
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match='dtype'):
    models.build_model(ml_collections.ConfigDict(dict(config, dtype='float16')), 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown encoder'):
    models.build_model(ml_collections.ConfigDict(dict(config, encoder='resnet18')), 4, rngs=nnx.Rngs(0))


def test_encoder_blocks_sets_the_depth_of_each_stage():
  for encoder, full in (('convnext_tiny', [3, 3, 9, 3]), ('resnext50_32x4d', [3, 4, 6, 3])):
    config = ml_collections.ConfigDict({'encoder': encoder, 'width_multiplier': TINY, 'dtype': 'float32',
                                        'encoder_blocks': (1, 2, 1, 1)})
    shallow = models.abstract_model(config, 3)
    deep = models.abstract_model(ml_collections.ConfigDict(dict(config, encoder_blocks=())), 3)
    depth = lambda m: ([len(s.blocks) for s in m.encoder.stages] if encoder.startswith('convnext') else
                       [len(getattr(m.encoder, f'layer{i}')) for i in range(1, 5)])
    assert depth(shallow) == [1, 2, 1, 1] and depth(deep) == full
    count = lambda m: models.parameter_counts(m)
    assert count(shallow)['encoder'] < count(deep)['encoder']
    assert count(shallow)['total'] - count(shallow)['encoder'] == count(deep)['total'] - count(deep)['encoder']
  with pytest.raises(ValueError, match='encoder_blocks must be 4'):
    models.abstract_model(ml_collections.ConfigDict(dict(config, encoder_blocks=(1, 1, 1))), 3)


def test_resnext_groups_and_decoder_layouts():
  full = _abstract_shared('resnext50_32x4d', 5)
  assert full.encoder.layer1[0].conv2.kernel.shape == (3, 3, 4, 128)  # 32 groups of 4 channels
  assert full.encoder.layer4[0].conv2.kernel.shape == (3, 3, 32, 1024)
  assert full.encoder.layer4[0].conv2.strides == (2, 2)
  assert [b.conv1.kernel.shape[2] for b in full.class_decoder.blocks] == [3072, 768, 384, 128, 32]
  tiny = _abstract_shared('resnext50_32x4d', 5, TINY)
  assert tiny.encoder.layer1[0].conv2.feature_group_count == 16  # width 16 < 32: one channel per group
  config = ml_collections.ConfigDict({'encoder': 'resnext50_32x4d', 'width_multiplier': TINY,
                                      'dtype': 'float32'})
  assert models.abstract_model(config, 5).encoder.layer1[0].conv2.feature_group_count == 16  # old config.json
  dense = models.abstract_model(ml_collections.ConfigDict(dict(config, cardinality=1)), 5)
  assert dense.encoder.layer1[0].conv2.feature_group_count == 1
  assert dense.encoder.layer1[0].conv2.kernel.shape == (3, 3, 16, 16)
  # Only the grouped 3x3 kernels grow: from in/groups input channels per output channel to all `in`.
  blocks = [b for layer in (tiny.encoder.layer1, tiny.encoder.layer2, tiny.encoder.layer3, tiny.encoder.layer4)
            for b in layer]
  extra = sum(9 * b.conv2.out_features * (b.conv2.in_features - b.conv2.kernel.shape[2]) for b in blocks)
  assert extra > 0
  assert models.parameter_counts(dense)['encoder'] - models.parameter_counts(tiny)['encoder'] == extra
  assert models.parameter_counts(dense)['class_decoder'] == models.parameter_counts(tiny)['class_decoder']
  with pytest.raises(ValueError, match='cardinality'):
    models.abstract_model(ml_collections.ConfigDict(dict(config, cardinality=0)), 5)
  cnx = _abstract_shared('convnext_base', 5)
  for decoder in (cnx.class_decoder, cnx.density_decoder):  # both decoders upsample x4 in the last block
    assert [b.upsample for b in decoder.blocks] == [2, 2, 2, 1, 4]
    assert [b.conv1.kernel.shape[2] for b in decoder.blocks] == [1536, 512, 256, 192, 32]


# ------------------------------------------------------------------------------------------------ init


def test_initialisers_follow_pytorch_bounds():
  key = jax.random.key(0)
  fan_in = 16 * 9
  shape = (3, 3, 16, 64)
  kaiming = unet_decoder.KAIMING_UNIFORM_RELU(key, shape)
  assert 0.9 * math.sqrt(6 / fan_in) < float(jnp.abs(kaiming).max()) <= math.sqrt(6 / fan_in)
  torch_default = unet_decoder.TORCH_DEFAULT_KERNEL(key, shape)
  assert 0.9 / math.sqrt(fan_in) < float(jnp.abs(torch_default).max()) <= 1 / math.sqrt(fan_in)
  bias = unet_decoder.torch_default_bias(fan_in)(key, (4096,))
  assert 0.9 / math.sqrt(fan_in) < float(jnp.abs(bias).max()) <= 1 / math.sqrt(fan_in)


def test_pad_to_multiple_reflects_and_handles_tiny_sides():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1)
  padded = dualunet.pad_to_multiple(jnp.broadcast_to(x, (1, 5, 32, 1)))
  assert padded.shape == (1, 32, 32, 1)
  np.testing.assert_array_equal(padded[0, :9, 0, 0], [0, 1, 2, 3, 4, 3, 2, 1, 0])
  assert dualunet.pad_to_multiple(jnp.ones((1, 1, 1, 3))).shape == (1, 32, 32, 3)


# ------------------------------------------------------------------------------------------------ forward


def test_output_shapes_and_dtypes(resnext_tiny_batch4):
  _, logits, density = resnext_tiny_batch4
  assert logits.shape == (4, 64, 64, 4) and logits.dtype == jnp.float32
  assert density.shape == (4, 64, 64) and density.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all()) and bool(jnp.isfinite(density).all())
  assert float(logits.std()) > 1e-3  # not a constant map


@pytest.mark.parametrize('height,width', [(67, 45), (100, 130)])
def test_odd_input_sizes_give_input_sized_outputs(resnext_tiny, height, width):
  graphdef, state = resnext_tiny
  logits, density, _ = _forward(graphdef, state, _images((1, height, width, 3)))
  assert logits.shape == (1, height, width, 4) and density.shape == (1, height, width)
  assert bool(jnp.isfinite(logits).all())


def test_uint8_input_is_scaled_and_convnext_runs():
  graphdef, state = _tiny('convnext_tiny', num_classes=2)
  images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  logits, density, _ = _forward(graphdef, state, images)
  assert logits.shape == (2, 32, 32, 3) and density.shape == (2, 32, 32)
  logits_f, density_f, _ = _forward(graphdef, state, images.astype(jnp.float32) / 255.0)
  np.testing.assert_allclose(logits, logits_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(density, density_f, rtol=1e-5, atol=1e-5)


def test_bfloat16_agrees_with_float32(resnext_tiny, resnext_tiny_batch4):
  """Same float32 parameters, bf16 compute: max |diff| <= 5% of the float32 output's max |value| (bf16 has an
  8-bit mantissa, ~0.4% per rounding, accumulated over ~70 layers; measured ~1.1-1.7%), and the argmax class
  agrees on >= 95% of pixels (measured 100%)."""
  _, state = resnext_tiny
  images, logits32, density32 = resnext_tiny_batch4
  model16 = _abstract('resnext50_32x4d', 3, TINY, jnp.bfloat16)
  model16.eval()
  graphdef16, _ = nnx.split(model16)
  logits16, density16, _ = _forward(graphdef16, state, images)
  assert logits16.dtype == jnp.float32 and density16.dtype == jnp.float32
  for ref, low in ((logits32, logits16), (density32, density16)):
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(ref - low).max()) <= 0.05 * scale
  assert float((logits16.argmax(-1) == logits32.argmax(-1)).mean()) >= 0.95


def test_sharded_forward_matches_single_device(resnext_tiny, resnext_tiny_batch4):
  if jax.device_count() < 4:
    pytest.skip('needs 4 devices (tests/conftest.py sets --xla_force_host_platform_device_count=4)')
  graphdef, state = resnext_tiny
  images, logits, density = resnext_tiny_batch4
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  replicated_state = jax.device_put(state, NamedSharding(mesh, P()))
  logits_s, density_s, _ = _forward(graphdef, replicated_state, sharded_images)
  assert logits_s.sharding.num_devices == 4
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(density_s, density, rtol=1e-5, atol=1e-5)


def test_train_mode_uses_batch_statistics_and_updates_running_averages(resnext_tiny, resnext_tiny_batch4):
  _, state = resnext_tiny
  images, logits_eval, _ = resnext_tiny_batch4
  model = _abstract('resnext50_32x4d', 3, TINY)
  model.train()
  graphdef_train, _ = nnx.split(model)
  logits_train, _, new_state = _forward(graphdef_train, state, images)
  assert logits_train.shape == logits_eval.shape
  assert float(jnp.abs(logits_train - logits_eval).max()) > 1e-3
  old = nnx.state(nnx.merge(graphdef_train, state), nnx.BatchStat)
  new = nnx.state(nnx.merge(graphdef_train, new_state), nnx.BatchStat)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]
  assert all(changed)  # every BatchNorm mean/var moved (momentum 0.9)
  params_old = jax.tree.leaves(nnx.state(nnx.merge(graphdef_train, state), nnx.Param))
  params_new = jax.tree.leaves(nnx.state(nnx.merge(graphdef_train, new_state), nnx.Param))
  assert all(np.array_equal(a, b) for a, b in zip(params_old, params_new))


def test_fill_random_gives_a_usable_model_without_initialisers():
  """`fill_random` (benchmarks, plumbing tests) fills every value of an abstract model with finite numbers."""
  config = ml_collections.ConfigDict({'encoder': 'resnext50_32x4d', 'width_multiplier': 0.125, 'dtype': 'float32'})
  model = models.fill_random(models.abstract_model(config, 3), seed=1)
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.Array) and bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  model.eval()
  logits, density = model(jnp.zeros((1, 32, 32, 3), jnp.float32))
  assert logits.shape == (1, 32, 32, 4) and density.shape == (1, 32, 32)
