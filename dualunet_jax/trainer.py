"""The one training loop: jitted pure train step over a device mesh, Orbax checkpoints, validation, resume.

    train_and_evaluate(config, workdir)

The method (`config.method`: DualU-Net, HoVer-Net, ...) supplies the model and the loss; everything else here
is shared. Besides checkpoints the workdir receives the class weights and the training split's stain
statistics (`stain_stats.json`, for `--stain_norm` at inference).

Devices: one `Mesh` with a 'data' axis over all devices (all hosts after `jax.distributed.initialize()`).
Batches are global arrays sharded on 'data'; parameters and optimizer state are replicated. BatchNorm
statistics inside the jitted step are computed over the *global* batch (XLA inserts the cross-device
reductions), i.e. synchronised BatchNorm. The reference used per-GPU statistics over 4 images (reference §6);
with a global batch of 8 the two differ only in the noise of the batch statistics.
"""

import functools
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualunet_jax import checkpointing, evaluation, losses, methods, metric_writers, optim
from dualunet_jax.data import augment, pipeline, sources, targets

CLASS_WEIGHTS_FILE = 'class_weights.json'


def make_mesh() -> Mesh:
  """All devices of all processes on one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def create_train_state(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int
                       ) -> tuple[nnx.Module, nnx.Optimizer]:
  method = methods.get(config)
  model = method.build_model(config, num_classes, rngs=nnx.Rngs(config.seed))
  if config.model.get('encoder_init'):
    method.encoder_init(model, config.model.encoder_init)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.train, steps_per_epoch),
                            wrt=method.trainable(config))
  return model, optimizer


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], key: jax.Array, *,
               class_weights: jax.Array, config: ml_collections.ConfigDict
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimisation step; a pure function of (state, batch, key).

  Args:
    graphdef, state: `nnx.split((model, optimizer))`.
    batch: image uint8[B, H, W, 3], class_map int32[B, H, W], instance_map int32[B, H, W] and the method's
      targets (e.g. density float32[B, H, W]) as global arrays.
    key: PRNG key of this step (augmentation).
    class_weights: float32[K+1].
    config: the experiment config (method, augment, loss); read at trace time.
  Returns:
    The new state and scalar metrics (loss parts, gradient norm).
  """
  method = methods.get(config)
  model, optimizer = nnx.merge(graphdef, state)
  model.train()
  vector_keys = tuple(k for k, kind in method.target_kinds.items() if kind == 'hv')
  batch = augment.augment_batch(key, batch, config.augment, vector_keys=vector_keys)

  def loss_fn(model):
    return method.loss(model(batch['image']), batch, class_weights, config)

  diff = nnx.DiffState(0, method.trainable(config))  # a refinement's stage 2: only its own parameters
  (_, parts), grads = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=True)(model)
  optimizer.update(model, grads)
  metrics = dict(parts, grad_norm=optax.tree.norm(grads))
  return nnx.state((model, optimizer)), metrics


def class_weights_for(config: ml_collections.ConfigDict, source: Any, num_classes: int,
                      workdir: pathlib.Path) -> np.ndarray:
  """Inverse pixel-frequency class weights of the training split (background x factor), computed once
  and cached in `W/class_weights.json` (reference §2: computed from the training set, saved, reused)."""
  path = workdir / CLASS_WEIGHTS_FILE
  if path.is_file():
    weights, _ = losses.load_class_weights(path)
    return np.asarray(weights, np.float32)
  from tqdm import tqdm
  counts = np.zeros(num_classes + 1, np.int64)
  for i in tqdm(range(len(source)), desc='class weights', unit='tile', leave=False,
                disable=jax.process_index() != 0):
    record = source[i]
    counts += losses.pixel_class_counts(
        targets.class_map(record['instance_map'], record['instance_classes']), num_classes)
  weights = losses.class_weights_from_counts(counts, config.loss.background_factor)
  if jax.process_index() == 0:
    losses.save_class_weights(path, weights, counts)
  return np.asarray(weights, np.float32)


STAIN_FIT_IMAGES = 64  # training images sampled for the stain statistics (medians of per-image statistics)


