"""Image and whole-slide readers behind one interface, resolution handling and tissue detection.

Readers (`open_source` picks one):
- OpenSlide for every format it detects (svs, ndpi, mrxs, scn, bif, DICOM, Philips/Ventana/Trestle TIFF and
  generic tiled TIFF); level-0 µm/px from `openslide.mpp-x` (which OpenSlide also derives from TIFF resolution
  tags in centimetres). Transparent pixels (outside the scanned area) are composited on white.
- tifffile for TIFFs OpenSlide does not take (strip TIFFs, unusual pyramids); each level is decoded whole
  on first use, so very large non-tiled TIFFs need the memory of their level 0 (use OpenSlide formats there).
- Pillow / tifffile via `dualunet_jax.data.readers.read_image` for plain tiles (png, jpg, small tif).
  Policy shared with the dataset readers: RGBA -> alpha dropped, 16-bit -> scaled to 8 bits, grayscale and
  undecodable files rejected with one message naming the file.

Resolution: `ModelView` presents any source resampled to the model's µm/px (`config.dataset.mpp`), reading
from the pyramid level closest to (not coarser than) the target and resizing with Pillow (antialiased
bilinear). The per-input `mpp` override wins over the file's value; a slide without any mpp is an error;
a plain tile without one is assumed to be at the model's mpp (a warning, once per run).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from typing import Protocol

import numpy as np
from PIL import Image

OPENSLIDE_SUFFIXES = ('.svs', '.ndpi', '.mrxs', '.vms', '.vmu', '.scn', '.bif', '.svslide', '.dcm', '.tif',
                      '.tiff')
PLAIN_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
INPUT_SUFFIXES = tuple(sorted(set(OPENSLIDE_SUFFIXES + PLAIN_SUFFIXES)))
# A single-level image larger than this (either side, level-0 px) is treated as a slide (tissue detection,
# tiled TIFF maps, thumbnail overlay) rather than a tile.
SLIDE_MIN_SIDE = 8192


class InputError(ValueError):
  """An input image/slide cannot be used; the message names the file and says what is wrong."""


class Source(Protocol):
  """A readable image at level 0 plus optional lower-resolution levels.

  Attributes:
    path: the file.  name: output stem.  width, height: level-0 size.  mpp: level-0 µm/px or None.
    level_downsamples: downsample factor of each level (level 0 = 1).  is_slide: see `SLIDE_MIN_SIDE`.
  """
  path: pathlib.Path
  width: int
  height: int
  mpp: float | None
  level_downsamples: tuple[float, ...]
  is_slide: bool
  kind: str

  def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """uint8[h, w, 3]: the region of `level` whose top-left is level-0 pixel (x, y); outside = white."""

  def thumbnail(self, max_side: int) -> np.ndarray:
    """uint8[h, w, 3] of the whole image, longest side <= max_side."""

  def close(self) -> None:
    ...


def _mpp_from_resolution(xres, unit) -> float | None:
  """µm/px from a TIFF XResolution (pixels per unit) and ResolutionUnit; None where not meaningful."""
  try:
    xres = float(xres[0]) / float(xres[1]) if isinstance(xres, tuple) else float(xres)
  except (TypeError, ValueError, ZeroDivisionError):
    return None
  if not xres or xres <= 0:
    return None
  unit = int(unit)
  mpp = 1e4 / xres if unit == 3 else 25400.0 / xres if unit == 2 else None
  # 72/96/300 dpi are screen/print defaults, not a scan resolution: trust only microscope-like values.
  return mpp if mpp is not None and mpp < 5.0 else None


class OpenSlideSource:
  """A slide read through OpenSlide."""
  kind = 'openslide'

  def __init__(self, path: pathlib.Path, vendor: str):
    import openslide
    try:
      self._slide = openslide.OpenSlide(str(path))
    except Exception as e:  # OpenSlideError / OpenSlideUnsupportedFormatError
      raise InputError(f'{path}: OpenSlide cannot open it ({type(e).__name__}: {e})') from e
    self.path, self.vendor = path, vendor
    self.width, self.height = self._slide.dimensions
    self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
    mpp = self._slide.properties.get('openslide.mpp-x')
    self.mpp = float(mpp) if mpp not in (None, '') and float(mpp) > 0 else None
    self.is_slide = (vendor != 'generic-tiff' or len(self.level_downsamples) > 1
                     or max(self.width, self.height) > SLIDE_MIN_SIDE)

  def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    try:
      rgba = np.asarray(self._slide.read_region((int(x), int(y)), int(level), (int(w), int(h))))
    except Exception as e:
      raise InputError(f'{self.path}: cannot read region x={x} y={y} {w}x{h} at level {level} '
                       f'({type(e).__name__}: {e})') from e
    return _over_white(rgba)

  def thumbnail(self, max_side: int) -> np.ndarray:
    return np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert('RGB'))

  def close(self) -> None:
    if self._slide is not None:
      self._slide.close()
      self._slide = None


def _over_white(rgba: np.ndarray) -> np.ndarray:
  """uint8[h, w, 4] (non-premultiplied, as openslide-python returns it) -> uint8[h, w, 3] on white."""
  alpha = rgba[..., 3:4]
  if alpha.min() == 255:
    return np.ascontiguousarray(rgba[..., :3])
  a = alpha.astype(np.float32) / 255.0
  return np.round(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)


class ArraySource:
  """An image held (or decoded level by level) in memory: plain tiles and TIFFs OpenSlide does not take."""

  def __init__(self, path: pathlib.Path, levels: list, mpp: float | None, kind: str):
    """`levels`: arrays or zero-argument loaders returning uint8[h, w, 3], level 0 first."""
    self.path, self.kind, self.mpp = path, kind, mpp
    self._levels = levels
    self._shapes = [lv.shape[:2] if isinstance(lv, np.ndarray) else lv.shape for lv in levels]
    self.height, self.width = (int(s) for s in self._shapes[0][:2])
    self.level_downsamples = tuple(self.width / s[1] for s in self._shapes)
    self.is_slide = len(levels) > 1 or max(self.width, self.height) > SLIDE_MIN_SIDE

  def _level(self, level: int) -> np.ndarray:
    lv = self._levels[level]
    if not isinstance(lv, np.ndarray):
      lv = self._levels[level] = lv()
    return lv

  def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    from dualunet_jax.inference.tiling import crop_padded
    d = self.level_downsamples[level]
    return crop_padded(self._level(level), int(math.floor(y / d)), int(math.floor(x / d)), h, w, fill=255)

  def thumbnail(self, max_side: int) -> np.ndarray:
    level = len(self._levels) - 1
    img = Image.fromarray(self._level(level))
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(img)

  def close(self) -> None:
    self._levels = [None]


@dataclasses.dataclass
class _LazyTiffLevel:
  """A tifffile pyramid level decoded on first use."""
  path: pathlib.Path
  index: int
  shape: tuple

  def __call__(self) -> np.ndarray:
    import tifffile
    from dualunet_jax.data import readers
    try:
      with tifffile.TiffFile(self.path) as tif:
        array = tif.series[0].levels[self.index].asarray()
      return readers.to_rgb_uint8(array, self.path)
    except readers.DatasetError as e:
      raise InputError(str(e)) from e
    except Exception as e:
      raise InputError(f'{self.path}: cannot decode TIFF level {self.index} ({type(e).__name__}: {e})') from e


def _open_tiff(path: pathlib.Path) -> ArraySource:
  import tifffile
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      page = series.pages[0] if hasattr(series, 'pages') else tif.pages[0]
      tags = page.tags
      mpp = None
      if 'XResolution' in tags and 'ResolutionUnit' in tags:
        mpp = _mpp_from_resolution(tags['XResolution'].value, tags['ResolutionUnit'].value)
      levels = []
      for i, lv in enumerate(series.levels):
        shape = tuple(lv.shape)
        if lv.axes.startswith('S') or (len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)):
          shape = shape[1:] + shape[:1]  # planar
        if len(shape) != 3 or shape[-1] not in (3, 4):
          raise InputError(f'{path}: TIFF level {i} has shape {tuple(lv.shape)} (axes {lv.axes}); an RGB '
                           'image (H, W, 3) is required (grayscale / multi-channel images are not supported)')
        levels.append(_LazyTiffLevel(path, i, shape[:2]))
  except InputError:
    raise
  except Exception as e:
    raise InputError(f'{path}: cannot read TIFF ({type(e).__name__}: {e})') from e
  return ArraySource(path, levels, mpp, 'tifffile')


def open_source(path: str | pathlib.Path) -> Source:
  """Opens an image or slide with the best reader (module docstring). Raises `InputError` naming the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f'{path}: no such file')
  suffix = path.suffix.lower()
  if suffix not in INPUT_SUFFIXES:
    raise InputError(f'{path}: unsupported file type {suffix!r}; expected one of {", ".join(INPUT_SUFFIXES)}')
  if suffix in OPENSLIDE_SUFFIXES:
    vendor = None
    try:
      import openslide
      vendor = openslide.OpenSlide.detect_format(str(path))
    except ImportError:
      if suffix not in PLAIN_SUFFIXES:
        raise InputError(f'{path}: reading {suffix} slides needs OpenSlide: pip install "dualunet-jax[wsi]"')
    except Exception:  # a corrupt file: let the plain readers produce the message
      vendor = None
    if vendor is not None:
      return OpenSlideSource(path, vendor)
    if suffix not in PLAIN_SUFFIXES:
      raise InputError(f'{path}: OpenSlide does not recognise this {suffix} file (corrupt or unsupported)')
  if suffix in ('.tif', '.tiff'):
    src = _open_tiff(path)
    if len(src._shapes) == 1:  # a plain TIFF tile: decode now so that errors surface at open
      src._level(0)
    return src
  from dualunet_jax.data import readers
  try:
    image = readers.read_image(path)
  except readers.DatasetError as e:
    raise InputError(str(e)) from e
  return ArraySource(path, [image], None, 'image')


