"""Methods by name: `config.method` selects one (`get(config)`); `base.Method` says what a method provides. A
refinement run (`config.refine.mode`, refinement.py) gets its stage-1 method wrapped in `RefinedMethod`.

    method = methods.get(config)                      # 'dualunet' when the config has no `method` field
    model = method.build_model(config, num_classes, rngs=nnx.Rngs(0))

Each method lives in its own module here and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dualunet_jax.methods.base import Method

# name -> module:attribute of the Method subclass
_REGISTRY = {
    'dualunet': 'dualunet_jax.methods.dualunet:DualUNetMethod',
    'hovernet': 'dualunet_jax.methods.hovernet:HoVerNetMethod',
    'conic': 'dualunet_jax.methods.hovernet:ConicMethod',
    'histonext': 'dualunet_jax.methods.hovernet:HistoNeXtMethod',
    'unet': 'dualunet_jax.methods.binary:UNetMethod',
    'unetpp': 'dualunet_jax.methods.binary:UNetPlusPlusMethod',
}
DEFAULT = 'dualunet'
NAMES = tuple(_REGISTRY)
_INSTANCES: dict[str, Method] = {}


def method_name(config: Any) -> str:
  """`config.method`, or 'dualunet' for configs (and workdirs) made before methods existed."""
  name = config.get('method', DEFAULT) if hasattr(config, 'get') else getattr(config, 'method', DEFAULT)
  return name or DEFAULT


def get(config_or_name: Any) -> Method:
  """The method named by a string or by `config.method`."""
  name = config_or_name if isinstance(config_or_name, str) else method_name(config_or_name)
  if name not in _REGISTRY:
    raise ValueError(f'unknown method {name!r}; expected one of {NAMES}')
  if name not in _INSTANCES:
    module, attr = _REGISTRY[name].split(':')
    _INSTANCES[name] = getattr(importlib.import_module(module), attr)()
  method = _INSTANCES[name]
  if not isinstance(config_or_name, str):
    from dualunet_jax import refinement  # a two-stage run (config.refine.mode): the stage-1 method, refined
    if refinement.is_two_stage(config_or_name):
      return refinement.RefinedMethod(method)
  return method


__all__ = ['DEFAULT', 'Method', 'NAMES', 'get', 'method_name']
