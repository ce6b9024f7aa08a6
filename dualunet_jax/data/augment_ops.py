"""The HistoNeXt and CoNIC-framework augmentation sets as device ops (jax, per sample, vmapped by `augment.py`).

`config.augment.preset` picks a set: 'dualunet' (the default: none of the ops below; every existing config keeps
its behaviour bit for bit), 'histonext' (seed_systems §C) or 'conic' (§B). Every field of `AUGMENT_PRESETS`
that is set in `config.augment` overrides the preset's value (`resolve_augment_preset`), as for the stain
presets.

HistoNeXt (§C), in the order applied:
  affine       scale U(0.9, 1.1) per axis, rotation U(-90, 90) deg, shear U(-5, 5) deg (§C); translation
               U(-1, 1) % of the side and p 1 are the official HoVer-Net's (§C gives neither)
  elastic      p 0.3, alpha U(0, 20), sigma 5 (§C), imgaug's convention: displacement = alpha x Gaussian(sigma)
               smoothed U(-1, 1) noise (NOT `augment.py`'s RMS-normalised elastic_alpha)
  H&E          p 0.8: H and E concentrations (skimage's HED, `augment.rgb_to_hed`) x U(0.95, 1.05) + U(-8, 8)
               (§C). The ±8 is on an 8-bit scale of each stain channel; we read it as 8/255 of the sample's own
               H (E) concentration range (min-max), since HED concentrations have no fixed 8-bit range. DAB kept.
  blur | noise p 0.3 (§C), one of the two with equal odds: Gaussian blur sigma U(0, 0.5) or additive Gaussian
               noise with std U(0, 0.025) (0.025 x 255 on 8 bit, §C)
  CLAHE        clip limit U(1, 2) (§C; OpenCV's units, as in albumentations), 8 x 8 tiles, on the luma (Y of
               YIQ; albumentations equalises L* of Lab, the same idea without a Lab round trip), chroma kept
  gamma        image ** U(0.9, 1.1) (§C)
  sharpen      albumentations' Sharpen: alpha U(0.2, 0.5), lightness U(0.5, 1) (§C gives no ranges: its defaults)
  §C prints "(p 0.4)" after sharpen only; we use 0.4 for CLAHE, gamma and sharpen alike (the clause reads as
  one group). The flips are `config.augment.flips`; §C's random crop is the host pipeline's crop.

CoNIC framework (§B): flips and rot90 are `config.augment.flips` / `rot90`; `transpose` (p 0.5, square crops
only) is here; the colour jitter is the stain preset 'conic' (`augment.STAIN_PRESETS`); then one of Gaussian
(sigma U(0, 1)), median (3x3 or 5x5) or motion blur (a line of length 3, 5 or 7 px at an angle U(0, 180) deg)
with equal odds. §B gives no probabilities or ranges: p 1 for the blur as the official HoVer-Net's OneOf
(a sigma near 0, a short line, are near-identities), sizes from albumentations' defaults.

Geometry and targets: the host makes every target before augmentation (`augment.py`). The affine / elastic warp
samples class and instance maps with nearest neighbour (no new label values; an instance pushed out of the
crop disappears) and other arrays (the image, a density) bilinearly; samples from outside the crop are 0 in
the maps and white (1.0, glass, i.e. background) in the image. Vector targets (`vector_keys`, HoVer-Net's HV
maps) are NOT resampled: HV values are per-instance normalised distances, which a rotation, shear or scale
does not map linearly, so they are recomputed on the device from the warped instance map (`hv_map`, the
official rule, exactly `hv_targets.hv_map`). The host's "too little inside the output crop" rule
(`hv_min_size`) is carried over, not re-judged: an instance keeps HV values iff the host gave it some.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualunet_jax.config_fields import config_field

Batch = dict[str, jax.Array]
_MAP_KEYS = ('class_map', 'instance_map')  # nearest neighbour, 0 outside

# ---------------------------------------------------------------------------------------------- presets
# Fields of `config.augment` read here (float; 0 = off). *_p are probabilities per sample.
#   transpose                          bool, p 0.5 (square crops)
#   affine_p, affine_scale             per-axis scale U(1 - s, 1 + s)
#   affine_rotate, affine_shear        degrees, U(-r, r)
#   affine_translate                   fraction of the side, U(-t, t)
#   warp_elastic_p, warp_elastic_alpha alpha U(0, a) (imgaug convention); warp_elastic_sigma (pixels, static)
#   he_p, he_scale, he_shift           H, E x U(1 - s, 1 + s) + U(-d, d) / 255 of the channel's range
#   blur_noise_p, blur_noise_sigma, noise_std
#   clahe_p, clahe_clip (clip U(1, c)), clahe_tiles (static int)
#   gamma_p, gamma_range               image ** U(1 - g, 1 + g)
#   sharpen_p
#   blur_oneof_p, blur_oneof_sigma     one of Gaussian (sigma U(0, s)), median 3/5, motion 3/5/7
AUGMENT_FIELDS = ('transpose', 'affine_p', 'affine_scale', 'affine_rotate', 'affine_shear', 'affine_translate',
                  'warp_elastic_p', 'warp_elastic_alpha', 'warp_elastic_sigma', 'he_p', 'he_scale', 'he_shift',
                  'blur_noise_p', 'blur_noise_sigma', 'noise_std', 'clahe_p', 'clahe_clip', 'clahe_tiles',
                  'gamma_p', 'gamma_range', 'sharpen_p', 'blur_oneof_p', 'blur_oneof_sigma')
_OFF = dict(dict.fromkeys(AUGMENT_FIELDS, 0.0), transpose=False, warp_elastic_sigma=5.0, clahe_clip=2.0,
            clahe_tiles=8)
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    'dualunet': dict(_OFF),
    'histonext': dict(_OFF, affine_p=1.0, affine_scale=0.1, affine_rotate=90.0, affine_shear=5.0,
                      affine_translate=0.01, warp_elastic_p=0.3, warp_elastic_alpha=20.0, warp_elastic_sigma=5.0,
                      he_p=0.8, he_scale=0.05, he_shift=8.0, blur_noise_p=0.3, blur_noise_sigma=0.5,
                      noise_std=0.025, clahe_p=0.4, clahe_clip=2.0, gamma_p=0.4, gamma_range=0.1, sharpen_p=0.4),
    'conic': dict(_OFF, transpose=True, blur_oneof_p=1.0, blur_oneof_sigma=1.0),
}
_PROBS = tuple(f for f in AUGMENT_FIELDS if f.endswith('_p'))
MOTION_SIZE = 7  # the longest motion-blur line (static kernel size)


def resolve_augment_preset(augment_config: Any) -> dict[str, Any]:
  """{field: value} over `AUGMENT_FIELDS`: the preset named by `augment_config.preset` ('dualunet' when
  absent), each field set (not None) in the config overriding it."""
  name = config_field(augment_config, 'preset', None) or 'dualunet'
  if name not in AUGMENT_PRESETS:
    raise ValueError(f'config.augment.preset={name!r}: expected one of {sorted(AUGMENT_PRESETS)}')
  out = dict(AUGMENT_PRESETS[name])
  for field in AUGMENT_FIELDS:
    value = config_field(augment_config, field, None)
    if value is None:
      continue
    out[field] = bool(value) if field == 'transpose' else int(value) if field == 'clahe_tiles' else float(value)
    if out[field] < 0 or (field in _PROBS and out[field] > 1):
      expected = 'a probability in [0, 1]' if field in _PROBS else '>= 0'
      raise ValueError(f'config.augment.{field}={value}: expected {expected}')
  if out['clahe_tiles'] < 1 or out['warp_elastic_sigma'] <= 0:
    raise ValueError(f"config.augment: clahe_tiles={out['clahe_tiles']} must be >= 1 and "
                     f"warp_elastic_sigma={out['warp_elastic_sigma']} > 0")
  return out


def static_and_traced(fields: Mapping[str, Any]) -> tuple[tuple, dict[str, jax.Array]]:
  """Splits resolved fields into the static part (which ops are on, kernel sizes: a jit cache key) and the
  traced strengths (changing one does not recompile)."""
  on = lambda p: fields[p] > 0
  static = (('transpose',) if fields['transpose'] else ()) + \
      (('affine',) if on('affine_p') else ()) + (('elastic',) if on('warp_elastic_p') else ()) + \
      (('he',) if on('he_p') else ()) + (('blur_noise',) if on('blur_noise_p') else ()) + \
      (('clahe',) if on('clahe_p') else ()) + (('gamma',) if on('gamma_p') else ()) + \
      (('sharpen',) if on('sharpen_p') else ()) + (('blur_oneof',) if on('blur_oneof_p') else ())
  sizes = (_radius(fields['warp_elastic_sigma']), _radius(fields['blur_noise_sigma']),
           _radius(fields['blur_oneof_sigma']), int(fields['clahe_tiles']))
  traced = {k: jnp.float32(v) for k, v in fields.items() if k not in ('transpose', 'clahe_tiles')}
  return (static, sizes), traced


def _radius(sigma: float) -> int:
  return max(1, int(np.ceil(3.0 * sigma)))


# ---------------------------------------------------------------------------------------------- geometry
def affine_matrix(scale: jax.Array, rotate: jax.Array, shear: jax.Array) -> jax.Array:
  """A = R(rotate) . Shear_x(shear) . diag(scale), float32[2, 2] on (x, y) = (column, row) coordinates;
  angles in degrees (y points down, so a positive rotation turns the content clockwise on screen);
  scale float32[2] (x, y)."""
  th, sh = jnp.deg2rad(rotate), jnp.tan(jnp.deg2rad(shear))
  rot = jnp.stack([jnp.stack([jnp.cos(th), -jnp.sin(th)]), jnp.stack([jnp.sin(th), jnp.cos(th)])])
  shear_x = jnp.stack([jnp.stack([jnp.float32(1.0), sh]), jnp.array([0.0, 1.0], jnp.float32)])
  return rot @ shear_x @ jnp.diag(scale)


def affine_coords(shape: tuple[int, int], scale: jax.Array, rotate: jax.Array, shear: jax.Array,
                  translate: jax.Array, at: tuple[jax.Array, jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Where output positions sample the input under p_out = A (p_in - c) + c + t, c the crop centre
  (`affine_matrix` for A; translate float32[2] pixels (x, y)).

  at: output positions (yy, xx) float32[H, W] (default: the pixel grid; an elastic field's positions when the
  two are composed). Returns the input coordinates (yy, xx) float32[H, W].
  """
  h, w = shape
  if at is None:
    at = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
  c = jnp.array([(w - 1) / 2.0, (h - 1) / 2.0], jnp.float32)
  p = jnp.stack([at[1], at[0]], -1) - c - translate  # [H, W, 2] (x, y)
  q = p @ jnp.linalg.inv(affine_matrix(scale, rotate, shear)).T + c
  return q[..., 1], q[..., 0]


