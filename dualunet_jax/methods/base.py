"""What a method provides to the shared trainer, evaluation, oracle and prediction engine.

A *method* (DualU-Net, HoVer-Net, ...) is one object that owns everything specific to it:

  model        `build_model(config, num_classes, rngs)`: a Flax NNX module. A model with valid convolutions
               exposes `model.margin` (context pixels it consumes on each side: outputs are H - 2m by W - 2m
               for an H x W input); same-size models have none (margin 0).
  targets      `make_targets(instance_map, instance_classes, config)`: host-side numpy maps of one crop, after
               cropping (centroids of the visible nuclei). Every method's targets hold 'class_map' and
               'instance_map' (the shared pipeline, class weights and evaluation read them).
  augmentation `target_kinds`: how each target moves under the shared device-side geometry (see KINDS).
  loss         `loss(outputs, batch, class_weights, config)`: jittable, float32 scalars; `batch` holds the
               targets at input size, so a method with a margin centre-crops them to its outputs.
  maps         `maps(outputs)`: device-side raw outputs -> the float maps post-processing reads, each
               [B, H, W, C] channel-last; always 'class_probs' [B, H, W, K+1] (softmax, channel 0 background),
               which the exporters use for per-nucleus class probabilities.
  TTA          `map_kinds`: how each map is undone after a flip / rot90 view (`undo_view`).
  post-proc    `postprocess_fn`: a top-level, JAX-free function `fn(maps: {name: float[H, W, C]}, **kwargs)
               -> postprocess.Instances` (it is pickled by reference into host worker processes, which must
               never import JAX), with `postprocess_kwargs(config)`.
  oracle       `oracle_maps(instance_map, instance_classes, num_classes, config)`: the ideal maps of ground
               truth, through the same post-processing (the ceiling the targets + post-processing allow).

Everything else (the training loop, evaluation, metrics, tiling/stitching, checkpoints, exporters and the CLIs)
is shared and knows a method only through this interface.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# How a spatial array transforms under a flip / rot90 of the image:
#   'scalar'  every channel moves with the pixels (probabilities, densities, labels)
#   'hv'      channels (horizontal, vertical) are the components of a vector field in image axes (x right,
#             y down), e.g. HoVer-Net's distances to the nucleus centre: they move with the pixels AND rotate
#             (a horizontal flip negates channel 0; a quarter turn swaps the channels with one sign change).
KINDS = ('scalar', 'hv')

Maps = dict[str, Any]


def margin_of(model: Any) -> int:
  """Context pixels a model consumes per side (0 for same-size models)."""
  return int(getattr(model, 'margin', 0) or 0)


def center_crop(x: jax.Array, margin: int) -> jax.Array:
  """x: [B, H, W, ...] -> [B, H - 2m, W - 2m, ...]."""
  if not margin:
    return x
  return x[:, margin:x.shape[1] - margin, margin:x.shape[2] - margin]


def undo_view(x: jax.Array, kind: str, k: int, flip: bool) -> jax.Array:
  """Maps predicted on the view `flip_w(rot90(image, k))` back to the image's frame.

  Args:
    x: [B, H', W', C] map of the view (rot90 over axes (1, 2) as `jnp.rot90`, then a horizontal flip).
    kind: 'scalar' or 'hv' (see KINDS).
    k, flip: the view.
  Returns:
    [B, H, W, C] in the original frame.
  """
  if kind not in KINDS:
    raise ValueError(f'map kind must be one of {KINDS}, got {kind!r}')
  if flip:
    x = x[:, :, ::-1]
    if kind == 'hv':  # x -> W - 1 - x: horizontal components change sign
      x = x.at[..., 0].multiply(-1.0)
  x = jnp.rot90(x, -k, axes=(1, 2))
  if kind == 'hv':
    for _ in range(k % 4):
      # The view is the image turned a quarter counter-clockwise: a view vector (h', v') is the image vector
      # (h, v) = (-v', h').
      x = jnp.stack([-x[..., 1], x[..., 0]], axis=-1)
  return x


class Method(abc.ABC):
  """The interface a method implements (see the module docstring)."""

  name: str = ''
  # target name -> kind, for the device-side augmentation of the targets `make_targets` returns.
  target_kinds: Mapping[str, str] = {}
  # map name -> kind, for undoing TTA views of the maps `maps` returns.
  map_kinds: Mapping[str, str] = {}

  # ------------------------------------------------------------------ model
  @abc.abstractmethod
  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model of `config.model` with K = num_classes, in training mode."""

  def abstract_model(self, config: Any, num_classes: int) -> nnx.Module:
    """`build_model` under `nnx.eval_shape`: shapes only, nothing allocated (parameter counts, FLOPs, restore)."""
    return nnx.eval_shape(lambda rngs: self.build_model(config, num_classes, rngs=rngs), nnx.Rngs(0))

  def parameter_counts(self, model: nnx.Module) -> dict[str, int]:
    """Trainable parameters per top-level part and 'total' (BatchNorm statistics excluded)."""
    counts = {}
    for name, value in vars(model).items():
      if isinstance(value, nnx.Module):
        counts[name] = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(value, nnx.Param)))
    counts['total'] = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return counts

  def summary_notes(self, config: Any, model: nnx.Module, counts: Mapping[str, int]) -> list[str]:
    """Lines `summary` prints under the table (e.g. the published size of this architecture)."""
    return []

  def trainable(self, config: Any) -> Any:
    """The nnx filter of the parameters the optimizer trains (a refinement run: its stage-2 parameters)."""
    return nnx.Param

  def encoder_filter(self, config: Any) -> Any:
    """The nnx filter of the encoder's variables, frozen in phase 1 of two-phase training
    (`config.train.freeze_encoder_epochs`): everything under a module attribute named `encoder` (where every
    model with a pre-trainable backbone keeps it, as `encoder_init` assumes; also a refinement's
    `stage1/encoder`). U-Net / U-Net++ have none (trained from scratch), so the trainer refuses to freeze them."""
    return nnx.PathContains('encoder')

  def initialise(self, model: nnx.Module, config: Any) -> None:
    """Called by the trainer on a fresh run (no checkpoint yet), after `build_model` (a refinement run loads
    its stage-1 weights here)."""

  def encoder_init(self, model: nnx.Module, path: str) -> None:
    """Loads ImageNet weights from `path` into the encoder (config.model.encoder_init)."""
    raise NotImplementedError(f'{self.name}: loading encoder weights is not supported')

  # ------------------------------------------------------------------ training
  @abc.abstractmethod
  def make_targets(self, instance_map: np.ndarray, instance_classes: np.ndarray, config: Any) -> dict[str, np.ndarray]:
    """Host-side targets of one crop.

    Args:
      instance_map: int32[H, W], nuclei 1..M (contiguous, relabelled after cropping).
      instance_classes: int32[M] in 1..K (unlabelled nuclei already drawn as class 1).
      config: the experiment config.
    Returns:
      {'class_map': int32[H, W], 'instance_map': int32[H, W], <method targets>: float32[H, W(, C)]}.
    """

  @abc.abstractmethod
  def loss(self, outputs: Any, batch: Mapping[str, jax.Array], class_weights: jax.Array, config: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total float32 scalar, {part: float32 scalar, ..., 'total'}) of model outputs against a batch."""

  # ------------------------------------------------------------------ inference
  @abc.abstractmethod
  def maps(self, outputs: Any) -> Maps:
    """Raw model outputs -> {name: float32[B, h, w, C]} with 'class_probs' [B, h, w, K+1]."""

  postprocess_fn: Callable[..., Any]

  @abc.abstractmethod
  def postprocess_kwargs(self, config: Any) -> dict[str, Any]:
    """Keyword arguments of `postprocess_fn` held by the config."""

  @abc.abstractmethod
  def oracle_maps(self, instance_map: np.ndarray, instance_classes: np.ndarray, num_classes: int, config: Any
                  ) -> dict[str, np.ndarray]:
    """Ideal maps of one ground-truth tile, {name: float32[H, W, C]} as `maps` would give per tile."""

  # ------------------------------------------------------------------ shared helpers
  def forward_maps(self, model: nnx.Module, images: jax.Array) -> Maps:
    """Whole-image maps of a batch: a model with a margin sees the image reflect-padded by it, so every map
    covers the image (tiles from slides get real context from the engine instead).

    Args:
      images: uint8[B, H, W, 3] (or float in [0, 1]).
    Returns:
      {name: float32[B, H, W, C]}.
    """
    m = margin_of(model)
    if m:
      images = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode='reflect')
    return self.maps(model(images))
