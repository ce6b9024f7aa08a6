r"""Model summary of any method: parameters per part and forward GFLOPs (XLA cost analysis), nothing
materialised.

    python -m dualunet_jax.summary --config=configs/default.py [--config.model.encoder=convnext_base] \
        [--num_classes=5] [--sizes=256,1024] [--json]

The model is built abstractly (`nnx.eval_shape`) and the jitted eval-mode forward (batch 1, square tiles) is
only lowered, never compiled or run, so even 1024x1024 costs about a second on a CPU. FLOPs are XLA's count
on the lowered HLO: a multiply-add is 2 FLOPs, and element-wise ops (BatchNorm, ReLU, padding, ...) are
included. The paper's Table 2 "GLOPs" (ResNeXt 41.01 M params, 16.26 / 260.23 at 256^2 / 1024^2; ConvNeXt
97.81 M, 26.78 / 428.49) are most likely multiply-accumulates (e.g. thop/ptflops), so compare them with
FLOPs / 2. Each method adds its notes (DualU-Net: the paper's Table 2; HoVer-Net: the official counts).

With --json the last stdout line is one JSON object with at least `params`, `gflops_256`, `gflops_1024`
(one `gflops_<size>` / `gmacs_<size>` pair per requested size).
"""

from collections.abc import Sequence
import json
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_flags

from dualunet_jax import methods
from dualunet_jax.methods.base import margin_of

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'K nucleus classes (default: config.dataset.num_classes).')
_SIZES = flags.DEFINE_list('sizes', ['256', '1024'], 'Square tile sides for the FLOP count.')
_JSON = flags.DEFINE_bool('json', False, 'Also print one JSON object as the last stdout line.')

def forward_flops(model: nnx.Module, size: int, batch: int = 1) -> float:
  """XLA FLOPs of the eval-mode forward of `model` (concrete or abstract) on float32[batch, size, size, 3]
  (for a valid-convolution model that is the input: its outputs are size - 2 * margin)."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    module = nnx.merge(graphdef, state)
    module.eval()
    return module(images)

  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  cost = jax.jit(forward).lower(abstract_state, images).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  if not cost or 'flops' not in cost:
    raise RuntimeError('XLA cost analysis returned no FLOP count on this backend')
  return float(cost['flops'])


def summarize(config: Any, num_classes: int, sizes: Sequence[int] = (256, 1024)) -> dict[str, Any]:
  """Parameter counts per part and GFLOPs / GMACs (= FLOPs / 2) per tile size of the experiment config's
  method and model (`config.method`, `config.model`), from an abstract model."""
  method = methods.get(config)
  model = method.abstract_model(config, num_classes)
  counts = method.parameter_counts(model)
  result: dict[str, Any] = {
      'method': method.name,
      'encoder': config.model.encoder,
      'num_classes': num_classes,
      'width_multiplier': float(config.model.width_multiplier),
      'dtype': config.model.dtype,
      'margin': margin_of(model),
      'params': counts['total'],
      'params_per_part': counts,
      'notes': method.summary_notes(config, model, counts),
  }
  for size in sizes:
    flops = forward_flops(model, size)
    result[f'gflops_{size}'] = flops / 1e9
    result[f'gmacs_{size}'] = flops / 2e9
  return result


def format_table(summary: dict[str, Any]) -> str:
  """Human-readable table of `summarize` output."""
  lines = [f"{summary['method']}  encoder={summary['encoder']}  K={summary['num_classes']} "
           f"(class head {summary['num_classes'] + 1} ch)  width_multiplier={summary['width_multiplier']:g}  "
           f"dtype={summary['dtype']}", '', f"{'part':<18}{'parameters':>14}"]
  for part, n in summary['params_per_part'].items():
    if part == 'total':
      lines.append('-' * 32)
    lines.append(f'{part:<18}{n:>14,}')
  sizes = sorted(int(k.split('_')[1]) for k in summary if k.startswith('gflops_'))
  lines += ['', f"{'input (batch 1)':<18}{'GFLOPs (XLA)':>14}{'FLOPs/2 (GMAC)':>16}"]
  for size in sizes:
    lines.append(f"{f'{size}x{size}':<18}{summary[f'gflops_{size}']:>14.2f}{summary[f'gmacs_{size}']:>16.2f}")
  lines.append('')
  if summary.get('margin'):
    lines.append(f"Valid convolutions: an S x S input gives (S - {2 * summary['margin']})^2 outputs.")
  lines.append('XLA counts FLOPs (a multiply-add = 2, element-wise ops included); papers\' "GFLOPs" are most '
               'often multiply-accumulates: compare them with FLOPs/2.')
  lines += summary.get('notes', [])
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/default.py')
  num_classes = _NUM_CLASSES.value if _NUM_CLASSES.value is not None else config.dataset.num_classes
  try:
    sizes = [int(s) for s in _SIZES.value]
  except ValueError as e:
    raise app.UsageError(f'--sizes must be integers, got {_SIZES.value}') from e
  summary = summarize(config, num_classes, sizes)
  print(format_table(summary))
  if _JSON.value:
    print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
