"""DualU-Net: one encoder, two U-Net decoders (class logits, centroid density), NHWC, Flax NNX.

Reference: `../shared/reference/dualunet_reference.md` §1 (model) and §9 (checkpoint keys).

Top-level attribute -> reference torch prefix (the sub-module docstrings hold the full key mapping):

  encoder          <- encoder.       (ResNeXt: resnext.py; ConvNeXt: `encoder.timm_model.`, convnext.py)
  class_decoder    <- decoder.  (older checkpoints: decoder_seg.)   (unet_decoder.py)
  class_head       <- segmentation_head.0.{weight [K+1, 16, 3, 3], bias}
  density_decoder  <- decoder_count.
  density_head     <- count_head.0.{weight [1, 16, 3, 3], bias}

Input handling: RGB in [0, 1] (float) or 0..255 (integer, divided by 255), ImageNet mean/std normalisation
inside the model, then reflect padding at the bottom/right up to a multiple of 32 (jnp.pad repeats the
reflection when the pad is longer than the side, and a 1-pixel side is replicated), so any H, W works; outputs
are cropped back to H, W. Reflect rather than zeros because a zero border is an artificial edge the network
never saw in training.

Precision: parameters are float32; `dtype` is the compute dtype of encoder and decoders (BatchNorm/LayerNorm
statistics are reduced in float32 by Flax). The two heads (16 input channels, negligible cost) compute in
float32 and both outputs are float32.

Mode: the model is built in training mode (BatchNorm uses batch statistics and updates its running averages,
as a fresh PyTorch module); call `model.eval()` for inference and `model.train()` to go back.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import convnext
from dualunet_jax.models import resnext
from dualunet_jax.models import unet_decoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODER_CHANNELS = (256, 128, 64, 32, 16)
RESNEXT_STEM, RESNEXT_PLANES = 64, (64, 128, 256, 512)
RESNEXT_UPSAMPLE = (2, 2, 2, 2, 2)
CONVNEXT_UPSAMPLE = (2, 2, 2, 1, 4)  # block 3 joins the stem (also 1/4), block 4 goes 1/4 -> 1/1.
ENCODERS = ('resnext50_32x4d',) + tuple(f'convnext_{name}' for name in convnext.CONVNEXT_SPECS)
PAD_MULTIPLE = 32
CHANNEL_DIVISOR = 8


def scale_channels(channels: int, width_multiplier: float, divisor: int = CHANNEL_DIVISOR) -> int:
  """round(channels * width_multiplier) to a multiple of `divisor` (at least `divisor`); identity at 1.0."""
  return max(divisor, int(round(channels * width_multiplier / divisor)) * divisor)


def pad_to_multiple(x: jax.Array, multiple: int = PAD_MULTIPLE) -> jax.Array:
  """Reflect-pad the bottom/right of x: [B, H, W, C] so that H and W are multiples of `multiple`."""
  _, h, w, _ = x.shape
  ph, pw = -h % multiple, -w % multiple
  if ph == 0 and pw == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='reflect')


class DualUNet(nnx.Module):
  """Shared encoder + class decoder/head (K+1 logits) + density decoder/head (1 channel).

  Args:
    encoder: 'resnext50_32x4d' or 'convnext_{tiny,small,base,large}'.
    num_classes: K nucleus classes; the class head predicts K + 1 channels (channel 0 = background).
    width_multiplier: scales every channel count of encoder and decoders (`scale_channels`, multiples of 8);
      1.0 is the reference model, 1/8 a tiny test/demo model (~1/60 of the parameters).
    dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters are always float32.
    cardinality: groups of the ResNeXt 3x3 convolutions (32 = ResNeXt-50 32x4d; 1 = dense, for tiny CPU
      models: resnext.py says why). Ignored by ConvNeXt.
  """

  def __init__(self, *, encoder: str, num_classes: int, width_multiplier: float = 1.0, dtype=jnp.float32,
               cardinality: int = resnext.CARDINALITY, encoder_blocks: Sequence[int] = (), rngs: nnx.Rngs):
    if encoder not in ENCODERS:
      raise ValueError(f'unknown encoder {encoder!r}; expected one of {ENCODERS}')
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if not width_multiplier > 0:
      raise ValueError(f'width_multiplier must be > 0, got {width_multiplier}')
    if encoder_blocks and (len(encoder_blocks) != 4 or min(encoder_blocks) < 1):
      raise ValueError(f'encoder_blocks must be 4 block counts >= 1 (empty: the encoder\'s own), got '
                       f'{tuple(encoder_blocks)}')
    self.encoder_name = encoder
    self.num_classes = num_classes
    self.width_multiplier = width_multiplier
    self.cardinality = cardinality
    self.dtype = jnp.dtype(dtype)
    scale = lambda c: scale_channels(c, width_multiplier)
    if encoder == 'resnext50_32x4d':
      self.encoder = resnext.ResNeXtEncoder(stem_width=scale(RESNEXT_STEM),
                                            planes=tuple(scale(p) for p in RESNEXT_PLANES),
                                            blocks=tuple(encoder_blocks) or (3, 4, 6, 3),
                                            cardinality=cardinality, dtype=dtype, rngs=rngs)
      upsample = RESNEXT_UPSAMPLE
    else:
      depths, dims = convnext.CONVNEXT_SPECS[encoder.removeprefix('convnext_')]
      depths = tuple(encoder_blocks) or depths
      self.encoder = convnext.ConvNeXtEncoder(depths=depths, dims=tuple(scale(d) for d in dims), dtype=dtype,
                                              rngs=rngs)
      upsample = CONVNEXT_UPSAMPLE
    enc_ch = self.encoder.out_channels
    dec_ch = tuple(scale(c) for c in DECODER_CHANNELS)
    self.class_decoder = unet_decoder.UNetDecoder(enc_ch, dec_ch, upsample,
                                                  kernel_init=unet_decoder.KAIMING_UNIFORM_RELU, dtype=dtype,
                                                  rngs=rngs)
    self.class_head = nnx.Conv(dec_ch[-1], num_classes + 1, (3, 3), padding=((1, 1), (1, 1)),
                               kernel_init=unet_decoder.XAVIER_UNIFORM, bias_init=jax.nn.initializers.zeros,
                               dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.density_decoder = unet_decoder.UNetDecoder(enc_ch, dec_ch, upsample,
                                                    kernel_init=unet_decoder.TORCH_DEFAULT_KERNEL,
                                                    dtype=dtype, rngs=rngs)
    self.density_head = nnx.Conv(dec_ch[-1], 1, (3, 3), padding=((1, 1), (1, 1)),
                                 kernel_init=unet_decoder.TORCH_DEFAULT_KERNEL,
                                 bias_init=unet_decoder.torch_default_bias(dec_ch[-1] * 9),
                                 dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward pass.

    Args:
      images: float[B, H, W, 3] RGB in [0, 1], or uint8[B, H, W, 3] in 0..255; any H, W >= 1.

    Returns:
      class_logits: float32[B, H, W, K+1] raw logits (softmax outside, in the loss/eval).
      density: float32[B, H, W] un-activated centroid density map.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {images.shape}')
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    x = pad_to_multiple(x).astype(self.dtype)
    features = self.encoder(x)
    class_logits = self.class_head(self.class_decoder(features).astype(jnp.float32))
    density = self.density_head(self.density_decoder(features).astype(jnp.float32))
    return class_logits[:, :h, :w], density[:, :h, :w, 0]


def count_params(module: nnx.Module) -> int:
  """Trainable parameters (nnx.Param) of a concrete or abstract (nnx.eval_shape) module; no BN stats."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))