def elastic_displacement(key: jax.Array, shape: tuple[int, int], alpha: jax.Array, radius: int,
                         sigma: float) -> jax.Array:
  """imgaug's elastic field float32[H, W, 2] (dy, dx): U(-1, 1) noise, Gaussian(sigma) smoothed, times alpha."""
  from dualunet_jax.data import augment  # the shared smoothing primitives (augment imports this module lazily)
  noise = jax.random.uniform(key, (*shape, 2), jnp.float32, -1.0, 1.0)
  return augment._smooth_2d(noise, augment._gaussian_kernel(sigma, radius)) * alpha


def sample(x: jax.Array, yy: jax.Array, xx: jax.Array, *, nearest: bool, fill: float) -> jax.Array:
  """x: [H, W, ...] read at float coordinates yy, xx: [H, W]; `fill` where the (rounded) coordinate falls
  outside the crop. Nearest keeps the dtype (label maps: no new values); bilinear returns float32."""
  h, w = x.shape[:2]
  inside = (yy > -0.5) & (yy < h - 0.5) & (xx > -0.5) & (xx < w - 0.5)
  inside = inside.reshape(inside.shape + (1,) * (x.ndim - 2))
  if nearest:
    yi = jnp.clip(jnp.round(yy), 0, h - 1).astype(jnp.int32)
    xi = jnp.clip(jnp.round(xx), 0, w - 1).astype(jnp.int32)
    return jnp.where(inside, x[yi, xi], jnp.asarray(fill, x.dtype))
  from dualunet_jax.data import augment
  return jnp.where(inside, augment._sample_bilinear(x.astype(jnp.float32), yy, xx), jnp.float32(fill))


