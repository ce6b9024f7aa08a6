"""Binary methods 'unet' and 'unetpp': models (shapes, full-size counts), BCE training, connected components."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.ndimage as ndi
from flax import nnx

from dualunet_jax import methods, models, postprocess_binary
from dualunet_jax.data import consep
from dualunet_jax.models.unet import UNet
from dualunet_jax.models.unetpp import UNetPlusPlus


def _params(module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _abstract(build) -> int:
  return _params(nnx.eval_shape(build, nnx.Rngs(0)))


def _tiny(method, config):
  """A tiny model with host-drawn He-normal weights (`models.fill_random`): the real initialisation compiles
  one XLA program per parameter shape, most of a test's time on a small CPU."""
  return models.fill_random(method.abstract_model(config, 1))


def _config(method: str, **model) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'method': method,
      'model': dict({'width_multiplier': 0.125, 'batch_norm': True, 'dtype': 'float32'}, **model),
      'postprocess': {'fg_threshold': 0.5, 'split': False, 'split_min_distance': 3, 'relabel_connectivity': 1}})


def test_full_size_parameter_counts():
  # Known counts of the reference implementations (module docstrings of models/unet.py and unetpp.py).
  counts = {
      'unet 64 rgb': _abstract(lambda r: UNet(rngs=r)),
      'unet 64 rgb bn': _abstract(lambda r: UNet(batch_norm=True, rngs=r)),
      'unet 32 gray (Zhou)': _abstract(lambda r: UNet(base_channels=32, in_channels=1, rngs=r)),
      'unet++ 32 gray (Zhou)': _abstract(lambda r: UNetPlusPlus(in_channels=1, rngs=r)),
      'unet++ 32 rgb': _abstract(lambda r: UNetPlusPlus(rngs=r)),
  }
  print(counts)
  assert counts == {'unet 64 rgb': 31_031_745, 'unet 64 rgb bn': 31_037_633, 'unet 32 gray (Zhou)': 7_759_521,
                    'unet++ 32 gray (Zhou)': 9_041_601, 'unet++ 32 rgb': 9_042_177}


@pytest.mark.parametrize('name,model,channels', [('unet', {}, 1), ('unetpp', {}, 1),
                                                 ('unetpp', {'deep_supervision': True}, 4)])
def test_tiny_models_any_size(name, model, channels):
  net = methods.get(name).abstract_model(_config(name, **model), 1)
  images = jax.ShapeDtypeStruct((2, 40, 37, 3), jnp.uint8)  # padded to 48 x 48 inside and cropped back
  logits = nnx.eval_shape(lambda m, x: m(x), net, images)
  assert logits.shape == (2, 40, 37, channels) and logits.dtype == jnp.float32


def test_maps_of_a_deeply_supervised_unetpp():
  method = methods.get('unetpp')
  net = _tiny(method, _config('unetpp', deep_supervision=True))
  net.eval()
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40, 37, 3)), jnp.uint8)
  logits = nnx.jit(lambda m, x: m(x))(net, images)
  maps = method.maps(logits)
  assert maps['class_probs'].shape == (2, 40, 37, 2) and maps['fg'].shape == (2, 40, 37, 1)
  np.testing.assert_allclose(maps['fg'][..., 0], jax.nn.sigmoid(logits).mean(-1), atol=1e-6)  # "accurate mode"
  np.testing.assert_allclose(maps['class_probs'][..., 1], maps['fg'][..., 0])
  np.testing.assert_allclose(maps['class_probs'].sum(-1), 1.0, atol=1e-6)


def test_build_refuses_multiclass_dataset():
  with pytest.raises(ValueError, match='binary'):
    methods.get('unet').build_model(_config('unet'), 4, rngs=nnx.Rngs(0))


def test_bce_decreases_on_a_tiny_batch():
  from dualunet_jax.data import synthetic
  method = methods.get('unet')
  config = _config('unet')
  records = synthetic.make_records(2, seed=1, size=32, num_classes=1)
  targets = [method.make_targets(r['instance_map'], r['instance_classes'], config) for r in records]
  batch = {'image': jnp.asarray(np.stack([r['image'] for r in records])),
           'class_map': jnp.asarray(np.stack([t['class_map'] for t in targets]))}
  assert set(np.unique(batch['class_map'])) == {0, 1}
  model = _tiny(method, config)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    (loss, _), grads = nnx.value_and_grad(lambda m: method.loss(m(batch['image']), batch, None, config),
                                          has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(12)]
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize('k', [1, 2, 3])
def test_postprocess_on_real_masks_gives_connected_components(fixtures_dir, k):
  record = consep.read_tile(fixtures_dir / 'imgs' / f'patch{k}.png', fixtures_dir / 'masks' / f'patch{k}.mat')
  inst = record['instance_map']
  method = methods.get('unet')
  maps = method.oracle_maps(inst, record['instance_classes'], 1, _config('unet'))
  out = method.postprocess_fn(maps, **method.postprocess_kwargs(_config('unet')))
  expected, n = ndi.label(inst > 0)  # 4-connected components, raster order
  np.testing.assert_array_equal(out.instance_map, expected)
  assert out.instance_map.dtype == np.int32 and out.num_instances == n
  assert n <= int(inst.max())  # touching nuclei merge: the ceiling of plain components
  np.testing.assert_array_equal(out.classes, np.ones(n, np.int32))
  np.testing.assert_array_equal(out.counts, [n])
  np.testing.assert_array_equal(out.class_map, (inst > 0).astype(np.int32))
  want = np.array(ndi.center_of_mass(np.ones_like(inst), expected, np.arange(1, n + 1)), np.float32)
  np.testing.assert_allclose(out.centroids, want.reshape(n, 2), atol=1e-3)
  # The optional split keeps the mask, renumbers in raster order and never merges.
  split = postprocess_binary.postprocess_binary_maps(maps, split=True)
  np.testing.assert_array_equal(split.instance_map > 0, inst > 0)
  assert split.num_instances >= n
  firsts = [np.flatnonzero(split.instance_map.ravel() == i)[0] for i in range(1, split.num_instances + 1)]
  assert firsts == sorted(firsts)
