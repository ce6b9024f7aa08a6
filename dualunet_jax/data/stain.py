"""Stain statistics of a training split and inference-time stain normalisation (host side, numpy only).

    stats = fit_statistics(record['image'] for record in train_source)   # once, at training start
    save_statistics(workdir, stats)                                       # W/stain_stats.json
    norm = Normalizer('reinhard', load_statistics(workdir))              # or 'macenko', or 'none'
    norm.fit(thumbnail)            # per slide: the source statistics, from a thumbnail (or per tile: the tile)
    tile = norm(tile)              # uint8[H, W, 3] -> uint8[H, W, 3], the same mapping for every tile

Two methods, both estimated on tissue pixels only (`tissue_mask`: glass and near-black artefacts excluded):

- Reinhard et al. 2001: per-channel mean and standard deviation in CIELAB (D65); the source's are mapped onto
  the target's, `lab' = (lab - mean_s) / std_s * std_t + mean_t`. Global: fixes brightness, contrast and
  colour cast, not the balance between the two stains.
- Macenko et al. 2009: the H and E stain vectors (optical-density plane of the two largest principal
  components, extreme angles at the 1st / 99th percentile) and each stain's 99th-percentile concentration.
  The source's concentrations are rescaled to the target's maxima and recomposed with the target's vectors.
  The part of the optical density outside the source's stain plane (JPEG noise, pigment) is added back
  unchanged, so normalising an image with its own statistics is the identity (the classic method drops it).

A source with too little tissue to estimate anything (a background tile, an empty image, a one-stain tile
for Macenko) gets the identity mapping, never an error: whole-slide and tile inference must not stop there.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

STATS_FILE = 'stain_stats.json'
STATS_VERSION = 1
KINDS = ('none', 'reinhard', 'macenko')

# Tissue: brightest-channel optical density above this (glass scans at OD ~0.02-0.10; the palest eosin-only
# stroma of CoNSeP and the fixtures is above 0.2), and some channel brighter than `_DARK` (black borders, dust
# and dark pen marks are not stain).
_WHITE_OD = 0.15
_DARK = 25
# Fewer tissue pixels than this: no statistics (identity). 400 px is a 20x20 patch, enough for stable means.
MIN_TISSUE_PIXELS = 400
# Macenko: a pixel enters the stain-plane estimate only if every channel's OD exceeds this (Macenko's beta).
_MACENKO_BETA = 0.15
_MACENKO_ALPHA = 1.0  # percentile of the extreme angles
_MACENKO_MIN_ANGLE = np.deg2rad(3.0)  # H and E vectors closer than this: one stain only, no estimate


def _check_image(image: Any, what: str = 'image') -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{what}: expected uint8[H, W, 3] RGB, got {image.dtype}{list(image.shape)}')
  return image


# ------------------------------------------------------------------------------------------ colour spaces
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float64)  # skimage's sRGB (D65)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float64)  # D65, 2-degree observer (skimage's default)
# sRGB decoding of the 256 uint8 levels: one lookup instead of a power per pixel.
_LINEAR_LUT = (lambda c: np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4))(
    np.arange(256) / 255.0).astype(np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """uint8[..., 3] sRGB -> float32[..., 3] CIELAB (D65; matches skimage.color.rgb2lab to ~1e-3)."""
  xyz = _LINEAR_LUT[rgb] @ (_XYZ_FROM_RGB / _WHITE[:, None]).T.astype(np.float32)
  f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                  axis=-1).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
  """float[..., 3] CIELAB -> uint8[..., 3] sRGB (out-of-gamut colours clipped)."""
  fy = (lab[..., 0] + 16.0) / 116.0
  f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
  xyz = np.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)  # 0.2068966 = cbrt(0.008856)
  lin = np.clip(xyz @ (_RGB_FROM_XYZ * _WHITE[None, :]).T.astype(np.float32), 0.0, 1.0)
  srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1.0 / 2.4) - 0.055)
  return np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)


def optical_density(rgb: np.ndarray) -> np.ndarray:
  """uint8[..., 3] -> float32[..., 3] optical density -ln(I / 255) (0 clamped to 1: OD <= 5.54)."""
  return -np.log(np.maximum(rgb, 1).astype(np.float32) / 255.0)


def _od_to_rgb(od: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ tissue
def tissue_mask(image: np.ndarray) -> np.ndarray:
  """Stained-tissue pixels of an H&E image: uint8[H, W, 3] -> bool[H, W].

  Per pixel (no morphology, so it works on tiles and thumbnails alike): not glass (brightest-channel OD above
  0.15) and not near-black (some channel above 25). For whole slides, pass the coarse tissue region of
  `dualunet_jax.inference.slide.tissue_mask(thumbnail)` as `Normalizer.fit(..., tissue=)`; the two combine.
  """
  image = _check_image(image)
  return (image.min(axis=-1) < 255.0 * np.exp(-_WHITE_OD)) & (image.max(axis=-1) > _DARK)


def _tissue(image: np.ndarray, tissue: np.ndarray | None) -> np.ndarray:
  mask = tissue_mask(image)
  if tissue is not None:
    tissue = np.asarray(tissue, bool)
    if tissue.shape != image.shape[:2]:
      raise ValueError(f'tissue: expected bool{list(image.shape[:2])} like the image, got {list(tissue.shape)}')
    mask &= tissue
  return mask


# ------------------------------------------------------------------------------------------ estimators
def _reinhard_stats(lab: np.ndarray) -> dict[str, list[float]] | None:
  """lab: float32[N, 3] tissue pixels -> {'mean': [3], 'std': [3]} (None when too few / flat)."""
  if len(lab) < MIN_TISSUE_PIXELS:
    return None
  lab = lab.astype(np.float64)
  std = lab.std(axis=0)
  if not np.all(std > 1e-3):
    return None
  return {'mean': lab.mean(axis=0).tolist(), 'std': std.tolist()}


def _macenko_stats(od: np.ndarray) -> dict[str, list] | None:
  """od: float32[N, 3] tissue-pixel optical densities -> {'stain_matrix': [[H rgb], [E rgb]] (unit rows),
  'max_concentrations': [H, E]} (99th percentiles), or None when no two-stain plane can be estimated."""
  od = od[np.all(od > _MACENKO_BETA, axis=1)].astype(np.float64)
  if len(od) < MIN_TISSUE_PIXELS:
    return None
  _, vectors = np.linalg.eigh(np.cov(od.T))
  plane = vectors[:, [2, 1]]  # the two largest principal directions
  plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # both pointing into positive OD
  proj = od @ plane
  phi = np.arctan2(proj[:, 1], proj[:, 0])
  lo, hi = np.percentile(phi, [_MACENKO_ALPHA, 100.0 - _MACENKO_ALPHA])
  if hi - lo < _MACENKO_MIN_ANGLE:
    return None
  v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
  v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
  # Haematoxylin absorbs red more than eosin does: the vector with the larger red OD is H.
  he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])
  he = np.abs(he) / np.linalg.norm(he, axis=1, keepdims=True)
  conc = od @ np.linalg.pinv(he)  # [N, 2] least squares
  max_c = np.percentile(conc, 99, axis=0)
  if not np.all(max_c > 1e-3):
    return None
  return {'stain_matrix': he.tolist(), 'max_concentrations': max_c.tolist()}


def fit_statistics(images: Iterable[np.ndarray], *, stride: int = 2, max_pixels_per_image: int = 50_000,
                   seed: int = 0) -> dict[str, Any]:
  """Target statistics of a set of images (a training split), for both methods, JSON-serialisable.

  Each image is measured as `Normalizer.fit` measures a source (the same estimators), and the target is the
  median over images of each statistic (the H and E vectors renormalised). Pooling all pixels instead would
  put the between-image spread into Reinhard's std and let the darkest images set Macenko's 99th-percentile
  maxima: normalised tiles would come out with more contrast and darker than a typical training image (on
  CoNSeP Test, Macenko with pooled maxima darkened clean tiles by 7 L*).

  Computed on every `stride`-th row and column (a quarter of the pixels at 2: colour statistics do not
  change, and it is 4x faster); Macenko on at most `max_pixels_per_image` of those tissue pixels, drawn at
  random (seeded).

  Args:
    images: uint8[H, W, 3] arrays (any sizes).
  Returns:
    {'version', 'num_images', 'tissue_pixels', 'reinhard': {'mean', 'std'}, 'macenko': {'stain_matrix',
    'max_concentrations'}, 'image_mean_L': [min, median, max] of the per-image tissue mean L*}.
  Raises:
    ValueError: a wrong image, or no image with enough tissue (Reinhard) / two separable stains (Macenko).
  """
  rng = np.random.default_rng(seed)
  reinhard, macenko, count, n_images = [], [], 0, 0
  for i, image in enumerate(images):
    image = _check_image(image, f'image {i}')
    n_images += 1
    image = image[::stride, ::stride]
    pixels = image[tissue_mask(image)]
    stats = _reinhard_stats(rgb_to_lab(pixels)) if len(pixels) else None
    if stats is None:
      continue
    reinhard.append(stats)
    count += len(pixels)
    if len(pixels) > max_pixels_per_image:
      pixels = pixels[rng.choice(len(pixels), max_pixels_per_image, replace=False)]
    stats = _macenko_stats(optical_density(pixels))
    if stats is not None:
      macenko.append(stats)
  if not reinhard:
    raise ValueError(f'fit_statistics: none of the {n_images} images has {MIN_TISSUE_PIXELS}+ tissue pixels')
  if not macenko:
    raise ValueError('fit_statistics: no image shows two separable stains (Macenko)')
  median = lambda rows, key: np.median(np.asarray([r[key] for r in rows], np.float64), axis=0)
  he = median(macenko, 'stain_matrix')
  he /= np.linalg.norm(he, axis=1, keepdims=True)
  image_l = [r['mean'][0] for r in reinhard]
  return {'version': STATS_VERSION, 'num_images': n_images, 'tissue_pixels': int(count),
          'reinhard': {'mean': median(reinhard, 'mean').tolist(), 'std': median(reinhard, 'std').tolist()},
          'macenko': {'stain_matrix': he.tolist(),
                      'max_concentrations': median(macenko, 'max_concentrations').tolist()},
          'image_mean_L': [float(np.min(image_l)), float(np.median(image_l)), float(np.max(image_l))]}


def save_statistics(workdir: str | os.PathLike, stats: dict[str, Any]) -> pathlib.Path:
  """Writes `workdir/stain_stats.json` atomically (temporary file, then rename); returns its path."""
  path = pathlib.Path(workdir) / STATS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(stats, indent=2, sort_keys=True, allow_nan=False))
  os.replace(tmp, path)
  return path


def load_statistics(workdir: str | os.PathLike) -> dict[str, Any]:
  """Reads `workdir/stain_stats.json` (a workdir, or the file itself)."""
  path = pathlib.Path(workdir)
  path = path if path.suffix == '.json' else path / STATS_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f'{path}: no stain statistics (the run predates them, or is a converted checkpoint); write them with '
        f'`python -m dualunet_jax.data.stain --workdir={path.parent} --config=<the training config>` '
        f"or `--images='<glob of training images>'`")
  stats = json.loads(path.read_text())
  if stats.get('version') != STATS_VERSION:
    raise ValueError(f'{path}: stain statistics version {stats.get("version")}, expected {STATS_VERSION}')
  return stats


# ------------------------------------------------------------------------------------------ normaliser
class Normalizer:
  """Maps an image's stain appearance onto the target statistics (a training split's).

  `fit(image)` estimates the SOURCE statistics once (a slide's thumbnail, or the tile itself); every call then
  applies the same source -> target mapping, so all tiles of a slide are normalised alike. A source without
  enough tissue fits to the identity. Plain numpy state: picklable (post-processing / loader workers).

  Args:
    kind: 'none' (always the identity), 'reinhard' or 'macenko'.
    target_stats: `fit_statistics(...)` / `load_statistics(workdir)` (unused for 'none'; may be None then).
  """

  def __init__(self, kind: str, target_stats: dict[str, Any] | None = None):
    if kind not in KINDS:
      raise ValueError(f'stain normalisation {kind!r}: expected one of {KINDS}')
    self.kind = kind
    self._target = None
    if kind != 'none':
      if not target_stats or kind not in target_stats:
        raise ValueError(f'stain normalisation {kind!r}: the target statistics have no {kind!r} entry')
      self._target = {k: np.asarray(v, np.float64) for k, v in target_stats[kind].items()}
    self._source: dict[str, np.ndarray] | None = None
    self._fitted = kind == 'none'

  def __repr__(self) -> str:
    state = 'unfitted' if not self._fitted else 'identity' if self.identity else 'fitted'
    return f'Normalizer({self.kind!r}, {state})'

  @property
  def identity(self) -> bool:
    """True when calls return the input unchanged ('none', or a source without enough tissue)."""
    return self._fitted and self._source is None

  def fit(self, image: np.ndarray, tissue: np.ndarray | None = None) -> Normalizer:
    """Estimates the source statistics from `image` (uint8[H, W, 3]: a thumbnail or a tile) on its tissue
    pixels, optionally restricted further by `tissue` (bool[H, W]). Returns self."""
    image = _check_image(image)
    self._source, self._fitted = None, True
    if self.kind == 'none':
      return self
    pixels = image[_tissue(image, tissue)]
    if self.kind == 'reinhard':
      stats = _reinhard_stats(rgb_to_lab(pixels)) if len(pixels) else None
    else:
      stats = _macenko_stats(optical_density(pixels)) if len(pixels) else None
    if stats is not None:
      self._source = {k: np.asarray(v, np.float64) for k, v in stats.items()}
      if self.kind == 'macenko':
        self._source['unmix'] = np.linalg.pinv(self._source['stain_matrix'])  # [3, 2]
    return self

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] -> normalised uint8[H, W, 3] (the input itself when the mapping is the identity)."""
    image = _check_image(image)
    if not self._fitted:
      raise RuntimeError('Normalizer: call .fit(thumbnail or tile) first, to estimate the source statistics')
    if self._source is None or image.size == 0:
      return image
    s, t = self._source, self._target
    if self.kind == 'reinhard':
      scale = (t['std'] / s['std']).astype(np.float32)
      shift = (t['mean'] - s['mean'] * t['std'] / s['std']).astype(np.float32)
      return lab_to_rgb(rgb_to_lab(image) * scale + shift)
    od = optical_density(image)
    conc = od @ s['unmix'].astype(np.float32)  # [H, W, 2]
    residual = od - conc @ s['stain_matrix'].astype(np.float32)
    conc *= (t['max_concentrations'] / s['max_concentrations']).astype(np.float32)
    return _od_to_rgb(conc @ t['stain_matrix'].astype(np.float32) + residual)


def normalize_tile(normalizer: Normalizer, image: np.ndarray) -> np.ndarray:
  """Per-tile use (independent tiles, e.g. CoNSeP): fit on the tile itself, then normalise it."""
  return normalizer.fit(image)(image)


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> None:
  """`python -m dualunet_jax.data.stain --workdir=W (--config=CONFIG [--split=train] | --images=GLOB)`:
  writes W/stain_stats.json for a workdir that has none (trained before statistics were stored, converted)."""
  import argparse
  import glob
  import time
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--workdir', required=True)
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument('--config', help='training config (.py); its dataset must be prepared or manual_dir set')
  group.add_argument('--images', help="glob of training images, e.g. 'data/Train/Images/*.png'")
  parser.add_argument('--split', default=None, help='with --config: the split (default: its train_split)')
  parser.add_argument('--manual_dir', default=None, help='with --config: config.dataset.manual_dir')
  args = parser.parse_args(argv)
  start = time.time()
  if args.images:
    from PIL import Image
    paths = sorted(glob.glob(args.images))
    if not paths:
      raise SystemExit(f'--images={args.images!r} matches no file')
    images = (np.asarray(Image.open(p).convert('RGB')) for p in paths)
  else:
    import importlib.util
    from dualunet_jax.data import schema, sources
    spec = importlib.util.spec_from_file_location('stain_config', args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if args.manual_dir:
      config.dataset.manual_dir = args.manual_dir
    source = sources.load_source(config.dataset, args.split or config.dataset.train_split)
    images = (source[i][schema.IMAGE] for i in range(len(source)))
  stats = fit_statistics(images)
  path = save_statistics(args.workdir, stats)
  print(f'{path}: {stats["num_images"]} images, {stats["tissue_pixels"]:,} tissue pixels, '
        f'Reinhard LAB mean {np.round(stats["reinhard"]["mean"], 1).tolist()}, '
        f'Macenko H {np.round(stats["macenko"]["stain_matrix"][0], 3).tolist()} '
        f'E {np.round(stats["macenko"]["stain_matrix"][1], 3).tolist()} ({time.time() - start:.1f} s)')


if __name__ == '__main__':
  main()
