"""Predict nuclei on tiles and whole-slide images: `python -m dualunet_jax.predict` (console: dualunet-predict).

    python -m dualunet_jax.predict --workdir=workdirs/consep --input=slides/*.svs --input=tiles/ \
        --output=out/ [--mpp=0.25] [--tile_size=1024 --overlap=128 --batch_size=4] [--tta] \
        [--formats=geojson,csv,maps,overlay,composition] [--stain_norm=reinhard|macenko]

Inputs: files (png/jpg/tif tiles, svs/ndpi/mrxs/scn/bif/dcm/tiled tif slides through OpenSlide), folders
(their image/slide files) and globs, repeatable. Every input is resampled to the model's µm/px
(`config.dataset.mpp` of the checkpoint); `--mpp` gives the level-0 µm/px of the inputs (one value for all, or
one per `--input` flag). Slides without resolution metadata need `--mpp`; plain tiles without it are assumed
to be at the model's resolution (with a warning).

Model: `--workdir` (a training workdir; `--which=best|last|<step>`) or `--checkpoint` (workdirs or step
folders, repeatable: several are averaged as an ensemble). `--config` without a checkpoint runs a randomly
initialised model of that config (pipeline smoke tests and throughput only).

Outputs per input in `--output` (see `dualunet_jax/inference/exporters.py`): `<name>.geojson` (QuPath
detections, level-0 px), `<name>_points.geojson`, `<name>.csv`, maps (`.npy` for tiles, tiled `.tif` for
slides), `<name>_overlay.png`, `<name>_composition.json` and `composition.csv`. Interrupted runs resume where
they stopped when rerun with the same arguments (state in `<output>/.dualunet_work`).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir to load the model from.')
flags.DEFINE_multi_string('checkpoint', [], 'Workdir or checkpoint step folder; repeat for an ensemble.')
flags.DEFINE_string('which', 'best', "Checkpoint of a workdir: 'best', 'last' or a step.")
config_flags.DEFINE_config_file('config', None, 'Config file for a randomly initialised model (no checkpoint).')
flags.DEFINE_multi_string('input', [], 'Image/slide file, folder or glob; repeatable.')
flags.DEFINE_string('output', None, 'Output folder.')
flags.DEFINE_list('mpp', [], 'Level-0 µm/px of the inputs: one value for all, or one per --input.')
flags.DEFINE_integer('tile_size', 1024, 'Tile side in model-resolution pixels.')
flags.DEFINE_integer('overlap', 128, 'Overlap between tiles (even; nuclei up to overlap/2 px radius are whole).')
flags.DEFINE_integer('batch_size', 4, 'Tiles per device per batch (a batch is split over all local devices).')
flags.DEFINE_bool('tta', False, 'Test-time augmentation: average --tta_views flip/rot90 views.')
flags.DEFINE_enum('tta_views', '8', ['2', '4', '8'], 'Views with --tta (4: flips; 8: flips and rot90s).')
flags.DEFINE_list('formats', ['geojson', 'csv', 'maps', 'overlay', 'composition'],
                  'Outputs: geojson, geojson_points, csv, maps, overlay, composition.')
flags.DEFINE_enum('tissue', 'auto', ['auto', 'on', 'off'], 'Skip background tiles (auto: on for slides).')
flags.DEFINE_integer('workers', 0, 'Post-processing processes (0: one per CPU core; 1: in-process).')
flags.DEFINE_enum('stain_norm', 'none', ['none', 'reinhard', 'macenko'],
                  "Stain normalisation onto the training split's colours (W/stain_stats.json), fitted per input "
                  'on its thumbnail.')
flags.DEFINE_bool('refine', True, 'Use the refinement stage of a checkpoint that holds one (two-stage '
                  'enhancement); --norefine predicts with its stage-1 model alone.')
flags.DEFINE_bool('keep_work', False, 'Keep per-row result shards after export.')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def _fail(error: Exception):
  """Boundary errors: one line naming the file and the problem, no traceback."""
  print(f'dualunet-predict: error: {error}', file=sys.stderr)
  sys.exit(2)


def _predictor(checkpoints: list[str], tta_views: int):
  from dualunet_jax.inference import engine
  if checkpoints:
    return engine.checkpoint_predictor(checkpoints, which=FLAGS.which, tta_views=tta_views, refine=FLAGS.refine)
  from flax import nnx
  from dualunet_jax import methods
  config = FLAGS.config
  method = methods.get(config)
  logging.warning('no checkpoint: predicting with a RANDOMLY INITIALISED %s model (%s)', method.name,
                  config.model.encoder)
  model = method.build_model(config, config.dataset.num_classes, rngs=nnx.Rngs(config.seed))
  model.eval()
  identity = json.dumps({'random_init': config.model.to_dict(), 'method': method.name, 'seed': config.seed,
                         'tta_views': tta_views})
  return engine.model_predictor([model], method=method, tta_views=tta_views), config, identity


def _normalizer(checkpoints: list[str]):
  """The --stain_norm normaliser with the training statistics of the first checkpoint's workdir, or None."""
  if FLAGS.stain_norm == 'none':
    return None
  if not checkpoints:
    raise ValueError('--stain_norm needs a trained workdir (its stain_stats.json), not --config alone')
  import pathlib
  from dualunet_jax.data import stain
  path = pathlib.Path(checkpoints[0])
  workdir = path.parent.parent if path.name.isdigit() else path  # a step folder W/best/123 -> W
  return stain.Normalizer(FLAGS.stain_norm, stain.load_statistics(workdir))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError('--input and --output are required')
  checkpoints = list(FLAGS.checkpoint) + ([FLAGS.workdir] if FLAGS.workdir else [])
  if not checkpoints and FLAGS.config is None:
    raise app.UsageError('give --workdir or --checkpoint (or --config for a randomly initialised model)')
  from dualunet_jax import methods
  from dualunet_jax.inference import engine, slide
  tta_views = int(FLAGS.tta_views) if FLAGS.tta else 1
  try:
    specs = engine.expand_inputs(FLAGS.input, FLAGS.mpp)
  except ValueError as e:
    _fail(e)
  from dualunet_jax.checkpointing import CheckpointError
  try:
    predictor, config, identity = _predictor(checkpoints, tta_views)
    class_names = tuple(config.dataset.class_names)
    if len(class_names) != config.dataset.num_classes:
      class_names = tuple(f'class_{i}' for i in range(1, config.dataset.num_classes + 1))
    batch_size = FLAGS.batch_size * getattr(predictor, 'num_devices', 1)  # every local device gets tiles
    normalizer = _normalizer(checkpoints)
    options = engine.Options(
        model_mpp=float(config.dataset.mpp), class_names=class_names, tile_size=FLAGS.tile_size,
        overlap=FLAGS.overlap, batch_size=batch_size, formats=tuple(FLAGS.formats), tissue=FLAGS.tissue,
        workers=FLAGS.workers, postprocess=methods.get(config).postprocess_kwargs(config),
        postprocess_fn=methods.get(config).postprocess_fn, stain_norm=normalizer, predictor_id=identity,
        keep_work=FLAGS.keep_work, progress=FLAGS.progress)
  except (ValueError, CheckpointError, OSError) as e:  # bad flags / paths / checkpoints / statistics
    _fail(e)
  try:
    summaries = engine.predict(specs, predictor, FLAGS.output, options)
  except slide.InputError as e:
    _fail(e)
  for s in summaries:
    counts = ', '.join(f'{k} {v}' for k, v in s['counts'].items())
    print(f'{s["name"]}: {s["nuclei"]} nuclei ({counts}) from {s["tiles"]} tiles in {s["seconds"]:.1f} s')
  print(f'outputs in {FLAGS.output}')


def run():
  app.run(main)


if __name__ == '__main__':
  run()
