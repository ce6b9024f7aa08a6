"""ResNeXt-50 32x4d encoder, torchvision v1.5 layout (stride on the grouped 3x3), NHWC, Flax NNX.

Reference: `../shared/reference/dualunet_reference.md` §1.3 (architecture) and §9 (checkpoint keys).

Attribute path (this module, under `DualUNet.encoder`) -> reference torch key (under `encoder.`):

  conv1.kernel [7, 7, 3, 64]                 <- conv1.weight [64, 3, 7, 7]  (OIHW -> HWIO: transpose 2,3,1,0)
  bn1.{scale, bias}                          <- bn1.{weight, bias}
  bn1.{mean, var}  (nnx.BatchStat)           <- bn1.{running_mean, running_var}  (num_batches_tracked dropped)
  layer{L}[b].conv{1,2,3}.kernel             <- layer{L}.{b}.conv{1,2,3}.weight  (conv2 is grouped: HWIO with
                                                I = width / groups, same transpose)
  layer{L}[b].bn{1,2,3}.*                    <- layer{L}.{b}.bn{1,2,3}.*
  layer{L}[0].downsample_conv.kernel         <- layer{L}.0.downsample.0.weight
  layer{L}[0].downsample_bn.*                <- layer{L}.0.downsample.1.*

  layer{L}[b].se.fc{1,2}.{kernel, bias}      <- layer{L}.{b}.se.fc{1,2}.{weight, bias}  (SE-ResNeXt only:
                                                `se_reduction` > 0; timm `seresnext*` layout, see seresnext.py)

`layer{L}` is an `nnx.List`, so block b has the state path ('layer{L}', b, ...). All convolutions are
bias-free; BatchNorm eps 1e-5, Flax momentum 0.9 (= PyTorch momentum 0.1). Flax updates the running variance
with the biased batch variance (PyTorch: unbiased); this only matters while training.

Width multiplier: `stem_width` and `planes` are passed already scaled by the caller (`DualUNet`). The grouped
3x3 of a block is `width = 2 * planes` wide (torchvision: planes * base_width 4 / 64 * groups 32) and uses
`groups = gcd(cardinality, width)` groups: exactly 32 for the full model, and for narrow test models
(width < 32, e.g. 16 at width_multiplier 1/8) one channel per group, so the group structure stays valid and
every convolution shrinks by the square of the multiplier.

Cardinality: 32 is ResNeXt (and the only value the released/ImageNet weights fit). `cardinality=1` makes the
3x3 dense (a ResNet-50 bottleneck with the ResNeXt widths). It was introduced for tiny CPU models when XLA:CPU's
grouped kernels made the grouped 3x3 slow; on the CPU the grouped 3x3 now runs as one dense convolution per
group (grouped_conv.py) and is no slower than the dense one. Train step, batch 8 of 128x128, 2-core build CPU,
width 1/4: 0.46 s grouped (XLA's grouped kernel: 3.64 s) vs 0.56 s dense; width 1/8 0.27 s (0.85 s) vs 0.27 s
(`python benchmarks/train_step_throughput.py --width_multipliers=0.125,0.25 --grouped_conv=split,xla`).
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import grouped_conv

# torchvision ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'); BN weight 1, bias 0.
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # untruncated in jax
CARDINALITY = 32
_EXPANSION = 4
BN_MOMENTUM = 0.9  # Flax convention (PyTorch momentum 0.1).
BN_EPSILON = 1e-5


def batch_norm(features: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def conv(cin: int, cout: int, kernel: int, stride: int, padding: int, dtype, rngs: nnx.Rngs,
          groups: int = 1) -> nnx.Conv:
  return grouped_conv.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                           padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                           use_bias=False, kernel_init=CONV_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def se_channels(channels: int, reduction: int, divisor: int = 8) -> int:
  """timm `make_divisible(channels / reduction, 8)`: nearest multiple of 8, at least 8."""
  return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


class SqueezeExcite(nnx.Module):
  """Channel gate x * sigmoid(fc2(relu(fc1(pool(x))))), fc1/fc2 1x1 convolutions (C -> hidden -> C).

  Defaults = timm's SEModule (pool = spatial mean, biases). `add_max` pools mean + max, the channel attention
  of HistoNeXt's ConvCAM (histonext.py), which has no biases there.
  """

  def __init__(self, channels: int, hidden: int, *, bias: bool = True, add_max: bool = False, dtype,
               rngs: nnx.Rngs):
    self.add_max = add_max
    fc = lambda cin, cout: nnx.Conv(cin, cout, (1, 1), use_bias=bias, kernel_init=CONV_INIT, dtype=dtype,
                                    param_dtype=jnp.float32, rngs=rngs)
    self.fc1 = fc(channels, hidden)
    self.fc2 = fc(hidden, channels)

  def gate(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, 1, 1, C] gates in (0, 1)."""
    # Mean accumulated in float32: a bfloat16 sum over a whole tile loses the low bits.
    s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
    if self.add_max:
      s = s + jnp.max(x, axis=(1, 2), keepdims=True)
    return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> same shape, each channel scaled by its gate."""
    return x * self.gate(x)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride 2, padding 1): the padding never wins (-inf). x: [B, H, W, C]."""
  # A Python-scalar identity (-inf) makes lax dispatch to the differentiable reduce_window_max primitive; an
  # array init value falls back to the generic reduce_window, which has no reverse-mode derivative.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class Bottleneck(nnx.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> grouped 3x3 (stride) -> 1x1 (x4), BN after each, residual.

  `se_reduction` > 0 adds timm's squeeze-excitation after the last BN, before the residual sum (SE-ResNeXt).
  """

  def __init__(self, in_channels: int, planes: int, stride: int, *, cardinality: int = CARDINALITY,
               se_reduction: int = 0, dtype, rngs: nnx.Rngs):
    width = 2 * planes
    groups = math.gcd(cardinality, width)
    out = planes * _EXPANSION
    self.conv1 = conv(in_channels, width, 1, 1, 0, dtype, rngs)
    self.bn1 = batch_norm(width, dtype, rngs)
    self.conv2 = conv(width, width, 3, stride, 1, dtype, rngs, groups=groups)
    self.bn2 = batch_norm(width, dtype, rngs)
    self.conv3 = conv(width, out, 1, 1, 0, dtype, rngs)
    self.bn3 = batch_norm(out, dtype, rngs)
    self.se = (SqueezeExcite(out, se_channels(out, se_reduction), dtype=dtype, rngs=rngs) if se_reduction
               else None)
    if stride != 1 or in_channels != out:
      self.downsample_conv = conv(in_channels, out, 1, stride, 0, dtype, rngs)
      self.downsample_bn = batch_norm(out, dtype, rngs)
    else:
      self.downsample_conv = None
      self.downsample_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.se is not None:
      y = self.se(y)
    shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
    return jax.nn.relu(y + shortcut)


class ResNeXtEncoder(nnx.Module):
  """ResNeXt-50 32x4d without avgpool/fc. Returns the 6 features of reference §1.3.

  Full size: `stem_width=64, planes=(64, 128, 256, 512)`, blocks (3, 4, 6, 3). Hooks for the other encoders
  built on it (seresnext.py): `blocks` (3, 4, 23, 3) is the 101-layer trunk, `se_reduction` adds SE modules,
  and `stem_stride=1, stem_pool=False` is the CoNIC HoVer-Net geometry (features at strides 1, 1, 1, 2, 4, 8).
  """

  def __init__(self, *, stem_width: int = 64, planes: Sequence[int] = (64, 128, 256, 512),
               blocks: Sequence[int] = (3, 4, 6, 3), cardinality: int = CARDINALITY, se_reduction: int = 0,
               stem_stride: int = 2, stem_pool: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    if cardinality < 1:
      raise ValueError(f'cardinality must be >= 1, got {cardinality}')
    self.stem_pool = stem_pool
    self.conv1 = conv(3, stem_width, 7, stem_stride, 3, dtype, rngs)
    self.bn1 = batch_norm(stem_width, dtype, rngs)
    in_channels = stem_width
    layers = []
    for i, (p, n) in enumerate(zip(planes, blocks)):
      stride = 1 if i == 0 else 2
      layer = []
      for b in range(n):
        layer.append(Bottleneck(in_channels, p, stride if b == 0 else 1, cardinality=cardinality,
                                se_reduction=se_reduction, dtype=dtype, rngs=rngs))
        in_channels = p * _EXPANSION
      layers.append(nnx.List(layer))
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.out_channels = (3, stem_width) + tuple(p * _EXPANSION for p in planes)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, 3] normalised, H and W multiples of 32 -> 6 features at strides 1, 2, 4, 8, 16, 32
    (channels `out_channels`); with stem_stride=1, stem_pool=False: strides 1, 1, 1, 2, 4, 8."""
    features = [x]
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    features.append(x)
    if self.stem_pool:
      x = max_pool_3x3_s2(x)
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
      features.append(x)
    return features
