"""Device-side training augmentation: jittable, vmapped over the batch, one PRNG key per step.

`augment_batch(key, batch, augment_config)` takes the host pipeline's batch (uint8 image, int32 class and
instance maps, float32 density) and returns the augmented batch with the image as float32 in [0, 1].
ImageNet mean/std normalisation is done inside the model, not here.

Geometry (flips, rot90, elastic) moves image, class map, instance map and density together, so targets stay
aligned with the pixels. Why the targets are computed on the host *before* augmentation rather than here:
the Gaussian rendering is cheap in scipy and depends on the crop (centroids of the visible part of each
nucleus), and the dihedral transforms commute with the reference's rendering (a delta at the floored
centroid filtered with a symmetric, reflect-mode Gaussian, divided by its max): transforming the rendered map
equals rendering at the transformed centroid except for the 1-px floor. A flip maps a centroid x to
W - 1 - x, and the rendered peak sits at W - 1 - floor(x) instead of floor(W - 1 - x): identical for integer
centroids, one pixel apart for fractional ones (the same +-1 px order as the reference's own box quirk, §3.4).
Elastic deformation resamples the density bilinearly: peaks move with the displacement field and their
heights change slightly (the map is not re-rendered or re-normalised).

rot90: `k` in 0..3 for square crops. For non-square crops a quarter turn would change the shape, so only
k in {0, 2} is drawn there (a half turn; with flips on this adds nothing new, documented rather than raised).

Colour (stain) augmentation: `config.augment.stain_preset` names a set of strengths ('paper': the paper's HED
jitter only; 'strong': wide HED jitter, stain-vector mixing, gamma, brightness, contrast, saturation and hue,
for inter-lab variation; 'none'; 'custom': the fields alone), resolved in one place, `resolve_stain_preset`;
any colour field set in the config overrides its preset value. Colour ops never touch the targets.

The HistoNeXt and CoNIC-framework sets (`config.augment.preset` = 'histonext' | 'conic'; default 'dualunet':
none of them) live in `augment_ops.py`: transpose, affine and elastic warps right after this module's own
geometry (vector targets are recomputed from the warped instance map there), their pixel ops after the colour
ops above and before `blur_sigma`'s blur. Their keys are `fold_in`s of the per-sample key, so the draws of
the ops here are the same with or without them.

All randomness is per sample from `jax.random.split(key, B)`; no Python branching on traced values. Any
augmentation whose config strength is 0 (or flag False) is skipped at trace time.
"""

from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualunet_jax.config_fields import config_field
from dualunet_jax.data import augment_ops

# Ruifrok & Johnston stain vectors, exactly skimage.color.rgb_from_hed / hed_from_rgb.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = float(np.log(1e-6))  # skimage's optical-density scale: OD / -log(1e-6)

_MAP_KEYS = ('class_map', 'instance_map')  # nearest-neighbour resampled
Batch = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------- geometry
def _dihedral(x: jax.Array, hflip: jax.Array, vflip: jax.Array, k: jax.Array, square: bool) -> jax.Array:
  """rot90(k) . vflip . hflip of one sample `x: [H, W, ...]` (bools / int32 scalars, traced).

  rot90 is transpose + flips (np.rot90: k=1 -> flip(x^T, 0), k=2 -> flip both, k=3 -> flip(x^T, 1)), so the
  whole dihedral group costs a few selects rather than a switch over four rotated copies.
  """
  x = jnp.where(hflip, jnp.flip(x, 1), x)
  x = jnp.where(vflip, jnp.flip(x, 0), x)
  if square:
    x = jnp.where(k % 2 == 1, jnp.swapaxes(x, 0, 1), x)
  x = jnp.where((k == 1) | (k == 2), jnp.flip(x, 0), x)
  x = jnp.where((k == 2) | (k == 3), jnp.flip(x, 1), x)
  return x


