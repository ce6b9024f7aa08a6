"""The two-stage enhancement stage (seed 003, `../shared/reference/seed_systems.md` §D) for any method.

A trained stage-1 model of any method gives a foreground probability; the 76k-parameter `EnhancementNet`
(models/refine.py) sees the image again with it and predicts a refined foreground, which replaces the
stage-1 foreground in the maps, so the method's own post-processing uses it as its watershed mask.

    foreground_of(name, maps)          stage-1 foreground probability float[..., H, W]
    refine_maps(name, maps, refined)   the maps with the refined foreground in place of the stage-1 one
    foreground_mask(name, maps)        the mask the method's post-processing actually uses
    TwoStage                           stage-1 model + EnhancementNet, one module (one checkpoint)
    RefinedMethod                      a `methods.base.Method` over TwoStage: the shared trainer, evaluation
                                       and prediction use it as any other method (`method_for(config)`)
    train_step                         jittable step; stage 2 updates only the refinement parameters
    PixelMetrics, pixel_metrics        dataset-pooled pixel precision, recall, Dice, IoU

Where each method keeps its foreground (`FOREGROUND_SOURCES`; unknown methods by their map names):

  dualunet   'class_probs' [.., K+1]  foreground = 1 - p(background); post-processing mask argmax > 0
  hovernet   'np' [.., 1] or [.., 2]  the NP probability (channel 0 of a 1-channel map, channel 1 of a
                                      (background, nucleus) softmax); mask np > 0.5
  unet(pp)   'fg' [.., 1]             p; mask p > 0.5 (and 'class_probs' = [1 - p, p])

Training (the paper: BCE for both stages, Adam 1e-4, early stopping on validation loss; stage 1, then stage
2 on the frozen stage 1, then joint fine-tuning). Each stage is a config of the one training loop:

  stage 1  any method's own config (configs/unet_consep.py, configs/unetpp_consep.py, configs/consep.py)
  stage 2  configs/refine_consep.py, `config.refine.mode = 'stage2'`, `config.refine.init_workdir` = the
           stage-1 workdir: loss = BCE(refined, GT foreground); only `refine/*` parameters are in the
           optimizer, the stage-1 gradient is stopped and its BatchNorm stays in inference mode, so the
           stage-1 state is bit-for-bit unchanged
  joint    `config.refine.mode = 'joint'`, `init_workdir` = the stage-2 workdir: every parameter trains on
           BCE(refined) + `config.refine.stage1_loss_weight` x the method's own loss (the paper's "BCE for both
           stages" for the binary methods; for DualU-Net / HoVer-Net the method loss keeps the other heads
           (density, HV) trained, which BCE on the foreground alone would let drift)

Workdir of a refinement run W (self-contained: nothing outside W is read once it has a checkpoint):

  W/config.json       the stage-1 run's method/dataset/targets/model/loss/postprocess sections
                      (`resolve_config`) + this run's seed/train/augment/eval/refine; `refine.init_workdir`,
                      `refine.stage1_workdir` record where the weights came from
  W/checkpoints/<s>/  W/best/<s>/   as every run (checkpointing.py); the model item is the whole TwoStage,
                      {'stage1': <the stage-1 model's state>, 'refine': <EnhancementNet>}
  The stage-1 weights are copied in (restored from `init_workdir` into `model.stage1` at the first step,
  `initialise`), so deleting or retraining the stage-1 workdir never changes W.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dualunet_jax import checkpointing, methods, optim
from dualunet_jax.methods import base
from dualunet_jax.methods.binary import bce_with_logits, binary_class_probs
from dualunet_jax.models.refine import EnhancementNet

MODES = ('stage2', 'joint')
# method name -> the map holding its foreground
FOREGROUND_SOURCES = {'dualunet': 'class_probs', 'hovernet': 'np', 'unet': 'fg', 'unetpp': 'fg'}
# source -> the maps `refine_maps` rewrites
_REPLACED = {'class_probs': ('class_probs',), 'np': ('np',), 'fg': ('fg', 'class_probs')}
# `RefinedMethod.maps` keeps the stage-1 version of each rewritten map under this prefix.
STAGE1_PREFIX = 'stage1_'
# Sections of the stage-1 run's config that a refinement run inherits (`resolve_config`).
STAGE1_SECTIONS = ('method', 'dataset', 'targets', 'model', 'loss', 'postprocess')


# ----------------------------------------------------------------------------------------------- maps

def foreground_source(method_name: str, map_names: Any = ()) -> str:
  """The map a method keeps its foreground in: `FOREGROUND_SOURCES`, else 'fg' / 'np' / 'class_probs',
  whichever `map_names` holds first (a HoVer-Net-family method named otherwise has 'np')."""
  if method_name in FOREGROUND_SOURCES:
    return FOREGROUND_SOURCES[method_name]
  for source in ('fg', 'np', 'class_probs'):
    if source in map_names:
      return source
  raise ValueError(f'method {method_name!r}: no foreground map among {sorted(map_names)}')


def _np_channel(np_map: Any) -> Any:
  """HoVer-Net NP map [..., 1] (probability) or [..., 2] ((background, nucleus) softmax) -> p[...]."""
  c = np_map.shape[-1]
  if c not in (1, 2):
    raise ValueError(f"maps['np'] must have 1 or 2 channels, got {c}")
  return np_map[..., c - 1]


def foreground_of(method_name: str, maps: Mapping[str, Any]) -> Any:
  """Stage-1 foreground probability of a method's maps.

  Args:
    method_name: the method (`FOREGROUND_SOURCES`).
    maps: {name: float[B, H, W, C]} (or per tile [H, W, C]), jax or numpy.
  Returns:
    float[B, H, W] (or [H, W]) in [0, 1].
  """
  source = foreground_source(method_name, maps)
  if source == 'class_probs':
    return 1.0 - maps['class_probs'][..., 0]
  if source == 'np':
    return _np_channel(maps['np'])
  return maps['fg'][..., 0]


def foreground_mask(method_name: str, maps: Mapping[str, Any]) -> Any:
  """bool[B, H, W] (or [H, W]): the foreground the method's post-processing uses as its mask (DualU-Net:
  argmax(class_probs) > 0, which for K > 1 is not `foreground_of > 0.5`; others: probability > 0.5)."""
  if foreground_source(method_name, maps) == 'class_probs':
    return maps['class_probs'].argmax(-1) > 0
  return foreground_of(method_name, maps) > 0.5


def rescale_class_probs(class_probs: jax.Array, refined_fg: jax.Array) -> jax.Array:
  """DualU-Net class probabilities whose argmax > 0 is exactly `refined_fg > 0.5`, with the nucleus classes'
  relative proportions (hence their argmax) kept.

  q_c = f w_c for c >= 1, q_0 = 1 - f, where w_c = p_c / sum_{c>=1} p_c (uniform where that sum is 0) and
  f is the foreground mass. Why not simply f = refined_fg: the largest class gets f m with m = max_c w_c in
  [1/K, 1], so argmax > 0 iff f > t = 1 / (1 + m), which is 0.5 only for K = 1 (K = 2, p = (0.2, 0.4, 0.4),
  refined 0.6: q = (0.4, 0.3, 0.3), background wins). So f maps refined_fg piecewise linearly with
  f(0) = 0, f(0.5) = t, f(1) = 1:

    r <= 0.5: f = 2 r t        (f <= t: f m <= 1 - f, the background wins, ties included: argmax takes the first)
    r >  0.5: f = t + (2 r - 1)(1 - t)      (f > t: f m > 1 - f, the largest nucleus class wins)

  For K = 1 (m = 1, t = 0.5) f = r: q = (1 - r, r) exactly. Each q sums to 1. Exact up to float32 rounding
  of r within ~1e-7 of 0.5.

  Args:
    class_probs: float[..., K+1] probabilities (channel 0 background).
    refined_fg: float[...] refined foreground probability.
  Returns:
    float32[..., K+1].
  """
  p = class_probs.astype(jnp.float32)
  r = refined_fg.astype(jnp.float32)
  nuclei = p[..., 1:]
  total = nuclei.sum(-1, keepdims=True)
  k = nuclei.shape[-1]
  w = jnp.where(total > 0, nuclei / jnp.where(total > 0, total, 1.0), 1.0 / k)
  t = 1.0 / (1.0 + w.max(-1))
  f = jnp.where(r <= 0.5, 2.0 * r * t, t + (2.0 * r - 1.0) * (1.0 - t))
  return jnp.concatenate([(1.0 - f)[..., None], f[..., None] * w], axis=-1)


def refine_maps(method_name: str, maps: Mapping[str, jax.Array], refined_fg: jax.Array) -> dict[str, jax.Array]:
  """The maps with the refined foreground in place of the stage-1 one (other maps unchanged), so the method's
  own post-processing uses `refined_fg > 0.5` as its mask: `foreground_mask(name, refine_maps(name, maps,
  r)) == (r > 0.5)` for every method.

  Args:
    maps: {name: float[B, H, W, C]} of the method (or per tile [H, W, C]).
    refined_fg: float[B, H, W] (or [H, W]) refined foreground probability.
  Returns:
    A new dict: DualU-Net 'class_probs' rescaled (`rescale_class_probs`); HoVer-Net 'np' replaced (1 or 2
    channels as given); binary 'fg' and 'class_probs' replaced.
  """
  source = foreground_source(method_name, maps)
  out = dict(maps)
  r = jnp.asarray(refined_fg, jnp.float32)
  if source == 'class_probs':
    out['class_probs'] = rescale_class_probs(maps['class_probs'], r)
  elif source == 'np':
    out['np'] = r[..., None] if maps['np'].shape[-1] == 1 else binary_class_probs(r)
  else:
    out['fg'] = r[..., None]
    out['class_probs'] = binary_class_probs(r)
  return out


def unrefined(maps: Mapping[str, Any]) -> dict[str, Any]:
  """`RefinedMethod.maps` -> the stage-1 maps (the `STAGE1_PREFIX` copies put back in place)."""
  out = {k: v for k, v in maps.items() if not k.startswith(STAGE1_PREFIX)}
  out.update({k[len(STAGE1_PREFIX):]: v for k, v in maps.items() if k.startswith(STAGE1_PREFIX)})
  return out


def refined(maps: Mapping[str, Any]) -> dict[str, Any]:
  """`RefinedMethod.maps` without the stage-1 copies (what post-processing and exporters need)."""
  return {k: v for k, v in maps.items() if not k.startswith(STAGE1_PREFIX)}


# ----------------------------------------------------------------------------------------------- model

class TwoStage(nnx.Module):
  """A stage-1 model of method `method_name` and an `EnhancementNet`, one module and one checkpoint.

  `__call__(images) -> (stage1_outputs, refined_logits float32[B, h, w])`, (h, w) the stage-1 maps' size
  (the input less twice the stage-1 margin). With `freeze_stage1` (stage-2 training) the stage-1 foreground
  is a constant for the gradient and `train()` keeps the stage-1 BatchNorm in inference mode, so nothing in
  the stage-1 state moves.
  """

  def __init__(self, stage1: nnx.Module, refine: EnhancementNet, *, method_name: str, freeze_stage1: bool):
    self.stage1 = stage1
    self.refine = refine
    self.method_name = method_name
    self.freeze_stage1 = freeze_stage1
    self.margin = base.margin_of(stage1)

  def train(self, **attributes):
    super().train(**attributes)
    if self.freeze_stage1:
      self.stage1.eval()

  def __call__(self, images: jax.Array) -> tuple[Any, jax.Array]:
    """images uint8[B, H, W, 3] or float in [0, 1] -> (stage-1 outputs, refined logits float32[B, h, w])."""
    outputs = self.stage1(images)
    fg = foreground_of(self.method_name, methods.get(self.method_name).maps(outputs))
    if self.freeze_stage1:
      fg = jax.lax.stop_gradient(fg)
    return outputs, self.refine(base.center_crop(images, self.margin), fg)


def is_two_stage(config: Any) -> bool:
  """Whether `config` is a refinement run (`config.refine.mode` in MODES)."""
  refine = config.get('refine') if hasattr(config, 'get') else None
  return bool(refine) and refine.get('mode', '') in MODES


def _mode(config: Any) -> str:
  mode = config.refine.mode
  if mode not in MODES:
    raise ValueError(f'config.refine.mode must be one of {MODES}, got {mode!r}')
  return mode


def _is_refine_path(path: tuple, _value: Any) -> bool:
  return bool(path) and path[0] == 'refine'


def trainable_filter(config: Any) -> Any:
  """The nnx filter of the trained parameters: stage 2 only `refine/*`, joint all."""
  return nnx.All(nnx.Param, _is_refine_path) if _mode(config) == 'stage2' else nnx.Param


class RefinedMethod(base.Method):
  """A method's two-stage version: model = TwoStage(stage-1 model, EnhancementNet); maps = the stage-1 maps
  with the refined foreground (`refine_maps`), plus the stage-1 version of each rewritten map under
  `STAGE1_PREFIX` (so one forward pass scores both; `unrefined`, `refined`); post-processing, TTA kinds and
  the oracle are the stage-1 method's."""

  def __init__(self, stage1: base.Method):
    self.stage1 = stage1
    self.name = stage1.name
    self.target_kinds = dict(stage1.target_kinds)
    self.source = foreground_source(stage1.name, stage1.map_kinds)
    self.replaced = _REPLACED[self.source]
    self.map_kinds = {**stage1.map_kinds, **{STAGE1_PREFIX + k: stage1.map_kinds[k] for k in self.replaced}}
    self.postprocess_fn = stage1.postprocess_fn

  # Equal wrappers of one method are one static argument for jit (`method_for` makes a new one per call).
  def __eq__(self, other: Any) -> bool:
    return isinstance(other, RefinedMethod) and other.stage1 is self.stage1

  def __hash__(self) -> int:
    return hash((RefinedMethod, id(self.stage1)))

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> TwoStage:
    from dualunet_jax import models
    refine_config = config.refine
    enhancer = EnhancementNet(features=int(refine_config.get('features', 64)),
                              num_convs=int(refine_config.get('num_convs', 3)),
                              dtype=models.compute_dtype(config.model.get('dtype', 'float32')), rngs=rngs)
    return TwoStage(self.stage1.build_model(config, num_classes, rngs=rngs), enhancer, method_name=self.name,
                    freeze_stage1=_mode(config) == 'stage2')

  def trainable(self, config: Any) -> Any:
    return trainable_filter(config)

  def initialise(self, model: TwoStage, config: Any) -> None:
    initialise(model, config)

  def make_targets(self, instance_map, instance_classes, config):
    return self.stage1.make_targets(instance_map, instance_classes, config)

  def loss(self, outputs, batch, class_weights, config):
    """BCE of the refined logits against the ground-truth foreground (instance_map > 0, centre-cropped to the
    outputs); joint mode adds `config.refine.stage1_loss_weight` x the stage-1 method's loss."""
    stage1_outputs, logits = outputs
    target = base.center_crop(batch['instance_map'] > 0, (batch['instance_map'].shape[1] - logits.shape[1]) // 2)
    bce = bce_with_logits(logits, target)
    parts = {'refine_bce': bce}
    total = bce
    if _mode(config) == 'joint':
      stage1_total, stage1_parts = self.stage1.loss(stage1_outputs, batch, class_weights, config)
      total = total + float(config.refine.get('stage1_loss_weight', 1.0)) * stage1_total
      parts.update({f'{STAGE1_PREFIX}{k}': v for k, v in stage1_parts.items()})
    parts['total'] = total
    return total, parts

  def maps(self, outputs) -> base.Maps:
    stage1_outputs, logits = outputs
    maps = self.stage1.maps(stage1_outputs)
    out = refine_maps(self.name, maps, jax.nn.sigmoid(logits))
    out.update({STAGE1_PREFIX + k: maps[k] for k in self.replaced})
    return out

  def postprocess_kwargs(self, config):
    return self.stage1.postprocess_kwargs(config)

  def oracle_maps(self, instance_map, instance_classes, num_classes, config):
    maps = self.stage1.oracle_maps(instance_map, instance_classes, num_classes, config)
    return {**maps, **{STAGE1_PREFIX + k: maps[k] for k in self.replaced}}


def method_for(config: Any) -> base.Method:
  """`methods.get(config)`: wrapped in `RefinedMethod` for a refinement run (`is_two_stage`)."""
  return methods.get(config)


# ----------------------------------------------------------------------------------------------- training

def make_optimizer(model: TwoStage, config: Any, steps_per_epoch: int) -> nnx.Optimizer:
  """The project's Adam (`optim.make_optimizer(config.train)`) over `trainable_filter(config)` only: in
  stage 2 the stage-1 parameters have no optimizer state and no weight decay."""
  return nnx.Optimizer(model, optim.make_optimizer(config.train, steps_per_epoch), wrt=trainable_filter(config))


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: Mapping[str, jax.Array], *,
               method: RefinedMethod, class_weights: jax.Array, config: Any
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
  """One optimisation step of a refinement run; a pure function of (state, batch), jittable with
  `functools.partial(train_step, graphdef, method=..., class_weights=..., config=...)`.

  Args:
    graphdef, state: `nnx.split((model, optimizer))` of a TwoStage and its `make_optimizer`.
    batch: image (uint8 or augmented float [0, 1]) [B, H, W, 3], instance_map int32[B, H, W] and the
      stage-1 method's targets (joint mode), already augmented (the shared loop augments before the loss).
  Returns:
    The new state and float32 scalars (loss parts, 'total', 'grad_norm').
  """
  model, optimizer = nnx.merge(graphdef, state)
  model.train()
  wrt = trainable_filter(config)

  def loss_fn(model):
    return method.loss(model(batch['image']), batch, class_weights, config)

  (_, parts), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), dict(parts, grad_norm=optax.tree.norm(grads))


