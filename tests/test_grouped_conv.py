"""The CPU path of grouped / depthwise convolutions gives lax's outputs and gradients, for every grouped
convolution the models use (shapes, strides, paddings, layouts) and for whole models at their input sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualunet_jax.models import grouped_conv

NHWC = ('NHWC', 'HWIO', 'NHWC')

# (name, input NHWC, kernel, groups, out channels, strides, padding, dimension numbers)
CASES = [
    ('convnext depthwise 7x7', (2, 20, 20, 16), 7, 16, 16, (1, 1), ((3, 3), (3, 3)), NHWC),
    ('depthwise SAME string', (2, 13, 11, 8), 3, 8, 8, (1, 1), 'SAME', NHWC),
    ('hovernet sobel 5x5, 2 groups', (2, 24, 24, 2), 5, 2, 2, (1, 1), ((2, 2), (2, 2)), NHWC),
    ('hovernet dense unit 5x5, 4 groups, valid', (2, 18, 18, 16), 5, 4, 8, (1, 1), 'VALID', NHWC),
    ('histonext convcam 5x5, 12 groups', (2, 16, 16, 24), 5, 12, 24, (1, 1), 'VALID', NHWC),
    ('resnext 3x3, 32 groups', (2, 12, 12, 64), 3, 32, 64, (1, 1), ((1, 1), (1, 1)), NHWC),
    ('resnext 3x3, 8 groups, stride 2', (2, 15, 15, 32), 3, 8, 32, (2, 2), ((1, 1), (1, 1)), NHWC),
    ('depthwise stride 2 (split path)', (2, 16, 16, 8), 3, 8, 8, (2, 2), ((1, 1), (1, 1)), NHWC),
    ('depthwise x2 multiplier (split path)', (2, 12, 12, 4), 3, 4, 8, (1, 1), 'SAME', NHWC),
    ('NCHW / OIHW layout, 4 groups', (2, 16, 10, 10), 3, 4, 8, (1, 1), ((1, 1), (1, 1)), ('NCHW', 'OIHW', 'NCHW')),
    ('NCHW depthwise', (2, 8, 10, 10), 3, 8, 8, (1, 1), ((1, 1), (1, 1)), ('NCHW', 'OIHW', 'NCHW')),
]


def _operands(shape, kernel, groups, out_channels, dn):
  spec = jax.lax.conv_dimension_numbers(shape, (1,) * len(shape), dn)
  in_channels = shape[spec.lhs_spec[1]]
  rhs_shape = [0] * 4
  rhs_shape[spec.rhs_spec[0]], rhs_shape[spec.rhs_spec[1]] = out_channels, in_channels // groups
  rhs_shape[spec.rhs_spec[2]] = rhs_shape[spec.rhs_spec[3]] = kernel
  k1, k2 = jax.random.split(jax.random.key(len(shape) + kernel + groups))
  return jax.random.normal(k1, shape), jax.random.normal(k2, tuple(rhs_shape))


@pytest.mark.parametrize('name,shape,kernel,groups,out_channels,strides,padding,dn', CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_equal_lax(name, shape, kernel, groups, out_channels, strides, padding, dn):
  del name
  lhs, rhs = _operands(shape, kernel, groups, out_channels, dn)

  def loss(lhs, rhs):
    y = grouped_conv.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=dn,
                                          feature_group_count=groups)
    return jnp.sum(jnp.sin(y)), y  # a non-linear loss: the gradients depend on every output

  results = {}
  for impl in ('xla', 'split'):
    with grouped_conv.implementation(impl):
      (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
    results[impl] = (y, grads)
  (y_xla, g_xla), (y_fast, g_fast) = results['xla'], results['split']
  assert y_fast.shape == y_xla.shape and y_fast.dtype == y_xla.dtype
  np.testing.assert_allclose(y_fast, y_xla, rtol=1e-5, atol=1e-4)
  for a, b in zip(g_fast, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_the_cpu_path_is_taken_on_cpu_and_lax_elsewhere():
  lhs, rhs = _operands((1, 8, 8, 4), 3, 4, 4, NHWC)
  conv = lambda: jax.make_jaxpr(lambda a, b: grouped_conv.conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=NHWC, feature_group_count=4))(lhs, rhs)
  groups_in = lambda jaxpr: [e.params['feature_group_count'] for e in jaxpr.eqns
                             if e.primitive.name == 'conv_general_dilated']
  assert jax.default_backend() == 'cpu'
  with grouped_conv.implementation('auto'):  # the tests' process default is 'xla' (tests/child_env.py)
    assert groups_in(conv()) == []  # auto on CPU: depthwise as shifted products, no convolution
  with grouped_conv.implementation('xla'):
    assert groups_in(conv()) == [4]
  with pytest.raises(ValueError, match='expected one of'):
    with grouped_conv.implementation('fast'):
      pass


def _forward(model, x):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


@pytest.mark.parametrize('which', ['dualunet_resnext', 'dualunet_convnext', 'hovernet_fast', 'histonext', 'conic'])
def test_models_give_the_same_maps_with_either_path(which):
  """Whole models at their real input sizes (tiny widths): every grouped convolution inside, composed."""
  from configs import conic, consep, histonext_consep, hovernet_consep
  from dualunet_jax import methods, models
  if which.startswith('dualunet'):
    config = consep.get_config()
    config.model.width_multiplier = 0.125
    config.model.cardinality = 8  # grouped, as the full model's 32 (tiny widths cannot hold 32 groups)
    if which == 'dualunet_convnext':
      config.model.encoder = 'convnext_tiny'
    size = 256
  elif which == 'hovernet_fast':
    config = hovernet_consep.get_config('fast')
    config.model.width_multiplier = 0.125
    size = 256
  elif which == 'histonext':
    config = histonext_consep.get_config()
    config.model.width_multiplier = 0.125
    size = 270
  else:
    config = conic.get_config('consep')
    config.model.width_multiplier = 0.125
    config.model.cardinality = 8
    size = 256
  method = methods.get(config)
  model = models.fill_random(method.abstract_model(config, 4), seed=3)
  model.eval()
  x = jax.random.uniform(jax.random.key(0), (1, size, size, 3), minval=0, maxval=255).astype(jnp.uint8)
  outs = {}
  for impl in ('xla', 'split'):
    with grouped_conv.implementation(impl):
      outs[impl] = _forward(model, x)
  leaves = jax.tree_util.tree_leaves_with_path(outs['xla'])
  assert leaves and jax.tree.structure(outs['split']) == jax.tree.structure(outs['xla'])
  for (path, b), a in zip(leaves, jax.tree.leaves(outs['split'])):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1.0)
    assert np.abs(a - b).max() <= 1e-4 * scale, \
        f'{which} {jax.tree_util.keystr(path)}: max |diff| {np.abs(a - b).max():.3g}'