def _dihedral_vector(x: jax.Array, hflip: jax.Array, vflip: jax.Array, k: jax.Array, square: bool) -> jax.Array:
  """`_dihedral` of a vector field `x: [H, W, 2]` with components (horizontal, vertical) in image axes (e.g.
  HoVer-Net's distances to the nucleus centre): the pixels move as `_dihedral` moves them, and each flip of
  an axis negates that axis' component, each transpose swaps the components."""
  sign = lambda flag, c: jnp.where(flag, -1.0, 1.0) if c else 1.0
  x = _dihedral(x, hflip, vflip, k, square)
  h, v = x[..., 0], x[..., 1]
  h, v = h * sign(hflip, 1), v * sign(vflip, 1)
  if square:
    h, v = jnp.where(k % 2 == 1, v, h), jnp.where(k % 2 == 1, h, v)
  v = v * sign((k == 1) | (k == 2), 1)
  h = h * sign((k == 2) | (k == 3), 1)
  return jnp.stack([h, v], axis=-1).astype(x.dtype)


def _gaussian_kernel(sigma: jax.Array | float, radius: int) -> jax.Array:
  """Normalised 1-D Gaussian float32[2 * radius + 1] (sigma may be traced; the radius is static)."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)  # sigma -> 0 gives a delta, not NaN
  k = jnp.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def _smooth_2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Gaussian smoothing of `x: float32[H, W, C]` as two 1-D convolutions (large radii: conv, not unrolled)."""
  r = (kernel.shape[0] - 1) // 2
  c = x.shape[-1]
  xp = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode='edge')[None]  # [1, H+2r, W+2r, C]
  dn = ('NHWC', 'HWIO', 'NHWC')
  ky = jnp.tile(kernel[:, None, None, None], (1, 1, 1, c))
  kx = jnp.tile(kernel[None, :, None, None], (1, 1, 1, c))
  y = jax.lax.conv_general_dilated(xp, ky, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c)
  y = jax.lax.conv_general_dilated(y, kx, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c)
  return y[0]


def _elastic_field(key: jax.Array, shape: tuple[int, int], alpha: jax.Array, sigma: float) -> jax.Array:
  """Smooth random displacement float32[H, W, 2] (dy, dx) in pixels with RMS `alpha` per component.

  Simard et al.: U(-1, 1) noise smoothed by a Gaussian of `sigma`; divided by its analytic standard deviation
  (sqrt(1/3 * sum(k2d^2)), k2d the 2-D kernel) so that `alpha` reads directly as pixels.
  """
  kernel = _gaussian_kernel(sigma, _radius(sigma))
  noise = jax.random.uniform(key, (*shape, 2), jnp.float32, -1.0, 1.0)
  field = _smooth_2d(noise, kernel)
  std = jnp.sqrt((jnp.sum(kernel ** 2) ** 2) / 3.0)
  return field * (alpha / std)


def _sample_bilinear(x: jax.Array, yy: jax.Array, xx: jax.Array) -> jax.Array:
  """x: [H, W, ...] sampled at float coords yy, xx: [H, W] (clamped to the border)."""
  h, w = x.shape[:2]
  yy = jnp.clip(yy, 0.0, h - 1.0)
  xx = jnp.clip(xx, 0.0, w - 1.0)
  y0 = jnp.floor(yy).astype(jnp.int32)
  x0 = jnp.floor(xx).astype(jnp.int32)
  y1 = jnp.minimum(y0 + 1, h - 1)
  x1 = jnp.minimum(x0 + 1, w - 1)
  wy = (yy - y0).reshape(yy.shape + (1,) * (x.ndim - 2))
  wx = (xx - x0).reshape(xx.shape + (1,) * (x.ndim - 2))
  top = x[y0, x0] * (1 - wx) + x[y0, x1] * wx
  bottom = x[y1, x0] * (1 - wx) + x[y1, x1] * wx
  return top * (1 - wy) + bottom * wy


