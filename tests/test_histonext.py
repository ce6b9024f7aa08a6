"""HistoNeXt (models/histonext.py): parameter counts of the four variants (abstract) against a closed-form
restatement of the paper's decoder and against the paper's table, dense-block channel arithmetic, ConvCAM
attention, the 270 -> 80 geometry and the output contract at a tiny width."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualunet_jax.models import dualunet
from dualunet_jax.models import histonext
from dualunet_jax.models.decoder_blocks import DenseBlock
from model_helpers import abstract
from model_helpers import filled
from model_helpers import forward

K = 5  # CoNSeP with the paper's 5 merged classes: TP has 6 channels
TINY = 1 / 8
# timm convnext_* without head (stem, stages); Base as tests/test_models.py's reference.
CONVNEXT_TRUNK = {'tiny': 27_818_592, 'base': 87_564_416, 'large': 196_227_264, 'xlarge': 348_143_872}
# (encoder + NP + HV + TP) of this implementation, and the paper's (parameters M, GFLOPs at 270²).
TOTALS = {'tiny': 82_510_762, 'base': 186_684_298, 'large': 414_896_458, 'xlarge': 744_490_762}
PAPER = {'tiny': (82.6, 33.7), 'base': (184.8, 69.5), 'large': (414.0, 155.7), 'xlarge': (734.4, 276.0)}


def np_branch_params(dims, r: float, out: int = 2) -> int:
  """The paper's NP/HV branch, counted by hand: per stage a 3x3 transposed conv (to the skip's channels, or to
  the previous growth where there is no skip), concat, `layers` x [BN + 3x3 conv to k], closing BN; then a 3x3
  transposed conv to the last k, BN, 1x1 conv with bias."""
  c0, c1, c2, c3 = dims
  growth = [dualunet.scale_channels(k, r) for k in (512, 256, 128, 64)]
  total, cin = 0, c3
  for layers, k, skip, prev in zip((2, 4, 6, 4), growth, (c2, c1, c0, 0), [None] + growth):
    up = skip or prev
    total += cin * up * 9
    c = up + skip
    for _ in range(layers):
      total += 2 * c + c * k * 9
      c += k
    total += 2 * c
    cin = c
  return total + cin * growth[-1] * 9 + 2 * growth[-1] + growth[-1] * out + out


def tp_branch_params(dims, r: float, out: int = K + 1) -> int:
  """Per stage a 5x5 transposed conv, `depth` ConvCAMs (grouped 5x5, BN, 1x1 C -> C/16 -> C without bias), concat
  the next level; then a 5x5 transposed conv, BN, 1x1 conv with bias."""
  c0, c1, c2, c3 = dims
  widths = [dualunet.scale_channels(w, r) for w in (512, 256, 128, 64)]
  total, cin = 0, c3
  for depth, w, skip in zip((1, 2, 3, 4), widths, (c2, c1, c0, 0)):
    total += cin * w * 25
    total += depth * (w * w // math.gcd(12, w) * 25 + 2 * w + 2 * w * (w // 16))
    cin = w + skip
  return total + cin * widths[-1] * 25 + 2 * widths[-1] + widths[-1] * out + out


@pytest.mark.parametrize('variant', list(histonext.VARIANTS))
def test_branch_parameter_counts_follow_the_paper_arithmetic(variant):
  depths, dims, r = histonext.VARIANTS[variant]
  growth = tuple(dualunet.scale_channels(k, r) for _, k in histonext.DENSE_STAGES)
  widths = tuple(dualunet.scale_channels(w, r) for w in histonext.TP_WIDTHS)
  np_branch = abstract(lambda rngs: histonext.DenseBranch(dims, growth, 2, dtype=jnp.float32, rngs=rngs))
  tp_branch = abstract(lambda rngs: histonext.TypeBranch(dims, widths, K + 1, dtype=jnp.float32, rngs=rngs))
  n, t = dualunet.count_params(np_branch), dualunet.count_params(tp_branch)
  assert (n, t) == (np_branch_params(dims, r), tp_branch_params(dims, r))
  total = CONVNEXT_TRUNK[variant] + 2 * n + t
  assert total == TOTALS[variant]
  paper_m, _ = PAPER[variant]
  print(f'{variant}: {total / 1e6:.2f} M parameters, paper {paper_m} M')
  assert abs(total / 1e6 - paper_m) / paper_m < 0.015


def test_full_size_tiny_parts_by_abstract_evaluation():
  model = abstract(lambda rngs: histonext.HistoNeXt(variant='tiny', num_classes=K, rngs=rngs))
  counts = histonext.parameter_counts(model)
  assert counts['encoder'] == CONVNEXT_TRUNK['tiny'] and counts['total'] == TOTALS['tiny']
  assert counts['np_branch'] == counts['hv_branch']
  assert model.np_branch.blocks[0].units[0].layers[0].conv.out_features == 384  # k 512 x 0.75
  assert model.tp_branch.cams[0][0].conv.feature_group_count == 12


def test_dense_block_channel_arithmetic_and_valid_crops():
  """3 layers of k = 8 on 16 channels: 16 + 3 x 8 = 40 out, 1 pixel lost per side and layer; the block input
  passes through the concatenations unchanged (centre-cropped)."""
  block = filled(lambda rngs: DenseBlock(16, ((3, 8, 1),), 3, valid=True, final_bn_relu=False,
                                         dtype=jnp.float32, rngs=rngs))
  block.eval()
  assert [u.layers[0].bn.num_features for u in block.units] == [16, 24, 32]
  assert (block.out_channels, block.margin) == (40, 3)
  x = np.random.default_rng(0).normal(size=(1, 12, 14, 16)).astype(np.float32)
  y, _ = forward(block, x)
  assert y.shape == (1, 6, 8, 40)
  np.testing.assert_array_equal(y[..., :16], x[:, 3:9, 3:11])


def test_convcam_gates_each_channel_by_mean_plus_max_pooling():
  cam = filled(lambda rngs: histonext.ConvCAM(48, dtype=jnp.float32, rngs=rngs), seed=3)
  cam.eval()
  assert cam.conv.feature_group_count == 12 and cam.attention.fc1.out_features == 3
  assert not cam.attention.fc1.use_bias
  x = np.random.default_rng(1).normal(size=(2, 9, 9, 48)).astype(np.float32)
  out, _ = forward(cam, x)
  y, _ = forward(nnx.Sequential(cam.conv, cam.bn, jax.nn.relu), x)  # the features before the attention
  y = np.asarray(y)
  pooled = y.mean(axis=(1, 2)) + y.max(axis=(1, 2))
  w1 = np.asarray(cam.attention.fc1.kernel[...])[0, 0]
  w2 = np.asarray(cam.attention.fc2.kernel[...])[0, 0]
  alpha = 1 / (1 + np.exp(-(np.maximum(pooled @ w1, 0) @ w2)))
  assert out.shape == (2, 5, 5, 48)
  np.testing.assert_allclose(out, y * alpha[:, None, None, :], rtol=1e-5, atol=1e-6)
  wide = abstract(lambda rngs: histonext.ConvCAM(64, dtype=jnp.float32, rngs=rngs))
  assert wide.conv.feature_group_count == 4  # gcd(12, 64)


def test_grid_bookkeeping():
  f3 = histonext.Grid.encoder_level(32)
  assert f3 == histonext.Grid(32, 15.5)
  assert f3.transposed(3) == histonext.Grid(16, -0.5)  # 2j + 1 sits on coarse pixel j
  assert histonext.Grid(8, 3.5).transposed(5) == histonext.Grid(4, -4.5)
  assert histonext.Grid(4, 1.5).valid(6) == histonext.Grid(4, 25.5)
  assert histonext.Grid(16, -0.5).index_of(7.5) == 1  # half a pixel rounds up


@functools.cache
def _tiny() -> histonext.HistoNeXt:
  model = filled(lambda rngs: histonext.HistoNeXt(variant='tiny', num_classes=K, width_multiplier=TINY,
                                                  rngs=rngs))
  model.eval()
  return model


@pytest.mark.parametrize('size', [(191, 191), (270, 270), (271, 301)])
def test_output_is_input_minus_95_per_side(size):
  model = _tiny()
  images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x), model, images)
  h, w = size[0] - 190, size[1] - 190
  assert model.margin == histonext.MARGIN == 95
  assert {k: v.shape for k, v in out.items()} == {'np': (1, h, w, 2), 'hv': (1, h, w, 2), 'tp': (1, h, w, K + 1)}


def test_forward_uint8_is_finite_float32_and_small_inputs_are_refused():
  model = _tiny()
  images = np.random.default_rng(0).integers(0, 256, (1, 192, 200, 3), dtype=np.uint8)
  out, _ = forward(model, images)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      'np': ((1, 2, 10, 2), jnp.float32), 'hv': ((1, 2, 10, 2), jnp.float32), 'tp': ((1, 2, 10, K + 1), jnp.float32)}
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  with pytest.raises(ValueError, match='needs H, W > 190'):
    model(jnp.zeros((1, 190, 256, 3)))
