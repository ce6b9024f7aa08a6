"""Orbax checkpoints of a training workdir, and loading a trained model for evaluation or prediction.

Layout of a workdir `W`:

    W/config.json            the resolved config of the run (builds the model again at load time)
    W/checkpoints/<step>/    periodic checkpoints (the last `keep_checkpoints`), for resuming
    W/best/<step>/           the single checkpoint with the best validation metric
    W/class_weights.json     the cached class weights (losses.save_class_weights)

Each checkpoint holds three items: `model` (parameters and BatchNorm statistics, a pure dict),
`optimizer` (Adam moments and step; absent in converted checkpoints) and `meta` (JSON: step, epoch, metrics).
Orbax writes each checkpoint into a temporary folder and renames it when complete, so an interrupted save
never leaves a checkpoint that a resume would pick up.
"""

import functools
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

CONFIG_FILE = 'config.json'
PERIODIC_DIR = 'checkpoints'
BEST_DIR = 'best'


class CheckpointError(RuntimeError):
  """A checkpoint or workdir cannot be read."""


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes `W/config.json` atomically (temporary file, then rename)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f'{path}: no config.json here; is this a dualunet-jax workdir?')
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: not valid JSON ({e})') from e
  return ml_collections.ConfigDict(data)


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding of each leaf: tells Orbax where to place the restored arrays. Leaves without a
  sharding (an abstract model) go to the first local device, so a checkpoint saved on 8 devices restores in
  a 1-device process (Orbax would otherwise insist on the saved topology)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None) or default), tree)


@functools.cache
def _single_replica_saves_on_cpu() -> None:
  """On CPU-only processes, each replicated array is written by one replica.

  Orbax's default on CPU (and TPU; it is already off on GPU) is replica-parallel saving: every replicated
  array is cut into one slice per device, each slice an eager op that XLA compiles per shape. On a CPU mesh
  that is most of the cost of a save: a tiny HoVer-Net's training state on the tests' 4-device mesh (2-core
  CPU, busy) took 15.0 s for the first save and 3.7 s for later ones, 2.4 s and 2.0 s with one replica.
  The written checkpoint is the same.
  """
  if all(d.platform == 'cpu' for d in jax.devices()):
    # The replacement keeps the default handler's ArrayMetadata store: a PyTree handler made before the
    # override (a resume restores before its first save) expects the metadata that store writes, and a save
    # without it failed ("No ArrayMetadata found for process_index=0").
    store = getattr(ocp.type_handlers.get_type_handler(jax.Array), '_array_metadata_store', None)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns on every override of a default handler
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store),
          override=True)
    finally:
      logging.set_verbosity(verbosity)


