"""Pre-activation ResNet-50 encoder of HoVer-Net (vqdang/hover_net `net_desc.py` / `net_utils.py`), NHWC, NNX.

Layout (official module -> attribute here; `convert_hovernet.py` maps the state-dict keys):

  conv0./ (7x7, 3 -> 64, no bias), conv0.bn, ReLU    -> conv0, conv0_bn
      'original': valid convolution (270 -> 264); 'fast': TF 'same' zero padding (3 each side).
  d0..d3 `ResidualBlock` (3, 4, 6, 3 units; channels (64, 64, 256) ... (512, 512, 2048); stride 1, 2, 2, 2)
      unit: [preact/bn, ReLU] -> conv1 1x1 -> conv1/bn, ReLU -> TF-same pad -> conv2 3x3 (stride on unit 0)
            -> conv2/bn, ReLU -> conv3 1x1; unit 0 has NO pre-activation (the previous block ends with its
            own BN-ReLU, `blk_bna`).
      residual: shortcut = 1x1 conv (stride, no padding) of the block input when channels or stride change,
            else the input; after each unit `x = unit(x) + shortcut; shortcut = x`.
      block end: blk_bna.bn, ReLU                     -> units[i], shortcut, blk_bna
  conv_bot (1x1, 2048 -> 1024, no bias, no BN after)  -> conv_bot

TF 'same' padding (`TFSamepaddingLayer`): pad = max(k - s, 0) when the side is a multiple of the stride, else
max(k - side % s, 0); the smaller half goes first (top/left). For the stride-2 3x3 convolutions on the even
sides this model always sees, that is 0 before and 1 after, so output row i reads input rows 2i..2i+2 while
the 1x1 stride-2 shortcut reads row 2i: the official misalignment, kept. The official computes the pad from
the height only; here each axis uses its own side (identical for the sizes HoVerNet feeds it).

All convolutions are bias-free; BatchNorm eps 1e-5, Flax momentum 0.9 (= PyTorch 0.1); kaiming-normal
fan-out kernels as the official `weights_init`. Parameters are float32, `dtype` is the compute dtype.
`width_multiplier` scales every channel count to a multiple of 4 (`scale_channels`): 1/8 gives a tiny test
model whose dense-block group convolutions (4 groups) stay valid.

The official `freeze` flag (phase 1 trains with d0's units and d1..d3 frozen) is a training-loop matter and
not part of this module.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import grouped_conv, resnext

CHANNEL_DIVISOR = 4  # the dense blocks' 4-group convolutions need multiples of 4
STEM = 64
BLOCKS = (3, 4, 6, 3)
UNIT_CHANNELS = ((64, 64, 256), (128, 128, 512), (256, 256, 1024), (512, 512, 2048))
STRIDES = (1, 2, 2, 2)
BOTTLENECK = 1024  # conv_bot output channels
MODES = ('original', 'fast')


def scale_channels(channels: int, width_multiplier: float) -> int:
  """round(channels * w) to a multiple of 4 (at least 4); identity at w = 1."""
  if width_multiplier == 1.0:
    return channels
  return max(CHANNEL_DIVISOR, int(round(channels * width_multiplier / CHANNEL_DIVISOR)) * CHANNEL_DIVISOR)


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(before, after) zero padding of TF 'same' for one axis of `size` pixels."""
  if size % stride == 0:
    pad = max(kernel - stride, 0)
  else:
    pad = max(kernel - size % stride, 0)
  return pad // 2, pad - pad // 2


def tf_same_pad(x: jax.Array, kernel: int, stride: int = 1) -> jax.Array:
  """x: [B, H, W, C] zero-padded for a TF-'same' convolution of `kernel` and `stride`."""
  ph = tf_same_pads(x.shape[1], kernel, stride)
  pw = tf_same_pads(x.shape[2], kernel, stride)
  return jnp.pad(x, ((0, 0), ph, pw, (0, 0)))


def conv(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, dtype, rngs: nnx.Rngs,
         use_bias: bool = False) -> nnx.Conv:
  """A valid (unpadded) convolution with the official kaiming-normal fan-out initialisation."""
  return grouped_conv.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding='VALID',
                           feature_group_count=groups, use_bias=use_bias, kernel_init=resnext.CONV_INIT,
                           bias_init=jax.nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return resnext.batch_norm(features, dtype, rngs)


