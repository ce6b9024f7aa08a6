"""Evaluate a trained model (any method: DualU-Net, HoVer-Net, ...) on a split and print every metric.

    python -m dualunet_jax.eval --config=configs/consep.py --workdir=W [--split=test] [--checkpoint=best|last|STEP]
    python -m dualunet_jax.eval --config=configs/consep.py --workdir=W --robustness=paper   # paper, Appendix D
    python -m dualunet_jax.eval --config=configs/consep.py --workdir=W --robustness=stress  # other labs' stains
    python -m dualunet_jax.eval --config=configs/consep.py --workdir=W --stain_norm=reinhard
    python -m dualunet_jax.eval --config=configs/consep.py --oracle --split=test         # no model: GT-derived maps
    python -m dualunet_jax.eval --config=configs/conic.py --workdir=W50 --ensemble=W101  # averaged maps, one post-proc
    python -m dualunet_jax.eval --config=configs/conic.py --workdir=W --conic_output=DIR  # + CoNIC-format predictions

Writes `W/eval/<split>.json` (all metrics, per-image counts), overlay PNGs (ground truth | prediction,
outlines coloured by class) in `W/eval/<split>_overlays/`, and prints a table; the last stdout line is one
JSON object with the headline metrics. The model (encoder, widths, classes, mpp) comes from `W/config.json`;
the `--config` file supplies data locations and evaluation settings (post-processing, match radius).
`--stain_norm` maps each tile's colours onto the training split's statistics (`W/stain_stats.json`, written at
training time; fitted per tile, as evaluation tiles are independent images) before the model sees it.

`--ensemble=W2` (repeatable) averages the maps of W2, ... with those of `--workdir` (encoders may differ; the
methods must give the same maps for the same classes) and post-processes the mean once, with the `--config`
post-processing; the JSON (`<split>_ensemble.json` in W/eval) names every member. `--conic_output=DIR` writes
`pred_labels.npy` int32[N, H, W, 2] and `pred_counts.csv` for the CoNIC challenge's own scoring (on CoNIC,
`r2` is the challenge's R² of the central 224² of each patch; see `evaluation.evaluate` and `conic.py`).
"""

import json
import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=False)
flags.DEFINE_string('workdir', None, 'Training workdir (holds config.json and checkpoints).')
flags.DEFINE_string('split', None, 'Split to evaluate (default: config.dataset.test_split).')
flags.DEFINE_string('checkpoint', 'best', "'best', 'last' or a step number.")
flags.DEFINE_bool('oracle', False, 'Feed ground-truth-derived ideal maps through post-processing and metrics.')
flags.DEFINE_string('robustness', None, "Robustness protocol: 'paper' (5 perturbed copies, mean ± std), 'stress' "
                    "(graded stain shifts of other labs), 'all', or comma-separated level names.")
flags.DEFINE_enum('stain_norm', 'none', ['none', 'reinhard', 'macenko'],
                  'Inference stain normalisation onto the training statistics (W/stain_stats.json).')
flags.DEFINE_string('output', None, 'Output folder (default: W/eval, or workdirs/oracle with --oracle).')
flags.DEFINE_multi_string('ensemble', [], 'Another workdir whose maps are averaged with --workdir\'s '
                          '(repeatable; encoders may differ, the maps and classes must match).')
flags.DEFINE_string('conic_output', None, 'Folder for the predictions in the CoNIC format (pred_labels.npy, '
                    'pred_counts.csv).')
flags.mark_flag_as_required('config')

HEADLINE = ('f1_d', 'f1_c_mean', 'dice', 'bpq', 'mpq', 'aji')


def _merge_trained_config(config, workdir: pathlib.Path):
  """The model-defining fields come from the training run, so the checkpoint always fits the model."""
  from dualunet_jax import checkpointing
  from dualunet_jax import methods
  trained = checkpointing.load_config(workdir)
  with config.unlocked():
    config.method = methods.method_name(trained)
    config.model = trained.model
    if 'refine' in trained:  # a two-stage workdir: its model is TwoStage (stage 1 + EnhancementNet)
      config.refine = trained.refine
    for key in ('num_classes', 'class_names', 'mpp'):
      config.dataset[key] = trained.dataset[key]
  return config


def _normalizer(workdir: pathlib.Path):
  """The --stain_norm normaliser with the training statistics of `workdir`, or None."""
  if FLAGS.stain_norm == 'none':
    return None
  from dualunet_jax.data import stain
  try:
    return stain.Normalizer(FLAGS.stain_norm, stain.load_statistics(workdir))
  except (OSError, ValueError) as e:
    raise app.UsageError(f'--stain_norm={FLAGS.stain_norm}: {e}') from e


def _fail(message: str):
  """One line, no traceback (e.g. workdirs that cannot be ensembled)."""
  print(f'dualunet-eval: error: {message}', file=sys.stderr)
  sys.exit(2)


