"""Training and evaluation end to end on tiny synthetic data: smoke training, resume, devices, eval outputs."""

import copy
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from dualunet_jax import checkpointing, evaluation, metric_writers, models, trainer
from dualunet_jax.data import pipeline, sources

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 6  # 3 epochs of 2 steps


def tiny_config(data_dir: pathlib.Path):
  config = demo.get_config()
  config.dataset.data_dir = str(data_dir)
  config.model.width_multiplier = 0.125  # tests stay tiny whatever the demo uses
  config.model.encoder_blocks = (1, 1, 1, 1)  # a shallow encoder compiles faster; same code paths
  config.dataset.synthetic_train_size = 8
  config.dataset.synthetic_test_size = 4
  config.dataset.synthetic_tile_size = 64
  config.dataset.crop_size = 0  # whole 64² tiles
  config.train.batch_size = 4
  config.train.steps_per_epoch = 2
  config.train.epochs = 3
  config.train.lr_milestones = (2,)
  config.train.eval_every_epochs = 0  # validate after epoch 1 and the last epoch only
  config.train.checkpoint_every_epochs = 1
  config.train.log_every_steps = 1
  config.eval.batch_size = 4
  config.eval.max_val_images = 4
  config.eval.num_overlays = 2
  config.postprocess.workers = 1
  return config


