"""One way to read an optional field from a config section: a ConfigDict, a plain mapping, or None.

Library functions take `config.loss`, `config.augment`, `config.targets`, ... or a dict of the same fields
(tests, notebooks), or None for the reference defaults.
"""

from collections.abc import Mapping
from typing import Any


def config_field(config: Any, name: str, default: Any) -> Any:
  """`config[name]` for a mapping, `config.name` for a ConfigDict-like object, `default` if absent or None."""
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)
