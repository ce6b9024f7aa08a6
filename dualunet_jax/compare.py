r"""Side-by-side accuracy of finished runs: one table from the JSON files `eval` wrote, nothing recomputed.

    python -m dualunet_jax.compare workdirs/consep_w25 workdirs/hovernet_fast_w25 \
        'CoNIC ensemble=workdirs/conic_seresnext50_w25/eval/test_ensemble.json' [--split=test] [--markdown]

Each argument is a training workdir (its `eval/<split>.json`, and `eval/<split>_robustness.json` when
`eval --robustness=paper` has run) or one eval JSON file; `label=path` names the row (default: the workdir's
folder name). Columns: detection F1 / precision / recall, F1c per class and their mean, Dice, AJI, bPQ,
mPQ, mPQ+ and R² (CoNIC), and under the paper's robustness protocol the mean ± std of F1d over its five
perturbed copies with each row's F1d variance relative to the first row's (the DualU-Net paper reports 49 %
lower F1d variance than HoVer-Net's). A metric a run did not report shows as '-'.
"""

from collections.abc import Sequence
import dataclasses
import json
import math
import os
from typing import Any

from absl import app
from absl import flags

_SPLIT = flags.DEFINE_string('split', 'test', 'Which eval files of a workdir: eval/<split>.json.')
_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Print a Markdown table (default: aligned text).')

# (column, key in the eval JSON); per-class F1c columns are inserted after 'R_d'.
HEADLINE = (('F1d', 'f1_d'), ('P_d', 'precision_d'), ('R_d', 'recall_d'))
AFTER_CLASSES = (('F1c mean', 'f1_c_mean'), ('Dice', 'dice'), ('AJI', 'aji'), ('bPQ', 'bpq'), ('mPQ', 'mpq'),
                 ('mPQ+', 'mpq_plus'), ('R²', 'r2'))


class CompareError(ValueError):
  """A run that cannot be read: the message names the file and what is wrong."""


@dataclasses.dataclass
class Run:
  label: str
  metrics: dict[str, Any]  # eval's JSON object
  robustness: dict[str, Any] | None  # eval --robustness's JSON object, when there is one


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      value = json.load(f)
  except OSError as e:
    raise CompareError(f'{path}: cannot read ({e.strerror})') from e
  except json.JSONDecodeError as e:
    raise CompareError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(value, dict):
    raise CompareError(f'{path}: expected a JSON object, got {type(value).__name__}')
  return value


def load_run(spec: str, split: str = 'test') -> Run:
  """'[label=]path' -> Run. path: a workdir (reads eval/<split>.json and, if present,
  eval/<split>_robustness.json) or an eval JSON file."""
  label, sep, path = spec.partition('=')
  if not sep:
    label, path = '', spec
  path = os.path.normpath(path)
  if os.path.isdir(path):
    metrics_path = os.path.join(path, 'eval', f'{split}.json')
    if not os.path.exists(metrics_path):
      raise CompareError(f'{path}: no eval/{split}.json; run `python -m dualunet_jax.eval --workdir={path} '
                         f'--split={split}` first')
    robustness_path = os.path.join(path, 'eval', f'{split}_robustness.json')
    robustness = _read_json(robustness_path) if os.path.exists(robustness_path) else None
    label = label or os.path.basename(path)
  else:
    metrics_path, robustness = path, None
    label = label or os.path.splitext(os.path.basename(path))[0]
  metrics = _read_json(metrics_path)
  if 'f1_d' not in metrics:
    raise CompareError(f'{metrics_path}: no f1_d; not a file written by `dualunet_jax.eval`')
  return Run(label, metrics, robustness)


def class_names(runs: Sequence[Run]) -> list[str]:
  """Per-class F1c names in the order they first appear across runs (eval writes f1_c_<class>)."""
  names = []
  for run in runs:
    for key in run.metrics:
      if key.startswith('f1_c_') and key != 'f1_c_mean' and key[5:] not in names:
        names.append(key[5:])
  return names


def _number(value: Any) -> str:
  if value is None or not isinstance(value, (int, float)) or math.isnan(value):
    return '-'
  return f'{value:.3f}'


def table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
  """-> (header, rows of strings). The robustness columns appear when any run has the paper protocol."""
  if not runs:
    raise CompareError('no runs to compare')
  names = class_names(runs)
  columns = list(HEADLINE) + [(f'F1c {n}', f'f1_c_{n}') for n in names] + list(AFTER_CLASSES)
  header = ['run', 'method', 'step'] + [c for c, _ in columns]
  papers = [(run.robustness or {}).get('paper') for run in runs]
  with_robustness = any(p and 'f1_d_std' in p for p in papers)
  if with_robustness:
    header += ['robust F1d (mean ± std)', f'F1d variance vs {runs[0].label}']
  base = papers[0]['f1_d_std'] if papers[0] and papers[0].get('f1_d_std') else None
  rows = []
  for run, paper in zip(runs, papers):
    method = (run.metrics.get('config') or {}).get('method', '-')
    step = run.metrics.get('checkpoint_step')
    row = [run.label, str(method), '-' if step is None else str(step)]
    row += [_number(run.metrics.get(key)) for _, key in columns]
    if with_robustness:
      if paper and 'f1_d_std' in paper:
        row.append(f"{paper['f1_d_mean']:.3f} ± {paper['f1_d_std']:.3f}")
        row.append(f"{(paper['f1_d_std'] / base) ** 2:.2f}x" if base else '-')
      else:
        row += ['-', '-']
    rows.append(row)
  return header, rows


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def format_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  return '\n'.join('  '.join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                   for r in [header, *rows])


def main(argv: Sequence[str]) -> None:
  specs = argv[1:]
  if not specs:
    raise app.UsageError('give one or more workdirs or eval JSON files, e.g. workdirs/consep_w25')
  try:
    runs = [load_run(spec, _SPLIT.value) for spec in specs]
    header, rows = table(runs)
  except CompareError as e:
    raise SystemExit(f'error: {e}') from None
  print(format_markdown(header, rows) if _MARKDOWN.value else format_text(header, rows))


if __name__ == '__main__':
  app.run(main)
