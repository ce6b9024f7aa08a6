"""Plain U-Net (Ronneberger et al., MICCAI 2015) for binary nucleus segmentation, NHWC, Flax NNX.

The stage-1 base model of the two-stage enhancement protocol (seed 003, `../shared/reference/seed_systems.md`
§D; methods/binary.py). Built as the original: 4 down / 4 up levels, two 3x3 convolutions + ReLU per level,
2x2 max pooling, 2x2 stride-2 transposed convolutions ("up-convolutions") that halve the channels, skip
concatenation [skip, up], a 1x1 output convolution; channels base x (1, 2, 4, 8, 16) (64..1024 at full size).

Differences from the 2015 paper, and why:
- SAME padding (the paper used valid convolutions and cropped the skips): the output covers the input, which
  the shared pipeline, evaluation and tiling assume for margin-0 models. Inputs whose sides are not multiples
  of 16 are reflect-padded at the bottom/right (`dualunet.pad_to_multiple`) and the output is cropped back.
- `batch_norm` (off by default = the original): BatchNorm after each 3x3 convolution (then no conv bias), as
  common PyTorch ports. The seed-003 paper does not say; the project's configs turn it on (training from
  random weights with Adam 1e-4 on short budgets, where BatchNorm is the usual help; not compared here).
- Inputs are ImageNet-normalised like DualU-Net's (a fixed affine map; it only centres the data).

Parameter counts (`nnx.eval_shape`, tests/test_binary_methods.py):
- base 64, RGB, 1 output, no BN: 31,031,745 (the 2015 architecture with SAME padding); with BN (no conv
  biases): 31,037,633, the count public PyTorch U-Nets of this layout report (BN, bias-free convolutions,
  transposed-convolution up-sampling).
- base 32, 1 input channel, no BN: 7,759,521, the "U-Net" of Zhou et al.'s UNet++ code (MrGiovanni/UNetPlusPlus)
  that UNet++ is compared against.

Precision: parameters float32; `dtype` is the compute dtype of the body; the output 1x1 convolution computes
in float32 and the logits are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models.dualunet import IMAGENET_MEAN, IMAGENET_STD, pad_to_multiple, scale_channels
from dualunet_jax.models.resnext import BN_EPSILON, BN_MOMENTUM

LEVELS = 5  # 4 poolings: sides are padded to multiples of 2**4
PAD_MULTIPLE = 2 ** (LEVELS - 1)
# He normal (Ronneberger: Gaussian with std sqrt(2/N), N = fan-in; Zhou's Keras code: he_normal).
HE_NORMAL = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


def level_channels(base_channels: int, width_multiplier: float) -> tuple[int, ...]:
  """Channels of the 5 levels, base x (1, 2, 4, 8, 16) scaled by `width_multiplier` (multiples of 8)."""
  return tuple(scale_channels(base_channels * 2 ** i, width_multiplier) for i in range(LEVELS))


def prepare_input(images: jax.Array, dtype) -> tuple[jax.Array, tuple[int, int]]:
  """images float[B, H, W, C] in [0, 1] or uint8 0..255 -> (normalised, padded to multiples of 16, in `dtype`;
  the original (H, W) to crop the output back to). RGB inputs are ImageNet-normalised; other channel counts
  (grayscale count tests) are only scaled."""
  if images.ndim != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape {images.shape}')
  _, h, w, c = images.shape
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  if c == 3:
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return pad_to_multiple(x, PAD_MULTIPLE).astype(dtype), (h, w)


def max_pool(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class ConvBlock(nnx.Module):
  """(conv3x3 [-> BN] -> ReLU) x 2, SAME padding: [B, H, W, in] -> [B, H, W, out]."""

  def __init__(self, in_channels: int, out_channels: int, *, batch_norm: bool, dtype, rngs: nnx.Rngs):
    conv = lambda cin: nnx.Conv(cin, out_channels, (3, 3), padding='SAME', use_bias=not batch_norm,
                                kernel_init=HE_NORMAL, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    bn = lambda: (nnx.BatchNorm(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs) if batch_norm else None)
    self.conv1, self.bn1 = conv(in_channels), bn()
    self.conv2, self.bn2 = conv(out_channels), bn()

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
      x = conv(x)
      if bn is not None:
        x = bn(x)
      x = jax.nn.relu(x)
    return x


def up_conv(in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.ConvTranspose:
  """2x2 stride-2 transposed convolution: [B, H, W, in] -> [B, 2H, 2W, out]."""
  return nnx.ConvTranspose(in_channels, out_channels, (2, 2), strides=(2, 2), padding='VALID',
                           kernel_init=HE_NORMAL, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def output_conv(in_channels: int, out_channels: int, *, rngs: nnx.Rngs) -> nnx.Conv:
  """The 1x1 logit convolution, in float32 (cheap; keeps the logits exact under bfloat16 compute)."""
  return nnx.Conv(in_channels, out_channels, (1, 1), kernel_init=jax.nn.initializers.glorot_uniform(),
                  dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class UNet(nnx.Module):
  """U-Net with binary (or `out_channels`) logit output.

  Args:
    base_channels: channels of the first level (64 = Ronneberger; 32 = Zhou's comparison U-Net).
    width_multiplier: scales every level (`scale_channels`, multiples of 8); 1/8 for tiny test models.
    batch_norm: BatchNorm after each 3x3 convolution (see the module docstring).
    in_channels: 3 (RGB); 1 reproduces the grayscale counts of Zhou's code.
    out_channels: logit channels (1 for binary segmentation).
    dtype: compute dtype; parameters are float32.
  """

  def __init__(self, *, base_channels: int = 64, width_multiplier: float = 1.0, batch_norm: bool = False,
               in_channels: int = 3, out_channels: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
    ch = level_channels(base_channels, width_multiplier)
    self.channels = ch
    self.dtype = jnp.dtype(dtype)
    block = lambda cin, cout: ConvBlock(cin, cout, batch_norm=batch_norm, dtype=dtype, rngs=rngs)
    self.down = nnx.List([block(in_channels if i == 0 else ch[i - 1], ch[i]) for i in range(LEVELS)])
    # up[i] takes level i + 1 to level i; the block after it sees [skip_i, up_i] (2 ch[i] channels).
    self.up = nnx.List([up_conv(ch[i + 1], ch[i], dtype=dtype, rngs=rngs) for i in range(LEVELS - 1)])
    self.up_blocks = nnx.List([block(2 * ch[i], ch[i]) for i in range(LEVELS - 1)])
    self.head = output_conv(ch[0], out_channels, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images float[B, H, W, C] in [0, 1] or uint8, any H, W -> logits float32[B, H, W, out_channels]."""
    x, (h, w) = prepare_input(images, self.dtype)
    skips: list[jax.Array] = []
    for i, block in enumerate(self.down):
      x = block(x if i == 0 else max_pool(x))
      skips.append(x)
    x = skips.pop()
    for i in reversed(range(LEVELS - 1)):
      x = self.up_blocks[i](jnp.concatenate([skips[i], self.up[i](x)], axis=-1))
    return self.head(x.astype(jnp.float32))[:, :h, :w]

