"""Two-phase training (`config.train.freeze_encoder_epochs`): encoder frozen, then all; resume across the switch."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo, unet_consep
from dualunet_jax import checkpointing, metric_writers, trainer
from dualunet_jax.data import pipeline, sources


def _config(data_dir: pathlib.Path):
  """Tiny DualU-Net on 64² synthetic tiles: 2 epochs of 2 steps, the first epoch with the encoder frozen."""
  config = demo.get_config()
  config.dataset.data_dir = str(data_dir)
  config.model.width_multiplier = 0.125
  config.model.encoder_blocks = (1, 1, 1, 1)  # compiles faster; the encoder is still the `encoder` subtree
  config.dataset.synthetic_train_size = 8
  config.dataset.synthetic_test_size = 4
  config.dataset.synthetic_tile_size = 64
  config.dataset.crop_size = 0
  config.dataset.val_split = ''  # no validation: these tests are about the parameters
  config.train.batch_size = 4
  config.train.steps_per_epoch = 2
  config.train.epochs = 2
  config.train.freeze_encoder_epochs = 1
  config.train.lr_milestones = (1,)  # x0.1 after one epoch *of each phase*: never reached here
  config.train.checkpoint_every_epochs = 0  # checkpoints only where a run stops (saves are slow on a busy CPU)
  config.train.log_every_steps = 1
  return config


def _split(state: dict) -> tuple[dict, dict]:
  """(encoder subtree, everything else) of a pure state dict."""
  return state['encoder'], {k: v for k, v in state.items() if k != 'encoder'}


def _changed(a, b) -> list[bool]:
  """Per leaf: does any element differ?"""
  return [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def _checkpoint(workdir: pathlib.Path, step: int, kind=nnx.Param) -> dict:
  model, _ = checkpointing.restore_for_inference(workdir, step)
  return nnx.to_pure_dict(nnx.state(model, kind))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def initial(data_dir):
  """The step-0 model of `_config` (what a fresh run starts from)."""
  model, _ = trainer.create_train_state(_config(data_dir), 3, steps_per_epoch=2, phase=1)
  return model


def _two_batch_config(data_dir: pathlib.Path):
  """`_config` with epochs of one pass over the 8 training tiles and phase 1 at its own global batch of 8
  (HoVer-Net's official schedule changes the batch at the switch): phase 1 = 1 step, phase 2 = 2 steps of 4."""
  config = _config(data_dir)
  config.train.steps_per_epoch = 0
  config.train.phase1_batch_size = 8
  return config


def test_phases_freeze_then_train_all_and_resume_across_the_switch(tmp_path, data_dir, initial):
  reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
  trainer.train_and_evaluate(_two_batch_config(data_dir), reference)
  # The same run interrupted exactly at the switch (step 1: the checkpoint holds phase 2's fresh optimizer),
  # then resumed.
  for stop in (1, None):
    trainer.train_and_evaluate(_two_batch_config(data_dir), resumed, max_steps=stop)
  assert sorted(int(p.name) for p in (resumed / 'checkpoints').iterdir()) == [1, 3]

  # Phase 1 (step 1): encoder parameters bit-identical, every decoder/head leaf moved; the encoder's
  # BatchNorm statistics move (frozen_encoder_bn='update', the official HoVer-Net behaviour).
  start = nnx.to_pure_dict(nnx.state(initial, nnx.Param))
  (enc0, dec0), (enc1, dec1) = _split(start), _split(_checkpoint(resumed, 1))
  assert not any(_changed(enc0, enc1))
  assert all(_changed(dec0, dec1))
  stats0 = _split(nnx.to_pure_dict(nnx.state(initial, nnx.BatchStat)))[0]
  assert all(_changed(stats0, _split(_checkpoint(resumed, 1, nnx.BatchStat))[0]))
  # Phase 2 (steps 2-3): every parameter moves.
  enc2, dec2 = _split(_checkpoint(reference, 3))
  assert all(_changed(enc1, enc2)) and all(_changed(dec1, dec2))

  # The resumed run ends where the uninterrupted one does.
  for kind in (nnx.Param, nnx.BatchStat):
    final, expected = _checkpoint(resumed, 3, kind), _checkpoint(reference, 3, kind)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected))) < 1e-6
  train = [r for r in metric_writers.read_metrics(reference) if r['split'] == 'train']
  again = [r for r in metric_writers.read_metrics(resumed) if r['split'] == 'train']
  assert [r['step'] for r in again] == [1, 2, 3]
  np.testing.assert_allclose([r['total'] for r in again], [r['total'] for r in train], rtol=1e-5)
  assert [r['phase'] for r in train] == [r['phase'] for r in again] == [1, 2, 2]
  # Each phase has its own global batch (and so its own steps per epoch) at the run's learning rate (the
  # papers keep Adam's rate across the batch change), and restarts the schedule: its first epoch is at the
  # full rate (one global schedule would have applied the epoch-1 milestone to phase 2).
  assert [r['batch_size'] for r in train] == [r['batch_size'] for r in again] == [8, 4, 4]
  assert [r['epoch'] for r in train] == pytest.approx([1.0, 1.5, 2.0])
  assert [r['learning_rate'] for r in train] == pytest.approx([2e-3 * 4 / 8] * 3)


