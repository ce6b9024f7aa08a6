r"""Model summary: parameters per part and forward GFLOPs (XLA cost analysis), nothing materialised.

    python -m dualunet_jax.summary --config=configs/default.py [--config.model.encoder=convnext_base] \
        [--num_classes=5] [--sizes=256,1024] [--json]

The model is built abstractly (`nnx.eval_shape`) and the jitted eval-mode forward (batch 1, square tiles) is
only lowered, never compiled or run, so even 1024x1024 costs about a second on a CPU. FLOPs are XLA's count
on the lowered HLO: a multiply-add is 2 FLOPs, and element-wise ops (BatchNorm, ReLU, padding, ...) are
included. The paper's Table 2 "GLOPs" (ResNeXt 41.01 M params, 16.26 / 260.23 at 256^2 / 1024^2; ConvNeXt
97.81 M, 26.78 / 428.49) are most likely multiply-accumulates (e.g. thop/ptflops), so compare them with
FLOPs / 2.

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

from dualunet_jax import models
from dualunet_jax.models import resnext

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'K nucleus classes (default: config.dataset.num_classes).')
_SIZES = flags.DEFINE_list('sizes', ['256', '1024'], 'Square tile sides for the FLOP count.')
_JSON = flags.DEFINE_bool('json', False, 'Also print one JSON object as the last stdout line.')

PAPER_TABLE2 = {  # encoder -> (params M, "GLOPs" at 256^2, at 1024^2), MIDL 2025 paper Table 2.
    'resnext50_32x4d': (41.01, 16.26, 260.23),
    'convnext_base': (97.81, 26.78, 428.49),
}


def forward_flops(model: models.DualUNet, size: int, batch: int = 1) -> float:
  """XLA FLOPs of the eval-mode forward of `model` (concrete or abstract) on float32[batch, size, size, 3]."""
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


def summarize(model_config: Any, num_classes: int, sizes: Sequence[int] = (256, 1024)) -> dict[str, Any]:
  """Parameter counts per part and GFLOPs / GMACs (= FLOPs / 2) per tile size, from an abstract model."""
  model = models.abstract_model(model_config, num_classes)
  counts = models.parameter_counts(model)
  result: dict[str, Any] = {
      'encoder': model_config.encoder,
      'num_classes': num_classes,
      'width_multiplier': float(model_config.width_multiplier),
      'cardinality': model.cardinality,
      'dtype': model_config.dtype,
      'params': counts['total'],
      'params_per_part': counts,
  }
  for size in sizes:
    flops = forward_flops(model, size)
    result[f'gflops_{size}'] = flops / 1e9
    result[f'gmacs_{size}'] = flops / 2e9
  return result


def format_table(summary: dict[str, Any]) -> str:
  """Human-readable table of `summarize` output."""
  lines = [f"DualU-Net  encoder={summary['encoder']}  K={summary['num_classes']} "
           f"(class head {summary['num_classes'] + 1} ch)  width_multiplier={summary['width_multiplier']:g}  "
           f"dtype={summary['dtype']}", '', f"{'part':<18}{'parameters':>14}"]
  regrouped = summary['encoder'].startswith('resnext') and summary['cardinality'] != resnext.CARDINALITY
  if regrouped:
    lines.insert(1, f"ResNeXt 3x3 convolutions in {summary['cardinality']} group(s), not "
                    f"{resnext.CARDINALITY}: not the reference architecture")
  for part, n in summary['params_per_part'].items():
    if part == 'total':
      lines.append('-' * 32)
    lines.append(f'{part:<18}{n:>14,}')
  sizes = sorted(int(k.split('_')[1]) for k in summary if k.startswith('gflops_'))
  lines += ['', f"{'input (batch 1)':<18}{'GFLOPs (XLA)':>14}{'FLOPs/2 (GMAC)':>16}"]
  for size in sizes:
    lines.append(f"{f'{size}x{size}':<18}{summary[f'gflops_{size}']:>14.2f}{summary[f'gmacs_{size}']:>16.2f}")
  lines.append('')
  lines.append('XLA counts FLOPs (a multiply-add = 2, element-wise ops included); the paper\'s Table 2 '
               '"GLOPs" are most likely multiply-accumulates: compare them with FLOPs/2.')
  paper = PAPER_TABLE2.get(summary['encoder'])
  if paper and summary['width_multiplier'] == 1.0 and not regrouped:
    lines.append(f'Paper Table 2 ({summary["encoder"]}): {paper[0]:.2f} M params, {paper[1]:.2f} "GLOPs" at '
                 f'256x256, {paper[2]:.2f} at 1024x1024.')
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
  summary = summarize(config.model, num_classes, sizes)
  print(format_table(summary))
  if _JSON.value:
    print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
