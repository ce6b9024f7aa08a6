"""File readers shared by the dataset builders, each raising one clear `DatasetError` on bad input.

Every reader names the offending file and says what is wrong, so a user pointing a builder at a broken or
mis-laid download sees the cause at once instead of a numpy/scipy traceback deep inside TFDS.

Image conversion policy (`read_image`), documented once here:
- RGB uint8 is returned as is; RGBA / LA-free palette / CMYK images are converted to RGB (alpha dropped:
  CoNSeP and MoNuSeg PNG/TIFF tiles often carry an opaque alpha channel).
- 16-bit RGB is scaled to 8 bits (value / 257, rounded); float RGB in [0, 1] is scaled by 255, float RGB in
  [0, 255] (PanNuke stores its images as float) is rounded and clipped.
- Grayscale (one channel) images are REJECTED: the models are trained on RGB stains, and a silent gray->RGB
  replication hides a wrong file (a label map in the images folder is the usual cause).
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dualunet_jax.data import schema

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
PathLike = str | pathlib.Path


class DatasetError(ValueError):
  """A dataset file or folder is missing or malformed; the message names it and says what is expected."""


# ----------------------------------------------------------------------------------------------- paths


def natural_key(path: PathLike) -> tuple:
  """Sort key that orders `train_2` before `train_10`."""
  name = pathlib.Path(path).name
  return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', name))


def find_child(parent: pathlib.Path, *names: str) -> pathlib.Path | None:
  """The child of `parent` whose name matches one of `names` case-insensitively (first match), or None.

  Downloads differ in capitalisation (`CoNSeP` / `consep`, `Images` / `images`)."""
  if not parent.is_dir():
    return None
  wanted = [n.lower() for n in names]
  children = {c.name.lower(): c for c in sorted(parent.iterdir())}
  for name in wanted:
    if name in children:
      return children[name]
  return None


def require_dir(path: pathlib.Path, what: str, layout: str = '') -> pathlib.Path:
  if not path.is_dir():
    msg = f'{what}: folder {path} does not exist'
    raise DatasetError(msg + (f'. Expected layout:\n{layout}' if layout else ''))
  return path


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files in `folder` (png/jpg/jpeg/tif/tiff, any case), natural order."""
  return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                key=natural_key)


def find_by_stem(folder: pathlib.Path, stem: str, suffixes: Sequence[str]) -> pathlib.Path | None:
  """`folder/<stem><suffix>` for the first suffix that exists (suffix compared case-insensitively)."""
  if not folder.is_dir():
    return None
  for suffix in suffixes:
    for cand in (folder / f'{stem}{suffix}', folder / f'{stem}{suffix.upper()}'):
      if cand.is_file():
        return cand
  return None


# ----------------------------------------------------------------------------------------------- images


def to_rgb_uint8(array: np.ndarray, source: PathLike) -> np.ndarray:
  """Converts a decoded image array to uint8[H, W, 3] following the module's policy.

  Args:
    array: [H, W], [H, W, C] with C in {1, 2, 3, 4}; uint8, uint16 or float.
    source: the file it came from (for the error message).
  Returns:
    uint8[H, W, 3].
  """
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
    a = np.moveaxis(a, 0, -1)  # planar (C, H, W) TIFF
  if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 2)):
    raise DatasetError(f'{source}: grayscale image of shape {a.shape}; an RGB image (H, W, 3) is required '
                       '(is a label map in the images folder?)')
  if a.ndim != 3 or a.shape[-1] not in (3, 4):
    raise DatasetError(f'{source}: image of shape {a.shape}; expected (H, W, 3) RGB or (H, W, 4) RGBA')
  a = a[..., :3]
  if a.dtype == np.uint8:
    return np.ascontiguousarray(a)
  if a.dtype == np.uint16:
    return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    if not np.isfinite(a).all():
      raise DatasetError(f'{source}: image holds NaN or infinite values')
    scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0
    return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
  if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
    if a.size and (a.min() < 0 or a.max() > 255):
      raise DatasetError(f'{source}: {a.dtype} image with values outside 0..255')
    return a.astype(np.uint8)
  raise DatasetError(f'{source}: unsupported image dtype {a.dtype}')


