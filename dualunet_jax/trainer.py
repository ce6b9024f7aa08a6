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

Two-phase training (`config.train.freeze_encoder_epochs` > 0; HoVer-Net's official schedule, HistoNeXt): the first
`freeze_encoder_epochs` epochs train everything but the encoder (`Method.encoder_filter`), the rest train all
parameters (`Method.trainable`). See `make_optimizer` for the optimizer across the switch and `train_step` for the
encoder's BatchNorm in phase 1.

Stopping: Ctrl-C and SIGTERM (a scheduler's preemption or time limit: SLURM, Kubernetes, spot VMs) save a
checkpoint at the current step first, so the same command resumes with nothing lost; SIGTERM then raises
`Preempted` (the CLI exits with status 143, as if terminated).
"""

import functools
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dualunet_jax import checkpointing, evaluation, losses, methods, metric_writers, optim
from dualunet_jax.data import augment, pipeline, sources, targets

CLASS_WEIGHTS_FILE = 'class_weights.json'


def make_mesh() -> Mesh:
  """All devices of all processes on one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), ('data',))


FROZEN_ENCODER_BN = ('update', 'keep')  # config.train.frozen_encoder_bn, see train_step


def freeze_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Steps of phase 1 (encoder frozen): `config.train.freeze_encoder_epochs` epochs; 0 = one phase."""
  epochs = int(config.train.get('freeze_encoder_epochs', 0))
  if epochs < 0:
    raise ValueError(f'config.train.freeze_encoder_epochs must be >= 0, got {epochs}')
  bn = config.train.get('frozen_encoder_bn', 'update')
  if bn not in FROZEN_ENCODER_BN:
    raise ValueError(f'config.train.frozen_encoder_bn must be one of {FROZEN_ENCODER_BN}, got {bn!r}')
  return epochs * steps_per_epoch


def phase_config(config: ml_collections.ConfigDict, phase: int) -> ml_collections.ConfigDict:
  """`config` as phase `phase` trains it: phase 1 of a two-phase run uses `config.train.phase1_batch_size`
  (0 = `batch_size`) as its global batch (HoVer-Net's official 16 then 4, HistoNeXt's 64 then 16), and its
  own steps per epoch: one pass with `steps_per_epoch` 0, else `steps_per_epoch` scaled so that an epoch is
  the same number of images in both phases. The learning rate stays the run's (`optim.learning_rate` at
  `batch_size`): the papers keep Adam's rate across the batch change."""
  batch = int(config.train.get('phase1_batch_size', 0))
  if phase != 1 or batch in (0, int(config.train.batch_size)):
    return config
  if batch < 0:
    raise ValueError(f'config.train.phase1_batch_size must be >= 0, got {batch}')
  run_batch = int(config.train.batch_size)
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch
  config.train.learning_rate = config.train.learning_rate * run_batch / batch  # undoes the linear scaling
  if int(config.train.steps_per_epoch) > 0:
    config.train.steps_per_epoch = max(1, round(int(config.train.steps_per_epoch) * run_batch / batch))
  return config


class Schedule:
  """Steps, epochs and phases of a run. Phase 1 (`freeze_encoder_epochs` epochs of `steps_per_epoch[1]`
  steps) then phase 2 (the other epochs, `steps_per_epoch[2]` steps each); the two differ only when phase 1
  has its own batch size and an epoch is one pass over the data."""

  def __init__(self, config: ml_collections.ConfigDict, source: Any):
    self.frozen_epochs = int(config.train.get('freeze_encoder_epochs', 0))
    self.configs = {p: phase_config(config, p) for p in (1, 2)}  # what each phase trains with
    self.steps_per_epoch = {p: pipeline.steps_per_epoch(self.configs[p], source) for p in (1, 2)}
    self._lr = {p: optim.lr_schedule(self.configs[p].train, self.steps_per_epoch[p]) for p in (1, 2)}
    self.frozen_steps = freeze_steps(config, self.steps_per_epoch[1])
    later_epochs = max(0, config.train.epochs - self.frozen_epochs) if self.frozen_steps else config.train.epochs
    self.total_steps = min(self.frozen_steps, config.train.epochs * self.steps_per_epoch[1]) + \
        later_epochs * self.steps_per_epoch[2]

  def phase(self, step: int) -> int:
    return phase_of(step, self.frozen_steps)

  def phase_start(self, phase: int) -> int:
    """The global step at which `phase` starts (its schedule and data order count from there)."""
    return 0 if phase == 1 else self.frozen_steps

  def learning_rate(self, step: int) -> float:
    """The learning rate of the step taken after `step` steps (each phase restarts its schedule)."""
    phase = self.phase(step)
    return float(self._lr[phase](step - self.phase_start(phase)))

  def epoch(self, step: int) -> tuple[int, bool]:
    """(epochs completed after `step` steps, whether `step` ends an epoch)."""
    if step <= self.frozen_steps:
      done, rest = divmod(step, self.steps_per_epoch[1])
      return done, rest == 0
    done, rest = divmod(step - self.frozen_steps, self.steps_per_epoch[2])
    return self.frozen_epochs + done, rest == 0

  def progress(self, step: int) -> float:
    """Epochs completed after `step` steps, with the fraction of the current one."""
    if step <= self.frozen_steps:
      return step / self.steps_per_epoch[1]
    return self.frozen_epochs + (step - self.frozen_steps) / self.steps_per_epoch[2]