def _sample_nearest(x: jax.Array, yy: jax.Array, xx: jax.Array) -> jax.Array:
  h, w = x.shape[:2]
  yi = jnp.clip(jnp.round(yy), 0, h - 1).astype(jnp.int32)
  xi = jnp.clip(jnp.round(xx), 0, w - 1).astype(jnp.int32)
  return x[yi, xi]


# ---------------------------------------------------------------------------------------------- colour
def rgb_to_hed(rgb: jax.Array) -> jax.Array:
  """skimage.color.rgb2hed without its clamp of negative stains to 0 (so hed_to_rgb inverts it exactly).

  rgb: float32[..., 3] in [0, 1] -> float32[..., 3] stain concentrations (optical density / -log(1e-6)).
  """
  od = jnp.log(jnp.maximum(rgb, 1e-6)) / _LOG_ADJUST
  return od @ jnp.asarray(HED_FROM_RGB, jnp.float32)


def hed_to_rgb(hed: jax.Array) -> jax.Array:
  """skimage.color.hed2rgb: float32[..., 3] stains -> float32[..., 3] RGB clipped to [0, 1]."""
  log_rgb = (hed * _LOG_ADJUST) @ jnp.asarray(RGB_FROM_HED, jnp.float32)
  return jnp.clip(jnp.exp(log_rgb), 0.0, 1.0)


def _hed_jitter(key: jax.Array, image: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """Per-channel HED scale ~ U(1 - scale, 1 + scale) and shift ~ U(-shift, shift) (paper App. D)."""
  ks, kt = jax.random.split(key)
  a = jax.random.uniform(ks, (3,), jnp.float32, 1.0 - scale, 1.0 + scale)
  b = jax.random.uniform(kt, (3,), jnp.float32, -shift, shift)
  return hed_to_rgb(rgb_to_hed(image) * a + b)


def _grayscale(image: jax.Array) -> jax.Array:
  return image @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)


def _color_jitter(key: jax.Array, image: jax.Array, strength: jax.Array) -> jax.Array:
  """Brightness, contrast, saturation factors each ~ U(1 - s, 1 + s), applied in that fixed order."""
  kb, kc, ks = jax.random.split(key, 3)
  lo, hi = jnp.maximum(0.0, 1.0 - strength), 1.0 + strength
  image = jnp.clip(image * jax.random.uniform(kb, (), jnp.float32, lo, hi), 0.0, 1.0)
  mean = jnp.mean(_grayscale(image))
  c = jax.random.uniform(kc, (), jnp.float32, lo, hi)
  image = jnp.clip(mean + c * (image - mean), 0.0, 1.0)
  gray = _grayscale(image)[..., None]
  s = jax.random.uniform(ks, (), jnp.float32, lo, hi)
  return jnp.clip(gray + s * (image - gray), 0.0, 1.0)


def _hed_mix(key: jax.Array, image: jax.Array, scale: jax.Array, shift: jax.Array, mix: jax.Array) -> jax.Array:
  """HED jitter (as `_hed_jitter`) recomposed with perturbed stain vectors (stain-vector mixing).

  The image is decomposed with the standard Ruifrok matrix, then rebuilt with H and E vectors whose RGB
  components are each scaled by U(1 - mix, 1 + mix) and renormalised to unit length: the hue of each stain
  changes independently (bluish vs purple haematoxylin, pink vs orange eosin), which a per-channel HED scale
  cannot do. DAB (near zero on H&E) keeps its vector. float32[H, W, 3] in [0, 1] -> same.
  """
  ks, kt, km = jax.random.split(key, 3)
  a = jax.random.uniform(ks, (3,), jnp.float32, 1.0 - scale, 1.0 + scale)
  b = jax.random.uniform(kt, (3,), jnp.float32, -shift, shift)
  m = jnp.asarray(RGB_FROM_HED, jnp.float32)
  noise = jax.random.uniform(km, (2, 3), jnp.float32, 1.0 - mix, 1.0 + mix)
  he = m[:2] * noise
  he = he / jnp.linalg.norm(he, axis=1, keepdims=True) * jnp.linalg.norm(m[:2], axis=1, keepdims=True)
  m = jnp.concatenate([he, m[2:]], axis=0)
  log_rgb = ((rgb_to_hed(image) * a + b) * _LOG_ADJUST) @ m
  return jnp.clip(jnp.exp(log_rgb), 0.0, 1.0)


