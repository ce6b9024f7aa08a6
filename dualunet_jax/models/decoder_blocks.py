"""Pieces shared by the three-output (NP / HV / TP) models conic_net.py and histonext.py, NHWC, Flax NNX.

Output contract of those models: `model(images)` with images uint8[B, H, W, 3] (0..255) or float[B, H, W, 3] in
[0, 1] returns {'np': float32[B, h, w, 2] logits, 'hv': float32[B, h, w, 2], 'tp': float32[B, h, w, K+1]
logits}, h = H - 2 * model.margin (context pixels consumed per side; 0 = same-size output).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import dualunet
from dualunet_jax.models import resnext


def prepare_images(images: jax.Array, multiple: int) -> jax.Array:
  """uint8 (0..255) or float ([0, 1]) [B, H, W, 3] -> float32 ImageNet-normalised, reflect-padded at the
  bottom/right to multiples of `multiple` (as DualU-Net: a zero border is an edge never seen in training)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {images.shape}')
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  x = (x - jnp.asarray(dualunet.IMAGENET_MEAN, jnp.float32)) / jnp.asarray(dualunet.IMAGENET_STD, jnp.float32)
  return dualunet.pad_to_multiple(x, multiple)


def crop(x: jax.Array, top: int, left: int, height: int, width: int) -> jax.Array:
  """x[:, top:top + height, left:left + width] with static bounds checked. x: [B, H, W, C]."""
  if top < 0 or left < 0 or top + height > x.shape[1] or left + width > x.shape[2]:
    raise ValueError(f'crop {height}x{width} at ({top}, {left}) does not fit in {x.shape[1]}x{x.shape[2]}')
  return x[:, top:top + height, left:left + width]


def head(in_channels: int, out_channels: int, rngs: nnx.Rngs) -> nnx.Conv:
  """1x1 output convolution with bias, float32 (cheap; keeps the logits out of bfloat16)."""
  return nnx.Conv(in_channels, out_channels, (1, 1), kernel_init=resnext.CONV_INIT, dtype=jnp.float32,
                  param_dtype=jnp.float32, rngs=rngs)


class PreactConv(nnx.Module):
  """BN -> ReLU -> conv (no bias; 'VALID' or 'SAME' symmetric padding)."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, groups: int = 1, valid: bool,
               dtype, rngs: nnx.Rngs):
    self.bn = resnext.batch_norm(in_channels, dtype, rngs)
    self.conv = resnext.conv(in_channels, out_channels, kernel, 1, 0 if valid else kernel // 2, dtype, rngs,
                             groups=groups)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jax.nn.relu(self.bn(x)))


class DenseUnit(nnx.Module):
  """A chain of PreactConv layers, `unit` = ((kernel, channels, groups), ...)."""

  def __init__(self, in_channels: int, unit: Sequence[tuple[int, int, int]], *, valid: bool, dtype,
               rngs: nnx.Rngs):
    layers = []
    for kernel, channels, groups in unit:
      layers.append(PreactConv(in_channels, channels, kernel, groups=groups, valid=valid, dtype=dtype, rngs=rngs))
      in_channels = channels
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class DenseBlock(nnx.Module):
  """Densely connected block (DenseNet; HoVer-Net's `DenseBlock`): unit i sees the concatenation of the block
  input and the outputs of units < i; the block returns that concatenation after the last unit, optionally
  followed by BN -> ReLU (HoVer-Net's `blk_bna`).

  HoVer-Net unit: ((1, 128, 1), (3, 32, 4)) (1x1 to 128, then 3x3 to 32 in 4 groups); HistoNeXt unit:
  ((3, k, 1),). With `valid`, each unit's convolutions shrink the map and the running concatenation is centre-
  cropped to the new output (`margin` = pixels lost per side by the whole block).

  Shapes: [B, H, W, in_channels] -> [B, H - 2 margin, W - 2 margin, out_channels],
  out_channels = in_channels + count * unit[-1][1].
  """

  def __init__(self, in_channels: int, unit: Sequence[tuple[int, int, int]], count: int, *, valid: bool,
               final_bn_relu: bool, dtype, rngs: nnx.Rngs):
    units = []
    channels = in_channels
    for _ in range(count):
      units.append(DenseUnit(channels, unit, valid=valid, dtype=dtype, rngs=rngs))
      channels += unit[-1][1]
    self.units = nnx.List(units)
    self.out_channels = channels
    self.margin = count * sum((kernel - 1) // 2 for kernel, _, _ in unit) if valid else 0
    self.final_bn = resnext.batch_norm(channels, dtype, rngs) if final_bn_relu else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for unit in self.units:
      y = unit(x)
      m = (x.shape[1] - y.shape[1]) // 2
      x = jnp.concatenate([crop(x, m, m, y.shape[1], y.shape[2]), y], axis=-1)
    return x if self.final_bn is None else jax.nn.relu(self.final_bn(x))


def part_parameter_counts(model: nnx.Module, parts: Sequence[str]) -> dict[str, int]:
  """Trainable parameters of each named attribute of `model` and 'total' (concrete or nnx.eval_shape)."""
  counts = {part: dualunet.count_params(getattr(model, part)) for part in parts}
  counts['total'] = sum(counts.values())
  return counts
