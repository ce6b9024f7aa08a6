"""HoVer-Net post-processing throughput (tiles/s, one process): `postprocess_hv` vs the plain restatement
`_postprocess_hv_reference` of the official code.

    python benchmarks/postprocess_hv_throughput.py --consep_dir=.data/CoNSeP [--tiles=2 --repeats=5]

Inputs: HoVer-Net oracle maps (one-hot TP, fg NP, target HV) of real CoNSeP Test tiles, 256^2 crops (9 disjoint
per 1000^2 tile) and the whole tiles; `--noise` adds Gaussian noise to NP (clipped) and HV, as a trained model's
maps are not ideal. Prints medians over repeats and the speed-up; never asserted.
"""

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)

from dualunet_jax import postprocess_hv as ph  # noqa: E402
from dualunet_jax.data import consep  # noqa: E402


def _maps(consep_dir: str, n: int, noise: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  for rec in itertools.islice(consep.iter_split(consep_dir, 'test'), n):
    m = ph.oracle_maps(rec['instance_map'], rec['instance_classes'], 4)
    if noise:
      m['np'] = np.clip(m['np'] + rng.normal(0, noise, m['np'].shape), 0, 1).astype(np.float32)
      m['hv'] = (m['hv'] + rng.normal(0, noise, m['hv'].shape)).astype(np.float32)
    out.append(m)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--consep_dir', default='.data/CoNSeP')
  parser.add_argument('--tiles', type=int, default=2, help='1000^2 tiles (each gives 9 disjoint 256^2 crops)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--noise', type=float, default=0.0)
  args = parser.parse_args()
  print(f'machine: {_machine.describe()}')
  tiles = _maps(args.consep_dir, args.tiles, args.noise)
  crops = [{k: v[y:y + 256, x:x + 256] for k, v in m.items()} for m in tiles for y in (0, 372, 744)
           for x in (0, 372, 744)]
  ref = lambda m: ph._postprocess_hv_reference(m['class_probs'], m['np'][..., 0], m['hv'])
  from dualunet_jax import postprocess_kernels
  backends = ['numpy'] + (['numba'] if postprocess_kernels.available() else [])
  ph.postprocess_hv_maps(crops[0])  # load (or compile) the kernels before timing
  for size, maps in (('256^2', crops), ('1000^2', tiles)):
    n = len(maps)
    t_ref = _machine.median_seconds(lambda: [ref(m) for m in maps], args.repeats)
    line = f'{size}: {n} tiles, noise {args.noise} | reference {n / t_ref:7.2f} tiles/s'
    for backend in backends:
      t_fast = _machine.median_seconds(lambda: [ph.postprocess_hv_maps(m, backend=backend) for m in maps],
                                       args.repeats)
      line += f' | postprocess_hv {backend} {n / t_fast:7.2f} tiles/s ({t_ref / t_fast:4.1f}x)'
    print(line, flush=True)


if __name__ == '__main__':
  main()
