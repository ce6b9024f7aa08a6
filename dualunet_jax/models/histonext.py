"""HistoNeXt (seed 004: Chen et al., BMC Medical Imaging 2025): ConvNeXt encoder, dense-block NP and HV branches,
ConvCAM type (TP) branch; 270² in -> 80² out like HoVer-Net "original". NHWC, Flax NNX.

What the paper states (seed §C) and how it is built here (channels for Base; see VARIANTS for the others):

  encoder   timm ConvNeXt (convnext.py), features F0..F3 at strides 4, 8, 16, 32 with C0..C3 channels.
  NP, HV    two identical branches, bottom-up: F3 -> 3x3 transposed conv x2 -> centre crop to F2 -> concat F2
            -> dense block (2 layers, k 512); likewise with F1 (4 layers, k 256) and F0 (6 layers, k 128); then
            (no encoder feature at stride 2) 3x3 transposed conv -> dense block (4 layers, k 64); final 1x1
            conv, 2 channels. Dense layer = BN -> ReLU -> 3x3 conv to k channels, input = concat of the block
            input and all earlier layers' outputs (decoder_blocks.DenseBlock).
  TP        F3 -> 5x5 transposed conv x2 -> ConvCAM x1 -> concat F2 -> 5x5 transposed conv -> ConvCAM x2 ->
            concat F1 -> ... x3 -> concat F0 -> ... x4 (stride 2); final 1x1 conv, K + 1 channels. ConvCAM =
            5x5 conv in 12 groups -> BN -> ReLU -> x * alpha, alpha = sigmoid(W2 ReLU(W1 (avgpool + maxpool)))
            with 1x1 convolutions, reduction 16.

Choices where the paper is silent (all constants below):
  * Geometry (HoVer-Net "original" style): every decoder convolution is VALID and transposed convolutions use no
    padding (3x3 -> 2n+1, 5x5 -> 2n+3 pixels), which is why the paper centre-crops. The encoder runs on the
    whole tile (padded convolutions, as timm). `Grid` tracks where each map's pixels sit on the image, so skip
    features are cropped to the pixels they share with the upsampled path and the output is cropped to exactly
    [margin, H - margin), margin = 95 (270 -> 80). A stride-2 transposed conv with an odd kernel puts its
    outputs half a fine pixel off the encoder grid; crops round that half pixel the same way everywhere.
  * Resolution: the four dense stages run at strides 16, 8, 4, 2; a last transposed conv (3x3 NP/HV, 5x5 TP)
    brings the map to stride 1, then BN -> ReLU -> 1x1 conv (with bias; every other convolution is followed by
    BN and has none).
  * Widths: the transposed conv before a skip outputs the skip's channels (U-Net style), so the concatenation
    is 2 C_s; before the skip-less stride-2 stage it outputs the previous growth k, and the last one the stage-4
    growth. TP widths per stage are TP_WIDTHS (Base: 512, 256, 128, 64, i.e. the next skip's channels). The
    grouped 5x5 uses gcd(12, C) groups: 12 wherever C allows it (Tiny, Large), 4 at Base and XLarge, where
    12 does not divide C. The attention's 1x1 convolutions have no bias (CBAM convention), C/16 hidden.
  * Variants scale every decoder width by `decoder_scale` = the encoder's width ratio to Base: Tiny 0.75,
    Large 1.5, XLarge 2. The seed's text says Tiny = half of Base (first dense block k 256); with 0.75 (k 384)
    all four variants land within 1.5% of the paper's parameter counts (Tiny 82.51 M vs 82.6, Base 186.68 vs
    184.8, Large 414.90 vs 414.0, XLarge 744.49 vs 734.4; with 0.5 Tiny has 64.53 M) and within 6% of its
    GFLOPs, which are multiply-accumulates (XLA FLOPs / 2 at 270²: Tiny 31.6 vs 33.7, Base 70.6 vs 69.5, Large
    153.2 vs 155.7, XLarge 279.3 vs 276.0). decoder_scale=0.5 builds the text's Tiny.
Inputs: uint8 0..255 or float [0, 1], ImageNet-normalised inside; reflect-padded bottom/right to a multiple of 32;
H and W must exceed 2 * margin.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import convnext
from dualunet_jax.models import dualunet
from dualunet_jax.models import resnext
from dualunet_jax.models.decoder_blocks import crop
from dualunet_jax.models.decoder_blocks import DenseBlock
from dualunet_jax.models.decoder_blocks import head
from dualunet_jax.models.decoder_blocks import part_parameter_counts
from dualunet_jax.models.decoder_blocks import prepare_images

# name -> (ConvNeXt depths, dims, decoder scale). XLarge is timm's convnext_xlarge (not a DualU-Net encoder).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    'tiny': (*convnext.CONVNEXT_SPECS['tiny'], 0.75),
    'base': (*convnext.CONVNEXT_SPECS['base'], 1.0),
    'large': (*convnext.CONVNEXT_SPECS['large'], 1.5),
    'xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048), 2.0),
}
MARGIN = 95  # 270 -> 80
PAD_MULTIPLE = 32
DENSE_STAGES = ((2, 512), (4, 256), (6, 128), (4, 64))  # Base: (layers, growth k) at strides 16, 8, 4, 2
CAM_DEPTHS = (1, 2, 3, 4)
TP_WIDTHS = (512, 256, 128, 64)  # Base, ConvCAM channels per stage: the next skip's (C2, C1, C0), then C0 / 2
CAM_GROUPS = 12  # the paper's; gcd(12, width) where the width is not a multiple of 12
CAM_REDUCTION = 16
NP_HV_UP_KERNEL, TP_UP_KERNEL, CAM_KERNEL = 3, 5, 5
PARTS = ('encoder', 'np_branch', 'hv_branch', 'tp_branch')


@dataclasses.dataclass(frozen=True)
class Grid:
  """Where a feature map lies on the input image: pixel i is centred on image coordinate offset + stride * i
  (image pixel centres at 0, 1, ...). Static Python numbers, known at trace time."""
  stride: int
  offset: float

  @classmethod
  def encoder_level(cls, stride: int) -> 'Grid':
    return cls(stride, (stride - 1) / 2)  # mean of the `stride` input pixels pooled into pixel 0

  def valid(self, margin: int) -> 'Grid':
    return Grid(self.stride, self.offset + self.stride * margin)

  def transposed(self, kernel: int) -> 'Grid':
    """After a stride-2 unpadded transposed conv: output 2j + (kernel - 1) / 2 is centred on input j."""
    return Grid(self.stride // 2, self.offset - self.stride * (kernel - 1) / 4)

  def index_of(self, coordinate: float) -> int:
    """Index of the pixel centred nearest `coordinate` (half pixels round up)."""
    return math.floor((coordinate - self.offset) / self.stride + 0.5)


def crop_like(x: jax.Array, grid: Grid, target: jax.Array, target_grid: Grid) -> jax.Array:
  """Crops x [B, H, W, C] to target's spatial size at the pixels that cover target's (same stride)."""
  start = grid.index_of(target_grid.offset)
  return crop(x, start, start, target.shape[1], target.shape[2])


def _transposed_conv(cin: int, cout: int, kernel: int, dtype, rngs: nnx.Rngs) -> nnx.ConvTranspose:
  return nnx.ConvTranspose(cin, cout, (kernel, kernel), strides=(2, 2), padding='VALID', use_bias=False,
                           kernel_init=resnext.CONV_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ConvCAM(nnx.Module):
  """5x5 conv (gcd(12, C) groups, VALID) -> BN -> ReLU -> channel attention (mean + max pool, C -> C/16 -> C).

  [B, H, W, C] -> [B, H - 4, W - 4, C]."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    groups = math.gcd(CAM_GROUPS, channels)
    self.conv = resnext.conv(channels, channels, CAM_KERNEL, 1, 0, dtype, rngs, groups=groups)
    self.bn = resnext.batch_norm(channels, dtype, rngs)
    self.attention = resnext.SqueezeExcite(channels, max(1, channels // CAM_REDUCTION), bias=False,
                                           add_max=True, dtype=dtype, rngs=rngs)
    self.margin = (CAM_KERNEL - 1) // 2

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.attention(jax.nn.relu(self.bn(self.conv(x))))


class OutputHead(nnx.Module):
  """Last stride-2 transposed conv -> BN -> ReLU -> 1x1 conv (float32 logits)."""

  def __init__(self, in_channels: int, width: int, out_channels: int, kernel: int, *, dtype, rngs: nnx.Rngs):
    self.up = _transposed_conv(in_channels, width, kernel, dtype, rngs)
    self.bn = resnext.batch_norm(width, dtype, rngs)
    self.conv = head(width, out_channels, rngs)
    self.kernel = kernel

  def __call__(self, x: jax.Array, grid: Grid) -> tuple[jax.Array, Grid]:
    x = jax.nn.relu(self.bn(self.up(x)))
    return self.conv(x.astype(jnp.float32)), grid.transposed(self.kernel)


class DenseBranch(nnx.Module):
  """NP or HV branch. encoder_channels = (C0, C1, C2, C3); growth = k per stage (4); out_channels = 2."""

  def __init__(self, encoder_channels: tuple[int, ...], growth: tuple[int, ...], out_channels: int, *, dtype,
               rngs: nnx.Rngs):
    skips = tuple(reversed(encoder_channels[:3])) + (0,)  # C2, C1, C0, none
    ups, blocks = [], []
    channels = encoder_channels[3]
    for s, ((layers, _), k, skip) in enumerate(zip(DENSE_STAGES, growth, skips)):
      up_out = skip if skip else growth[s - 1]
      ups.append(_transposed_conv(channels, up_out, NP_HV_UP_KERNEL, dtype, rngs))
      blocks.append(DenseBlock(up_out + skip, ((3, k, 1),), layers, valid=True, final_bn_relu=True, dtype=dtype,
                               rngs=rngs))
      channels = blocks[-1].out_channels
    self.ups, self.blocks = nnx.List(ups), nnx.List(blocks)
    self.out = OutputHead(channels, growth[-1], out_channels, NP_HV_UP_KERNEL, dtype=dtype, rngs=rngs)

  def __call__(self, features: list[jax.Array], grids: list[Grid]) -> tuple[jax.Array, Grid]:
    """features F0..F3 with their grids -> (float32 [B, h, w, out_channels] at stride 1, its grid)."""
    x, grid = features[3], grids[3]
    skips = [(features[i], grids[i]) for i in (2, 1, 0)] + [None]
    for up, block, skip in zip(self.ups, self.blocks, skips):
      x, grid = up(x), grid.transposed(NP_HV_UP_KERNEL)
      if skip is not None:
        x, grid = _concat_skip(x, grid, *skip)
      x, grid = block(x), grid.valid(block.margin)
    return self.out(x, grid)


class TypeBranch(nnx.Module):
  """TP branch: per stage 5x5 transposed conv -> ConvCAM x depth -> concat the next encoder level."""

  def __init__(self, encoder_channels: tuple[int, ...], widths: tuple[int, ...], out_channels: int, *, dtype,
               rngs: nnx.Rngs):
    skips = tuple(reversed(encoder_channels[:3])) + (0,)
    ups, cams = [], []
    channels = encoder_channels[3]
    for width, depth, skip in zip(widths, CAM_DEPTHS, skips):
      ups.append(_transposed_conv(channels, width, TP_UP_KERNEL, dtype, rngs))
      cams.append(nnx.List([ConvCAM(width, dtype=dtype, rngs=rngs) for _ in range(depth)]))
      channels = width + skip
    self.ups, self.cams = nnx.List(ups), nnx.List(cams)
    self.out = OutputHead(channels, widths[-1], out_channels, TP_UP_KERNEL, dtype=dtype, rngs=rngs)

  def __call__(self, features: list[jax.Array], grids: list[Grid]) -> tuple[jax.Array, Grid]:
    x, grid = features[3], grids[3]
    skips = [(features[i], grids[i]) for i in (2, 1, 0)] + [None]
    for up, cams, skip in zip(self.ups, self.cams, skips):
      x, grid = up(x), grid.transposed(TP_UP_KERNEL)
      for cam in cams:
        x, grid = cam(x), grid.valid(cam.margin)
      if skip is not None:
        x, grid = _concat_skip(x, grid, *skip)
    return self.out(x, grid)


def _concat_skip(x: jax.Array, grid: Grid, skip: jax.Array, skip_grid: Grid) -> tuple[jax.Array, Grid]:
  """[x, skip] on the pixels both cover: the larger map is cropped to the smaller one (the paper's centre crop)."""
  if skip.shape[1] > x.shape[1]:
    skip = crop_like(skip, skip_grid, x, grid)
  else:
    x, grid = crop_like(x, grid, skip, skip_grid), skip_grid
  return jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), grid


