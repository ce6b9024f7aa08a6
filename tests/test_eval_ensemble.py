"""Cross-encoder ensembles in one evaluation (`eval --ensemble`), and CoNIC-format prediction output.

The two workdirs hold width-1/8 DualU-Nets with different encoders (ResNeXt, ConvNeXt) and random weights
filled from numpy (as tests/test_predict.py's `tiny_checkpoint`): training them even one step costs minutes of
compilation on a small CPU, and averaging, post-processing once and naming members do not depend on the
weights."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dualunet_jax import checkpointing, evaluation, models
from dualunet_jax.data import sources
from child_env import child_env
from test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_FLAGS = ('--config.dataset.synthetic_train_size=8', '--config.dataset.synthetic_test_size=4',
              '--config.dataset.synthetic_tile_size=64', '--config.postprocess.workers=1',
              '--config.eval.num_overlays=0')


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('ensemble')
  out = {}
  for encoder in ('resnext50_32x4d', 'convnext_tiny'):
    config = tiny_config(root / 'tfds')
    config.model.encoder = encoder
    model = models.fill_random(models.abstract_model(config.model, config.dataset.num_classes),
                               seed=len(out))
    out[encoder] = checkpointing.save_model_checkpoint(root / encoder, config, model, step=len(out) + 1)
  return root, out


def _evaluate(workdir_list, root):
  config = tiny_config(root / 'tfds')
  restored = [checkpointing.restore_for_inference(w, 'last')[0] for w in workdir_list]
  model = restored[0] if len(restored) == 1 else restored
  return evaluation.evaluate(model, sources.load_source(config.dataset, 'test'), config)


def test_two_copies_of_one_workdir_score_as_the_workdir(workdirs):
  root, dirs = workdirs
  single = _evaluate([dirs['resnext50_32x4d']], root)
  double = _evaluate([dirs['resnext50_32x4d']] * 2, root)
  assert single['n_pred'] > 0  # random weights still give nuclei to score
  assert double == pytest.approx(single, abs=0, nan_ok=True)


def _cli(*args, timeout=600):
  env = child_env()
  return subprocess.run([sys.executable, '-m', 'dualunet_jax.eval', '--config=configs/demo.py', *args, *DATA_FLAGS],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_ensemble_of_two_encoders_names_both_and_writes_conic_format(workdirs, tmp_path):
  root, dirs = workdirs
  first, second = dirs['resnext50_32x4d'], dirs['convnext_tiny']
  out = _cli(f'--workdir={first}', f'--ensemble={second}', '--checkpoint=last',
             f'--config.dataset.data_dir={root / "tfds"}', f'--output={tmp_path}', f'--conic_output={tmp_path / "c"}')
  assert out.returncode == 0, out.stderr[-3000:]
  written = json.loads((tmp_path / 'test_ensemble.json').read_text())
  assert [(m['encoder'], m['checkpoint_step']) for m in written['members']] == [('resnext50_32x4d', 1),
                                                                                ('convnext_tiny', 2)]
  assert [m['workdir'] for m in written['members']] == [str(first), str(second)]
  assert written['n_images'] == 4 and 0.0 <= written['f1_d'] <= 1.0
  labels = np.load(tmp_path / 'c' / 'pred_labels.npy')
  assert labels.shape == (4, 64, 64, 2) and labels.dtype == np.int32
  # The class channel is each instance's class, and the counts are whole-image ones off CoNIC.
  from dualunet_jax import conic
  counts = conic.read_counts(tmp_path / 'c' / 'pred_counts.csv', ('lymphocyte', 'epithelial', 'spindle'))
  np.testing.assert_array_equal(counts, conic.counts_in_centre(labels, 3, crop=0))
  assert counts.sum() == written['n_pred'] == sum(sum(p['pred_counts']) for p in written['per_image'])


def test_cli_refuses_workdirs_with_other_maps_in_one_line(workdirs, tmp_path):
  root, dirs = workdirs
  first = dirs['resnext50_32x4d']
  other = tmp_path / 'hovernet_w'  # only its config.json is read before the refusal
  saved = checkpointing.load_config(first)
  saved.method = 'hovernet'
  checkpointing.save_config(other, saved)
  out = _cli(f'--workdir={first}', f'--ensemble={other}', f'--config.dataset.data_dir={root / "tfds"}',
             timeout=120)
  assert out.returncode == 2
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and str(other) in err[0] and str(first) in err[0] and "'hv'" in err[0], out.stderr