class ResidualUnit(nnx.Module):
  """[BN-ReLU] -> 1x1 -> BN-ReLU -> 3x3 (TF same, stride) -> BN-ReLU -> 1x1; no pre-activation on unit 0."""

  def __init__(self, cin: int, channels: Sequence[int], stride: int, first: bool, *, dtype, rngs: nnx.Rngs):
    c1, c2, c3 = channels
    self.preact = None if first else batch_norm(cin, dtype, rngs)
    self.conv1 = conv(cin, c1, 1, dtype=dtype, rngs=rngs)
    self.conv1_bn = batch_norm(c1, dtype, rngs)
    self.conv2 = conv(c1, c2, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.conv2_bn = batch_norm(c2, dtype, rngs)
    self.conv3 = conv(c2, c3, 1, dtype=dtype, rngs=rngs)
    self.stride = stride

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.preact is not None:
      x = jax.nn.relu(self.preact(x))
    x = jax.nn.relu(self.conv1_bn(self.conv1(x)))
    x = jax.nn.relu(self.conv2_bn(self.conv2(tf_same_pad(x, 3, self.stride))))
    return self.conv3(x)


class ResidualBlock(nnx.Module):
  """The official `ResidualBlock`: units with running residual sums, then BN-ReLU (`blk_bna`)."""

  def __init__(self, cin: int, channels: Sequence[int], count: int, stride: int, *, dtype, rngs: nnx.Rngs):
    units = []
    unit_in = cin
    for i in range(count):
      units.append(ResidualUnit(unit_in, channels, stride if i == 0 else 1, i == 0, dtype=dtype, rngs=rngs))
      unit_in = channels[-1]
    self.units = nnx.List(units)
    self.shortcut = (conv(cin, channels[-1], 1, stride=stride, dtype=dtype, rngs=rngs)
                     if cin != channels[-1] or stride != 1 else None)
    self.blk_bna = batch_norm(channels[-1], dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.shortcut is None else self.shortcut(x)
    for unit in self.units:
      x = unit(x) + shortcut
      shortcut = x
    return jax.nn.relu(self.blk_bna(x))


class PreActResNet50(nnx.Module):
  """conv0 + d0..d3 + conv_bot. Returns the four features the HoVer-Net decoders read.

  Args:
    mode: 'original' (valid 7x7 stem) or 'fast' (TF-same stem).
    width_multiplier: channel scale (`scale_channels`); 1.0 is the official encoder (25,597,504 parameters
      including conv_bot).
    dtype: compute dtype.
    blocks: residual units per stage; the official (3, 4, 6, 3) by default (fewer: quick experiments and tests;
      the units are same-padded, so the geometry and margins do not change).
  """

  def __init__(self, *, mode: str = 'original', width_multiplier: float = 1.0, dtype=jnp.float32,
               blocks: Sequence[int] = BLOCKS, rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    counts = tuple(blocks)
    if len(counts) != 4 or min(counts) < 1:
      raise ValueError(f'blocks must be 4 unit counts >= 1, got {counts}')
    self.mode = mode
    s = lambda c: scale_channels(c, width_multiplier)
    stem = s(STEM)
    self.conv0 = conv(3, stem, 7, dtype=dtype, rngs=rngs)
    self.conv0_bn = batch_norm(stem, dtype, rngs)
    cin = stem
    blocks = []
    for count, channels, stride in zip(counts, UNIT_CHANNELS, STRIDES):
      channels = tuple(s(c) for c in channels)
      blocks.append(ResidualBlock(cin, channels, count, stride, dtype=dtype, rngs=rngs))
      cin = channels[-1]
    self.d0, self.d1, self.d2, self.d3 = blocks
    self.conv_bot = conv(cin, s(BOTTLENECK), 1, dtype=dtype, rngs=rngs)
    # Channels of (d0, d1, d2, conv_bot(d3)): what the decoders add their upsampled features to.
    self.out_channels = (s(UNIT_CHANNELS[0][-1]), s(UNIT_CHANNELS[1][-1]), s(UNIT_CHANNELS[2][-1]), s(BOTTLENECK))

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, S, S', 3] in [0, 1] (compute dtype) -> [d0, d1, d2, d3] at strides 1, 2, 4, 8 of the stem output
    (stem output = S - 6 in 'original', S in 'fast')."""
    if self.mode == 'fast':
      x = tf_same_pad(x, 7, 1)
    d0 = self.d0(jax.nn.relu(self.conv0_bn(self.conv0(x))))
    d1 = self.d1(d0)
    d2 = self.d2(d1)
    d3 = self.conv_bot(self.d3(d2))
    return [d0, d1, d2, d3]