def read_image(path: PathLike) -> np.ndarray:
  """Reads a png/jpg/tif image as uint8[H, W, 3] RGB (conversions: module docstring)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetError(f'{path}: image file does not exist')
  try:
    if path.suffix.lower() in ('.tif', '.tiff'):
      import tifffile
      array = tifffile.imread(path)
    else:
      from PIL import Image
      with Image.open(path) as im:
        if im.mode in ('P', 'CMYK', 'YCbCr', 'RGBa'):
          im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
        array = np.asarray(im)
  except DatasetError:
    raise
  except Exception as e:  # decoders raise many types (OSError, ValueError, SyntaxError, struct.error)
    raise DatasetError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from e
  return to_rgb_uint8(array, path)


# ----------------------------------------------------------------------------------------------- arrays


def read_mat(path: PathLike, required: Iterable[str] = ()) -> dict[str, Any]:
  """Loads a MATLAB .mat file (v5; v7.3/HDF5 is rejected with a clear message) and checks `required` keys."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetError(f'{path}: .mat file does not exist')
  import scipy.io
  try:
    data = scipy.io.loadmat(path)
  except NotImplementedError as e:  # v7.3 files are HDF5
    raise DatasetError(f'{path}: MATLAB v7.3 (HDF5) .mat files are not supported; re-save with -v7') from e
  except Exception as e:
    raise DatasetError(f'{path}: cannot read .mat file ({type(e).__name__}: {e})') from e
  keys = [k for k in data if not k.startswith('__')]
  missing = [k for k in required if k not in data]
  if missing:
    present = ', '.join(keys) or 'none'
    raise DatasetError(f'{path}: .mat file has no key {missing[0]!r} (keys present: {present})')
  return data


def read_npy(path: PathLike, mmap: bool = False, allow_pickle: bool = False) -> np.ndarray:
  """Loads a .npy array; `mmap=True` maps it read-only (multi-GB PanNuke folds) and checks it is complete."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetError(f'{path}: .npy file does not exist')
  try:
    array = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=allow_pickle)
  except Exception as e:  # truncated files raise ValueError / EOFError / OSError depending on where they end
    raise DatasetError(f'{path}: cannot read .npy file, is it truncated or not a .npy? '
                       f'({type(e).__name__}: {e})') from e
  if isinstance(array, np.lib.npyio.NpzFile):
    raise DatasetError(f'{path}: is an .npz archive, expected a single .npy array')
  return array


def read_csv_rows(path: PathLike) -> list[dict[str, str]]:
  """Rows of a csv with a header line, as dicts (keys stripped and lower-cased)."""
  import csv
  path = pathlib.Path(path)
  if not path.is_file():
    raise DatasetError(f'{path}: csv file does not exist')
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None:
        raise DatasetError(f'{path}: csv file is empty (a header line is required)')
      return [{(k or '').strip().lower(): (v or '').strip() for k, v in row.items()} for row in reader]
  except DatasetError:
    raise
  except Exception as e:
    raise DatasetError(f'{path}: cannot read csv ({type(e).__name__}: {e})') from e


# ----------------------------------------------------------------------------------------------- labels


def as_instance_map(array: np.ndarray, source: PathLike) -> np.ndarray:
  """Checks a label array is a 2-D map of non-negative integer ids and returns it as int64[H, W]."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2:
    raise DatasetError(f'{source}: instance map of shape {a.shape}; expected a 2-D (H, W) array of ids')
  if np.issubdtype(a.dtype, np.floating):
    if not np.isfinite(a).all() or (a != np.round(a)).any():
      raise DatasetError(f'{source}: instance map holds non-integer values')
  elif not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
    raise DatasetError(f'{source}: instance map of dtype {a.dtype}; expected integer ids')
  a = a.astype(np.int64)
  if a.size and a.min() < 0:
    raise DatasetError(f'{source}: instance map holds negative ids')
  return a


