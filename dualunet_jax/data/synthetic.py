"""Synthetic H&E nuclei: procedurally rendered tiles with instance and class labels (the demo dataset).

Every record is a pure function of `(seed, split, index)` (plus tile size and K): `render_tile` seeds its own
numpy Generator from that tuple, so any record can be regenerated alone, in any order or in parallel, and
the train and test splits draw from disjoint streams.

What a tile holds (at 0.5 um/px, so a 256-px tile is 128 um across):

  type (K order)  diameter (px)             look
  lymphocyte      10-14, round              dark, dense, nearly uniform; clustered in aggregates
  epithelial      17-25 x 11-21, oval       pale, vesicular: chromatin clumps, dark membrane, 1-2 nucleoli,
                                            purple cytoplasm; in cohesive sheets (touching, palisading)
  spindle         20-29 x 4-9, bent         medium-dark, elongated along the stroma fibres
  plasma          11-14, round              clock-face chromatin, eccentric in basophilic cytoplasm (K >= 4)
  neutrophil      12-16, 3-4 lobes          dark lobes in a pale pink cytoplasm (K >= 5)

Sizes are the real ones at 0.5 um/px (lymphocyte nucleus 5-7 um, epithelial 8-12 um) and stay within the
~8-30 px a tiny model sees well on 256-px tiles. Nuclei grow into same-class clusters, touching and partly
overlapping (the later-drawn one occludes; the instance map holds what is visible, and fragments under
`MIN_PIXELS` are dropped), over a pink eosin stroma with wavy fibres, some white lumen and a few red blood
cells (unlabelled distractors). Stains are mixed by Beer-Lambert from haematoxylin and eosin concentration
maps (HED space) with per-tile jitter of the stain vectors, concentrations and illumination, then blurred
mildly and given sensor noise. 20-60 nuclei per 256^2 tile, scaled with the tile area.

The TFDS builder `Synthetic` writes these records (`schema.tfds_features()`, array_record) for the splits
`train` and `test`; its BuilderConfig name encodes every parameter, e.g. `train512_test64_size256_k3_seed42`,
so differently parameterised datasets live side by side in one data_dir (`<data_dir>/synthetic/<config>/
<version>/`). Bump `Synthetic.VERSION` whenever the rendering changes so stale prepared copies are not reused.

    python -m dualunet_jax.data.synthetic /tmp/synthetic_examples   # example overlays + rendering speed

Measured on the shared 2-core dev box (numpy 2.4, one process): ~50 tiles/s of CPU time at 256^2, K = 3.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import numpy as np
from scipy import ndimage

import tensorflow_datasets as tfds

from dualunet_jax.data import schema
from dualunet_jax.data._common import NucleiBuilder

MPP = 0.5
TISSUE = 'synthetic'
MIN_PIXELS = 10  # visible instances smaller than this (occluded / cut by the border) are dropped

# Optical densities per unit concentration: medians of Macenko estimates on the CoNSeP crops and fixtures
# (Ruifrok's eosin renders too cyan); jittered per tile.
_STAIN_H = np.array([0.65, 0.72, 0.25], np.float32)
_STAIN_E = np.array([0.30, 0.85, 0.42], np.float32)


@dataclasses.dataclass(frozen=True)
class NucleusType:
  """How one nucleus class looks. Ranges are (low, high) of a uniform draw; lengths in pixels at 0.5 um/px,
  stain amounts in concentration units of the H / E vectors."""
  name: str
  semi_major: tuple[float, float]
  aspect: tuple[float, float]  # minor / major semi-axis
  hematoxylin: tuple[float, float]
  texture: float  # fine chromatin granularity, relative
  clumps: float  # coarse chromatin clumps, relative
  margination: float  # chromatin pushed to the membrane (pale centre), relative
  rim: float  # extra H on the nuclear membrane
  nucleoli: int  # at most this many dark nucleoli
  irregularity: float  # std of the boundary's low harmonics, relative to the radius
  bend: float  # max curvature of the long axis (spindles)
  lobes: int  # > 0: lobulated nucleus made of this many lobes (+0/1)
  clock_face: float  # peripheral chromatin blocks (plasma cells)
  cytoplasm: float  # cytoplasm radius / nucleus radius (0 = scant)
  cytoplasm_stain: tuple[float, float]  # (H, E) concentration of the cytoplasm
  eccentric: float  # offset of the nucleus inside its cytoplasm, fraction of the nucleus radius
  attach: float  # probability that a new nucleus grows next to one of its class (clusters, touching)


NUCLEUS_TYPES = (
    NucleusType('lymphocyte', semi_major=(5.0, 7.0), aspect=(0.85, 1.0), hematoxylin=(1.9, 2.5), texture=0.15,
                clumps=0.12, margination=0.0, rim=0.0, nucleoli=0, irregularity=0.05, bend=0.0, lobes=0,
                clock_face=0.0, cytoplasm=1.3, cytoplasm_stain=(0.12, 0.2), eccentric=0.1, attach=0.65),
    NucleusType('epithelial', semi_major=(8.5, 12.5), aspect=(0.65, 0.85), hematoxylin=(0.75, 1.05),
                texture=0.25, clumps=0.35, margination=0.35, rim=0.45, nucleoli=2, irregularity=0.05,
                bend=0.0, lobes=0, clock_face=0.0, cytoplasm=1.7, cytoplasm_stain=(0.22, 0.35),
                eccentric=0.15, attach=0.8),
    NucleusType('spindle', semi_major=(10.0, 14.5), aspect=(0.2, 0.3), hematoxylin=(1.3, 1.7), texture=0.12,
                clumps=0.10, margination=0.0, rim=0.0, nucleoli=0, irregularity=0.02, bend=0.25, lobes=0,
                clock_face=0.0, cytoplasm=0.0, cytoplasm_stain=(0.0, 0.0), eccentric=0.0, attach=0.25),
    NucleusType('plasma', semi_major=(5.5, 7.0), aspect=(0.8, 0.95), hematoxylin=(1.3, 1.7), texture=0.10,
                clumps=0.10, margination=0.0, rim=0.3, nucleoli=0, irregularity=0.03, bend=0.0, lobes=0,
                clock_face=0.45, cytoplasm=1.9, cytoplasm_stain=(0.32, 0.28), eccentric=0.55, attach=0.4),
    NucleusType('neutrophil', semi_major=(6.0, 8.0), aspect=(1.0, 1.0), hematoxylin=(2.0, 2.5), texture=0.08,
                clumps=0.05, margination=0.0, rim=0.0, nucleoli=0, irregularity=0.0, bend=0.0, lobes=3,
                clock_face=0.0, cytoplasm=1.6, cytoplasm_stain=(0.03, 0.42), eccentric=0.0, attach=0.3),
)
CLASS_NAMES = tuple(t.name for t in NUCLEUS_TYPES)
MAX_CLASSES = len(NUCLEUS_TYPES)


# ----------------------------------------------------------------------------------------------- noise


@functools.lru_cache(maxsize=32)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
  """float32[size, cells + 3]: smooth (Gaussian-weighted) interpolation from a coarse grid to pixels."""
  nodes = (np.arange(cells + 3) - 1.0) * (size / cells)
  x = np.arange(size) + 0.5
  w = np.exp(-0.5 * ((x[:, None] - nodes[None]) / (0.6 * size / cells)) ** 2)
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """float32[size, size], zero mean, unit std, features ~size/cells px across (for cells << size)."""
  a = _interp_matrix(size, cells)
  half = rng.standard_normal((cells + 3, cells + 3), dtype=np.float32) @ a.T
  # einsum, not BLAS: a multithreaded GEMM stalls badly on the shared, oversubscribed CPUs of data workers.
  field = np.einsum('ik,kl->il', a, half)
  field -= field.mean()
  return field / (field.std() + 1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
  """Clip to [0, 1]; np.clip's Python wrapper costs more than the work on these small boxes."""
  return np.minimum(np.maximum(x, 0), 1)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  return yy, xx


