"""HoVer-Net (Graham et al., MedIA 2019; vqdang/hover_net `net_desc.py`): one pre-activation ResNet-50 encoder,
three decoders (NP nuclear pixels, HV distance maps, TP types), NHWC, Flax NNX.

Attribute -> official state-dict prefix (`convert_hovernet.py` holds the leaf-level table):

  encoder                     <- (no prefix) conv0, d0..d3, conv_bot   (preact_resnet.py)
  decoder_np / _hv / _tp      <- decoder.np / decoder.hv / decoder.tp
    u3 (conva, dense, convf)  <- u3.conva, u3.dense.units.{i}.*, u3.dense.blk_bna.bn, u3.convf
    u2 (conva, dense, convf)  <- u2.*
    u1.conva                  <- u1.conva
    u0 (bn, conv)             <- u0.bn, u0.conv (the only biased convolution)

Decoder branch (official `create_decoder_branch`, k = 5 'original' / 3 'fast'):
  u3 = conva_k(up2(d3) + d2) valid 1024 -> 256 -> DenseBlock(8 units of [BN-ReLU, 1x1 128, BN-ReLU, k x k 32 in
       4 groups, valid]) -> 512 -> convf 1x1 512
  u2 = conva_k(up2(u3) + d1) valid 512 -> 128 -> DenseBlock(4 units) -> 256 -> convf 1x1 256
  u1 = conva_k(up2(u2) + d0) TF-same 256 -> 64
  u0 = BN-ReLU -> 1x1 conv (bias) -> 2 (NP), 2 (HV) or K + 1 (TP) channels
A dense unit's output is k - 1 pixels smaller; its input is centre-cropped to it before the concatenation.
up2 is nearest-neighbour x2 (TensorPack's FixedUnpooling). d0 and d1 are centre-cropped by a fixed 184 / 72
('original') or 92 / 36 ('fast') pixels so the skips match.

Geometry (worked out from the above): with n = d3's side,
  'original': stem output 8n = S - 6; out = 8n - 184 = S - 190 for S = 8n + 6 (270 -> 80, margin 95);
  'fast':     S = 8n;                   out = 8n - 92  = S - 92  (256 -> 164, margin 46).
Output pixel (i, j) sees input pixel (i + margin, j + margin). Any other side works here: the input is
reflect-padded at the bottom/right up to the next supported side (S = 6 mod 8 / 0 mod 8) and the outputs are
cropped back to H - 2 * margin by W - 2 * margin, so the padding only ever feeds pixels that are cropped away
or lie within the receptive field near the bottom/right edge (like any padding). Sides must be >= 2 * margin +
8 (the smallest supported sides: 198 -> 8 and 104 -> 12).

Input: uint8 [B, H, W, 3] (divided by 255, as the official `imgs / 255.0`: no ImageNet mean/std) or float in
[0, 1]. Output: {'np': float32[B, h, w, 2] logits, 'hv': float32[B, h, w, 2] (channel 0 horizontal x,
channel 1 vertical y, raw regression), 'tp': float32[B, h, w, K + 1] logits (absent when num_classes is None)}.

Precision and mode: parameters float32, `dtype` compute for encoder and decoders; the u0 heads (64 channels)
compute in float32. Built in training mode (BatchNorm batch statistics); `model.eval()` for inference.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import preact_resnet as pr

MODES = pr.MODES
MARGINS = {'original': 95, 'fast': 46}
_SIDE_RESIDUE = {'original': 6, 'fast': 0}  # supported sides: S = residue (mod 8)
_SKIP_CROPS = {'original': (184, 72), 'fast': (92, 36)}  # pixels cut from d0, d1 (official crop_op)
_KSIZE = {'original': 5, 'fast': 3}
_GROUPS = 4  # dense-unit k x k convolutions (official split=4)
BRANCHES = ('np', 'hv', 'tp')


def crop_op(x: jax.Array, crop_h: int, crop_w: int) -> jax.Array:
  """Official `crop_op`: remove crop_h rows (crop_h // 2 on top, the rest at the bottom) and crop_w columns."""
  t, l = crop_h // 2, crop_w // 2
  return x[:, t:x.shape[1] - (crop_h - t), l:x.shape[2] - (crop_w - l)]


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def supported_side(side: int, mode: str) -> int:
  """The smallest side >= `side` the fixed skip crops fit (6 mod 8 'original', 0 mod 8 'fast')."""
  return side + (_SIDE_RESIDUE[mode] - side) % 8


class DenseUnit(nnx.Module):
  """BN-ReLU -> 1x1 -> BN-ReLU -> k x k grouped, both valid."""

  def __init__(self, cin: int, c1: int, c2: int, ksize: int, *, dtype, rngs: nnx.Rngs):
    self.preact_bna = pr.batch_norm(cin, dtype, rngs)
    self.conv1 = pr.conv(cin, c1, 1, dtype=dtype, rngs=rngs)
    self.conv1_bn = pr.batch_norm(c1, dtype, rngs)
    self.conv2 = pr.conv(c1, c2, ksize, groups=_GROUPS, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv1(jax.nn.relu(self.preact_bna(x)))
    return self.conv2(jax.nn.relu(self.conv1_bn(x)))


class DenseBlock(nnx.Module):
  """Official `DenseBlock`: each unit's output is concatenated to its (centre-cropped) input; BN-ReLU."""

  def __init__(self, cin: int, c1: int, c2: int, count: int, ksize: int, *, dtype, rngs: nnx.Rngs):
    self.units = nnx.List([DenseUnit(cin + i * c2, c1, c2, ksize, dtype=dtype, rngs=rngs) for i in range(count)])
    self.out_channels = cin + count * c2
    self.blk_bna = pr.batch_norm(self.out_channels, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for unit in self.units:
      new = unit(x)
      x = crop_op(x, x.shape[1] - new.shape[1], x.shape[2] - new.shape[2])
      x = jnp.concatenate([x, new], axis=-1)
    return jax.nn.relu(self.blk_bna(x))


class UpStage(nnx.Module):
  """u3 / u2: valid conva k x k -> DenseBlock -> convf 1x1."""

  def __init__(self, cin: int, ca: int, units: int, cout: int, ksize: int, width: float, *, dtype,
               rngs: nnx.Rngs):
    s = lambda c: pr.scale_channels(c, width)
    self.conva = pr.conv(cin, ca, ksize, dtype=dtype, rngs=rngs)
    self.dense = DenseBlock(ca, s(128), s(32), units, ksize, dtype=dtype, rngs=rngs)
    self.convf = pr.conv(self.dense.out_channels, cout, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.convf(self.dense(self.conva(x)))


class U1(nnx.Module):
  """u1: TF-same conva k x k."""

  def __init__(self, cin: int, cout: int, ksize: int, *, dtype, rngs: nnx.Rngs):
    self.conva = pr.conv(cin, cout, ksize, dtype=dtype, rngs=rngs)
    self.ksize = ksize

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conva(pr.tf_same_pad(x, self.ksize, 1))


class U0(nnx.Module):
  """u0: BN-ReLU -> 1x1 conv with bias, in float32."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.bn = pr.batch_norm(cin, jnp.float32, rngs)
    self.conv = pr.conv(cin, cout, 1, use_bias=True, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jax.nn.relu(self.bn(x.astype(jnp.float32))))


class DecoderBranch(nnx.Module):
  """One official decoder branch (u3, u2, u1, u0) producing `out_channels` maps."""

  def __init__(self, skip_channels: Sequence[int], out_channels: int, ksize: int, width: float, *, dtype,
               rngs: nnx.Rngs):
    s = lambda c: pr.scale_channels(c, width)
    c0, c1, c2, c3 = skip_channels  # d0, d1, d2, conv_bot(d3)
    self.u3 = UpStage(c3, s(256), 8, c1, ksize, width, dtype=dtype, rngs=rngs)
    self.u2 = UpStage(c1, s(128), 4, c0, ksize, width, dtype=dtype, rngs=rngs)
    self.u1 = U1(c0, s(64), ksize, dtype=dtype, rngs=rngs)
    self.u0 = U0(s(64), out_channels, rngs=rngs)
    if c2 != c3:
      raise ValueError(f'up2(d3) + d2 needs equal channels, got {c3} and {c2}')

  def __call__(self, d: Sequence[jax.Array]) -> jax.Array:
    u3 = self.u3(upsample2x(d[3]) + d[2])
    u2 = self.u2(upsample2x(u3) + d[1])
    u1 = self.u1(upsample2x(u2) + d[0])
    return self.u0(u1)


class HoVerNet(nnx.Module):
  """HoVer-Net with NP, HV and (optionally) TP branches.

  Args:
    mode: 'original' (valid convolutions, 270 -> 80) or 'fast' (256 -> 164).
    num_classes: K nucleus types: the TP branch predicts K + 1 channels (0 = background); None = no TP branch
      (the official `nr_types=None`).
    width_multiplier: channel scale (`preact_resnet.scale_channels`, multiples of 4); 1.0 is the official model.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
    encoder_blocks: residual units per encoder stage; () = the official (3, 4, 6, 3).
  """

  def __init__(self, *, mode: str = 'original', num_classes: int | None = None, width_multiplier: float = 1.0,
               dtype=jnp.float32, encoder_blocks: Sequence[int] = (), rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if num_classes is not None and num_classes < 1:
      raise ValueError(f'num_classes must be >= 1 or None, got {num_classes}')
    if not width_multiplier > 0:
      raise ValueError(f'width_multiplier must be > 0, got {width_multiplier}')
    self.mode = mode
    self.num_classes = num_classes
    self.width_multiplier = width_multiplier
    self.dtype = jnp.dtype(dtype)
    self.margin = MARGINS[mode]
    ksize = _KSIZE[mode]
    self.encoder = pr.PreActResNet50(mode=mode, width_multiplier=width_multiplier, dtype=dtype,
                                     blocks=tuple(encoder_blocks) or pr.BLOCKS, rngs=rngs)
    branch = lambda out: DecoderBranch(self.encoder.out_channels, out, ksize, width_multiplier, dtype=dtype,
                                       rngs=rngs)
    self.decoder_np = branch(2)
    self.decoder_hv = branch(2)
    self.decoder_tp = branch(num_classes + 1) if num_classes is not None else None

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: uint8[B, H, W, 3] or float[B, H, W, 3] in [0, 1], H, W >= 2 * margin + 8.

    Returns {'np', 'hv'[, 'tp']} float32[B, H - 2m, W - 2m, C] (see the module docstring).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {images.shape}')
    _, h, w, _ = images.shape
    m = self.margin
    if min(h, w) < 2 * m + 8:
      raise ValueError(f'HoVer-Net {self.mode!r} needs sides >= {2 * m + 8} (margin {m} per side), got {h}x{w}')
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x / 255.0
    ph, pw = supported_side(h, self.mode) - h, supported_side(w, self.mode) - w
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode='reflect')
    d = self.encoder(x.astype(self.dtype))
    c0, c1 = _SKIP_CROPS[self.mode]
    d = [crop_op(d[0], c0, c0), crop_op(d[1], c1, c1), d[2], d[3]]
    out = {'np': self.decoder_np(d), 'hv': self.decoder_hv(d)}
    if self.decoder_tp is not None:
      out['tp'] = self.decoder_tp(d)
    return {k: v[:, :h - 2 * m, :w - 2 * m] for k, v in out.items()}
