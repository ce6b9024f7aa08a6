"""Training input pipeline throughput (samples/s), in-process vs grain worker processes.

    .venv/bin/python benchmarks/input_throughput.py                       # synthetic + CoNSeP if present
    .venv/bin/python benchmarks/input_throughput.py --workers=0,2 --runs=3 --batches=12

Measures `pipeline.train_loader` end to end (read -> crop -> targets -> batch -> global jax.Array on the
host's devices), on
- synthetic: in-memory `synthetic.make_records` tiles (256^2, whole tiles, as PanNuke);
- consep: the real CoNSeP Train tiles (1000^2) from `.data/CoNSeP` (assembled by the test fixture), with
  256^2 random crops, and the 1024^2 reference parity mode (resize 1024, whole tiles) when --parity.
Each run starts a fresh loader at a different step, discards the first 2 batches (worker start-up) and times
the next --batches. Prints the median of --runs, the machine, and the ratio against in-process loading.
Figures only, never asserted.
"""

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)

import jax  # noqa: E402

from configs import default  # noqa: E402
from dualunet_jax.data import pipeline, synthetic  # noqa: E402


def _time(config, source, batches: int, runs: int) -> float:
  rates = []
  for r in range(runs):
    it = pipeline.train_loader(config, source, start_step=1000 * (r + 1))
    for _ in range(2):
      jax.block_until_ready(next(it))
    t = time.perf_counter()
    for _ in range(batches):
      jax.block_until_ready(next(it))
    rates.append(batches * config.train.batch_size / (time.perf_counter() - t))
    it.close()
  return statistics.median(rates)


def _consep_records(root: pathlib.Path) -> list[dict]:
  from dualunet_jax.data import consep  # pylint: disable=g-import-not-at-top
  return list(consep.iter_split(root, 'train'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workers', default='0,2')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--synthetic_tiles', type=int, default=64)
  parser.add_argument('--parity', action='store_true', help='also CoNSeP 1024^2 whole tiles (resize mode)')
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(',')]

  cases = []
  cfg = default.get_config()
  cfg.train.batch_size = args.batch_size
  cfg.dataset.num_classes = 3
  cases.append(('synthetic 256^2 whole tiles', cfg,
                synthetic.make_records(args.synthetic_tiles, seed=0, size=256, num_classes=3)))
  consep_root = REPO / '.data' / 'CoNSeP'
  if consep_root.is_dir():
    records = _consep_records(consep_root)
    cfg = default.get_config()
    cfg.train.batch_size = args.batch_size
    cfg.dataset.num_classes = 4
    cfg.dataset.crop_size = 256
    cases.append(('CoNSeP 1000^2 tiles, 256^2 crops', cfg, records))
    if args.parity:
      cfg = cfg.copy_and_resolve_references()
      cfg.dataset.crop_size, cfg.dataset.resize = 0, 1024
      cases.append(('CoNSeP 1024^2 parity (resize, whole tiles)', cfg, records))
  else:
    print(f'({consep_root} absent: CoNSeP skipped; run the tests once to assemble it)')

  print(f'machine: {_machine.describe()}')
  print(f'batch {args.batch_size}, {args.batches} timed batches per run, median of {args.runs} runs')
  for name, cfg, source in cases:
    base = None
    for w in workers:
      cfg.dataset.num_workers = w
      rate = _time(cfg, source, args.batches, args.runs)
      base = rate if base is None else base
      print(f'{name:45s} workers={w}: {rate:8.1f} samples/s  ({rate / base:.2f}x vs workers={workers[0]})',
            flush=True)


if __name__ == '__main__':
  main()