# ----------------------------------------------------------------------------------------------- workdirs

def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A refinement run's full config: `STAGE1_SECTIONS` from `config.refine.init_workdir`'s config.json (the
  stage-1 model, data and post-processing it was trained with; `model.encoder_init` cleared), everything else
  from `config`; `refine.stage1_workdir` is set to the stage-1 run (the init workdir itself, or the one it
  came from)."""
  init_dir = str(config.refine.init_workdir)
  if not init_dir:
    raise ValueError('config.refine.init_workdir is empty: name the stage-1 workdir (stage 2) or the stage-2 '
                     'workdir (joint)')
  init = checkpointing.load_config(init_dir)
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    for key in STAGE1_SECTIONS:
      if key in init:
        out[key] = init[key]
    if 'encoder_init' in out.model:
      out.model.encoder_init = ''  # the stage-1 weights come from init_workdir, not from ImageNet
    out.refine.init_workdir = str(pathlib.Path(init_dir).absolute())
    out.refine.stage1_workdir = str(init.refine.stage1_workdir) if is_two_stage(init) else out.refine.init_workdir
  return out


def initialise(model: TwoStage, config: Any) -> dict:
  """Loads `config.refine.init_workdir`'s checkpoint `config.refine.get('init_checkpoint', 'best')` into a
  fresh run: a stage-1 workdir into `model.stage1` (the EnhancementNet keeps its initialisation), a
  refinement workdir into the whole model. Returns the checkpoint's meta (with 'step'). Call it only when the
  run has no checkpoint of its own (a resume restores everything from W)."""
  init_dir = config.refine.init_workdir
  which = config.refine.get('init_checkpoint', 'best')
  target = model if is_two_stage(checkpointing.load_config(init_dir)) else model.stage1
  return checkpointing.restore_model(init_dir, target, which)


def save_two_stage(workdir: str | os.PathLike, config: ml_collections.ConfigDict, model: TwoStage, *,
                   step: int = 0, meta: dict | None = None) -> pathlib.Path:
  """A model-only, self-contained refinement workdir (config + both stages), e.g. to pack a stage-1 model
  with a separately trained EnhancementNet; `checkpointing.save_model_checkpoint` layout."""
  if not is_two_stage(config):
    raise ValueError('save_two_stage: config.refine.mode must be stage2 or joint')
  return checkpointing.save_model_checkpoint(workdir, config, model, step=step, meta=meta)


def restore_for_inference(workdir: str | os.PathLike, which: str | int = 'best'
                          ) -> tuple[TwoStage, ml_collections.ConfigDict]:
  """The TwoStage model of a refinement workdir (checkpoint `which`: 'best' | 'last' | step) in eval mode,
  and its config; reads nothing outside `workdir`."""
  config = checkpointing.load_config(workdir)
  if not is_two_stage(config):
    raise checkpointing.CheckpointError(f'{workdir}: not a refinement workdir (config.refine.mode is not one '
                                        f'of {MODES})')
  model = method_for(config).abstract_model(config, int(config.dataset.num_classes))
  checkpointing.restore_model(workdir, model, which)
  model.eval()
  return model, config


# ----------------------------------------------------------------------------------------------- metrics

PIXEL_KEYS = ('precision', 'recall', 'dice', 'iou')


def pixel_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """int64[3] (true positives, false positives, false negatives) of two bool masks of one shape."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f'prediction {pred.shape} and ground truth {gt.shape} differ in shape')
  tp = int(np.count_nonzero(pred & gt))
  return np.array([tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp], np.int64)


