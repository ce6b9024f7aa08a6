"""SMP-style U-Net decoder (reference §1.5), NHWC, Flax NNX, plus the PyTorch-matching initialisers.

Attribute path (under `DualUNet.class_decoder` / `DualUNet.density_decoder`) -> reference torch key (under
`decoder.` (or `decoder_seg.`) / `decoder_count.`):

  blocks[i].conv1.kernel [3, 3, in_i + skip_i, out_i] <- blocks.{i}.conv1.0.weight [out_i, in_i + skip_i, 3,3]
  blocks[i].bn1.{scale, bias, mean, var} <- blocks.{i}.conv1.1.{weight, bias, running_mean, running_var}
  blocks[i].conv2.kernel [3, 3, out_i, out_i]       <- blocks.{i}.conv2.0.weight
  blocks[i].bn2.*                                   <- blocks.{i}.conv2.1.*

Block i: nearest upsample by `upsample[i]` (repeat), concat [x, skip] (x first), 2x (conv3x3 no bias -> BN ->
ReLU). No residual, no attention, no center block. Layouts (the reference's per-block upsample factors):
ResNeXt (2, 2, 2, 2, 2); ConvNeXt (2, 2, 2, 1, 4) for BOTH decoders (the reference's HEAD count decoder drops
the final x4, a bug; see reference §1.5 / §8.2).
"""

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models.resnext import BN_EPSILON, BN_MOMENTUM

Initializer = Callable[..., jax.Array]

# Reference §1.7: class decoder re-initialised kaiming-uniform (fan_in, gain sqrt 2): U(+-sqrt(6/fan_in)).
KAIMING_UNIFORM_RELU: Initializer = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
# PyTorch Conv2d default: kaiming_uniform_(a=sqrt 5) -> bound sqrt(6 / (6 fan_in)) = 1/sqrt(fan_in).
TORCH_DEFAULT_KERNEL: Initializer = jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# torch xavier_uniform_ (fan_avg, gain 1); same fan convention as torch for HWIO kernels.
XAVIER_UNIFORM: Initializer = jax.nn.initializers.xavier_uniform()


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch Conv2d default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = in_channels * kh * kw."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """F.interpolate(mode='nearest', scale_factor=factor), integer factor. x: [B, H, W, C] -> [B, fH, fW, C]."""
  if factor == 1:
    return x
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class DecoderBlock(nnx.Module):
  """Upsample -> concat [x, skip] -> conv3x3-BN-ReLU -> conv3x3-BN-ReLU."""

  def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, upsample: int,
               kernel_init: Initializer, dtype, rngs: nnx.Rngs):
    self.upsample = upsample
    conv = lambda cin, cout: nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                                      kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                                      rngs=rngs)
    bn = lambda c: nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                                 param_dtype=jnp.float32, rngs=rngs)
    self.conv1 = conv(in_channels + skip_channels, out_channels)
    self.bn1 = bn(out_channels)
    self.conv2 = conv(out_channels, out_channels)
    self.bn2 = bn(out_channels)

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    x = upsample_nearest(x, self.upsample)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.nn.relu(self.bn2(self.conv2(x)))


class UNetDecoder(nnx.Module):
  """U-Net decoder over a 6-feature encoder list (feature 0 is dropped, the deepest is the head).

  Args:
    encoder_channels: channels of the 6 encoder features, e.g. (3, 64, 256, 512, 1024, 2048).
    decoder_channels: output channels of the 5 blocks, e.g. (256, 128, 64, 32, 16).
    upsample: per-block nearest upsample factor, (2,) * 5 (ResNeXt) or (2, 2, 2, 1, 4) (ConvNeXt).
  """

  def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
               upsample: Sequence[int], *, kernel_init: Initializer, dtype=jnp.float32, rngs: nnx.Rngs):
    if len(encoder_channels) != 6 or len(decoder_channels) != 5 or len(upsample) != 5:
      raise ValueError('UNetDecoder needs 6 encoder channels, 5 decoder channels and 5 upsample factors, got '
                       f'{encoder_channels}, {decoder_channels}, {upsample}')
    skips = list(reversed(encoder_channels[1:-1])) + [0]
    ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
    self.blocks = nnx.List([
        DecoderBlock(i, s, o, upsample=u, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        for i, s, o, u in zip(ins, skips, decoder_channels, upsample)
    ])

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: the encoder's 6 features -> [B, H, W, decoder_channels[-1]] at the input resolution."""
    skips = list(reversed(features[1:-1]))
    x = features[-1]
    for i, block in enumerate(self.blocks):
      x = block(x, skips[i] if i < len(skips) else None)
    return x