def phase_of(step: int, frozen_steps: int) -> int:
  """Phase of the step taken after `step` steps: 1 (encoder frozen) for the first `frozen_steps`, then 2.

  A checkpoint saved after `step` steps holds the optimizer of `phase_of(step)` (the next step's), so a
  resume knows which optimizer to rebuild from the step alone.
  """
  return 1 if step < frozen_steps else 2


def trainable_filter(config: ml_collections.ConfigDict, phase: int = 2) -> Any:
  """The nnx filter of the parameters trained in `phase`: the method's (`Method.trainable`), less the encoder
  (`Method.encoder_filter`) in phase 1."""
  method = methods.get(config)
  if phase == 1:
    return nnx.All(method.trainable(config), nnx.Not(method.encoder_filter(config)))
  return method.trainable(config)


def make_optimizer(model: nnx.Module, config: ml_collections.ConfigDict, steps_per_epoch: int, *,
                   phase: int = 2) -> nnx.Optimizer:
  """The project's Adam (`optim.make_optimizer`) over `trainable_filter(config, phase)`.

  Each phase gets its own, fresh optimizer, as in the papers' two separate fits (HoVer-Net's official
  `opt.py`: two runs of Adam, each with its own x0.1 step schedule): at the switch the Adam moments of the
  decoders restart from zero and the learning-rate schedule restarts, i.e. `lr_milestones` count epochs from
  the start of each phase. (One optimizer with a masked update would carry the decoders' moments over and
  keep one schedule; it is not what the papers ran.) A fresh optimizer is a pure function of the model, so
  a resume across the switch rebuilds it exactly.
  """
  return nnx.Optimizer(model, optim.make_optimizer(phase_config(config, phase).train, steps_per_epoch),
                       wrt=trainable_filter(config, phase))


def create_train_state(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int, *,
                       phase: int = 2) -> tuple[nnx.Module, nnx.Optimizer]:
  """The model (with `encoder_init` weights) and the optimizer of `phase` (see `make_optimizer`)."""
  method = methods.get(config)
  model = method.build_model(config, num_classes, rngs=nnx.Rngs(config.seed))
  if config.model.get('encoder_init'):
    method.encoder_init(model, config.model.encoder_init)
  if int(config.train.get('freeze_encoder_epochs', 0)) > 0 and \
     not jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, method.encoder_filter(config)))):
    raise ValueError(f'config.train.freeze_encoder_epochs: the {method.name!r} model has no encoder '
                     'parameters to freeze (it trains from scratch); set it to 0')
  return model, make_optimizer(model, config, steps_per_epoch, phase=phase)