# ------------------------------------------------------------------------------------------ background


def _background(rng: np.random.Generator, size: int, fine: np.ndarray) -> dict[str, np.ndarray]:
  """Stroma: H/E concentration maps float32[size, size], the lumen map (1 = empty) and the fibre phase;
  `fine` is a float32[size, size] unit-std speckle field."""
  yy, xx = _grid(size)
  cells = max(2, size // 64)
  theta = rng.uniform(0, np.pi)
  period = rng.uniform(4.0, 8.0)
  # Wavy collagen: fibre "lanes" follow a plane wave whose phase is warped by large-scale noise; each lane
  # gets its own strength from a 1-D random profile, so widths and contrast vary like real bundles.
  phase = (2 * np.pi / period) * (xx * np.cos(theta) + yy * np.sin(theta))
  phase += rng.uniform(4, 12) * _smooth_noise(rng, size, cells) + 1.5 * _smooth_noise(rng, size, cells * 3)
  lane = phase * (4 / (2 * np.pi))  # 4 profile samples per lane
  lane -= lane.min()
  profile = ndimage.gaussian_filter1d(rng.standard_normal(int(lane.max()) + 2).astype(np.float32), 1.3)
  profile /= profile.std() + 1e-6
  fib = np.interp(lane, np.arange(len(profile), dtype=np.float32), profile).astype(np.float32)
  fib += 0.6 * _smooth_noise(rng, size, max(4, size // 16))  # bundles start and stop along their length
  fibrous = 1 / (1 + np.exp(-2.5 * (_smooth_noise(rng, size, cells) + rng.uniform(-0.5, 1.0))))
  cleft = np.clip(-fib - 1.0, 0, 1)  # thin white clefts between bundles
  e = rng.uniform(0.3, 0.65) * (1 + 0.12 * _smooth_noise(rng, size, cells * 2))
  e *= (1 + 0.22 * fibrous * fib) * (1 - 0.75 * fibrous * cleft)
  e *= 1 + 0.06 * fine  # speckle
  e = np.maximum(e, 0.02)
  h = rng.uniform(0.03, 0.22) * (1 + 0.3 * _smooth_noise(rng, size, cells)) * (1 - 0.6 * fibrous * cleft)

  lumen = np.zeros((size, size), np.float32)
  if rng.random() < 0.45:
    field = _smooth_noise(rng, size, max(2, size // 96))
    thr = np.quantile(field[::4, ::4], 1 - rng.uniform(0.05, 0.3))  # lumen covers 5-30% of the tile
    lumen = np.clip((field - thr) * 6 + 0.5, 0, 1)
  keep = 1 - 0.95 * lumen
  return {'h': (h * keep).astype(np.float32), 'e': (e * keep).astype(np.float32), 'lumen': lumen,
          'phase': phase}


def _fibre_angle(phase: np.ndarray, x: float, y: float) -> float:
  """Direction (radians) of the stroma fibres at (x, y): perpendicular to the phase gradient."""
  size = phase.shape[0]
  xi, yi = min(max(round(x), 1), size - 2), min(max(round(y), 1), size - 2)
  gx = phase[yi, xi + 1] - phase[yi, xi - 1]
  gy = phase[yi + 1, xi] - phase[yi - 1, xi]
  return float(np.arctan2(gy, gx) + np.pi / 2)


# ---------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass
class _Nucleus:
  cls: int  # 0-based type index
  x: float
  y: float
  a: float  # semi-major
  b: float  # semi-minor
  theta: float  # direction of the major axis


def _directional_radius(a, b, theta, phi):
  """Radius of the ellipse (a, b, theta) in direction phi (vectorised over any argument)."""
  c, s = np.cos(phi - theta), np.sin(phi - theta)
  return a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)


def _layout(rng: np.random.Generator, size: int, num_classes: int, lumen: np.ndarray,
            phase: np.ndarray) -> list[_Nucleus]:
  """Nucleus centres, axes and orientations: a mixture of free nuclei and same-class clusters that grow by
  attaching new nuclei to placed ones at 0.85-1.02x the contact distance (touching or partly overlapping)."""
  n_target = max(2, int(round(rng.uniform(20, 60) * (size / 256) ** 2)))
  # Per-tile class mixture: varies from tile to tile, yet every class is likely present.
  weights = 0.65 * rng.dirichlet(np.full(num_classes, 1.5)) + 0.35 / num_classes
  classes = rng.choice(num_classes, size=n_target, p=weights)
  pad = 4.0
  xs, ys, aa, bb, th, cl = (np.zeros(n_target, np.float64) for _ in range(6))
  placed: list[_Nucleus] = []
  for c in classes:
    t = NUCLEUS_TYPES[c]
    a = rng.uniform(*t.semi_major)
    b = a * rng.uniform(*t.aspect)
    same = [i for i, n in enumerate(placed) if n.cls == c]
    for _ in range(15):
      if same and rng.random() < t.attach:
        j = placed[same[rng.integers(len(same))]]
        if t.name in ('epithelial', 'spindle'):
          theta = j.theta + rng.normal(0, 0.3)  # neighbours roughly parallel (palisading, fascicles)
          phi = j.theta + np.pi / 2 * rng.choice([-1, 1]) + rng.normal(0, 0.5)  # mostly side by side
        else:
          theta = rng.uniform(0, np.pi)
          phi = rng.uniform(0, 2 * np.pi)
        dist = (_directional_radius(a, b, theta, phi) + _directional_radius(j.a, j.b, j.theta, phi))
        dist *= rng.uniform(0.85, 1.02)
        x, y = j.x + dist * np.cos(phi), j.y + dist * np.sin(phi)
      else:
        x, y = rng.uniform(-pad, size + pad, 2)
        if t.name == 'spindle':  # fibroblasts lie along the collagen
          theta = _fibre_angle(phase, x, y) + rng.normal(0, 0.15)
        else:
          theta = rng.uniform(0, np.pi)
      if not (-pad <= x <= size + pad and -pad <= y <= size + pad):
        continue
      if lumen[min(max(int(y), 0), size - 1), min(max(int(x), 0), size - 1)] > 0.3:
        continue
      k = len(placed)
      if k:
        dx, dy = xs[:k] - x, ys[:k] - y
        phi_k = np.arctan2(dy, dx)
        contact = _directional_radius(a, b, theta, phi_k) + _directional_radius(aa[:k], bb[:k], th[:k], phi_k)
        if np.any(np.hypot(dx, dy) < 0.82 * contact):
          continue
      xs[k], ys[k], aa[k], bb[k], th[k], cl[k] = x, y, a, b, theta, c
      placed.append(_Nucleus(int(c), float(x), float(y), float(a), float(b), float(theta)))
      break
  return placed


# --------------------------------------------------------------------------------------------- drawing


def _box(x: float, y: float, radius: float, size: int):
  x0, x1 = max(int(np.floor(x - radius)), 0), min(int(np.ceil(x + radius)) + 1, size)
  y0, y1 = max(int(np.floor(y - radius)), 0), min(int(np.ceil(y + radius)) + 1, size)
  if x0 >= x1 or y0 >= y1:
    return None
  return (slice(y0, y1), slice(x0, x1)), np.arange(x0, x1, dtype=np.float32) - x, (
      np.arange(y0, y1, dtype=np.float32) - y)[:, None]


def _draw_cytoplasm(h: np.ndarray, e: np.ndarray, n: _Nucleus, t: NucleusType, offset: tuple[float, float],
                    texture: np.ndarray):
  """Soft elliptical cell body around a nucleus, blended into the background H/E maps (under all nuclei)."""
  ca, cb = t.cytoplasm * n.a + 1.0, t.cytoplasm * n.b + 2.0
  cx, cy = n.x + offset[0], n.y + offset[1]
  got = _box(cx, cy, ca + 3, h.shape[0])
  if got is None:
    return
  sl, dx, dy = got
  cos, sin = np.cos(n.theta), np.sin(n.theta)
  rn = np.sqrt(((dx * cos + dy * sin) / ca) ** 2 + ((dy * cos - dx * sin) / cb) ** 2)
  w = _unit((1 - rn) * 2.5 + 0.15 * texture[sl])  # ~40% of the radius fades out, ragged edge
  w = w * w * (3 - 2 * w)
  h[sl] += t.cytoplasm_stain[0] * w
  e[sl] = e[sl] * (1 - w) + t.cytoplasm_stain[1] * w


def _draw_nucleus(rng: np.random.Generator, canvas: dict[str, np.ndarray], n: _Nucleus, t: NucleusType,
                  ident: int, h_scale: float):
  """Renders one nucleus into its bounding box: premultiplied H (`nuc_h`), coverage (`alpha`) and the
  instance map (`inst`, overwriting what it occludes)."""
  size = canvas['inst'].shape[0]
  lobes = t.lobes + int(rng.integers(2)) if t.lobes else 0
  irregular = t.irregularity * rng.standard_normal(3)
  extent = (n.a + 2.5) * (1 + 3 * t.irregularity) + (n.a * t.bend)
  got = _box(n.x, n.y, extent, size)
  if got is None:
    return
  sl, dx, dy = got
  cos, sin = np.cos(n.theta), np.sin(n.theta)
  u = dx * cos + dy * sin
  v = -dx * sin + dy * cos
  if lobes:  # a horseshoe of overlapping round lobes
    r_lobe = n.a * rng.uniform(0.42, 0.5)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.arange(lobes) * rng.uniform(1.2, 1.6)
    ring = n.a - r_lobe
    lu, lv = (ring * np.cos(angles))[:, None, None], (ring * np.sin(angles))[:, None, None]
    rn = np.sqrt((u - lu) ** 2 + (v - lv) ** 2).min(0) / r_lobe
    scale = r_lobe
    ang = np.arctan2(v, u)
  else:
    if t.bend:
      v = v - rng.uniform(-t.bend, t.bend) * u ** 2 / n.a
    un, vn = u / n.a, v / n.b
    rn = np.sqrt(un ** 2 + vn ** 2)
    ang = np.arctan2(vn, un)
    if t.irregularity:
      phases = rng.uniform(0, 2 * np.pi, 3)
      rn = rn / (1 + sum(irregular[k] * np.cos((k + 2) * ang + phases[k]) for k in range(3)))
    scale = np.sqrt(n.a * n.b)
  alpha = _unit((1 - rn) * scale + 0.5)  # ~1-px anti-aliased edge; alpha > 0.5 <=> inside
  inside = rn < 1
  depth = (1 - rn) * scale  # distance to the boundary in px (approximately)

  hem = 1 + t.texture * canvas['fine'][sl] + t.clumps * canvas['clumps'][sl]
  if t.margination:
    hem = hem * (1 + t.margination * (_unit(rn) ** 2 - 0.6))
  if t.clock_face:
    hem = hem * (1 + t.clock_face * np.cos(6 * ang + rng.uniform(0, 2 * np.pi)) * _unit(rn) ** 2)
  base = rng.uniform(*t.hematoxylin) * h_scale
  hem = np.maximum(hem, 0.4) * base  # chromatin texture never leaves holes
  if t.rim:
    hem = hem + t.rim * np.exp(-((depth - 0.7) ** 2) / 0.8)
  for _ in range(int(rng.integers(0, t.nucleoli + 1)) if t.nucleoli else 0):
    r, p = rng.uniform(0, 0.45), rng.uniform(0, 2 * np.pi)
    nu, nv = r * n.a * np.cos(p), r * n.b * np.sin(p)
    spread = 2 * rng.uniform(0.8, 1.3) ** 2
    hem = hem + rng.uniform(0.8, 1.4) * np.exp(-((u - nu) ** 2 + (v - nv) ** 2) / spread)

  prev = canvas['nuc_h'][sl]
  # Premultiplied over-compositing; the occluded nucleus still adds a little stain (overlap looks darker).
  canvas['nuc_h'][sl] = prev * (1 - alpha) + alpha * (hem + 0.3 * prev)
  canvas['alpha'][sl] = np.maximum(canvas['alpha'][sl], alpha)
  canvas['inst'][sl][inside] = ident


def _draw_red_cells(rng: np.random.Generator, e: np.ndarray, h: np.ndarray):
  """A small clump of red blood cells (bright eosin discs with central pallor): unlabelled distractors."""
  size = e.shape[0]
  cx, cy = rng.uniform(0, size, 2)
  for _ in range(int(rng.integers(3, 16))):
    x, y = cx + rng.normal(0, 12), cy + rng.normal(0, 12)
    radius = rng.uniform(6.0, 7.5)
    got = _box(x, y, radius + 1.5, size)
    if got is None:
      continue
    sl, dx, dy = got
    r = np.sqrt(dx ** 2 + dy ** 2)
    w = _unit(radius - r + 0.5)
    disc = rng.uniform(0.9, 1.3) * (1 - 0.35 * np.exp(-(r / (0.45 * radius)) ** 2))
    e[sl] = e[sl] * (1 - w) + disc * w
    h[sl] *= 1 - 0.7 * w


# ------------------------------------------------------------------------------------------------ tiles


def _split_code(split: str) -> int:
  return zlib.crc32(split.encode('utf-8'))  # stable across processes, unlike hash()


def record_name(split: str, index: int) -> str:
  return f'synthetic_{split}_{index:06d}'


def render_tile(seed: int, *, size: int = 256, num_classes: int = 3, index: int = 0,
                split: str = 'train') -> dict[str, Any]:
  """One synthetic H&E tile and its labels, a pure function of `(seed, split, index, size, num_classes)`.

  Returns a record in the `schema` layout: image uint8[size, size, 3], instance_map int32[size, size]
  (ids 1..N contiguous, every id present), instance_classes int32[N] in 1..num_classes (order of
  `CLASS_NAMES`), name `synthetic_<split>_<index:06d>`, tissue 'synthetic', mpp float32 0.5.
  """
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'num_classes must be in 1..{MAX_CLASSES}, got {num_classes}')
  if size < 16:
    raise ValueError(f'size must be >= 16, got {size}')
  rng = np.random.default_rng([int(seed) % 2 ** 63, _split_code(split), int(index)])

  # Pixel-scale textures shared by the stroma (speckle) and the nuclei (granular chromatin, clumps).
  fine = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 0.7)
  clumps = ndimage.gaussian_filter(fine, 1.2)
  fine *= 1 / (fine.std() + 1e-6)
  clumps *= 1 / (clumps.std() + 1e-6)
  bg = _background(rng, size, fine)
  h, e = bg['h'], bg['e']
  nuclei = _layout(rng, size, num_classes, bg['lumen'], bg['phase'])
  if rng.random() < 0.3:
    _draw_red_cells(rng, e, h)
  offsets = []
  for n in nuclei:
    t = NUCLEUS_TYPES[n.cls]
    p = rng.uniform(0, 2 * np.pi)
    off = (t.eccentric * n.a * np.cos(p), t.eccentric * n.a * np.sin(p))
    offsets.append(off)
    if t.cytoplasm:
      _draw_cytoplasm(h, e, n, t, off, clumps)

  canvas = {
      'fine': fine,
      'clumps': clumps,
      'nuc_h': np.zeros((size, size), np.float32),
      'alpha': np.zeros((size, size), np.float32),
      'inst': np.zeros((size, size), np.int32),
  }
  h_scale = rng.uniform(0.85, 1.15)  # per-tile haematoxylin strength
  for ident, n in enumerate(nuclei, start=1):
    _draw_nucleus(rng, canvas, n, NUCLEUS_TYPES[n.cls], ident, h_scale)

  alpha = canvas['alpha']
  conc_h = h * (1 - alpha) + canvas['nuc_h']
  conc_e = e * (1 - 0.7 * alpha) + 0.1 * alpha  # nuclei carry little eosin
  conc = np.stack([conc_h * rng.uniform(0.85, 1.2), conc_e * rng.uniform(0.75, 1.25)])
  conc = ndimage.gaussian_filter(conc, (0, *(2 * [rng.uniform(0.4, 0.9)])))  # focus / scanner optics
  stains = np.stack([_STAIN_H, _STAIN_E]) + rng.normal(0, 0.04, (2, 3)).astype(np.float32)
  stains /= np.linalg.norm(stains, axis=1, keepdims=True)
  white = rng.uniform(225, 252) * (1 + rng.normal(0, 0.015, 3))  # illumination / white balance
  rgb = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(1.0, 3.5) + 0.5  # sensor noise
  for c in range(3):  # Beer-Lambert: I = I0 exp(-(c_H OD_H + c_E OD_E))
    rgb[..., c] += white[c] * np.exp(-(conc[0] * stains[0, c] + conc[1] * stains[1, c]))
  image = np.clip(rgb, 0, 255).astype(np.uint8)

  inst = canvas['inst']
  counts = np.bincount(inst.ravel(), minlength=len(nuclei) + 1)
  keep = counts[1:] >= MIN_PIXELS
  lut = np.zeros(len(nuclei) + 1, np.int32)
  lut[1:][keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
  classes = np.array([n.cls + 1 for n in nuclei], np.int32)[keep] if nuclei else np.zeros(0, np.int32)
  return {
      schema.IMAGE: image,
      schema.INSTANCE_MAP: lut[inst],
      schema.INSTANCE_CLASSES: classes.astype(np.int32),
      schema.NAME: record_name(split, index),
      schema.TISSUE: TISSUE,
      schema.MPP: np.float32(MPP),
  }


def make_records(n: int, *, seed: int = 0, size: int = 256, num_classes: int = 3,
                 split: str = 'train') -> list[dict[str, Any]]:
  """The first `n` records of a split, in memory (for tests and quick experiments)."""
  return [render_tile(seed, size=size, num_classes=num_classes, index=i, split=split) for i in range(n)]


# ------------------------------------------------------------------------------------------------- TFDS


def config_name(*, train_size: int, test_size: int, tile_size: int, num_classes: int, seed: int) -> str:
  """The BuilderConfig name, e.g. `train512_test64_size256_k3_seed42`: every parameter is in it, so prepared
  datasets with different parameters never share a directory."""
  return f'train{train_size}_test{test_size}_size{tile_size}_k{num_classes}_seed{seed}'


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Parameters of one synthetic dataset; build it with `make_config` so the name matches them."""
  train_size: int = 512
  test_size: int = 64
  tile_size: int = 256
  num_classes: int = 3
  seed: int = 0


def make_config(*, train_size: int = 512, test_size: int = 64, tile_size: int = 256, num_classes: int = 3,
                seed: int = 0) -> SyntheticConfig:
  """A config named after its parameters (the predefined instance where one matches, as TFDS requires)."""
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'num_classes must be in 1..{MAX_CLASSES}, got {num_classes}')
  if train_size < 0 or test_size < 0 or tile_size < 16:
    raise ValueError(f'bad synthetic sizes: train {train_size}, test {test_size}, tile {tile_size}')
  params = dict(train_size=int(train_size), test_size=int(test_size), tile_size=int(tile_size),
                num_classes=int(num_classes), seed=int(seed))
  name = config_name(**params)
  for predefined in Synthetic.BUILDER_CONFIGS:
    if predefined.name == name:
      return predefined
  return SyntheticConfig(name=name, description=f'Synthetic H&E nuclei: {params}', **params)


class Synthetic(NucleiBuilder, skip_registration=True):
  """Synthetic H&E nuclei tiles (see the module docstring); splits `train` and `test`.

  Records need no download: `_generate_examples` renders them with `render_tile(seed, split=..., index=i)`,
  and record i of a prepared split is tile i (the base class disables TFDS's key shuffle).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First renderer: 5 nucleus types, clusters, fibrous stroma, lumen, RBCs.'}
  # The default experiment (configs/default.py: 512 / 64 tiles of 256 px, K = 3, config.seed = 42).
  BUILDER_CONFIGS = [SyntheticConfig(name=config_name(train_size=512, test_size=64, tile_size=256,
                                                      num_classes=3, seed=42),
                                     description='configs/default.py', seed=42)]

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.train_size),
            'test': self._generate_examples('test', cfg.test_size)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    for i in range(num):
      yield i, render_tile(cfg.seed, size=cfg.tile_size, num_classes=cfg.num_classes, index=i, split=split)


def builder_from_config(dataset_config, data_dir: str, seed: int | None = None) -> Synthetic:
  """The `Synthetic` builder (array_record) for `config.dataset`: fields `synthetic_train_size`,
  `synthetic_test_size`, `synthetic_tile_size`, `num_classes`. `seed` is usually the top-level
  `config.seed`; when None, the dataset config's `synthetic_seed` or `seed` field, else 0.
  Then `.download_and_prepare()` and `.as_data_source(split)`."""
  if seed is None:
    get = getattr(dataset_config, 'get', lambda key, default: getattr(dataset_config, key, default))
    seed = get('synthetic_seed', get('seed', 0))
  config = make_config(train_size=dataset_config.synthetic_train_size,
                       test_size=dataset_config.synthetic_test_size,
                       tile_size=dataset_config.synthetic_tile_size,
                       num_classes=dataset_config.num_classes, seed=seed)
  return Synthetic(config=config, data_dir=str(data_dir), file_format='array_record')


def get_builder(dataset_config, data_dir: str, seed: int | None = None) -> Synthetic:
  """`builder_from_config` under the name `sources.get_builder` looks for."""
  return builder_from_config(dataset_config, data_dir, seed)


def _main(argv: list[str]) -> None:
  """Writes example tiles with class-coloured instance outlines and prints the rendering speed."""
  import pathlib
  import sys
  import time

  from PIL import Image
  from skimage.segmentation import find_boundaries

  out = pathlib.Path(argv[1] if len(argv) > 1 else '/tmp/synthetic_examples')
  num_classes = int(argv[2]) if len(argv) > 2 else 3
  out.mkdir(parents=True, exist_ok=True)
  colours = np.array([[0, 0, 0], [255, 255, 0], [0, 255, 0], [0, 200, 255], [255, 0, 0], [255, 128, 0]],
                     np.uint8)
  for i in range(3):
    r = render_tile(0, num_classes=num_classes, index=i)
    inst, cls = r[schema.INSTANCE_MAP], np.concatenate([[0], r[schema.INSTANCE_CLASSES]])
    edge = find_boundaries(inst, mode='inner')
    overlay = r[schema.IMAGE].copy()
    overlay[edge] = colours[cls[inst[edge]]]
    Image.fromarray(np.concatenate([r[schema.IMAGE], overlay], 1)).save(out / f'{r[schema.NAME]}.png')
  n, wall, cpu = 100, time.perf_counter(), time.process_time()
  for i in range(n):
    render_tile(0, num_classes=num_classes, index=i)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  print(f'wrote 3 examples to {out}; 256^2, K={num_classes}: {n / wall:.1f} tiles/s wall, '
        f'{n / cpu:.1f} tiles/s of CPU time', file=sys.stderr)


if __name__ == '__main__':
  import sys
  _main(sys.argv)
