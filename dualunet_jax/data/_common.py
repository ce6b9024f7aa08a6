"""The TFDS base class shared by this package's dataset builders.

Builders are not added to the global TFDS registry (`skip_registration=True`): `sources.get_builder` builds
them directly, which avoids name clashes with TFDS's own catalogue or between reloads, and
`builder.as_data_source(split)` is what `tfds.data_source(name, ...)` would call for a registered name.
"""

from __future__ import annotations

import importlib.resources
import importlib.resources.abc
import inspect
import pathlib
import sys

import tensorflow_datasets as tfds
from etils import epath

from dualunet_jax.data import schema


def ensure_importlib_resources() -> None:
  """Lets builders that keep TFDS's default `code_path` (e.g. `synthetic.Synthetic`) prepare on TF-free
  installs: TFDS imports `importlib_resources` there without declaring it; the standard library's
  `importlib.resources` (Python >= 3.11) has the one attribute it reads (`abc.Traversable`)."""
  try:
    import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.modules['importlib_resources'] = importlib.resources


class NucleiBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common `_info` (the `schema` record layout) and a TF-free `code_path` for the builders.

  Subclasses set VERSION, MANUAL_DOWNLOAD_INSTRUCTIONS, HOMEPAGE, CITATION and implement
  `_split_generators` / `_generate_examples`; inputs come only from `dl_manager.manual_dir`.
  """

  HOMEPAGE = ''
  CITATION = ''

  # TFDS's default resolves the module through `importlib_resources`, a package it does not declare and that
  # is absent from TF-free installs; the file of the class is all it needs (checksums file lookup).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=inspect.getmodule(type(self)).__doc__ or '', features=schema.tfds_features(),
        homepage=self.HOMEPAGE, citation=self.CITATION,
        # Records keep the generation (natural file) order, so index i of a split is a stable, documented
        # file (e.g. CoNIC patch i, aligned with `counts.csv` row i) instead of a key-hash shuffle.
        disable_shuffling=True)

  def manual_path(self, dl_manager) -> pathlib.Path:
    return pathlib.Path(dl_manager.manual_dir)
