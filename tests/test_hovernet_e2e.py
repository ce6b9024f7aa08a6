"""HoVer-Net through the shared stack: training loop, eval CLI, prediction engine, Segmenter, TTA, oracle."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dualunet_jax
from configs import hovernet_consep
from dualunet_jax import checkpointing, compare, inference, methods, models, oracle, trainer
from dualunet_jax.data import consep, synthetic
from dualunet_jax.methods import base
from child_env import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir: pathlib.Path):
  """Fast-mode HoVer-Net at width 1/8, one residual unit per stage, on 128² synthetic tiles (104² crops in,
  12² out)."""
  config = hovernet_consep.tiny(hovernet_consep.get_config('fast'))
  config.model.encoder_blocks = (1, 1, 1, 1)  # a shallow encoder compiles faster; same geometry and code paths
  config.dataset.name = 'synthetic'
  config.dataset.data_dir = str(data_dir)
  config.dataset.num_classes = 3
  config.dataset.class_names = ('lymphocyte', 'epithelial', 'spindle')
  config.dataset.mpp = 0.5
  config.dataset.synthetic_train_size = 4
  config.dataset.synthetic_test_size = 2
  config.dataset.synthetic_tile_size = 128
  config.dataset.val_split = 'test'
  config.train.batch_size = 4  # one tile per simulated device (tests/conftest.py)
  config.train.base_batch_size = 4
  config.train.steps_per_epoch = 2
  config.train.epochs = 1
  config.train.eval_every_epochs = 1
  config.train.log_every_steps = 1
  config.eval.max_val_images = 2
  config.eval.num_overlays = 1
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  workdir = tmp_path_factory.mktemp('run') / 'w'
  config = tiny_config(data_dir)
  val = trainer.train_and_evaluate(config, workdir)
  return workdir, config, val, data_dir


def test_training_loop_and_checkpoint(trained):
  workdir, _, val, _ = trained
  saved = checkpointing.load_config(workdir)
  assert methods.method_name(saved) == 'hovernet' and 0.0 <= val['f1_d'] <= 1.0
  model, config = checkpointing.restore_for_inference(workdir, 'last')
  assert type(model).__name__ == 'HoVerNet' and base.margin_of(model) == 46
  assert (workdir / 'stain_stats.json').is_file()


def test_eval_cli_on_a_hovernet_workdir(trained):
  workdir, _, _, data_dir = trained
  env = child_env()
  cmd = [sys.executable, '-m', 'dualunet_jax.eval', '--config=configs/hovernet_consep.py:fast',
         f'--workdir={workdir}', '--checkpoint=last', '--config.dataset.name=synthetic',
         f'--config.dataset.data_dir={data_dir}', '--config.dataset.synthetic_train_size=4',
         '--config.dataset.synthetic_test_size=2', '--config.dataset.synthetic_tile_size=128',
         '--config.postprocess.workers=1', '--config.eval.batch_size=1', '--config.eval.num_overlays=1']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  written = json.loads((workdir / 'eval' / 'test.json').read_text())
  assert written['config']['method'] == 'hovernet' and written['n_images'] == 2
  assert {'f1_d', 'dice', 'bpq', 'aji'} <= set(written)
  header, rows = compare.table([compare.load_run(str(workdir))])  # the side-by-side table reads it as written
  assert rows[0][header.index('F1d')] == f"{written['f1_d']:.3f}" and rows[0][header.index('method')] == 'hovernet'
  assert rows[0][header.index('F1c spindle')] == f"{written['f1_c_spindle']:.3f}"


def test_engine_and_segmenter_feed_context_to_valid_convolutions(trained, tmp_path):
  workdir, _, _, _ = trained
  image = synthetic.render_tile(7, size=200, num_classes=3, split='test')['image'][:150, :190]
  Image.fromarray(image).save(tmp_path / 'tile.png')
  predictor, config, identity = inference.checkpoint_predictor([str(workdir)], which='last')
  assert predictor.margin == 46
  method = methods.get(config)
  options = inference.Options(model_mpp=0.5, class_names=tuple(config.dataset.class_names), tile_size=96,
                              overlap=32, batch_size=2, workers=1, progress=False, formats=('maps', 'csv'),
                              postprocess=method.postprocess_kwargs(config), postprocess_fn=method.postprocess_fn,
                              predictor_id=identity)
  inference.predict([inference.InputSpec(tmp_path / 'tile.png', mpp=0.5)], predictor, tmp_path / 'out', options)
  engine_map = np.load(tmp_path / 'out' / 'tile_instances.npy')
  assert engine_map.shape == image.shape[:2]
  seg = dualunet_jax.Segmenter.from_workdir(workdir, which='last', tile_size=96, overlap=32)
  result = seg(image)
  np.testing.assert_array_equal(result.instance_map, engine_map)


def test_tta_undoes_rotations_and_flips_of_hv_maps():
  """With all 8 views, the averaged maps of a rotated / flipped image are the rotated / flipped maps of the
  image, the HV vectors turned with them (random weights: equivariance does not need a trained model)."""
  config = hovernet_consep.tiny(hovernet_consep.get_config('fast'))
  config.model.encoder_blocks = (1, 1, 1, 1)  # a shallow encoder compiles faster; same geometry and code paths
  config.dataset.num_classes = 3
  method = methods.get(config)
  model = models.fill_random(method.abstract_model(config, 3))
  model.eval()
  predictor = inference.model_predictor([model], method=method, tta_views=8, probs_dtype='float32')
  # 36 + 2 * 46 = 128: a side the fast model takes without padding, so the views see the same pixels.
  image = np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
  maps = {k: np.asarray(v) for k, v in predictor(image).items()}
  for k, flip in ((1, False), (0, True), (3, True)):
    view = np.rot90(image, k, axes=(1, 2))
    view = np.ascontiguousarray(view[:, :, ::-1] if flip else view)
    seen = predictor(view)
    for name, kind in method.map_kinds.items():
      back = np.asarray(base.undo_view(jnp.asarray(seen[name], jnp.float32), kind, k, flip))
      np.testing.assert_allclose(back, maps[name], atol=2e-4, err_msg=f'{name} k={k} flip={flip}')


def test_oracle_through_the_shared_oracle(fixtures_dir):
  # The fixtures' 125 nuclei: HoVer-Net's ideal maps lose the ones its official post-processing drops (under
  # 10 px, or cut by the patch border), measured F1d 0.918, precision 1.0, bPQ 0.911.
  records = [consep.read_tile(fixtures_dir / 'imgs' / f'{mat.stem}.png', mat)
             for mat in sorted((fixtures_dir / 'masks').glob('*.mat'))]
  config = hovernet_consep.get_config()
  results = oracle.run_oracle(records, num_classes=4, postprocess_config=config.postprocess, workers=1,
                              method='hovernet')
  assert results['n_gt'] == 125 and results['precision_d'] > 0.99
  assert results['f1_d'] > 0.9 and results['bpq'] > 0.85
