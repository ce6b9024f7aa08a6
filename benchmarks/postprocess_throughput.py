"""Post-processing throughput (tiles/s): `postprocess` against the plain restatement of the reference
(`_postprocess_reference`) measured in the same run, one process and a warm worker pool, at 256² and 1000².

    python benchmarks/postprocess_throughput.py --consep_dir=.data/CoNSeP [--tiles=2 --repeats=3 --workers=2]

Maps (each line says which):
- `noisy oracle`: ideal outputs of real CoNSeP Test tiles (one-hot classes, sigma-5 target density) plus smooth
  noise on the density (a Gaussian-filtered normal field, std 0.02: spurious maxima and negative values);
  256² maps are 9 crops of each 1000² tile (the previous version of this benchmark);
- `clean oracle`: the same without noise (a flat background, as a well-trained model's);
- `trained model`: the four 256² crops of tests/data/postprocess_model_maps.npz (a width-1/8 model trained
  300 steps on CoNSeP: rough maps with ~3,000 local maxima per crop).
Timings are medians over --repeats of the whole set; ratios are against the restatement in the same run,
one process each (pool figures use --workers processes and the default backend). `postprocess` is timed with
each backend: `numpy` (the pure path) and, when numba is installed, `numba` (the compiled kernels, the
default then). Nothing is asserted.
"""

import argparse
import itertools
import os
import pathlib
import sys

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import _machine  # noqa: E402  (benchmarks/_machine.py: scripts run with benchmarks/ on sys.path)

from dualunet_jax import oracle  # noqa: E402
from dualunet_jax.data import consep  # noqa: E402
from dualunet_jax import postprocess as pp  # noqa: E402
from dualunet_jax import postprocess_kernels  # noqa: E402

MODEL_MAPS = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'postprocess_model_maps.npz'


def _oracle_maps(consep_dir: str, n: int, noise: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  probs, dens = [], []
  for rec in itertools.islice(consep.iter_split(consep_dir, 'test'), n):
    p, d = oracle.oracle_outputs(rec['instance_map'], rec['instance_classes'], 4, sigma=5.0)
    if noise:
      field = ndi.gaussian_filter(rng.normal(0, 1, d.shape), 2.0)
      d = d + noise * field / field.std()
    probs.append(p)
    dens.append(d.astype(np.float32))
  return probs, dens


def _crops(maps):
  return [m[y:y + 256, x:x + 256] for m in maps for y in (0, 372, 744) for x in (0, 372, 744)]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--consep_dir', default='.data/CoNSeP')
  parser.add_argument('--tiles', type=int, default=2, help='1000^2 tiles (each gives 9 disjoint 256^2 crops)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workers', type=int, default=2)
  args = parser.parse_args()
  print(f'machine: {_machine.describe()}')
  noisy_p, noisy_d = _oracle_maps(args.consep_dir, args.tiles, 0.02)
  clean_p, clean_d = _oracle_maps(args.consep_dir, args.tiles, 0.0)
  z = np.load(MODEL_MAPS)
  model_p = list(z['class_map'].astype(np.int32))
  model_d = list(z['density'].astype(np.float32))
  sets = [('256^2 noisy oracle', _crops(noisy_p), _crops(noisy_d)),
          ('256^2 clean oracle', _crops(clean_p), _crops(clean_d)),
          ('256^2 trained model', model_p * 4, model_d * 4),
          ('1000^2 noisy oracle', noisy_p, noisy_d),
          ('1000^2 clean oracle', clean_p, clean_d)]
  backends = ['numpy'] + (['numba'] if postprocess_kernels.available() else [])
  print(f"backends: {', '.join(backends)}" + ('' if 'numba' in backends else ' (numba not installed)'))
  pp.postprocess(model_p[0], model_d[0], num_classes=4)  # load (or compile) the kernels before timing
  with pp.PostProcessor(workers=args.workers, num_classes=4) as proc:
    maps = lambda ps, ds: [{'class_probs': p, 'density': d} for p, d in zip(ps, ds)]
    proc.map(maps(noisy_p[:1] * args.workers, noisy_d[:1] * args.workers))  # start the workers
    for name, ps, ds in sets:
      n = len(ps)
      t_ref = _machine.median_seconds(
          lambda: [pp._postprocess_reference(p, d, num_classes=4) for p, d in zip(ps, ds)], args.repeats)
      ones = ''
      for backend in backends:
        t_one = _machine.median_seconds(
            lambda: [pp.postprocess(p, d, num_classes=4, backend=backend) for p, d in zip(ps, ds)], args.repeats)
        ones += f' | {backend} one process {n / t_one:7.2f} ({t_ref / t_one:4.1f}x)'
      t_pool = _machine.median_seconds(lambda: proc.map(maps(ps, ds)), args.repeats)
      print(f'{name}: {n} tiles | restatement {n / t_ref:7.2f} tiles/s{ones} | warm pool of {args.workers} '
            f'{n / t_pool:7.2f} ({t_ref / t_pool:4.1f}x)', flush=True)


if __name__ == '__main__':
  main()
