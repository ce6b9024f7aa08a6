"""Mean ± std over folds of the metrics in several `eval/<split>.json` files (the PanNuke 3-fold table).

    python launch/aggregate_folds.py workdirs/pannuke/train*_val*/eval/fold*.json [--json]
"""

import argparse
import json
import math
import pathlib
import sys


def aggregate(paths: list[pathlib.Path]) -> dict[str, tuple[float, float, int]]:
  """{metric: (mean, population std, number of folds)} over the numeric metrics present in every file."""
  runs = []
  for path in paths:
    try:
      runs.append(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
      raise SystemExit(f'{path}: cannot read evaluation JSON ({e})')
  if not runs:
    raise SystemExit('no evaluation files given')
  keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
          and all(isinstance(r.get(k), (int, float)) for r in runs)]
  table = {}
  for k in sorted(keys):
    values = [float(r[k]) for r in runs]
    mean = sum(values) / len(values)
    table[k] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), len(values))
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('files', nargs='+', type=pathlib.Path)
  parser.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
  args = parser.parse_args(argv)
  table = aggregate(args.files)
  if args.json:
    print(json.dumps({k: {'mean': m, 'std': s, 'n': n} for k, (m, s, n) in table.items()}, sort_keys=True))
    return
  print(f'{"metric":<24s} {"mean":>8s} {"std":>8s}  folds')
  for k, (m, s, n) in table.items():
    print(f'{k:<24s} {m:8.4f} {s:8.4f}  {n}')


if __name__ == '__main__':
  sys.exit(main())