def stain_statistics_for(source: Any, workdir: pathlib.Path) -> None:
  """Writes `W/stain_stats.json` once per workdir: the colour statistics of the training split that
  `--stain_norm` maps inference images onto, so users need no reference image (resumed runs keep the file).
  Up to `STAIN_FIT_IMAGES` evenly spaced tiles: the statistics are medians of per-image statistics, stable
  long before the whole split (a few seconds on CoNSeP Train)."""
  from dualunet_jax.data import schema, stain
  if jax.process_index() != 0 or (workdir / stain.STATS_FILE).is_file():
    return
  n = len(source)
  indices = np.unique(np.linspace(0, n - 1, min(n, STAIN_FIT_IMAGES)).round().astype(int)) if n else []
  try:
    stats = stain.fit_statistics(source[int(i)][schema.IMAGE] for i in indices)
  except ValueError as e:  # e.g. no tile with enough tissue: training goes on, --stain_norm will say why
    _say(f'no stain statistics for --stain_norm: {e}')
    return
  stain.save_statistics(workdir, stats)


def validation_loss(model: nnx.Module, source: Any, config: ml_collections.ConfigDict, class_weights: np.ndarray,
                    *, mesh: Mesh | None = None) -> float:
  """The method's training loss in eval mode over the validation split (whole tiles, no augmentation),
  averaged over batches weighted by their tiles: the early-stopping criterion of the HoVer-Net family and
  the two-stage enhancement (`config.train.best_metric = 'loss'`, `best_mode = 'min'`)."""
  method = methods.get(config)
  mesh = mesh or make_mesh()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated, as the batches are sharded on the mesh
  weights = jnp.asarray(class_weights)

  @jax.jit
  def loss_of(state, batch):
    m = nnx.merge(graphdef, state)
    m.eval()
    total, _ = method.loss(m(batch['image']), batch, weights, config)
    return total

  n = len(source) if not config.eval.max_val_images else min(len(source), config.eval.max_val_images)
  total, count = 0.0, 0
  for batch, records in pipeline.eval_batches(config, evaluation.Prefix(source, n),
                                              batch_size=config.eval.batch_size, mesh=mesh):
    k = len(records)  # padded rows (zeros) are cut off: at most one more compile, for the last batch
    rows = {key: value[:k] for key, value in batch.items() if key != 'valid'}
    total += float(loss_of(state, rows)) * k
    count += k
  return total / max(count, 1)


def _say(message: str) -> None:
  """A line for the person at the terminal (process 0 only), kept clear of the progress bar."""
  if jax.process_index() == 0:
    from tqdm import tqdm
    tqdm.write(message)


