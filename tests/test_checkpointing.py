"""Checkpointer on a 4-device CPU mesh: a replicated training state saves without compiling anything and
restores exactly."""

import jax
import numpy as np
from flax import nnx

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
