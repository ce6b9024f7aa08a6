"""The two-stage enhancement through the shared stack: a refinement run of the one training loop on a frozen
stage-1 DualU-Net workdir, validation scoring refined and stage-1 maps (instance and pixel metrics), and the
self-contained workdir predicting through the Segmenter."""

import jax
import numpy as np
from flax import nnx
from PIL import Image

from configs import demo, refine_consep
from dualunet_jax import checkpointing, methods, models, refinement, trainer
from dualunet_jax.data import synthetic


def test_stage2_run_trains_only_the_refinement_and_scores_both(tmp_path):
  # Stage 1: a tiny DualU-Net workdir (random weights: the plumbing does not need a trained model).
  stage1 = demo.get_config()
  stage1.dataset.data_dir = str(tmp_path / 'tfds')
  stage1.dataset.synthetic_train_size = 4
  stage1.dataset.synthetic_test_size = 4
  stage1.dataset.synthetic_tile_size = 64
  stage1.dataset.crop_size = 0
  stage1.model.width_multiplier = 0.125
  stage1.model.encoder_blocks = (1, 1, 1, 1)
  stage1_model = models.fill_random(models.abstract_model(stage1.model, 3))
  checkpointing.save_model_checkpoint(tmp_path / 's1', stage1, stage1_model)

  config = refine_consep.get_config()
  config.refine.init_workdir = str(tmp_path / 's1')
  config.train.batch_size = 4
  config.train.base_batch_size = 4
  config.train.steps_per_epoch = 2
  config.train.epochs = 1
  config.eval.batch_size = 4
  config.eval.num_overlays = 0
  config.postprocess.workers = 1
  val = trainer.train_and_evaluate(config, tmp_path / 's2')

  saved = checkpointing.load_config(tmp_path / 's2')
  assert saved.method == 'dualunet' and saved.dataset.name == 'synthetic'  # the stage-1 run's sections
  assert isinstance(methods.get(saved), refinement.RefinedMethod)
  for key in ('f1_d', 'bpq', 'pixel_dice', 'pixel_iou', 'stage1_f1_d', 'stage1_pixel_dice', 'loss'):
    assert key in val, key
  # The stage-1 half of the refinement checkpoint is the stage-1 workdir's, bit for bit.
  model, _ = refinement.restore_for_inference(tmp_path / 's2', 'last')
  want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(stage1_model)))
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.stage1)))
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, got))

  # Self-contained: with the stage-1 workdir gone the run still predicts, refined.
  import shutil
  import dualunet_jax
  shutil.rmtree(tmp_path / 's1')
  seg = dualunet_jax.Segmenter.from_workdir(tmp_path / 's2', which='last', tile_size=64, overlap=16)
  result = seg(synthetic.render_tile(3, size=96, num_classes=3)['image'])
  assert result.instance_map.shape == (96, 96)

  # predict on the refinement workdir: refined by default, the stage-1 model alone with refine=False
  # (`predict --norefine`); in-process, as the CLI calls it, to keep the test cheap.
  from dualunet_jax.inference import engine
  Image.fromarray(synthetic.render_tile(5, size=96, num_classes=3)['image']).save(tmp_path / 'tile.png')
  instances = {}
  for refine in (True, False):
    predictor, cfg, identity = engine.checkpoint_predictor([tmp_path / 's2'], which='last', refine=refine)
    assert isinstance(methods.get(cfg), refinement.RefinedMethod) == refine
    options = engine.Options(model_mpp=0.5, class_names=tuple(cfg.dataset.class_names), tile_size=64, overlap=16,
                             formats=('geojson', 'csv', 'maps'), workers=1, predictor_id=identity, progress=False,
                             postprocess=methods.get(cfg).postprocess_kwargs(cfg))
    out_dir = tmp_path / f'pred_{refine}'
    engine.predict([tmp_path / 'tile.png'], predictor, out_dir, options)
    assert (out_dir / 'tile.geojson').is_file() and (out_dir / 'tile.csv').is_file()
    instances[refine] = np.load(out_dir / 'tile_instances.npy')
  # The refined foreground replaces stage 1's in the watershed mask: the two predictions differ.
  assert instances[True].shape == instances[False].shape == (96, 96)
  assert (instances[True] > 0).any() or (instances[False] > 0).any()
  assert not np.array_equal(instances[True] > 0, instances[False] > 0)