class HistoNeXt(nnx.Module):
  """ConvNeXt encoder + NP, HV (dense) and TP (ConvCAM) branches; output = input minus `margin` per side.

  Args:
    variant: 'tiny', 'base', 'large' or 'xlarge' (VARIANTS).
    num_classes: K nucleus types; TP has K + 1 channels (0 = background).
    width_multiplier: scales encoder and decoder channels (1.0 = the paper's sizes; 1/8 for tiny tests).
    decoder_scale: decoder widths relative to Base; None = the variant's (0.75, 1, 1.5, 2).
    dtype: compute dtype (float32 or bfloat16); parameters float32, heads and outputs float32.
  """

  def __init__(self, *, variant: str = 'tiny', num_classes: int, width_multiplier: float = 1.0,
               decoder_scale: float | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f'unknown HistoNeXt variant {variant!r}; expected one of {tuple(VARIANTS)}')
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    depths, dims, default_scale = VARIANTS[variant]
    r = default_scale if decoder_scale is None else decoder_scale
    self.num_classes = num_classes
    self.margin = MARGIN
    self.dtype = jnp.dtype(dtype)
    self.encoder = convnext.ConvNeXtEncoder(
        depths=depths, dims=tuple(dualunet.scale_channels(d, width_multiplier) for d in dims), dtype=dtype,
        rngs=rngs)
    channels = self.encoder.out_channels[2:]
    growth = tuple(dualunet.scale_channels(k, r * width_multiplier) for _, k in DENSE_STAGES)
    widths = tuple(dualunet.scale_channels(w, r * width_multiplier) for w in TP_WIDTHS)
    self.np_branch = DenseBranch(channels, growth, 2, dtype=dtype, rngs=rngs)
    self.hv_branch = DenseBranch(channels, growth, 2, dtype=dtype, rngs=rngs)
    self.tp_branch = TypeBranch(channels, widths, num_classes + 1, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: uint8[B, H, W, 3] or float[B, H, W, 3] in [0, 1], H, W > 2 * margin -> {'np': float32[B, h, w, 2]
    logits, 'hv': float32[B, h, w, 2], 'tp': float32[B, h, w, K+1] logits}, h = H - 2 margin, w likewise."""
    _, h, w, _ = images.shape
    out_h, out_w = h - 2 * self.margin, w - 2 * self.margin
    if out_h < 1 or out_w < 1:
      raise ValueError(f'HistoNeXt needs H, W > {2 * self.margin}, got {h}x{w}')
    x = prepare_images(images, PAD_MULTIPLE).astype(self.dtype)
    features = self.encoder(x)[2:]
    grids = [Grid.encoder_level(4 * 2 ** i) for i in range(4)]
    outputs = {}
    for name, branch in (('np', self.np_branch), ('hv', self.hv_branch), ('tp', self.tp_branch)):
      y, grid = branch(features, grids)
      assert grid.stride == 1, grid
      start = grid.index_of(self.margin)
      outputs[name] = crop(y, start, start, out_h, out_w)
    return outputs


def parameter_counts(model: HistoNeXt) -> dict[str, int]:
  """Trainable parameters per part (PARTS) and 'total'; works on `nnx.eval_shape` models."""
  return part_parameter_counts(model, PARTS)