_warned_mpp = False


def resolve_mpp(source: Source, model_mpp: float, override: float | None = None) -> float:
  """Level-0 µm/px of `source`: `override` > file metadata > (tiles only) the model's, with one warning."""
  global _warned_mpp
  if override:
    if override <= 0:
      raise InputError(f'{source.path}: --mpp must be positive, got {override}')
    return float(override)
  if source.mpp:
    return float(source.mpp)
  if source.is_slide:
    raise InputError(f'{source.path}: the slide has no resolution (µm/px) in its metadata; pass --mpp=<level-0 '
                     f'µm/px> (the model expects {model_mpp} µm/px)')
  if not _warned_mpp:
    warnings.warn(f'{source.path}: no µm/px in the file; assuming the model\'s {model_mpp} µm/px (pass --mpp to '
                  'set it; this warning is shown once)', stacklevel=2)
    _warned_mpp = True
  return float(model_mpp)


class ModelView:
  """A source seen at the model's resolution.

  `scale` = model µm/px / source µm/px: one model pixel spans `scale` level-0 pixels; model-res pixel (r, c)
  covers level-0 [c * scale, (c + 1) * scale) x [r * scale, (r + 1) * scale).
  """

  def __init__(self, source: Source, source_mpp: float, model_mpp: float):
    self.source = source
    self.scale = float(model_mpp) / float(source_mpp)
    if abs(self.scale - round(self.scale)) < 1e-6:
      self.scale = float(round(self.scale))
    self.height = max(1, int(round(source.height / self.scale)))
    self.width = max(1, int(round(source.width / self.scale)))
    # Finest level not coarser than the target (tolerance for rounded downsample factors).
    ok = [i for i, d in enumerate(source.level_downsamples) if d <= self.scale * 1.01]
    self.level = max(ok, key=lambda i: source.level_downsamples[i]) if ok else 0

  def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """uint8[h, w, 3]: the model-res window with top-left (y0, x0).

    Parts outside the image are filled by reflecting the image (as the model pads its own input), so a tile
    at the border sees the same context as the whole image would.
    """
    iy0, ix0 = max(y0, 0), max(x0, 0)
    iy1, ix1 = min(y0 + h, self.height), min(x0 + w, self.width)
    if iy1 <= iy0 or ix1 <= ix0:
      return np.full((h, w, 3), 255, np.uint8)
    inner = self._read(iy0, ix0, iy1 - iy0, ix1 - ix0)
    if (iy0, ix0, iy1, ix1) == (y0, x0, y0 + h, x0 + w):
      return inner
    pads = ((iy0 - y0, y0 + h - iy1), (ix0 - x0, x0 + w - ix1), (0, 0))
    return np.pad(inner, pads, mode='reflect' if min(inner.shape[:2]) > 1 else 'edge')

  def _read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    d = self.source.level_downsamples[self.level]
    ratio = self.scale / d  # level px per model px
    if abs(ratio - 1.0) < 1e-6:
      # Same resolution: integer level-0 coordinates, no resampling.
      return self.source.read(self.level, int(round(x0 * d)), int(round(y0 * d)), w, h)
    # Level-px box of the window, read with a 2-px frame so the resampling kernel sees real neighbours.
    lx0, ly0 = x0 * ratio, y0 * ratio
    ix0, iy0 = int(math.floor(lx0)) - 2, int(math.floor(ly0)) - 2
    iw = int(math.ceil((x0 + w) * ratio)) + 2 - ix0
    ih = int(math.ceil((y0 + h) * ratio)) + 2 - iy0
    region = self.source.read(self.level, int(round(ix0 * d)), int(round(iy0 * d)), iw, ih)
    box = (lx0 - ix0, ly0 - iy0, lx0 - ix0 + w * ratio, ly0 - iy0 + h * ratio)
    return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BILINEAR, box=box))


def tissue_mask(thumbnail: np.ndarray, min_fraction: float = 1e-4) -> np.ndarray:
  """Tissue on a thumbnail: Otsu on HSV saturation, threshold clipped to [0.05, 0.15], then cleaned.

  The clip keeps white glass (saturation < 0.05) out on any slide and keeps pale tissue in on slides that
  are almost all tissue (where Otsu would split the tissue itself).

  Args:
    thumbnail: uint8[h, w, 3].
  Returns:
    bool[h, w].
  """
  import scipy.ndimage as ndi
  from skimage.filters import threshold_otsu
  rgb = thumbnail.astype(np.float32) / 255.0
  mx, mn = rgb.max(-1), rgb.min(-1)
  sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
  thr = float(np.clip(threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0, 0.05, 0.15))
  mask = (sat > thr) & (mx > 0.08)  # near-black (slide edges, scanner frames) is not tissue
  mask = ndi.binary_closing(mask, iterations=2)
  labels, n = ndi.label(mask)
  if n:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = sizes[labels] >= max(4, int(min_fraction * mask.size))
  return ndi.binary_dilation(mask, iterations=2)
