"""From `config.dataset` to a random-access source of `schema` records.

    builder = get_builder(config.dataset)               # the TFDS builder (array_record in data_dir)
    source = load_source(config.dataset, 'train')       # prepares on first use, then memory-light reads
    num_classes, class_names, mpp = dataset_info(config.dataset)

`config.dataset.name` selects the builder: pannuke, consep, lizard, conic, monuseg, folder, synthetic. Every
builder but synthetic reads the unpacked official download from `config.dataset.manual_dir` once, when the
dataset is first prepared into `config.dataset.data_dir` (`<data_dir>/<name>/[<config>/]<version>/`); later
runs only read the array_record files, and `manual_dir` may then be left empty. To rebuild (e.g. after fixing
a file), delete that folder. `folder` datasets get a builder config named after the folder plus a hash of
its path, class names and mpp, so different folders never share a prepared copy (see `folder.py`).

Records keep the source's natural file order (`disable_shuffling`); shuffle in the input pipeline.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

from dualunet_jax.data import _common
from dualunet_jax.data.readers import DatasetError

# name -> (module, builder class); modules are imported on demand (synthetic is optional at import time).
BUILDERS = {
    'pannuke': ('pannuke', 'Pannuke'),
    'consep': ('consep', 'Consep'),
    'lizard': ('lizard', 'Lizard'),
    'conic': ('lizard', 'Conic'),
    'monuseg': ('monuseg', 'Monuseg'),
    'folder': ('folder', 'Folder'),
    'synthetic': ('synthetic', 'Synthetic'),
}


def _module(name: str):
  if name not in BUILDERS:
    raise DatasetError(f'config.dataset.name={name!r} is not a known dataset; '
                       f'choose one of {", ".join(BUILDERS)}')
  return importlib.import_module(f'dualunet_jax.data.{BUILDERS[name][0]}')


def _name(dataset_config) -> str:
  return str(dataset_config.name).lower()


def get_builder(dataset_config, seed: int | None = None) -> Any:
  """The TFDS builder for `dataset_config.name`, writing to / reading from `dataset_config.data_dir`.

  `seed` only matters for `synthetic` (pass the top-level `config.seed`; default: `config.dataset.seed` if
  set, else 0), whose records and builder config name depend on it.
  """
  name = _name(dataset_config)
  module = _module(name)
  data_dir = str(pathlib.Path(dataset_config.data_dir).expanduser())
  if name == 'synthetic':
    _common.ensure_importlib_resources()
    return module.builder_from_config(dataset_config, data_dir=data_dir, seed=seed)
  cls = getattr(module, BUILDERS[name][1])
  if name == 'folder':
    if not dataset_config.manual_dir:
      raise DatasetError('config.dataset.manual_dir is empty; the folder dataset is identified by its '
                         f'folder, so set it to your data:\n{module.LAYOUT}')
    config = module.make_config(dataset_config.manual_dir, dataset_config.class_names,
                                float(dataset_config.get('source_mpp', 0.0)))
    return cls(config=config, data_dir=data_dir, file_format='array_record')
  return cls(data_dir=data_dir, file_format='array_record')


def prepare(dataset_config, seed: int | None = None) -> Any:
  """`get_builder` and, when not yet prepared, `download_and_prepare` from `dataset_config.manual_dir`."""
  import tensorflow_datasets as tfds

  builder = get_builder(dataset_config, seed)
  if builder.is_prepared() or _name(dataset_config) == 'synthetic':
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  manual_dir = str(dataset_config.manual_dir or '')
  instructions = type(builder).MANUAL_DOWNLOAD_INSTRUCTIONS
  if not manual_dir:
    raise DatasetError(f'dataset {_name(dataset_config)!r} is not prepared in {builder.data_dir} and '
                       f'config.dataset.manual_dir is empty. {instructions}')
  path = pathlib.Path(manual_dir).expanduser()
  if not path.is_dir():
    raise DatasetError(f'config.dataset.manual_dir: folder {path} does not exist. {instructions}')
  if not any(path.iterdir()):  # TFDS would raise a bare AssertionError
    raise DatasetError(f'config.dataset.manual_dir: folder {path} is empty. {instructions}')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(path.resolve())))
  return builder


def load_source(dataset_config, split: str, seed: int | None = None) -> Any:
  """A random-access source (`len`, `[i]` -> record dict with numpy arrays, `name`/`tissue` as bytes).

  Prepares the dataset on first use (see `prepare`); raises `DatasetError` for an unknown split, naming the
  splits there are.
  """
  builder = prepare(dataset_config, seed)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise DatasetError(f'dataset {_name(dataset_config)!r} has no split {split!r}; '
                       f'it has {", ".join(splits)}')
  source = builder.as_data_source(split=split)
  return BinaryView(source) if dataset_config.get('binary', False) else source


class BinaryView:
  """A source whose nuclei are all class 1 ('nucleus'): `config.dataset.binary`, for binary segmentation
  methods (U-Net, U-Net++) and binary runs of any method on a labelled dataset."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    import numpy as np
    record = dict(self.source[index])
    record['instance_classes'] = np.ones_like(np.asarray(record['instance_classes']))
    return record


def dataset_info(dataset_config) -> tuple[int, tuple[str, ...], float]:
  """(K, class names, microns per pixel of the stored images; 0 = unknown) without preparing anything.

  Folder datasets take their names from `config.dataset.class_names` and mpp from the optional
  `config.dataset.source_mpp`; synthetic the first `num_classes` of its nucleus types; with
  `config.dataset.binary` every dataset has one class, 'nucleus'.
  """
  name = _name(dataset_config)
  if dataset_config.get('binary', False):
    mpp = float(dataset_config.get('source_mpp', 0.0)) if name == 'folder' else float(_module(name).MPP)
    return 1, ('nucleus',), mpp
  if name == 'folder':
    names = tuple(str(c) for c in dataset_config.class_names)
    return len(names), names, float(dataset_config.get('source_mpp', 0.0))
  module = _module(name)
  names = tuple(module.CLASS_NAMES)
  if name == 'synthetic':
    names = names[:int(dataset_config.num_classes)]
  return len(names), names, float(module.MPP)