def _encoder_eval(model: nnx.Module) -> None:
  """Puts every `encoder` submodule in inference mode (BatchNorm on its running statistics, which then stay)."""
  for path, module in nnx.iter_modules(model):
    if path and path[-1] == 'encoder':
      module.eval()


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], key: jax.Array, *,
               class_weights: jax.Array, config: ml_collections.ConfigDict, phase: int = 2
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimisation step; a pure function of (state, batch, key).

  Phase 1 (encoder frozen) differentiates and updates only `trainable_filter(config, 1)`, so the encoder's
  parameters stay bit-identical. Its BatchNorm follows `config.train.frozen_encoder_bn`: 'update' (default)
  keeps it in training mode (batch statistics, running averages move), as the official HoVer-Net code does
  (its frozen layers run under `torch.set_grad_enabled(False)` in train mode); 'keep' runs the encoder in
  inference mode, so its running statistics stay as loaded (the usual choice for fine-tuning on small
  batches). HistoNeXt's ConvNeXt encoder has LayerNorm only: nothing in it moves in phase 1 either way.

  Args:
    graphdef, state: `nnx.split((model, optimizer))`.
    batch: image uint8[B, H, W, 3], class_map int32[B, H, W], instance_map int32[B, H, W] and the method's
      targets (e.g. density float32[B, H, W]) as global arrays.
    key: PRNG key of this step (augmentation).
    class_weights: float32[K+1].
    config: the experiment config (method, augment, loss); read at trace time.
    phase: 1 (encoder frozen) or 2 (all of `Method.trainable`), see `phase_of`; static.
  Returns:
    The new state and scalar metrics (loss parts, gradient norm).
  """
  method = methods.get(config)
  model, optimizer = nnx.merge(graphdef, state)
  model.train()
  if phase == 1 and config.train.get('frozen_encoder_bn', 'update') == 'keep':
    _encoder_eval(model)
  vector_keys = tuple(k for k, kind in method.target_kinds.items() if kind == 'hv')
  batch = augment.augment_batch(key, batch, config.augment, vector_keys=vector_keys)

  def loss_fn(model):
    return method.loss(model(batch['image']), batch, class_weights, config)

  diff = nnx.DiffState(0, trainable_filter(config, phase))  # a refinement's stage 2: only its own parameters
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


class Preempted(RuntimeError):
  """Training stopped on SIGTERM after saving a checkpoint; the same command resumes it."""


class _PreemptionWatch:
  """Whether this run has been asked to stop (SIGTERM), asked once per step.

  One process: a SIGTERM handler sets a flag (the previous handler comes back on `close`). Several processes
  must all save at the same step (an Orbax save is collective), so they ask JAX's preemption service instead,
  which `jax.distributed.initialize()` starts and which answers every process alike at a sync point.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __call__(self, step: int) -> bool:
    if self._multi:
      try:
        self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service (initialised without it): nothing to ask
        pass
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


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
  batches = {'batch_size': config.train.batch_size}
  if int(config.train.get('freeze_encoder_epochs', 0)) > 0:  # phase 1 exists
    batches['phase1_batch_size'] = phase_config(config, 1).train.batch_size
  for name, batch in batches.items():
    if batch % mesh.size:
      raise ValueError(f'config.train.{name}={batch} is not divisible by the {mesh.size} devices of the mesh')
  num_classes, class_names, mpp = sources.dataset_info(config.dataset)
  with config.unlocked():  # record what the data says, so eval/predict rebuild the same model
    config.dataset.num_classes = num_classes
    config.dataset.class_names = tuple(class_names)
    config.dataset.mpp = float(mpp)
  if jax.process_index() == 0:
    checkpointing.save_config(workdir, config)

  train_source = sources.load_source(config.dataset, config.dataset.train_split)
  val_source = sources.load_source(config.dataset, config.dataset.val_split) if config.dataset.val_split else None
  schedule = Schedule(config, train_source)
  total_steps = schedule.total_steps
  class_weights = class_weights_for(config, train_source, num_classes, workdir)
  stain_statistics_for(train_source, workdir)
  _say(f'{config.dataset.name}: {len(train_source)} training tiles, classes {list(class_names)}, '
       f'class weights {np.round(class_weights, 4).tolist()}; '
       f'{schedule.steps_per_epoch[2]} steps/epoch, {total_steps} steps' +
       (f' (phase 1: {schedule.frozen_steps} steps of batch {schedule.configs[1].train.batch_size})'
        if schedule.frozen_steps else ''))

  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    best_mode=config.train.get('best_mode', 'max'))
  frozen = schedule.frozen_steps
  phase = schedule.phase(ckpt.latest_step() or 0)  # the optimizer the checkpoint holds (see phase_of)
  model, optimizer = create_train_state(config, num_classes, schedule.steps_per_epoch[phase], phase=phase)
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

  def compile_phase(model, optimizer, phase):
    graphdef, state = nnx.split((model, optimizer))
    step_fn = jax.jit(functools.partial(train_step, graphdef, class_weights=jnp.asarray(class_weights),
                                        config=config, phase=phase), donate_argnums=(0,))
    return graphdef, jax.device_put(state, replicated), step_fn

  graphdef, state, step_fn = compile_phase(model, optimizer, phase)

  writer = metric_writers.MetricWriter(workdir)

  def phase_loader(phase, step):  # each phase's data order counts from the phase's start (its batch may differ)
    return pipeline.train_loader(schedule.configs[phase], train_source, mesh=mesh,
                                 start_step=step - schedule.phase_start(phase))

  loader = phase_loader(phase, start_step)
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

  def save_now() -> bool:  # a checkpoint at `step` unless one is there (Ctrl-C, SIGTERM); whether it saved
    if step > start_step and ckpt.latest_step() != step:
      model, optimizer = nnx.merge(graphdef, state)
      if schedule.phase(step) != phase:  # stopped just before the switch: save phase 2's optimizer
        optimizer = make_optimizer(model, config, schedule.steps_per_epoch[2])
      ckpt.save(step, model, optimizer, {'step': step, 'epoch': schedule.epoch(step)[0], 'interrupted': True,
                                         'since_best': since_best})
      return True
    return False

  watch = _PreemptionWatch()
  try:
    while step < end_step:
      batch = next(loader)
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      step += 1
      pending.append(metrics)
      window_images += batch['image'].shape[0]
      bar.update(1)
      if on_step is not None:
        on_step(step)
      preempted = watch(step) and step < end_step
      if step % config.train.log_every_steps == 0 or step == end_step or preempted:
        scalars = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
        elapsed = time.perf_counter() - window_start
        scalars['images_per_s'] = window_images / max(elapsed, 1e-9)
        scalars['learning_rate'] = schedule.learning_rate(step - 1)
        if frozen:
          scalars['phase'] = schedule.phase(step - 1)
        scalars['epoch'] = schedule.progress(step)
        scalars['batch_size'] = batch['image'].shape[0]  # global batch (phases may differ)
        writer.write(step, scalars, 'train')
        bar.set_postfix(loss=f"{scalars['total']:.4f}", img_s=f"{scalars['images_per_s']:.1f}")
        window_start, window_images, pending = time.perf_counter(), 0, []
      if schedule.phase(step) != phase:  # phase 2: all parameters, a fresh optimizer (see make_optimizer)
        model, _ = nnx.merge(graphdef, state)
        phase = 2
        graphdef, state, step_fn = compile_phase(
            model, make_optimizer(model, config, schedule.steps_per_epoch[2]), phase)
        loader.close()
        loader = phase_loader(phase, step)
        since_best = 0  # early stopping counts phase-2 validations only
        _say(f'step {step}: encoder unfrozen, training all parameters with a fresh optimizer')

      epoch, epoch_done = schedule.epoch(step)
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
        if patience and since_best >= patience and (phase == 2 or frozen >= total_steps):
          stopped, end_step = True, step
          _say(f'early stopping: no better validation {config.train.best_metric} in {patience} validations')
      every = config.train.checkpoint_every_epochs
      if (epoch_done and every > 0 and epoch % every == 0) or step == end_step:
        model, optimizer = nnx.merge(graphdef, state)
        ckpt.save(step, model, optimizer, {'step': step, 'epoch': epoch, 'since_best': since_best,
                                           'early_stopped': stopped})
      if preempted:
        save_now()
        raise Preempted(f'{workdir}: stopped on SIGTERM at step {step} of {end_step}, checkpoint saved; '
                        'run the same command to resume')
  except KeyboardInterrupt:
    # Keep the work done so far: a resume continues from exactly this step.
    if save_now():
      _say(f'interrupted: checkpoint saved at step {step}; run the same command to resume')
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    if not watch.requested or isinstance(e, Preempted):
      raise
    # The SIGTERM reached the data workers too (a scheduler signals the whole job) and the loader failed
    # before this step's check: the state of `step` is complete, keep it.
    save_now()
    raise Preempted(f'{workdir}: stopped on SIGTERM at step {step} of {end_step} ({type(e).__name__} from '
                    'the stopping job), checkpoint saved; run the same command to resume') from e
  finally:
    watch.close()
    loader.close()  # closes grain's iterator now, not at garbage collection: frees its shared-memory batches
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return val_metrics
