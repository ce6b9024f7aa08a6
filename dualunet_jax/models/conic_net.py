"""CoNIC-framework network (seed 002, "Pathology AI"): SE-ResNeXt encoder, ONE HoVer-Net decoder shared by
three single-convolution heads NP (2), HV (2), NC (K+1), dropout after each upsampling. NHWC, Flax NNX.

Geometry: the CoNIC-challenge HoVer-Net (the `conic` branch of vqdang/hover_net, the challenge baseline this
framework started from): same-size output (256² in, 256² out: CoNIC scores mPQ+ on the whole patch), every
convolution padded, decoder kernel 3 ("fast" widths), and an encoder stem of stride 1 without max pool, so the
four encoder levels sit at strides 1, 2, 4, 8 like HoVer-Net's pre-activation ResNet. `margin` is 0; inputs are
reflect-padded to multiples of 8 and the outputs cropped back.

Decoder (channels at width 1; `width_multiplier` scales all of them):

  x  = conv_bot 1x1 (layer4 2048 -> 1024)
  u3 = dropout(up2(x))  + layer3 -> conva 3x3 (1024 -> 256) -> dense 8 x [1x1 128, 3x3 32 / 4 groups]
       -> convf 1x1 (512 -> 512)
  u2 = dropout(up2(u3)) + layer2 -> conva 3x3 (512 -> 128) -> dense 4 x [...] -> convf 1x1 (256 -> 256)
  u1 = dropout(up2(u2)) + layer1 -> conva 3x3 (256 -> 64)
  features = ReLU(BN(u1)); np / hv / tp = 1x1 convolutions with bias (HoVer-Net's per-branch `u0`, merged)

up2 is nearest-neighbour (HoVer-Net's UpSample2x). The dense blocks end with BN -> ReLU (HoVer-Net `blk_bna`).
Dropout: element-wise (nnx.Dropout) on the upsampled decoder path, before the skip is added; the paper gives no
rate, DROPOUT_RATE = 0.1 is a mild default chosen here (a heavier rate on maps that feed 1x1/3x3 convolutions
mostly adds noise; the paper only reports that dropout helps on unseen data). Active in train mode only
(`model.train()` / `model.eval()`); a training step passes fresh randomness through the Rngs given at build.

Encoder weights: timm `seresnext{50,101}_32x4d` ImageNet files load with
`seresnext.load_seresnext_weights(model.encoder, path)` (the stem kernel trained at stride 2 is used at stride
1, as the CoNIC baseline does with torchvision's ResNet-50). Inputs are ImageNet-normalised inside the model.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import dualunet
from dualunet_jax.models import resnext
from dualunet_jax.models import seresnext
from dualunet_jax.models.decoder_blocks import DenseBlock
from dualunet_jax.models.decoder_blocks import head
from dualunet_jax.models.decoder_blocks import part_parameter_counts
from dualunet_jax.models.decoder_blocks import prepare_images
from dualunet_jax.models.unet_decoder import upsample_nearest

ENCODERS = tuple(seresnext.SERESNEXT_BLOCKS)
PARTS = ('encoder', 'decoder', 'np_head', 'hv_head', 'tp_head')
DROPOUT_RATE = 0.1
PAD_MULTIPLE = 8  # layer4 sits at stride 8
# HoVer-Net decoder: (conva output, dense units) for u3, u2, u1; a dense unit is 1x1 to 128 -> 3x3 to 32.
_STAGES = ((256, 8), (128, 4), (64, 0))
_UNIT_MID, _UNIT_GROWTH, _UNIT_GROUPS = 128, 32, 4


class DecoderStage(nnx.Module):
  """conva 3x3 -> [dense block -> convf 1x1 to the next skip's channels] (no dense block in u1)."""

  def __init__(self, in_channels: int, width: int, dense_units: int, out_channels: int, *, width_multiplier: float,
               dtype, rngs: nnx.Rngs):
    scale = lambda c: dualunet.scale_channels(c, width_multiplier)
    self.conva = resnext.conv(in_channels, width, 3, 1, 1, dtype, rngs)
    if dense_units:
      unit = ((1, scale(_UNIT_MID), 1), (3, scale(_UNIT_GROWTH), _UNIT_GROUPS))
      self.dense = DenseBlock(width, unit, dense_units, valid=False, final_bn_relu=True, dtype=dtype, rngs=rngs)
      self.convf = resnext.conv(self.dense.out_channels, out_channels, 1, 1, 0, dtype, rngs)
    else:
      self.dense = None
      self.convf = None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conva(x)
    return x if self.dense is None else self.convf(self.dense(x))


class MergedDecoder(nnx.Module):
  """HoVer-Net decoder, one copy for all three heads. encoder channels (.., layer1..4) -> [B, H, W, 64w]."""

  def __init__(self, encoder_channels: tuple[int, ...], *, width_multiplier: float, dropout_rate: float, dtype,
               rngs: nnx.Rngs):
    scale = lambda c: dualunet.scale_channels(c, width_multiplier)
    c1, c2, c3, c4 = encoder_channels[2:]
    self.conv_bot = resnext.conv(c4, c3, 1, 1, 0, dtype, rngs)
    ins, outs = (c3, c2, c1), (c2, c1, None)
    self.stages = nnx.List([
        DecoderStage(cin, scale(width), units, cout, width_multiplier=width_multiplier, dtype=dtype, rngs=rngs)
        for cin, (width, units), cout in zip(ins, _STAGES, outs)
    ])
    self.out_channels = scale(_STAGES[-1][0])
    self.bn = resnext.batch_norm(self.out_channels, dtype, rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, features: list[jax.Array]) -> jax.Array:
    """features: the encoder's 6 (layer1..4 at strides 1, 2, 4, 8) -> [B, H, W, out_channels] after BN-ReLU."""
    x = self.conv_bot(features[5])
    for stage, skip in zip(self.stages, (features[4], features[3], features[2])):
      x = stage(self.dropout(upsample_nearest(x, 2)) + skip)
    return jax.nn.relu(self.bn(x))


class ConicNet(nnx.Module):
  """SE-ResNeXt + merged HoVer-Net decoder + NP / HV / TP heads; `margin` 0 (same-size output).

  Args:
    encoder: 'seresnext50_32x4d' or 'seresnext101_32x4d'.
    num_classes: K nucleus types; the TP (NC) head has K + 1 channels (0 = background).
    width_multiplier: scales every channel count (1.0 = the paper's model; 1/8 for tiny tests).
    cardinality: encoder 3x3 groups (32; 1 = dense, for tiny CPU models).
    dropout_rate: after each decoder upsampling (DROPOUT_RATE).
    dtype: compute dtype (float32 or bfloat16); parameters float32, heads and outputs float32.
  """

  def __init__(self, *, encoder: str = ENCODERS[0], num_classes: int, width_multiplier: float = 1.0,
               cardinality: int = resnext.CARDINALITY, dropout_rate: float = DROPOUT_RATE, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    self.num_classes = num_classes
    self.margin = 0
    self.dtype = jnp.dtype(dtype)
    self.encoder = seresnext.SEResNeXtEncoder(encoder, width_multiplier=width_multiplier,
                                              cardinality=cardinality, stem_stride=1, stem_pool=False,
                                              dtype=dtype, rngs=rngs)
    self.decoder = MergedDecoder(self.encoder.out_channels, width_multiplier=width_multiplier,
                                 dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
    c = self.decoder.out_channels
    self.np_head, self.hv_head, self.tp_head = head(c, 2, rngs), head(c, 2, rngs), head(c, num_classes + 1, rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: uint8[B, H, W, 3] or float[B, H, W, 3] in [0, 1], any H, W >= 1 -> {'np': float32[B, H, W, 2]
    logits, 'hv': float32[B, H, W, 2], 'tp': float32[B, H, W, K+1] logits}."""
    _, h, w, _ = images.shape
    x = prepare_images(images, PAD_MULTIPLE).astype(self.dtype)
    features = self.decoder(self.encoder(x))[:, :h, :w].astype(jnp.float32)
    return {'np': self.np_head(features), 'hv': self.hv_head(features), 'tp': self.tp_head(features)}


def parameter_counts(model: ConicNet) -> dict[str, int]:
  """Trainable parameters per part (PARTS) and 'total'; works on `nnx.eval_shape` models."""
  return part_parameter_counts(model, PARTS)
