"""Checkpointer on a 4-device CPU mesh: a replicated training state saves without compiling anything and
restores exactly."""

import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import child_env
from configs import demo
from dualunet_jax import checkpointing, models, trainer


def _replicated_state():
  config = demo.get_config()
  config.model.width_multiplier = 0.125
  config.model.encoder_blocks = (1, 1, 1, 1)
  model = models.fill_random(models.abstract_model(config.model, 3), seed=1)
  optimizer = trainer.make_optimizer(model, config, steps_per_epoch=2)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  graphdef, state = nnx.split((model, optimizer))
  return graphdef, jax.device_put(state, replicated), config


def test_replicated_state_saves_without_compiling_and_restores_exactly(tmp_path):
  assert len(jax.devices()) == 4  # tests/conftest.py
  graphdef, state, config = _replicated_state()
  model, optimizer = nnx.merge(graphdef, state)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.append(event) if event == '/jax/core/compile/backend_compile_duration'
      else None)
  saver = checkpointing.Checkpointer(tmp_path / 'w')
  saver.save(3, model, optimizer, {'step': 3})
  saver.wait()
  # Orbax's replica-parallel default cut every replicated array into per-device slices, one eager (compiled)
  # op each: seconds per save on a CPU mesh.
  assert compiles == []
  fresh_graphdef, fresh_state, _ = _replicated_state()
  fresh_model, fresh_optimizer = nnx.merge(fresh_graphdef, jax.tree.map(np.zeros_like, fresh_state))
  meta = saver.restore(fresh_model, fresh_optimizer)
  saver.close()
  assert meta['step'] == 3
  for name, a, b in (('model', model, fresh_model), ('optimizer', optimizer, fresh_optimizer)):
    saved, restored = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f'{name}{jax.tree_util.keystr(path)}')


_RESUME_THEN_SAVE = """
import sys
import jax
from flax import nnx
from dualunet_jax import checkpointing
sys.path.insert(0, 'tests')
from test_checkpointing import _replicated_state
graphdef, state, _ = _replicated_state()
model, optimizer = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0, state))
saver = checkpointing.Checkpointer(sys.argv[1])
meta = saver.restore(model, optimizer)
saver.save(meta['step'] + 1, model, optimizer, {'step': meta['step'] + 1})
saver.wait()
saver.close()
"""


def test_a_resumed_process_saves_again(tmp_path):
  # A resume restores before its first save. In a fresh process that order once made every later save fail
  # (the CPU save handler lacked the ArrayMetadata store the restore-time Orbax handler expects): a HoVer-Net
  # run died at its first checkpoint after resuming. Only a fresh process has that order, hence the child.
  graphdef, state, _ = _replicated_state()
  model, optimizer = nnx.merge(graphdef, state)
  saver = checkpointing.Checkpointer(tmp_path / 'w')
  saver.save(3, model, optimizer, {'step': 3})
  saver.wait()
  saver.close()
  env = dict(child_env.child_env(), XLA_FLAGS=child_env.TEST_XLA_FLAGS)  # the 4-device mesh of this file
  done = subprocess.run([sys.executable, '-c', _RESUME_THEN_SAVE, str(tmp_path / 'w')], cwd=child_env.REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, [line for line in done.stderr.splitlines() if 'Error' in line][:3]
  assert sorted(p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()) == ['3', '4']
  assert checkpointing.Checkpointer(tmp_path / 'w').latest_step() == 4