def relabel_contiguous(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Renumbers instance ids to 1..N in increasing order of the original ids.

  Args:
    instance_map: int[H, W], 0 background, arbitrary non-negative ids.
  Returns:
    (int32[H, W] with ids 1..N, int64[N] original id of each new id: `old_ids[new - 1]`).
  """
  old_ids = np.unique(instance_map)
  old_ids = old_ids[old_ids > 0].astype(np.int64)
  # searchsorted maps every pixel to its rank among the sorted ids without a (max id)-sized lookup table.
  new = np.searchsorted(old_ids, instance_map).astype(np.int32) + 1
  new[instance_map <= 0] = 0
  return new, old_ids


def majority_class(instance_map: np.ndarray, class_map: np.ndarray, num_instances: int) -> np.ndarray:
  """The most frequent non-zero class under each instance (0 where an instance covers only class 0).

  Args:
    instance_map: int[H, W] ids 1..N.
    class_map: int[H, W] classes 0..K.
    num_instances: N.
  Returns:
    int32[N]; ties go to the smaller class id.
  """
  mask = (instance_map > 0) & (class_map > 0)
  if not mask.any():
    return np.zeros(num_instances, np.int32)
  k = int(class_map.max()) + 1
  votes = np.bincount(instance_map[mask].astype(np.int64) * k + class_map[mask].astype(np.int64),
                      minlength=(num_instances + 1) * k).reshape(num_instances + 1, k)[1:]
  out = votes.argmax(axis=1).astype(np.int32)
  out[votes.sum(axis=1) == 0] = 0
  return out


def classes_from_table(inst_ids: np.ndarray, table_ids: np.ndarray, table_classes: np.ndarray,
                       source: PathLike) -> np.ndarray:
  """Looks up the class of each original instance id in an (id, class) table; ids absent from it get 0."""
  table_ids = np.asarray(table_ids).reshape(-1).astype(np.int64)
  table_classes = np.asarray(table_classes).reshape(-1).astype(np.int64)
  if table_ids.shape != table_classes.shape:
    raise DatasetError(f'{source}: {len(table_ids)} instance ids but {len(table_classes)} classes')
  lookup = dict(zip(table_ids.tolist(), table_classes.tolist()))
  return np.array([lookup.get(int(i), 0) for i in inst_ids], np.int32)


def classes_from_inst_type(inst_type: np.ndarray, old_ids: np.ndarray, source: PathLike) -> np.ndarray:
  """Classes of the instances from a HoVer-Net style `inst_type` (N x 1, one row per instance).

  Row i belongs to id i + 1 when the rows cover every id up to the largest (the official CoNSeP files), or to
  the (i + 1)-th smallest id present when there is exactly one row per present id (crops whose ids are not
  contiguous, e.g. the fixtures). Anything else is ambiguous and rejected.
  """
  types = np.asarray(inst_type).reshape(-1).astype(np.int64)
  max_id = int(old_ids.max()) if old_ids.size else 0
  if len(types) >= max_id:
    return types[old_ids - 1].astype(np.int32) if old_ids.size else np.zeros(0, np.int32)
  if len(types) == len(old_ids):
    return types.astype(np.int32)
  raise DatasetError(f'{source}: inst_type has {len(types)} rows but the instance map has {len(old_ids)} '
                     f'instances with ids up to {max_id}')


def make_record(image: np.ndarray, instance_map: np.ndarray, instance_classes: np.ndarray, name: str,
                tissue: str = '', mpp: float = 0.0, source: PathLike = '') -> dict[str, Any]:
  """Assembles and checks one record in the `schema` layout.

  Args:
    image: uint8[H, W, 3].
    instance_map: int[H, W] with ids 1..N (contiguous).
    instance_classes: int[N] classes in 0..K.
    name, tissue, mpp: see `schema`.
    source: the file(s) it came from, for error messages.
  """
  source = source or name
  if image.shape[:2] != instance_map.shape:
    raise DatasetError(f'{source}: image is {image.shape[0]}x{image.shape[1]} but the instance map is '
                       f'{instance_map.shape[0]}x{instance_map.shape[1]}')
  n = int(instance_map.max()) if instance_map.size else 0
  if len(instance_classes) != n:
    raise DatasetError(f'{source}: {n} instances but {len(instance_classes)} classes')
  if len(instance_classes) and int(np.min(instance_classes)) < 0:
    raise DatasetError(f'{source}: negative instance class')
  return {
      schema.IMAGE: np.ascontiguousarray(image, dtype=np.uint8),
      schema.INSTANCE_MAP: np.ascontiguousarray(instance_map, dtype=np.int32),
      schema.INSTANCE_CLASSES: np.asarray(instance_classes, dtype=np.int32).reshape(-1),
      schema.NAME: str(name),
      schema.TISSUE: str(tissue),
      schema.MPP: np.float32(mpp),
  }


def map_classes(classes: np.ndarray, mapping: Mapping[int, int] | np.ndarray, source: PathLike) -> np.ndarray:
  """Maps raw class ids through a lookup table (array indexed by raw id); unknown ids are an error."""
  lut = np.asarray(mapping) if not isinstance(mapping, Mapping) else None
  if lut is None:
    size = max(mapping) + 1
    lut = np.full(size, -1, np.int64)
    for k, v in mapping.items():
      lut[k] = v
  classes = np.asarray(classes, np.int64)
  bad = (classes < 0) | (classes >= len(lut))
  if not bad.any():
    bad = lut[classes] < 0
  if bad.any():
    raise DatasetError(f'{source}: unknown class id {int(classes[bad][0])} '
                       f'(known: {[i for i in range(len(lut)) if lut[i] >= 0]})')
  return lut[classes].astype(np.int32)
