"""Oracle: the ideal model outputs of the GT (one-hot classes, the target density) through the SAME
post-processing and metrics as a trained model. Its scores are the ceiling the targets + post-processing allow.

    python -m dualunet_jax.oracle --consep_dir=.data/CoNSeP --split=test                  # reference settings
    python -m dualunet_jax.oracle --consep_dir=.data/CoNSeP --split=test --sigma=2 --h=0.05

prints a table and, on its last line, one JSON object with the metrics (and the settings).
`python -m dualunet_jax.eval --oracle` reuses `run_oracle` with the records of any dataset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from dualunet_jax import metrics as metrics_lib
from dualunet_jax.config_fields import config_field
from dualunet_jax import postprocess as pp
from dualunet_jax.data import consep, schema


def oracle_outputs(instance_map: np.ndarray, instance_classes: np.ndarray, num_classes: int, *, sigma: float,
                   centroid: str = 'mass') -> tuple[np.ndarray, np.ndarray]:
  """The perfect model outputs of one GT record.

  Args:
    instance_map: int[H, W], nuclei 1..N (contiguous, schema).
    instance_classes: int[N] in 1..K (class 0 = unlabelled is drawn as class 1, so it stays foreground).
    num_classes: K.
    sigma: density Gaussian sigma (config.targets.sigma).
    centroid: 'mass' | 'bbox' (config.targets.centroid).

  Returns:
    (class_probs float32[H, W, K+1] one-hot of the target class map, density float32[H, W] the target).
  """
  from dualunet_jax.data import targets  # pylint: disable=import-outside-toplevel
  t = targets.make_targets(np.asarray(instance_map), np.asarray(instance_classes), sigma=sigma, centroid=centroid,
                           unlabelled_class=1, num_classes=num_classes)
  probs = np.eye(num_classes + 1, dtype=np.float32)[t['class_map']]
  return probs, t['density']


def _oracle_one(args: tuple[dict[str, Any], int, dict[str, Any], float]) -> metrics_lib.ImageStats:
  """Worker: the method's oracle maps -> its post-processing -> per-image statistics of one record."""
  from dualunet_jax import methods  # pylint: disable=import-outside-toplevel
  record, num_classes, config, match_radius = args
  config = ml_collections.ConfigDict(config)
  method = methods.get(config)
  inst = np.asarray(record[schema.INSTANCE_MAP])
  cls = np.asarray(record[schema.INSTANCE_CLASSES])
  maps = method.oracle_maps(inst, cls, num_classes, config)
  pred = method.postprocess_fn(maps, num_classes=num_classes, **method.postprocess_kwargs(config))
  tissue = schema.decode_text(record.get(schema.TISSUE, ''))
  return metrics_lib.image_stats(inst, cls, pred.instance_map, pred.classes, num_classes=num_classes,
                                 match_radius=match_radius, pred_class_map=pred.class_map,
                                 pred_centroids=pred.centroids, tissue=tissue)


def _as_dict(section: Any) -> dict[str, Any]:
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, 'to_dict') else dict(section)


def run_oracle(records: Iterable[Mapping[str, Any]], *, num_classes: int, targets_config: Any = None,
               postprocess_config: Any = None, match_radius: float = 12.0, workers: int = 0,
               class_names: Sequence[str] | None = None, method: str = 'dualunet') -> dict[str, float]:
  """Metrics of a method's oracle maps of `records` through its post-processing and `metrics`.

  Args:
    records: schema records (at least `instance_map`, `instance_classes`).
    num_classes: K.
    targets_config: `config.targets` (sigma, centroid) or a dict; None = defaults (5, 'mass').
    postprocess_config: `config.postprocess` or a dict of post-processing options; None = reference defaults.
    match_radius: detection pairing radius (config.eval.match_radius).
    workers: processes (0 = os.cpu_count(), 1 = in-process).
    class_names: names for the per-class keys.
    method: `config.method` (whose oracle maps and post-processing are used).

  Returns:
    The `MetricsAccumulator.result()` dict.
  """
  targets = {'sigma': float(config_field(targets_config, 'sigma', 5.0)),
             'centroid': str(config_field(targets_config, 'centroid', 'mass'))}
  config = {'method': method, 'targets': targets, 'postprocess': _as_dict(postprocess_config)}
  acc = metrics_lib.MetricsAccumulator(num_classes, match_radius, class_names=class_names)
  jobs = ((dict(r), num_classes, config, match_radius) for r in records)
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    acc.add_stats(_oracle_one(j) for j in jobs)
  else:
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as ex:
      acc.add_stats(ex.map(_oracle_one, jobs))
  return acc.result()


# ----------------------------------------------------------------------------------------------- CoNSeP


def format_table(results: Mapping[str, float]) -> str:
  keys = [k for k in results]
  width = max(len(k) for k in keys)
  return '\n'.join(f'{k:<{width}}  {results[k]:.4f}' for k in keys)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--consep_dir', required=True, help='folder with Train/ and Test/ (official CoNSeP layout)')
  parser.add_argument('--split', default='test')
  parser.add_argument('--sigma', type=float, default=5.0)
  parser.add_argument('--centroid', default='mass', choices=('mass', 'bbox'))
  parser.add_argument('--marker', default='hmaxima', choices=pp.MARKERS)
  parser.add_argument('--h', type=float, default=0.15)
  parser.add_argument('--min_distance', type=int, default=3)
  parser.add_argument('--threshold', type=float, default=0.1)
  parser.add_argument('--compactness', type=float, default=1.0)
  parser.add_argument('--relabel_connectivity', type=int, default=1)
  parser.add_argument('--match_radius', type=float, default=12.0)
  parser.add_argument('--workers', type=int, default=0)
  args = parser.parse_args(argv)
  post = {k: getattr(args, k) for k in ('marker', 'h', 'min_distance', 'threshold', 'compactness',
                                         'relabel_connectivity')}
  start = time.perf_counter()
  results = run_oracle(consep.iter_split(args.consep_dir, args.split), num_classes=len(consep.CLASS_NAMES),
                       targets_config={'sigma': args.sigma, 'centroid': args.centroid}, postprocess_config=post,
                       match_radius=args.match_radius, workers=args.workers, class_names=consep.CLASS_NAMES)
  print(format_table(results))
  print(f'# {time.perf_counter() - start:.1f} s', file=sys.stderr)
  print(json.dumps({**results, 'settings': {'sigma': args.sigma, 'centroid': args.centroid, **post}}))
  return results


if __name__ == '__main__':
  main()