def _params(workdir: pathlib.Path, which='last') -> dict:
  model, _ = checkpointing.restore_for_inference(workdir, which)
  return nnx.to_pure_dict(nnx.state(model))


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_close_per_leaf(a, b, *, rtol: float, atol: float) -> None:
  """|a - b| <= atol + rtol * max|b| for every leaf, naming the first leaf that is not."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    err, scale = float(np.max(np.abs(x - y))), float(np.max(np.abs(y)))
    assert err <= atol + rtol * scale, f'{jax.tree_util.keystr(path)}: max |diff| {err:.3g}, max |value| {scale:.3g}'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """An uninterrupted 6-step run on the default (4-device) mesh."""
  workdir = tmp_path_factory.mktemp('run') / 'w'
  config = tiny_config(data_dir)
  val = trainer.train_and_evaluate(config, workdir)
  return workdir, config, val


def test_training_writes_everything_and_loss_decreases(trained):
  workdir, _, val = trained
  records = metric_writers.read_metrics(workdir)
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(1, TOTAL_STEPS + 1))
  assert np.mean([r['total'] for r in train[-2:]]) < train[0]['total']
  assert all(np.isfinite(r['grad_norm']) for r in train)
  assert train[0]['learning_rate'] == pytest.approx(2e-3 * 4 / 8)  # linear batch scaling
  assert train[-1]['learning_rate'] == pytest.approx(2e-4 * 4 / 8)  # x0.1 after the epoch-2 milestone
  vals = [r for r in records if r['split'] == 'val']
  assert [r['step'] for r in vals] == [2, TOTAL_STEPS]  # after epoch 1 and after the last epoch
  assert 0.0 <= val['f1_d'] <= 1.0 and 'bpq' in val
  assert (workdir / 'config.json').is_file() and (workdir / trainer.CLASS_WEIGHTS_FILE).is_file()
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [2, 4, 6]
  assert len([p for p in (workdir / 'best').iterdir() if p.name.isdigit()]) == 1
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  weights = json.loads((workdir / trainer.CLASS_WEIGHTS_FILE).read_text())['weights']
  assert len(weights) == 4 and sum(weights) == pytest.approx(1.0, abs=1e-5)
  # The training split's colour statistics, for --stain_norm at inference.
  from dualunet_jax.data import stain
  stats = stain.load_statistics(workdir)
  assert stats['num_images'] == 8 and len(stats['reinhard']['mean']) == 3
  assert np.asarray(stats['macenko']['stain_matrix']).shape == (2, 3)


def test_resume_equals_uninterrupted(trained, tmp_path, data_dir):
  reference_dir, _, _ = trained
  # Preempted (SIGTERM) after step 3, mid-epoch and between periodic checkpoints, then the same command
  # again: it must continue with the same data order, optimizer state and learning-rate schedule, ending
  # with the same parameters.
  workdir = tmp_path / 'resumed'
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(trainer.Preempted, match='step 3 of 6'):
    trainer.train_and_evaluate(tiny_config(data_dir), workdir,
                               on_step=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the caller's again
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [2, 3]
  trainer.train_and_evaluate(tiny_config(data_dir), workdir)
  assert _max_abs_diff(_params(workdir), _params(reference_dir)) < 1e-6
  resumed = [r for r in metric_writers.read_metrics(workdir) if r['split'] == 'train']
  reference = [r for r in metric_writers.read_metrics(reference_dir) if r['split'] == 'train']
  assert [r['step'] for r in resumed] == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([r['total'] for r in resumed], [r['total'] for r in reference], rtol=1e-5)


def test_sigterm_that_kills_the_data_workers_first_still_saves(tmp_path, data_dir, monkeypatch):
  # A scheduler signals the whole job: the loader's workers may die (and `next` fail) before the step's
  # check sees the signal. The finished step is kept all the same; without a signal, the failure is an error.
  real_loader = pipeline.train_loader

  class DyingLoader:
    def __init__(self, *args, signal_first=True, **kwargs):
      self.inner, self.calls, self.signal_first = real_loader(*args, **kwargs), 0, signal_first

    def __next__(self):
      self.calls += 1
      if self.calls == 4:  # after step 3, between the periodic checkpoints of steps 2 and 4
        if self.signal_first:
          os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError('Worker process was terminated unexpectedly')
      return next(self.inner)

    def close(self):
      self.inner.close()

  monkeypatch.setattr(pipeline, 'train_loader', DyingLoader)
  with pytest.raises(trainer.Preempted, match=r'step 3 of 6 \(RuntimeError'):
    trainer.train_and_evaluate(tiny_config(data_dir), tmp_path / 'w')
  assert sorted(int(p.name) for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == [2, 3]
  monkeypatch.setattr(pipeline, 'train_loader', functools.partial(DyingLoader, signal_first=False))
  with pytest.raises(RuntimeError, match='Worker process') as failure:
    trainer.train_and_evaluate(tiny_config(data_dir), tmp_path / 'w2')
  assert not isinstance(failure.value, trainer.Preempted)
  assert sorted(int(p.name) for p in (tmp_path / 'w2' / 'checkpoints').iterdir()) == [2]


def test_one_device_step_equals_four_device_step(data_dir):
  """The jitted step on a 4-device mesh (batch sharded, state replicated) computes what 1 device computes:
  same loss, same BatchNorm statistics (taken over the global batch, not per device)."""
  config = tiny_config(data_dir)
  source = sources.load_source(config.dataset, 'train')
  results = {}
  for n in (1, 4):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ('data',))
    model, optimizer = trainer.create_train_state(config, 3, steps_per_epoch=2)
    graphdef, state = nnx.split((model, optimizer))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = jax.jit(functools.partial(trainer.train_step, graphdef, class_weights=jnp.full((4,), 0.25),
                                     config=config))
    batch = next(pipeline.train_loader(config, source, mesh=mesh))
    assert len(batch['image'].sharding.device_set) == n
    new_state, metrics = step(state, batch, jax.random.key(0))
    model, _ = nnx.merge(graphdef, jax.device_get(new_state))
    results[n] = (jax.device_get(metrics), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                  nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  (m1, p1, s1), (m4, p4, s4) = results[1], results[4]
  for key in ('total', 'ce', 'dice', 'mse'):
    assert float(m1[key]) == pytest.approx(float(m4[key]), rel=1e-6), key
  assert float(m1['grad_norm']) == pytest.approx(float(m4['grad_norm']), rel=1e-2)
  # Running statistics come from the forward pass: global-batch BatchNorm makes them equal.
  _assert_close_per_leaf(s1, s4, rtol=1e-4, atol=1e-6)
  # Adam's first update is lr * sign(g): a near-zero gradient whose sign depends on the reduction order moves a
  # weight by +-lr, so parameters agree within 2 lr (lr = 2e-3 * 4 / 8).
  assert _max_abs_diff(p1, p4) <= 2 * 1e-3 + 1e-6


def test_validation_loss_and_early_stopping(trained, tmp_path, data_dir):
  workdir, config, _ = trained
  model, _ = checkpointing.restore_for_inference(workdir, 'last')
  source = sources.load_source(config.dataset, 'test')
  weights = np.full((4,), 0.25, np.float32)
  loss = trainer.validation_loss(model, source, config, weights)
  assert np.isfinite(loss) and loss > 0
  # 3 of the 4 tiles: a partial batch (padded rows cut off) gives a different, still finite mean.
  fewer = copy.deepcopy(config)  # the fixture's config is shared by the module's tests
  fewer.eval.max_val_images = 3
  assert trainer.validation_loss(model, source, fewer, weights) != pytest.approx(loss)
  # A constant metric never improves after the first validation: patience 1 stops at the second one.
  config = tiny_config(data_dir)
  config.train.eval_every_epochs = 1
  config.train.best_metric = 'n_images'
  config.train.best_mode = 'min'
  config.train.early_stopping_patience = 1
  trainer.train_and_evaluate(config, tmp_path / 'w')
  steps = [r['step'] for r in metric_writers.read_metrics(tmp_path / 'w') if r['split'] == 'train']
  assert steps == [1, 2, 3, 4]  # stopped after epoch 2 of 3
  assert sorted(int(p.name) for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == [2, 4]
  trainer.train_and_evaluate(config, tmp_path / 'w')  # the same command again: nothing left to do
  assert len([r for r in metric_writers.read_metrics(tmp_path / 'w') if r['split'] == 'train']) == 4


def test_eval_cli_writes_complete_json_and_overlays(trained, data_dir):
  workdir, _, _ = trained
  cmd = [sys.executable, '-m', 'dualunet_jax.eval', '--config=configs/demo.py', f'--workdir={workdir}',
         '--checkpoint=last', f'--config.dataset.data_dir={data_dir}', '--config.dataset.synthetic_train_size=8',
         '--config.dataset.synthetic_test_size=4', '--config.dataset.synthetic_tile_size=64',
         '--config.postprocess.workers=1', '--config.eval.num_overlays=2']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  def strict(text):  # NaN/Infinity are not JSON: undefined metrics must be written as null
    return json.loads(text, parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}'))

  headline = strict(out.stdout.strip().splitlines()[-1])
  written = strict((workdir / 'eval' / 'test.json').read_text())
  for key in ('f1_d', 'precision_d', 'recall_d', 'f1_c_mean', 'dice', 'pixel_accuracy', 'aji', 'bpq', 'bdq',
              'bsq', 'mpq', 'mpq_pooled', 'mpq_plus', 'r2', 'f1_c_lymphocyte', 'f1_c_epithelial', 'f1_c_spindle'):
    assert key in written, key
    assert headline[key] == written[key]  # same float, same JSON round trip
  assert written['checkpoint_step'] == TOTAL_STEPS and written['n_images'] == 4
  assert len(written['per_image']) == 4
  assert len(list((workdir / 'eval' / 'test_overlays').glob('*.png'))) == 2
  assert 'mean class F1' in out.stdout and 'lymphocyte' in out.stdout


def test_robustness_protocol_runs(trained):
  from dualunet_jax import robustness
  workdir, config, _ = trained
  model, _ = checkpointing.restore_for_inference(workdir, 'last')
  source = sources.load_source(config.dataset, 'test')
  summary = robustness.evaluate_stress(model, source, config, levels='paper')
  assert tuple(summary['levels']) == robustness.PAPER_LEVELS
  for key in robustness.PAPER_KEYS:
    values = [summary['levels'][name][key] for name in robustness.PAPER_LEVELS]
    assert summary['paper'][f'{key}_mean'] == pytest.approx(np.mean(values))
    assert summary['paper'][f'{key}_std'] == pytest.approx(np.std(values))
  # Different random views of the same images: the runs are not all identical.
  assert len({round(summary['levels'][name]['dice'], 6) for name in robustness.PAPER_LEVELS}) > 1


def test_restore_errors_are_clear(tmp_path, trained):
  with pytest.raises(checkpointing.CheckpointError, match='config.json'):
    checkpointing.restore_for_inference(tmp_path)
  workdir, _, _ = trained
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint for step'):
    checkpointing.restore_for_inference(workdir, 999)
  model, config = checkpointing.restore_for_inference(workdir / 'checkpoints' / '4')
  assert isinstance(model, models.DualUNet) and config.dataset.num_classes == 3