def _gamma(key: jax.Array, image: jax.Array, strength: jax.Array) -> jax.Array:
  """image ** g, log g ~ U(-s, s). Scales every pixel's optical density by g: darker or paler staining with
  white staying white (a global OD scale, unlike brightness, which also greys the glass)."""
  g = jnp.exp(jax.random.uniform(key, (), jnp.float32, -strength, strength))
  return jnp.power(jnp.maximum(image, 1e-6), g)


def _brightness(key: jax.Array, image: jax.Array, strength: jax.Array) -> jax.Array:
  """image * f, f ~ U(1 - s, 1 + s) (scanner exposure / white balance level)."""
  f = jax.random.uniform(key, (), jnp.float32, jnp.maximum(0.0, 1.0 - strength), 1.0 + strength)
  return jnp.clip(image * f, 0.0, 1.0)


def _contrast(key: jax.Array, image: jax.Array, strength: jax.Array) -> jax.Array:
  """Blend with the image's mean grey: mean + c * (image - mean), c ~ U(1 - s, 1 + s)."""
  c = jax.random.uniform(key, (), jnp.float32, jnp.maximum(0.0, 1.0 - strength), 1.0 + strength)
  mean = jnp.mean(_grayscale(image))
  return jnp.clip(mean + c * (image - mean), 0.0, 1.0)


# RGB <-> YIQ (NTSC): luma Y plus a chroma plane (I, Q) in which saturation is a radial scale and hue a rotation.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _saturation_hue(key: jax.Array, image: jax.Array, saturation: jax.Array, hue: jax.Array,
                    ops: tuple[str, ...]) -> jax.Array:
  """Chroma scaled by U(1 - saturation, 1 + saturation) and rotated by U(-hue, hue) turns, luma kept.

  One 3x3 matrix per sample (YIQ -> scale/rotate the IQ plane -> RGB), so both cost one matmul.
  """
  kss, kh = jax.random.split(key)
  s = jax.random.uniform(kss, (), jnp.float32, jnp.maximum(0.0, 1.0 - saturation), 1.0 + saturation) \
      if 'saturation' in ops else jnp.float32(1.0)
  theta = 2 * jnp.pi * jax.random.uniform(kh, (), jnp.float32, -hue, hue) if 'hue' in ops else jnp.float32(0.0)
  cos, sin = s * jnp.cos(theta), s * jnp.sin(theta)
  chroma = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], jnp.float32)
  chroma = chroma.at[1, 1].set(cos).at[1, 2].set(-sin).at[2, 1].set(sin).at[2, 2].set(cos)
  # Row-vector pixels: rgb' = rgb @ (T^T C^T T^-T).
  mat = jnp.asarray(_RGB_TO_YIQ.T, jnp.float32) @ chroma.T @ jnp.asarray(_YIQ_TO_RGB.T, jnp.float32)
  return jnp.clip(image @ mat, 0.0, 1.0)


