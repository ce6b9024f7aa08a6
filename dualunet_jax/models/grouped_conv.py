"""Grouped and depthwise convolutions that XLA's CPU backend runs fast; the same numbers everywhere.

XLA:CPU has no fast kernel for grouped convolutions (`feature_group_count` > 1) and is slowest on their
gradients. Measured on the 2-core build VM (jax 0.10.2, batch 8, forward + backward): a 5x5 convolution in
4 groups (HoVer-Net's dense unit at width 1/4) takes 34x longer than the same work as 4 dense convolutions;
a 3x3 in 32 groups (ResNeXt, SE-ResNeXt) 56-110x; a depthwise 7x7 (ConvNeXt) forward 20x longer than the sum
of its 49 shifted, weighted copies of the input. GPUs and TPUs have grouped kernels, so only the CPU changes
how it computes; the parameters (shapes, layout) are the same, and so are checkpoints and converted weights.

`conv_general_dilated` has `jax.lax.conv_general_dilated`'s signature; models pass it to every grouped
`nnx.Conv` (`grouped_conv.Conv`). With the default implementation 'auto', on the CPU backend:
  - depthwise (one group per input channel, one output channel per group, stride and dilation 1):
    the sum over kernel taps of the shifted input times the tap's weights (accumulated in float32);
  - any other grouping: one dense convolution per group, concatenated.
Elsewhere, and for ungrouped convolutions, it is `lax.conv_general_dilated` itself. `implementation('xla')`
forces the plain path (tests check that both give the same outputs and gradients), `implementation('split')`
the CPU path on any backend; the environment variable DUALUNET_GROUPED_CONV (auto | xla | split) sets the
process default. The choice is made when a function is traced.
"""

import contextlib
from collections.abc import Iterator, Sequence
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

IMPLEMENTATIONS = ('auto', 'xla', 'split')
_implementation = os.environ.get('DUALUNET_GROUPED_CONV', 'auto')  # the process default (e.g. to compare)
if _implementation not in IMPLEMENTATIONS:
  raise ValueError(f'DUALUNET_GROUPED_CONV={_implementation!r}: expected one of {IMPLEMENTATIONS}')


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
  """Within the block, functions traced use `name` ('auto' | 'xla' | 'split') for grouped convolutions."""
  global _implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'grouped convolution implementation {name!r}: expected one of {IMPLEMENTATIONS}')
  previous, _implementation = _implementation, name
  try:
    yield
  finally:
    _implementation = previous


def _rewrite() -> bool:
  if _implementation == 'auto':
    return jax.default_backend() == 'cpu'
  return _implementation == 'split'


def _ones(x: Sequence[int] | None, n: int) -> bool:
  return x is None or tuple(x) == (1,) * n


def _depthwise_taps(lhs: jax.Array, rhs: jax.Array, pads: Sequence[tuple[int, int]],
                    dn: lax.ConvDimensionNumbers, out_dtype) -> jax.Array:
  """Depthwise convolution, stride 1, as sum_taps shift(lhs) * w_tap; lhs/rhs in any layout `dn` names."""
  x = jnp.transpose(lhs, dn.lhs_spec)  # N, C, spatial...
  w = jnp.transpose(rhs, dn.rhs_spec)[:, 0]  # C, kernel spatial...
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = jnp.pad(x, ((0, 0), (0, 0)) + tuple(pads)).astype(acc_dtype)
  w = w.astype(acc_dtype)
  kernel = w.shape[1:]
  out_size = tuple(x.shape[2 + d] - kernel[d] + 1 for d in range(len(kernel)))
  y = None
  for tap in np.ndindex(*kernel):
    window = x[(slice(None), slice(None)) + tuple(slice(t, t + s) for t, s in zip(tap, out_size))]
    term = window * w[(slice(None),) + tap].reshape((1, -1) + (1,) * len(kernel))
    y = term if y is None else y + term
  return jnp.transpose(y.astype(out_dtype), np.argsort(dn.out_spec))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None, preferred_element_type=None,
                         out_sharding=None) -> jax.Array:
  """`lax.conv_general_dilated`, computed without grouped kernels on the CPU (see the module docstring)."""
  plain = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers, precision=precision,
                            preferred_element_type=preferred_element_type)
  groups = feature_group_count
  if groups == 1 or batch_group_count != 1 or out_sharding is not None or not _rewrite():
    return plain(lhs, rhs, feature_group_count=groups, batch_group_count=batch_group_count,
                 **({} if out_sharding is None else {'out_sharding': out_sharding}))
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  n = lhs.ndim - 2
  in_channels, out_channels = lhs.shape[dn.lhs_spec[1]], rhs.shape[dn.rhs_spec[0]]
  kernel = tuple(rhs.shape[d] for d in dn.rhs_spec[2:])
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(lhs.shape[d] for d in dn.lhs_spec[2:]), kernel, tuple(window_strides), padding)
  else:
    pads = tuple(tuple(p) for p in padding)
  if (groups == in_channels and out_channels == groups and _ones(window_strides, n) and _ones(lhs_dilation, n)
      and _ones(rhs_dilation, n) and all(lo >= 0 and hi >= 0 for lo, hi in pads)):
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    return _depthwise_taps(lhs, rhs, pads, dn, out_dtype)
  parts = [plain(x, w) for x, w in zip(jnp.split(lhs, groups, axis=dn.lhs_spec[1]),
                                       jnp.split(rhs, groups, axis=dn.rhs_spec[0]))]
  return jnp.concatenate(parts, axis=dn.out_spec[1])


def Conv(*args, **kwargs) -> nnx.Conv:  # pylint: disable=invalid-name
  """`nnx.Conv` whose grouped convolutions run through `conv_general_dilated` (same parameters)."""
  return nnx.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)