def hv_map(inst: jax.Array, keep: jax.Array | None = None) -> jax.Array:
  """`hv_targets.hv_map` (min_size 0) on the device: int[H, W] instance map -> float32[H, W, 2] (x, y).

  Instances are relabelled by a static-size `jnp.unique` (at most H*W segments), centres rounded half up in
  integer arithmetic (floor(sum / n + 0.5) = (2 sum + n) // (2 n): exact, as the host's float64). `keep`
  (bool[H, W], optional): an instance gets values only if `keep` holds on at least one of its pixels.
  """
  h, w = inst.shape
  n = h * w
  flat = inst.reshape(-1)
  _, lab = jnp.unique(flat, return_inverse=True, size=n, fill_value=0)
  lab = lab.reshape(-1)
  yy, xx = jnp.divmod(jnp.arange(n, dtype=jnp.int32), w)
  seg = lambda v: jax.ops.segment_sum(v, lab, n)
  cnt = jnp.maximum(seg(jnp.ones(n, jnp.int32)), 1)
  cy = ((2 * seg(yy) + cnt) // (2 * cnt))[lab]
  cx = ((2 * seg(xx) + cnt) // (2 * cnt))[lab]
  fg = flat > 0
  if keep is not None:
    fg = fg & (jax.ops.segment_max(keep.reshape(-1).astype(jnp.int32), lab, n) > 0)[lab]

  def normalise(v):
    v = v.astype(jnp.float32)
    lo = jax.ops.segment_min(v, lab, n)[lab]
    hi = jax.ops.segment_max(v, lab, n)[lab]
    out = jnp.where(v < 0, v / jnp.where(v < 0, -lo, 1.0), jnp.where(v > 0, v / jnp.where(v > 0, hi, 1.0), 0.0))
    return jnp.where(fg, out, 0.0)

  return jnp.stack([normalise(xx + 1 - cx), normalise(yy + 1 - cy)], -1).reshape(h, w, 2)


def transpose(x: jax.Array, flag: jax.Array, vector: bool) -> jax.Array:
  """Swap the image axes of `x: [H, W, ...]` (square) where `flag`; a vector field also swaps its (h, v)."""
  t = jnp.swapaxes(x, 0, 1)
  if vector:
    t = t[..., ::-1]
  return jnp.where(flag, t, x)


def warp(sample_: Batch, yy: jax.Array, xx: jax.Array, vector_keys: tuple[str, ...]) -> Batch:
  """Resample every spatial array of one sample at (yy, xx) (see the module docstring for the rules)."""
  out = dict(sample_)
  if vector_keys and 'instance_map' not in sample_:
    raise ValueError(f'affine / elastic augmentation of vector targets {vector_keys} recomputes them from '
                     f'the warped instance map: the batch needs an instance_map')
  for name, x in sample_.items():
    if x.ndim < 2 or name in vector_keys:
      continue
    if name in _MAP_KEYS:
      out[name] = sample(x, yy, xx, nearest=True, fill=0)
    else:
      out[name] = sample(x, yy, xx, nearest=False, fill=1.0 if name == 'image' else 0.0).astype(x.dtype)
  for name in vector_keys:
    had = jnp.any(sample(sample_[name], yy, xx, nearest=True, fill=0) != 0, axis=-1)
    out[name] = hv_map(out['instance_map'], had).astype(sample_[name].dtype)
  return out


# ---------------------------------------------------------------------------------------------- pixel ops
def he_intensity(image: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """H and E concentrations x scale + shift / 255 of each channel's range (min-max over the sample).
  image float32[H, W, 3] in [0, 1]; scale, shift float32[2] (H, E); DAB untouched."""
  from dualunet_jax.data import augment
  hed = augment.rgb_to_hed(image)
  he = hed[..., :2]
  span = jnp.max(he, axis=(0, 1)) - jnp.min(he, axis=(0, 1))
  he = he * scale + shift / 255.0 * span
  return augment.hed_to_rgb(jnp.concatenate([he, hed[..., 2:]], -1))


def gaussian_noise(key: jax.Array, image: jax.Array, std: jax.Array) -> jax.Array:
  return jnp.clip(image + std * jax.random.normal(key, image.shape, jnp.float32), 0.0, 1.0)


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  from dualunet_jax.data import augment
  return augment._smooth_2d(image, augment._gaussian_kernel(sigma, radius))


def _luma_chroma(image: jax.Array) -> tuple[jax.Array, jax.Array]:
  from dualunet_jax.data import augment
  yiq = image @ jnp.asarray(augment._RGB_TO_YIQ.T, jnp.float32)
  return yiq[..., 0], yiq[..., 1:]


def _from_luma_chroma(y: jax.Array, iq: jax.Array) -> jax.Array:
  from dualunet_jax.data import augment
  yiq = jnp.concatenate([y[..., None], iq], -1)
  return jnp.clip(yiq @ jnp.asarray(augment._YIQ_TO_RGB.T, jnp.float32), 0.0, 1.0)


def clahe(gray: jax.Array, clip: jax.Array, tiles: int) -> jax.Array:
  """Contrast-limited adaptive histogram equalisation (OpenCV's algorithm) of float32[H, W] in [0, 1].

  256 bins; the image is reflect-101 padded to a multiple of `tiles` per side (as OpenCV); per tile the
  histogram is clipped at max(clip x tile area / 256, 1) and the clipped excess spread evenly over all bins
  (OpenCV spreads its integer remainder bin by bin: within one count per bin); the mapping is the tile's
  cumulative histogram / area; each pixel interpolates bilinearly between the mappings of the four nearest
  tile centres (only the nearest at the borders). Returns float32[H, W] in [0, 1].
  """
  h, w = gray.shape
  th, tw = -(-h // tiles), -(-w // tiles)
  q = jnp.clip(jnp.round(gray * 255.0), 0, 255).astype(jnp.int32)
  qp = jnp.pad(q, ((0, th * tiles - h), (0, tw * tiles - w)), mode='reflect')
  tile = (jnp.arange(th * tiles) // th)[:, None] * tiles + (jnp.arange(tw * tiles) // tw)[None, :]
  hist = jax.ops.segment_sum(jnp.ones(qp.size, jnp.float32), (tile * 256 + qp).reshape(-1), tiles * tiles * 256)
  hist = hist.reshape(tiles * tiles, 256)
  area = float(th * tw)
  limit = jnp.maximum(clip * area / 256.0, 1.0)
  excess = jnp.sum(jnp.maximum(hist - limit, 0.0), axis=1, keepdims=True)
  hist = jnp.minimum(hist, limit) + excess / 256.0
  lut = (jnp.cumsum(hist, axis=1) / area).reshape(-1)  # [tiles * tiles * 256]

  def axis(n, size):
    f = jnp.arange(n, dtype=jnp.float32) / size - 0.5
    t0 = jnp.floor(f)
    a = f - t0
    t0 = t0.astype(jnp.int32)
    return jnp.maximum(t0, 0), jnp.minimum(t0 + 1, tiles - 1), a

  y0, y1, ay = axis(h, th)
  x0, x1, ax = axis(w, tw)
  look = lambda ty, tx: lut[(ty[:, None] * tiles + tx[None, :]) * 256 + q]
  top = look(y0, x0) * (1 - ax) + look(y0, x1) * ax
  bottom = look(y1, x0) * (1 - ax) + look(y1, x1) * ax
  return jnp.clip(top * (1 - ay[:, None]) + bottom * ay[:, None], 0.0, 1.0)


def clahe_rgb(image: jax.Array, clip: jax.Array, tiles: int) -> jax.Array:
  """CLAHE of the luma of float32[H, W, 3]; chroma (I, Q) kept."""
  y, iq = _luma_chroma(image)
  return _from_luma_chroma(clahe(jnp.clip(y, 0.0, 1.0), clip, tiles), iq)


def gamma(image: jax.Array, g: jax.Array) -> jax.Array:
  return jnp.power(jnp.maximum(image, 0.0), g)


def _depthwise(image: jax.Array, kernel: jax.Array) -> jax.Array:
  """float32[H, W, C] convolved (correlation) with one float32[k, k] kernel per channel, edge padded."""
  r = kernel.shape[0] // 2
  c = image.shape[-1]
  x = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode='edge')[None]
  k = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=c)[0]


def sharpen(image: jax.Array, alpha: jax.Array, lightness: jax.Array) -> jax.Array:
  """albumentations' Sharpen of float32[H, W, 3]: (1 - alpha) identity + alpha [[-1, -1, -1], [-1, 8 + lightness,
  -1], [-1, -1, -1]], clipped to [0, 1]."""
  ident = jnp.zeros((3, 3), jnp.float32).at[1, 1].set(1.0)
  effect = jnp.full((3, 3), -1.0, jnp.float32).at[1, 1].set(8.0 + lightness)
  return jnp.clip(_depthwise(image, (1 - alpha) * ident + alpha * effect), 0.0, 1.0)


def median_blur(image: jax.Array, size: int) -> jax.Array:
  """size x size median per channel (odd static size; reflect-101 border as OpenCV's medianBlur)."""
  r = size // 2
  h, w = image.shape[:2]
  x = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode='reflect')
  patches = jnp.stack([x[i:i + h, j:j + w] for i in range(size) for j in range(size)], 0)
  return jnp.sort(patches, axis=0)[size * size // 2]  # odd count: the middle value (no NaN-aware quantile)


def motion_kernel(length: jax.Array, angle: jax.Array, size: int = MOTION_SIZE) -> jax.Array:
  """float32[size, size] line of `length` px through the centre at `angle` degrees, anti-aliased
  (weight 1 - distance to the line, zero beyond `length` / 2 along it), normalised to sum 1."""
  r = size // 2
  t = jnp.arange(-r, r + 1, dtype=jnp.float32)
  dy, dx = t[:, None], t[None, :]
  th = jnp.deg2rad(angle)
  across = jnp.abs(dx * jnp.sin(th) - dy * jnp.cos(th))
  along = jnp.abs(dx * jnp.cos(th) + dy * jnp.sin(th))
  k = jnp.maximum(1.0 - across, 0.0) * (along <= (length - 1) / 2.0 + 1e-3)
  return k / jnp.sum(k)


def motion_blur(image: jax.Array, kernel: jax.Array) -> jax.Array:
  return _depthwise(image, kernel)


# ---------------------------------------------------------------------------------------------- per sample
def _maybe(key: jax.Array, p: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  return jnp.where(jax.random.bernoulli(key, p), new, old)


def geometry(key: jax.Array, sample_: Batch, s: dict[str, jax.Array], static: tuple,
             vector_keys: tuple[str, ...]) -> Batch:
  """transpose, then affine and elastic as one resampling (affine first, the elastic field on its output)."""
  ops, (el_radius, _, _, _) = static
  h, w = sample_['image'].shape[:2]
  out = dict(sample_)
  if 'transpose' in ops and h == w:  # a non-square crop would change shape: off there (as rot90's quarter turns)
    flag = jax.random.bernoulli(jax.random.fold_in(key, 0))
    for name in out:
      if out[name].ndim >= 2:
        out[name] = transpose(out[name], flag, name in vector_keys)
  if 'affine' not in ops and 'elastic' not in ops:
    return out
  gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
  yy, xx = gy, gx
  if 'elastic' in ops:
    ka, kf, kp = jax.random.split(jax.random.fold_in(key, 2), 3)
    alpha = jax.random.uniform(ka, (), jnp.float32, 0.0, s['warp_elastic_alpha'])
    d = elastic_displacement(kf, (h, w), alpha, el_radius, s['warp_elastic_sigma'])
    d = jnp.where(jax.random.bernoulli(kp, s['warp_elastic_p']), d, 0.0)
    yy, xx = yy + d[..., 0], xx + d[..., 1]
  if 'affine' in ops:  # sampling coordinates of the affine, read at the elastic field's positions
    kp, ks, kr, ksh, kt = jax.random.split(jax.random.fold_in(key, 1), 5)
    on = jax.random.bernoulli(kp, s['affine_p'])
    scale = jax.random.uniform(ks, (2,), jnp.float32, 1.0 - s['affine_scale'], 1.0 + s['affine_scale'])
    rot = jax.random.uniform(kr, (), jnp.float32, -s['affine_rotate'], s['affine_rotate'])
    shear = jax.random.uniform(ksh, (), jnp.float32, -s['affine_shear'], s['affine_shear'])
    trans = jax.random.uniform(kt, (2,), jnp.float32, -1.0, 1.0) * s['affine_translate'] * jnp.array([w, h])
    yy, xx = affine_coords((h, w), jnp.where(on, scale, 1.0), jnp.where(on, rot, 0.0),
                           jnp.where(on, shear, 0.0), jnp.where(on, trans, 0.0), at=(yy, xx))
  return warp(out, yy, xx, vector_keys)


def pixels(key: jax.Array, image: jax.Array, s: dict[str, jax.Array], static: tuple) -> jax.Array:
  """The pixel ops on float32[H, W, 3] in [0, 1], in the module docstring's order; each draws from its own
  `fold_in(key, i)` so switching one op leaves the others' draws alone."""
  ops, (_, bn_radius, bo_radius, tiles) = static
  k = lambda i: jax.random.split(jax.random.fold_in(key, i), 4)
  if 'he' in ops:
    kp, ka, kb, _ = k(10)
    a = jax.random.uniform(ka, (2,), jnp.float32, 1.0 - s['he_scale'], 1.0 + s['he_scale'])
    b = jax.random.uniform(kb, (2,), jnp.float32, -s['he_shift'], s['he_shift'])
    image = _maybe(kp, s['he_p'], he_intensity(image, a, b), image)
  if 'blur_noise' in ops:
    kp, kc, kv, kn = k(11)
    sigma = jax.random.uniform(kv, (), jnp.float32, 0.0, s['blur_noise_sigma'])
    std = jax.random.uniform(jax.random.fold_in(kv, 1), (), jnp.float32, 0.0, s['noise_std'])
    new = jnp.where(jax.random.bernoulli(kc), gaussian_blur(image, sigma, bn_radius),
                    gaussian_noise(kn, image, std))
    image = _maybe(kp, s['blur_noise_p'], new, image)
  if 'clahe' in ops:
    kp, kc, _, _ = k(12)
    clip = jax.random.uniform(kc, (), jnp.float32, 1.0, jnp.maximum(s['clahe_clip'], 1.0))
    image = _maybe(kp, s['clahe_p'], clahe_rgb(image, clip, tiles), image)
  if 'gamma' in ops:
    kp, kg, _, _ = k(13)
    g = jax.random.uniform(kg, (), jnp.float32, 1.0 - s['gamma_range'], 1.0 + s['gamma_range'])
    image = _maybe(kp, s['gamma_p'], gamma(image, g), image)
  if 'sharpen' in ops:
    kp, ka, kl, _ = k(14)
    alpha = jax.random.uniform(ka, (), jnp.float32, 0.2, 0.5)
    light = jax.random.uniform(kl, (), jnp.float32, 0.5, 1.0)
    image = _maybe(kp, s['sharpen_p'], sharpen(image, alpha, light), image)
  if 'blur_oneof' in ops:
    kp, kc, kv, ka = k(15)
    choice = jax.random.randint(kc, (), 0, 3)
    sigma = jax.random.uniform(kv, (), jnp.float32, 0.0, s['blur_oneof_sigma'])
    five = jax.random.bernoulli(jax.random.fold_in(kv, 1))
    median = jnp.where(five, median_blur(image, 5), median_blur(image, 3))
    length = 3.0 + 2.0 * jax.random.randint(ka, (), 0, 3).astype(jnp.float32)
    angle = jax.random.uniform(jax.random.fold_in(ka, 1), (), jnp.float32, 0.0, 180.0)
    motion = motion_blur(image, motion_kernel(length, angle))
    new = jnp.select([choice == 0, choice == 1], [gaussian_blur(image, sigma, bo_radius), median], motion)
    image = _maybe(kp, s['blur_oneof_p'], new, image)
  return image