def _stain_ops(key: jax.Array, image: jax.Array, strengths: dict[str, jax.Array], ops: tuple[str, ...]
               ) -> jax.Array:
  """The colour ops other than the paper's HED jitter, in a fixed order: gamma (global OD scale),
  brightness, contrast, then saturation and hue together, then the legacy combined `color_jitter`.

  Keys come from `fold_in(key, i)`, one per op, so turning one op on or off leaves the others' draws alone.
  """
  if 'gamma' in ops:
    image = _gamma(jax.random.fold_in(key, 1), image, strengths['gamma'])
  if 'brightness' in ops:
    image = _brightness(jax.random.fold_in(key, 2), image, strengths['brightness'])
  if 'contrast' in ops:
    image = _contrast(jax.random.fold_in(key, 3), image, strengths['contrast'])
  if 'saturation' in ops or 'hue' in ops:
    image = _saturation_hue(jax.random.fold_in(key, 4), image, strengths['saturation'], strengths['hue'], ops)
  if 'color_jitter' in ops:
    image = _color_jitter(key, image, strengths['color_jitter'])  # the key it always had
  return image


# ---------------------------------------------------------------------------------------------- presets
# Colour augmentation fields of `config.augment` (all float strengths, 0 = off):
#   hed_scale, hed_shift   HED concentrations * U(1 - scale, 1 + scale) + U(-shift, shift) (paper App. D)
#   stain_mix              H and E stain vectors' RGB components * U(1 - m, 1 + m), renormalised
#   gamma                  image ** exp(U(-g, g)) (global optical-density scale)
#   brightness, contrast   factors ~ U(1 - s, 1 + s)
#   saturation             chroma factor ~ U(1 - s, 1 + s); hue: chroma rotation ~ U(-h, h) turns
#   color_jitter           the older combined brightness/contrast/saturation factor (kept for old configs)
STAIN_FIELDS = ('hed_scale', 'hed_shift', 'stain_mix', 'gamma', 'brightness', 'contrast', 'saturation', 'hue',
                'color_jitter')