class Checkpointer:
  """Periodic and best-by-validation checkpoints of one workdir."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, best_mode: str = 'max'):
    workdir = pathlib.Path(workdir).absolute()
    _single_replica_saves_on_cpu()  # before any Orbax handler exists, so restores and saves see one registry
    items = ('model', 'optimizer', 'meta')
    self.periodic = ocp.CheckpointManager(
        workdir / PERIODIC_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=items)
    self.best = ocp.CheckpointManager(
        workdir / BEST_DIR, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True), item_names=items)
    self.best_mode = best_mode

  @staticmethod
  def _args(model: nnx.Module, optimizer: nnx.Optimizer | None, meta: dict) -> ocp.args.Composite:
    _single_replica_saves_on_cpu()  # every save's items are made here
    items = {'model': ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))), 'meta': ocp.args.JsonSave(meta)}
    if optimizer is not None:
      items['optimizer'] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    return ocp.args.Composite(**items)

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict) -> None:
    self.periodic.save(step, args=self._args(model, optimizer, meta), force=True)

  def best_value(self) -> float | None:
    step = self.best.latest_step()
    if step is None:
      return None
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    return meta.get('best_value')

  def maybe_save_best(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict,
                      value: float) -> bool:
    """Saves `W/best` when `value` beats the best so far; returns whether it did."""
    best = self.best_value()
    better = best is None or (value > best if self.best_mode == 'max' else value < best)
    if better:
      self.best.save(step, args=self._args(model, optimizer, dict(meta, best_value=value)), force=True)
    return better

  def latest_step(self) -> int | None:
    return self.periodic.latest_step()

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    """Restores the latest periodic checkpoint into `model` and `optimizer` in place; returns its meta."""
    step = self.periodic.latest_step()
    model_state, opt_state = nnx.state(model), nnx.state(optimizer)
    restored = self.periodic.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_state))),
        optimizer=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt_state))),
        meta=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(model_state, restored['model'])
    nnx.replace_by_pure_dict(opt_state, restored['optimizer'])
    nnx.update(model, model_state)
    nnx.update(optimizer, opt_state)
    return restored['meta']

  def wait(self) -> None:
    self.periodic.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.periodic.close()
    self.best.close()


def save_model_checkpoint(workdir: str | os.PathLike, config: ml_collections.ConfigDict, model: nnx.Module,
                          *, step: int = 0, meta: dict | None = None) -> pathlib.Path:
  """Writes a model-only checkpoint (no optimizer state) as both `last` and `best` of a new workdir, e.g. for
  weights converted from PyTorch. Returns the workdir."""
  workdir = pathlib.Path(workdir).absolute()
  save_config(workdir, config)
  meta = dict(meta or {}, step=step)
  for sub in (PERIODIC_DIR, BEST_DIR):
    with ocp.CheckpointManager(workdir / sub, item_names=('model', 'optimizer', 'meta')) as mgr:
      mgr.save(step, args=Checkpointer._args(model, None, meta), force=True)
      mgr.wait_until_finished()
  return workdir


def _resolve(workdir: pathlib.Path, which: str | int) -> tuple[pathlib.Path, int]:
  """('best' | 'last' | step) -> (manager directory, step)."""
  which = str(which)
  if which == 'best' and not (workdir / BEST_DIR).is_dir():
    which = 'last'  # a run that never validated has no best checkpoint yet
  sub = BEST_DIR if which == 'best' else PERIODIC_DIR
  directory = workdir / sub
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
  if not steps:
    raise CheckpointError(f'{directory}: no checkpoint here (train first, or convert one with dualunet_jax.convert)')
  if which in ('best', 'last'):
    return directory, steps[-1]
  if not which.isdigit() or int(which) not in steps:
    raise CheckpointError(f'{directory}: no checkpoint for step {which!r}; available: {steps}')
  return directory, int(which)


def _restore_into(directory: pathlib.Path, step: int, model: nnx.Module) -> dict:
  state = nnx.state(model)
  with ocp.CheckpointManager(directory, item_names=('model', 'optimizer', 'meta')) as mgr:
    restored = mgr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state))), meta=ocp.args.JsonRestore()))
  nnx.replace_by_pure_dict(state, restored['model'])
  nnx.update(model, state)
  return dict(restored['meta'], step=step)


def restore_model(workdir: str | os.PathLike, model: nnx.Module, which: str | int = 'best') -> dict:
  """Restores parameters and BatchNorm statistics of checkpoint `which` ('best' | 'last' | step) into `model`
  in place (a concrete or an `models.abstract_model`); returns the checkpoint's meta."""
  directory, step = _resolve(pathlib.Path(workdir).absolute(), which)
  return _restore_into(directory, step, model)


def restore_for_inference(path_or_workdir: str | os.PathLike, which: str | int = 'best'
                          ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """Builds the model described by `W/config.json`, loads checkpoint `which` into it and puts it in eval
  mode. `path_or_workdir` is a workdir or one of its checkpoint folders (`W/best/123`, `W/checkpoints/40`),
  in which case `which` is ignored."""
  from dualunet_jax import methods  # here, not at import: keeps this module light for tools

  path = pathlib.Path(path_or_workdir).absolute()
  is_step_folder = path.name.isdigit() and path.parent.name in (PERIODIC_DIR, BEST_DIR)
  workdir = path.parent.parent if is_step_folder else path
  if not workdir.is_dir():
    raise CheckpointError(f'{workdir}: no such workdir')
  config = load_config(workdir)
  # Abstract (shape-only) model: every value comes from the checkpoint, so a random initialisation (one XLA
  # compile per parameter shape, tens of seconds on a small CPU) would be wasted.
  model = methods.get(config).abstract_model(config, config.dataset.num_classes)
  if is_step_folder:
    _restore_into(path.parent, int(path.name), model)
  else:
    restore_model(workdir, model, which)
  model.eval()
  return model, config