def _members(config, workdirs: list[pathlib.Path]):
  """(merged config of the first workdir, [(workdir, method, model, meta, merged config)], models restored in
  eval mode); exits with one line naming both workdirs when a member's maps cannot be averaged with the
  first's (other map names or kinds, post-processing, classes or µm/px)."""
  import copy
  from dualunet_jax import checkpointing, methods
  members = []
  for workdir in workdirs:
    merged = _merge_trained_config(copy.deepcopy(config), workdir)
    method = methods.get(merged)
    if members:
      first_dir, first_method, first_config = members[0][0], members[0][1], members[0][4]
      mine = (dict(method.map_kinds), method.postprocess_fn, merged.dataset.num_classes, merged.dataset.mpp)
      theirs = (dict(first_method.map_kinds), first_method.postprocess_fn, first_config.dataset.num_classes,
                first_config.dataset.mpp)
      if mine != theirs:
        _fail(f'cannot ensemble {workdir} ({method.name}: maps {sorted(mine[0])}, '
              f'{mine[2]} classes, {mine[3]} µm/px) with {first_dir} ({first_method.name}: maps '
              f'{sorted(theirs[0])}, {theirs[2]} classes, {theirs[3]} µm/px)')
    # Values come from the checkpoint: an abstract (shape-only) model.
    model = method.abstract_model(merged, merged.dataset.num_classes)
    meta = checkpointing.restore_model(workdir, model, FLAGS.checkpoint)
    model.eval()
    members.append((workdir, method, model, meta, merged))
  return members[0][4], members


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO; `-v 0` brings it back
  from dualunet_jax import evaluation, methods
  from dualunet_jax.data import sources

  config = FLAGS.config
  split = FLAGS.split or config.dataset.test_split
  if FLAGS.oracle:
    from dualunet_jax import oracle
    source = sources.load_source(config.dataset, split)
    results = oracle.run_oracle(
        (source[i] for i in range(len(source))), num_classes=config.dataset.num_classes,
        targets_config=config.targets, postprocess_config=config.postprocess,
        match_radius=config.eval.match_radius, workers=config.postprocess.workers,
        class_names=tuple(config.dataset.class_names), method=methods.method_name(config))
    out_dir = pathlib.Path(FLAGS.output or 'workdirs/oracle')
    name = f'{config.dataset.name}_{split}_oracle'
  else:
    if not FLAGS.workdir:
      raise app.UsageError('--workdir is required (or use --oracle)')
    from dualunet_jax import trainer
    workdir = pathlib.Path(FLAGS.workdir)
    ensemble = [pathlib.Path(w) for w in FLAGS.ensemble]
    if ensemble and FLAGS.robustness:
      raise app.UsageError('--ensemble with --robustness is not supported; evaluate the members one by one')
    config, members = _members(config, [workdir, *ensemble])
    meta = members[0][3]
    source = sources.load_source(config.dataset, split)
    mesh = trainer.make_mesh()
    if ensemble:  # the members' maps averaged (each through its own method), post-processed once
      model = evaluation.make_forward([m[2] for m in members], mesh, methods.get(config),
                                      member_methods=[m[1] for m in members])
    else:
      model = members[0][2]
    out_dir = pathlib.Path(FLAGS.output or workdir / 'eval')
    normalizer = _normalizer(workdir)
    suffix = '' if normalizer is None else f'_{normalizer.kind}'
    if FLAGS.robustness:
      from dualunet_jax import robustness
      results = robustness.evaluate_stress(model, source, config, levels=FLAGS.robustness, normalizer=normalizer,
                                           mesh=mesh)
      name = f'{split}_robustness{suffix}'
    else:
      per_image = []
      transform = None
      if normalizer is not None:
        from dualunet_jax.data import stain
        transform = lambda record, index: dict(record, image=stain.normalize_tile(normalizer, record['image']))
      name = f'{split}{"_ensemble" if ensemble else ""}{suffix}'
      overlays = f'{split}{"_ensemble" if ensemble else ""}_overlays'
      results = evaluation.evaluate(model, source, config, mesh=mesh, overlays_dir=out_dir / overlays,
                                    num_overlays=config.eval.num_overlays, per_image=per_image,
                                    transform=transform, conic_output=FLAGS.conic_output)
      results['per_image'] = per_image
    results['checkpoint_step'] = meta.get('step')
    if ensemble:
      results['members'] = [{'workdir': str(w.resolve()), 'method': method.name, 'encoder': c.model.get('encoder'),
                             'checkpoint_step': m.get('step')} for w, method, _, m, c in members]
  results['config'] = {'method': methods.method_name(config), 'targets': config.targets.to_dict(),
                       'postprocess': config.postprocess.to_dict(), 'match_radius': config.eval.match_radius,
                       'split': split, 'stain_norm': FLAGS.stain_norm}

  if jax.process_index() == 0:
    evaluation.write_json(out_dir / f'{name}.json', results)
    if FLAGS.robustness and not FLAGS.oracle:
      from dualunet_jax import robustness
      print(robustness.format_stress_table(results))
      headline = {name: {k: row[k] for k in robustness.STRESS_KEYS} for name, row in results['levels'].items()}
      headline.update(results.get('paper', {}))
    else:
      print(f'{config.dataset.name} / {split}' + (' (oracle)' if FLAGS.oracle else ''))
      print(evaluation.format_table(results, tuple(config.dataset.class_names)))
      headline = {k: results[k] for k in results if isinstance(results[k], (int, float))}
    print(f'wrote {out_dir / f"{name}.json"}', file=sys.stderr)
    print(json.dumps(evaluation.json_safe(headline), sort_keys=True, allow_nan=False))


def run():
  app.run(main)


if __name__ == '__main__':
  run()