def _ratio(num: int, den: int) -> float:
  return num / den if den else math.nan


def metrics_from_counts(counts: np.ndarray) -> dict[str, float]:
  """{'precision', 'recall', 'dice', 'iou'} of pooled (tp, fp, fn); NaN where undefined (no predicted pixel
  for precision, no true pixel for recall, neither for Dice and IoU)."""
  tp, fp, fn = (int(c) for c in counts)
  return {'precision': _ratio(tp, tp + fp), 'recall': _ratio(tp, tp + fn), 'dice': _ratio(2 * tp, 2 * tp + fp + fn),
          'iou': _ratio(tp, tp + fp + fn)}


def pixel_metrics(pred_fg: np.ndarray, gt_fg: np.ndarray) -> dict[str, float]:
  """Pixel precision, recall, Dice and IoU pooled over every pixel of bool masks of any one shape (a tile,
  a batch or a stacked dataset)."""
  return metrics_from_counts(pixel_counts(pred_fg, gt_fg))


class PixelMetrics:
  """Dataset-pooled pixel metrics, one tile at a time: `add(pred, gt)` then `result()` (the seed-003
  paper's precision, recall, Dice, IoU of the binary mask; the project's `dice` in metrics.py is per-image
  averaged over the post-processed instances instead)."""

  def __init__(self):
    self.counts = np.zeros(3, np.int64)

  def add(self, pred_fg: np.ndarray, gt_fg: np.ndarray) -> None:
    self.counts += pixel_counts(pred_fg, gt_fg)

  def result(self, prefix: str = 'pixel_') -> dict[str, float]:
    return {prefix + k: v for k, v in metrics_from_counts(self.counts).items()}