def _is_eval_epoch(epoch: int, config: ml_collections.ConfigDict) -> bool:
  """The reference validates after epoch 1, every `eval_every_epochs`, and after the last epoch."""
  every = config.train.eval_every_epochs
  return epoch == 1 or (every > 0 and epoch % every == 0) or epoch == config.train.epochs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       *, max_steps: int | None = None, mesh: Mesh | None = None,
                       on_step: Callable[[int], None] | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds checkpoints) and validates; returns the last validation
  metrics. `max_steps` stops early (tests, smoke runs); `mesh` defaults to all devices; `on_step(step)` is
  called after each step."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or make_mesh()
  from dualunet_jax import refinement  # pylint: disable=import-outside-toplevel
  if refinement.is_two_stage(config):  # the stage-1 run's method, data, model and post-processing sections
    config = refinement.resolve_config(config)
  if config.train.batch_size % mesh.size:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')
  num_classes, class_names, mpp = sources.dataset_info(config.dataset)
  with config.unlocked():  # record what the data says, so eval/predict rebuild the same model
    config.dataset.num_classes = num_classes
    config.dataset.class_names = tuple(class_names)
    config.dataset.mpp = float(mpp)
  if jax.process_index() == 0:
    checkpointing.save_config(workdir, config)

  train_source = sources.load_source(config.dataset, config.dataset.train_split)
  val_source = sources.load_source(config.dataset, config.dataset.val_split) if config.dataset.val_split else None
  steps_per_epoch = config.train.steps_per_epoch or pipeline.steps_per_epoch(config, train_source)
  total_steps = config.train.epochs * steps_per_epoch
  class_weights = class_weights_for(config, train_source, num_classes, workdir)
  stain_statistics_for(train_source, workdir)
  _say(f'{config.dataset.name}: {len(train_source)} training tiles, classes {list(class_names)}, '
       f'class weights {np.round(class_weights, 4).tolist()}; '
       f'{steps_per_epoch} steps/epoch, {total_steps} steps')

  model, optimizer = create_train_state(config, num_classes, steps_per_epoch)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    best_mode=config.train.get('best_mode', 'max'))
  patience = int(config.train.get('early_stopping_patience', 0))
  start_step, since_best, stopped = 0, 0, False
  if ckpt.latest_step() is None:
    methods.get(config).initialise(model, config)
  else:
    meta = ckpt.restore(model, optimizer)
    start_step, since_best = int(meta['step']), int(meta.get('since_best', 0))
    stopped = bool(meta.get('early_stopped'))
    _say(f'resumed from {workdir} at step {start_step}' +
         (' (the run stopped early there: nothing left to do)' if stopped else ''))

  replicated = NamedSharding(mesh, P())
  graphdef, state = nnx.split((model, optimizer))
  state = jax.device_put(state, replicated)
  step_fn = jax.jit(functools.partial(train_step, graphdef, class_weights=jnp.asarray(class_weights),
                                      config=config), donate_argnums=(0,))

  writer = metric_writers.MetricWriter(workdir)
  loader = pipeline.train_loader(config, train_source, mesh=mesh, start_step=start_step)
  base_key = jax.random.key(config.seed)
  end_step = total_steps if max_steps is None else min(total_steps, max_steps)
  if stopped:
    end_step = start_step
  val_metrics: dict[str, float] = {}

  from tqdm import tqdm
  bar = tqdm(total=end_step, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
             disable=jax.process_index() != 0)
  window_start, window_images, pending = time.perf_counter(), 0, []
  step = start_step
  try:
    while step < end_step:
      batch = next(loader)
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      step += 1
      pending.append(metrics)
      window_images += config.train.batch_size
      bar.update(1)
      if on_step is not None:
        on_step(step)
      if step % config.train.log_every_steps == 0 or step == end_step:
        scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
        elapsed = time.perf_counter() - window_start
        scalars['images_per_s'] = window_images / max(elapsed, 1e-9)
        scalars['learning_rate'] = float(optim.lr_schedule(config.train, steps_per_epoch)(step - 1))
        scalars['epoch'] = step / steps_per_epoch
        writer.write(step, scalars, 'train')
        bar.set_postfix(loss=f"{scalars['total']:.4f}", img_s=f"{scalars['images_per_s']:.1f}")
        window_start, window_images, pending = time.perf_counter(), 0, []

      epoch_done = step % steps_per_epoch == 0
      epoch = step // steps_per_epoch
      if (epoch_done and val_source is not None and _is_eval_epoch(epoch, config)) or \
         (step == end_step and val_source is not None and not val_metrics):
        model, optimizer = nnx.merge(graphdef, state)
        val_metrics = evaluation.evaluate(model, val_source, config, mesh=mesh,
                                          max_images=config.eval.max_val_images, desc='validate')
        if config.train.best_metric == 'loss':
          val_metrics['loss'] = validation_loss(model, val_source, config, class_weights, mesh=mesh)
        writer.write(step, val_metrics, 'val')
        value = val_metrics.get(config.train.best_metric)
        meta = {'step': step, 'epoch': epoch, 'val': val_metrics}
        improved = False
        if value is not None and np.isfinite(value):  # NaN (e.g. an empty split) must not become the best
          improved = ckpt.maybe_save_best(step, model, optimizer, meta, float(value))
        since_best = 0 if improved else since_best + 1
        _say(f'step {step} (epoch {epoch}) validation: ' + ', '.join(
            f'{k} {val_metrics[k]:.4f}' for k in ('f1_d', 'f1_c_mean', 'dice', 'bpq', 'loss') if k in val_metrics))
        if patience and since_best >= patience:
          stopped, end_step = True, step
          _say(f'early stopping: no better validation {config.train.best_metric} in {patience} validations')
      every = config.train.checkpoint_every_epochs
      if (epoch_done and every > 0 and epoch % every == 0) or step == end_step:
        model, optimizer = nnx.merge(graphdef, state)
        ckpt.save(step, model, optimizer, {'step': step, 'epoch': epoch, 'since_best': since_best,
                                           'early_stopped': stopped})
  except KeyboardInterrupt:
    # Keep the work done so far: a resume continues from exactly this step.
    if step > start_step and ckpt.latest_step() != step:
      model, optimizer = nnx.merge(graphdef, state)
      ckpt.save(step, model, optimizer, {'step': step, 'epoch': step // steps_per_epoch, 'interrupted': True})
      _say(f'interrupted: checkpoint saved at step {step}; run the same command to resume')
    raise
  finally:
    loader.close()  # closes grain's iterator now, not at garbage collection: frees its shared-memory batches
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return val_metrics