_OFF = dict.fromkeys(STAIN_FIELDS, 0.0)
STAIN_PRESETS: dict[str, dict[str, float]] = {
    'none': dict(_OFF),
    # The paper's (Appendix D): HED scale U(0.98, 1.02), shift U(-0.02, 0.02), nothing else.
    'paper': dict(_OFF, hed_scale=0.02, hed_shift=0.02),
    # Inter-lab variation. The paper's shift already moves a CoNSeP crop's mean tissue L* by -11..+10 (5th-95th
    # percentile), but as an additive tint of every pixel, glass included, while its scale barely changes
    # how dark the nuclei are. Real labs differ multiplicatively (more or less stain): here gamma scales all
    # optical density by 0.61-1.65 and HED scale each stain by 0.7-1.3, so the darkest 5 % of tissue (the
    # nuclei) moves by -18..+19 L* (paper: -8..+10); stain_mix and hue change the stains' hues. Numbers:
    # README, Stain robustness.
    'strong': dict(_OFF, hed_scale=0.3, hed_shift=0.02, stain_mix=0.15, gamma=0.5, brightness=0.1,
                   contrast=0.25, saturation=0.3, hue=0.04),
    # The CoNIC framework's colour jitter (seed_systems §B: brightness, contrast, saturation, hue; no ranges
    # given): torchvision ColorJitter-style 0.2 / 0.2 / 0.2 and a hue of 0.05 turns (our choice).
    'conic': dict(_OFF, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
}


def resolve_stain_preset(augment_config: Any) -> dict[str, float]:
  """The colour augmentation strengths of `augment_config` ({field: float} over `STAIN_FIELDS`).

  `stain_preset` names a base ('paper' | 'strong' | 'none'); every colour field that is set (not None)
  overrides that base, so `--config.augment.stain_preset=strong --config.augment.gamma=0.6` widens one op.
  'custom', or no `stain_preset` at all (configs and workdirs written before presets), starts from all-off
  and takes the fields as given: older configs keep their behaviour.
  """
  name = config_field(augment_config, 'stain_preset', 'custom')
  if name != 'custom' and name not in STAIN_PRESETS:
    raise ValueError(f"config.augment.stain_preset={name!r}: expected one of "
                     f"{sorted(STAIN_PRESETS) + ['custom']}")
  base = STAIN_PRESETS.get(name, _OFF)
  out = {}
  for field in STAIN_FIELDS:
    value = config_field(augment_config, field, None)
    value = base[field] if value is None else float(value)  # None: a placeholder left unset in the config
    if value < 0:
      raise ValueError(f'config.augment.{field}={value}: strengths are >= 0 (0 = off)')
    out[field] = value
  return out


# ---------------------------------------------------------------------------------------------- per sample
def _augment_one(key: jax.Array, sample: Batch, strengths: dict[str, jax.Array], static: tuple) -> Batch:
  """One sample: image float32[H, W, 3] in [0, 1] plus maps [H, W]; returns the same layout."""
  flips, rot90, hed, color, blur_radius, elastic_sigma, vector_keys, extra = static
  k_geo, k_rot, k_el, k_hed, k_col, k_blur = jax.random.split(key, 6)
  image = sample['image']
  h, w = image.shape[:2]
  out = dict(sample)

  # Dihedral transforms: exact, applied identically to every spatial array.
  if flips or rot90:
    kh, kv = jax.random.split(k_geo)
    hflip = jax.random.bernoulli(kh) if flips else jnp.bool_(False)
    vflip = jax.random.bernoulli(kv) if flips else jnp.bool_(False)
    square = h == w
    if rot90:
      k = jax.random.randint(k_rot, (), 0, 4) if square else 2 * jax.random.randint(k_rot, (), 0, 2)
    else:
      k = jnp.int32(0)
    for name in out:
      if out[name].ndim >= 2:  # per-sample scalars (e.g. eval's 'valid') are not spatial
        move = _dihedral_vector if name in vector_keys else _dihedral
        out[name] = move(out[name], hflip, vflip, k, square)

  if elastic_sigma:
    field = _elastic_field(k_el, (h, w), strengths['elastic_alpha'], elastic_sigma)
    gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
    yy, xx = gy + field[..., 0], gx + field[..., 1]
    for name in out:
      if out[name].ndim >= 2:
        sampler = _sample_nearest if name in _MAP_KEYS else _sample_bilinear
        out[name] = sampler(out[name], yy, xx)

  if extra[0]:  # the HistoNeXt / CoNIC geometry: transpose, affine, elastic (augment_ops)
    out = augment_ops.geometry(jax.random.fold_in(key, 100), out, strengths['extra'], extra, vector_keys)

  image = out['image']
  if hed:  # `hed`: which of ('jitter', 'mix') are on
    if 'mix' in hed:
      image = _hed_mix(k_hed, image, strengths['hed_scale'], strengths['hed_shift'], strengths['stain_mix'])
    else:
      image = _hed_jitter(k_hed, image, strengths['hed_scale'], strengths['hed_shift'])  # the paper's draws
  if color:  # `color`: the names of the other colour ops that are on (see `_stain_ops`)
    image = _stain_ops(k_col, image, strengths, color)
  if extra[0]:
    image = augment_ops.pixels(jax.random.fold_in(key, 101), image, strengths['extra'], extra)
  if blur_radius:
    sigma = jax.random.uniform(k_blur, (), jnp.float32, 0.0, strengths['blur_sigma'])
    image = _smooth_2d(image, _gaussian_kernel(sigma, blur_radius))
  out['image'] = image
  return out


def augment_batch(key: jax.Array, batch: Mapping[str, jax.Array], augment_config: Any,
                  vector_keys: tuple[str, ...] = ()) -> Batch:
  """Random augmentation of a training batch, consistent across image and targets.

  Args:
    key: one PRNG key for the whole step (split per sample inside).
    batch: {'image': uint8[B, H, W, 3], 'class_map': int32[B, H, W], 'density': float32[B, H, W],
      'instance_map': int32[B, H, W] (optional)}; any other [B, H, W, ...] array is moved with the geometry
      (nearest resampling only for class/instance maps; bilinear otherwise); [B] arrays pass through.
    augment_config: `config.augment` (ConfigDict or mapping): flips, rot90 (bools), the colour ops
      (`stain_preset` and the `STAIN_FIELDS`, resolved by `resolve_stain_preset`), blur_sigma, elastic_alpha
      (RMS displacement, pixels), elastic_sigma (smoothness, pixels); `preset` and the
      `augment_ops.AUGMENT_FIELDS` (the HistoNeXt / CoNIC sets, resolved by
      `augment_ops.resolve_augment_preset`).
      Read at trace time: pass it as a closure / static argument under `jax.jit`.
    vector_keys: names of [B, H, W, 2] vector fields (horizontal, vertical components, e.g. HoVer-Net's HV
      targets) that also rotate under flips and quarter turns; elastic deformation resamples them bilinearly
      without rotating the vectors (a smooth, small displacement field barely turns them). The preset
      ops' transpose swaps their components; their affine / elastic warp recomputes them from the warped
      instance map (`augment_ops.hv_map`; the batch then needs 'instance_map').

  Returns:
    The same keys; 'image' float32[B, H, W, 3] in [0, 1] (uint8 input is divided by 255; float input is taken
    as already in [0, 1]); maps keep their dtypes.
  """
  stain = resolve_stain_preset(augment_config)
  cfg = {
      'flips': bool(config_field(augment_config, 'flips', False)),
      'rot90': bool(config_field(augment_config, 'rot90', False)),
      **stain,
      'blur_sigma': float(config_field(augment_config, 'blur_sigma', 0.0)),
      'elastic_alpha': float(config_field(augment_config, 'elastic_alpha', 0.0)),
      'elastic_sigma': float(config_field(augment_config, 'elastic_sigma', 8.0)),
  }
  # Static: what is on and the kernel radii (shapes); traced: the strengths, so changing a strength (or a
  # test sweeping them) does not recompile.
  hed_on = stain['hed_scale'] > 0 or stain['hed_shift'] > 0 or stain['stain_mix'] > 0
  hed = (('jitter',) if hed_on else ()) + (('mix',) if stain['stain_mix'] > 0 else ())
  color = tuple(k for k in ('gamma', 'brightness', 'contrast', 'saturation', 'hue', 'color_jitter') if stain[k] > 0)
  extra, extra_strengths = augment_ops.static_and_traced(augment_ops.resolve_augment_preset(augment_config))
  static = (cfg['flips'], cfg['rot90'], hed, color,
            _radius(cfg['blur_sigma']) if cfg['blur_sigma'] > 0 else 0,
            cfg['elastic_sigma'] if cfg['elastic_alpha'] > 0 else 0.0, tuple(vector_keys), extra)
  strengths = {k: jnp.float32(cfg[k]) for k in ('hed_scale', 'hed_shift', 'color_jitter', 'blur_sigma',
                                                  'elastic_alpha')}
  strengths.update({k: jnp.float32(stain[k]) for k in STAIN_FIELDS})
  if extra[0]:
    strengths['extra'] = extra_strengths
  return _augment_jit(key, dict(batch), strengths, static)


def _radius(sigma: float) -> int:
  return max(1, int(np.ceil(3.0 * sigma)))


@functools.partial(jax.jit, static_argnums=3)
def _augment_jit(key: jax.Array, batch: Batch, strengths: dict[str, jax.Array], static: tuple) -> Batch:
  # Jitted so eager callers compile once per configuration and shape; inside an outer jit this inlines.
  image = batch['image']
  if image.dtype == jnp.uint8:
    image = image.astype(jnp.float32) / 255.0
  batch['image'] = image.astype(jnp.float32)
  keys = jax.random.split(key, image.shape[0])
  return jax.vmap(lambda k, s: _augment_one(k, s, strengths, static), in_axes=(0, 0))(keys, batch)
