"""Post-processing throughput (tiles/s) on real CoNSeP-derived outputs: `postprocess_batch` / a warm
`PostProcessor` with 2 worker processes vs a one-tile-at-a-time loop of the plain reference restatement.

    python benchmarks/postprocess_throughput.py --consep_dir=.data/CoNSeP [--tiles=2 --repeats=3 --workers=2]

Inputs: oracle outputs (one-hot classes, sigma-5 target density) of real CoNSeP Test tiles, with smooth noise
added to the density (a Gaussian-filtered normal field, std 0.02: a few spurious maxima and negative values,
as in a trained model's output). 256^2 tiles are crops of the same 1000^2 tiles. Prints medians over repeats
and the speed-up ratio; never asserted.
"""

import argparse
import itertools
import os
import statistics
import sys
import time

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)

from dualunet_jax import oracle  # noqa: E402
from dualunet_jax.data import consep  # noqa: E402
from dualunet_jax import postprocess as pp  # noqa: E402


def _inputs(consep_dir: str, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  probs, dens = [], []
  for rec in itertools.islice(consep.iter_split(consep_dir, 'test'), n):
    p, d = oracle.oracle_outputs(rec['instance_map'], rec['instance_classes'], 4, sigma=5.0)
    noise = ndi.gaussian_filter(rng.normal(0, 1, d.shape), 2.0)
    probs.append(p)
    dens.append((d + 0.02 * noise / noise.std()).astype(np.float32))
  return probs, dens


def _time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--consep_dir', default='.data/CoNSeP')
  parser.add_argument('--tiles', type=int, default=2, help='1000^2 tiles (each gives 9 disjoint 256^2 crops)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workers', type=int, default=2)
  args = parser.parse_args()
  print(f'machine: {_machine.describe()}')
  probs, dens = _inputs(args.consep_dir, args.tiles)
  crops_p = [p[y:y + 256, x:x + 256] for p in probs for y in (0, 372, 744) for x in (0, 372, 744)]
  crops_d = [d[y:y + 256, x:x + 256] for d in dens for y in (0, 372, 744) for x in (0, 372, 744)]
  with pp.PostProcessor(workers=args.workers) as proc:
    proc.map(crops_p[:args.workers], crops_d[:args.workers])  # start the workers
    for size, ps, ds in (('256^2', crops_p, crops_d), ('1000^2', probs, dens)):
      n = len(ps)
      t_ref = _time(lambda: [pp._postprocess_reference(p, d) for p, d in zip(ps, ds)], args.repeats)
      t_one = _time(lambda: [pp.postprocess(p, d) for p, d in zip(ps, ds)], args.repeats)
      t_pool = _time(lambda: proc.map(ps, ds), args.repeats)
      t_batch = _time(lambda: pp.postprocess_batch(np.stack(ps), np.stack(ds), workers=args.workers), args.repeats)
      print(f'{size}: {n} tiles | reference loop {n / t_ref:7.2f} tiles/s | postprocess loop {n / t_one:7.2f} | '
            f'warm PostProcessor({args.workers}) {n / t_pool:7.2f} | postprocess_batch(workers={args.workers}, '
            f'pool per call) {n / t_batch:7.2f} | ratio warm pool / reference {t_ref / t_pool:5.1f}x, '
            f'batch / reference {t_ref / t_batch:5.1f}x', flush=True)


if __name__ == '__main__':
  main()