def test_keep_mode_leaves_the_encoder_batchnorm_alone(data_dir, initial):
  """frozen_encoder_bn='keep': the encoder runs in inference mode in phase 1, its running statistics stay."""
  config = _config(data_dir)
  config.train.frozen_encoder_bn = 'keep'
  model, optimizer = trainer.create_train_state(config, 3, steps_per_epoch=2, phase=1)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(functools.partial(trainer.train_step, graphdef, class_weights=jnp.full((4,), 0.25),
                                   config=config, phase=1))
  source = sources.load_source(config.dataset, 'train')
  state, _ = step(state, next(pipeline.train_loader(config, source)), jax.random.key(0))
  model, _ = nnx.merge(graphdef, jax.device_get(state))
  stats = lambda m: _split(nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))
  (enc0, dec0), (enc1, dec1) = stats(initial), stats(model)
  assert not any(_changed(enc0, enc1)) and all(_changed(dec0, dec1))
  params = lambda m: _split(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  assert not any(_changed(params(initial)[0], params(model)[0]))


def test_bad_settings_are_refused(data_dir):
  config = _config(data_dir)
  config.train.frozen_encoder_bn = 'frozen'
  with pytest.raises(ValueError, match='frozen_encoder_bn'):
    trainer.freeze_steps(config, 2)
  config = unet_consep.get_config()  # U-Net trains from scratch: no encoder to freeze
  config.dataset.num_classes = 1
  config.model.width_multiplier = 0.125
  config.train.freeze_encoder_epochs = 2
  with pytest.raises(ValueError, match='no encoder'):  # shapes only: nothing is initialised
    nnx.eval_shape(lambda: trainer.create_train_state(config, 1, steps_per_epoch=1, phase=1))


def test_official_batch_change_keeps_images_per_epoch_and_the_learning_rate():
  """HoVer-Net (16, then 4) and HistoNeXt (64, then 16): an epoch is the same number of crops in both phases,
  Adam's rate is the same in both (as the papers), and the run is 50 + 50 epochs long."""
  from configs import histonext_consep, hovernet_consep
  from dualunet_jax import optim
  for config, per_epoch in ((hovernet_consep.get_config('fast'), {1: 27, 2: 108}),
                            (histonext_consep.get_config(), {1: 7, 2: 27})):
    schedule = trainer.Schedule(config, source=())  # explicit steps per epoch: the source is not read
    assert schedule.steps_per_epoch == per_epoch
    assert schedule.frozen_steps == 50 * per_epoch[1]
    assert schedule.total_steps == 50 * per_epoch[1] + 50 * per_epoch[2]
    assert schedule.epoch(schedule.frozen_steps) == (50, True)
    assert schedule.epoch(schedule.frozen_steps + per_epoch[2]) == (51, True)
    assert schedule.epoch(schedule.frozen_steps + 1) == (50, False)
    phase1 = trainer.phase_config(config, 1)
    assert phase1.train.batch_size == config.train.phase1_batch_size and phase1 is not config
    assert optim.learning_rate(phase1.train) == pytest.approx(optim.learning_rate(config.train)) == \
        pytest.approx(1e-4)
    assert trainer.phase_config(config, 2) is config
