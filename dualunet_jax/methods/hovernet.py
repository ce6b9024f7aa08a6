"""HoVer-Net (Graham et al., MedIA 2019) as a method: NP / HV / TP decoders on a pre-activation ResNet-50.

Model: `models.hovernet.HoVerNet` (valid convolutions: outputs are the input minus `margin` = 95 'original' /
46 'fast' per side). Targets: class map, instance map and the HV maps of `data.hv_targets.hv_map` (the NP
target is class_map > 0, made in the loss). Loss (official `run_desc.train_step` with `utils.py`'s terms), on
the targets centre-cropped to the outputs:

  NP:  xentropy(softmax(np), onehot(fg)) * hv_np_ce   + dice(softmax(np), onehot(fg)) * hv_np_dice
  HV:  mse(hv, hv_t) * hv_mse                           + msge(hv, hv_t, focus=fg) * hv_msge
  TP:  xentropy(softmax(tp), onehot(class)) * hv_tp_ce + dice(softmax(tp), onehot(class)) * hv_tp_dice

(`config.loss` fields, all 1 in the official `opt.py`). The class weights the shared trainer passes are not
used (the official losses are unweighted).

`msge_loss` orientation: the paper and the original TensorFlow code take the x-derivative of the horizontal
map and the y-derivative of the vertical one. The PyTorch port builds its 5x5 kernels with `torch.meshgrid`'s
'ij' indexing, which transposes them: it penalises the y-derivative of the horizontal map and vice versa.
Default here: the paper's; `config.loss.hv_msge_pytorch_kernels=True` gives the PyTorch port's.

Maps: {'class_probs': softmax(tp) [B, h, w, K+1], 'np': softmax(np)[..., 1:2], 'hv': hv}; TTA kinds scalar,
scalar, hv. Post-processing: `postprocess_hv.postprocess_hv_maps` (official `process`), options from
`config.postprocess.hv_*`. Oracle: `postprocess_hv.oracle_maps` (one-hot TP, fg NP, target HV).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualunet_jax import losses
from dualunet_jax import postprocess_hv
from dualunet_jax.config_fields import config_field
from dualunet_jax.methods import base
from dualunet_jax.models import grouped_conv

LOSS_WEIGHTS = ('hv_np_ce', 'hv_np_dice', 'hv_mse', 'hv_msge', 'hv_tp_ce', 'hv_tp_dice')
# config.postprocess field -> postprocess_hv keyword
POSTPROCESS_FIELDS = {'hv_np_threshold': 'np_threshold', 'hv_energy_threshold': 'energy_threshold',
                      'hv_sobel_ksize': 'sobel_ksize', 'hv_min_size': 'min_size',
                      'hv_marker_min_size': 'marker_min_size', 'hv_opening_ksize': 'opening_ksize',
                      'hv_blur': 'blur', 'backend': 'backend'}


# ------------------------------------------------------------------------------------------- loss terms


def xentropy_loss(logits: jax.Array, target_onehot: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Official `xentropy_loss` on softmax(logits): mean over pixels of -sum_c y_c log(clip(p_c, eps, 1 - eps)).

  Not `losses.weighted_soft_cross_entropy`: the official clips the probabilities (so a confidently wrong pixel
  costs at most -log 1e-7 and passes no gradient), which log_softmax does not.

  Args:
    logits: float[B, H, W, C]; target_onehot: float[B, H, W, C].
  Returns:
    float32 scalar.
  """
  p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), eps, 1.0 - eps)
  return jnp.mean(-jnp.sum(target_onehot.astype(jnp.float32) * jnp.log(p), axis=-1))


def dice_loss(logits: jax.Array, target_onehot: jax.Array, smooth: float = 1e-3) -> jax.Array:
  """Official `dice_loss` on softmax(logits): sum over channels c (background included) of
  1 - (2 sum(p_c y_c) + smooth) / (sum p_c + sum y_c + smooth), pooled over batch and space.

  = C * `losses.soft_dice_loss` with unit weights and eps = smooth (that one averages over the channels).
  """
  c = logits.shape[-1]
  return c * losses.soft_dice_loss(logits, target_onehot, jnp.ones((c,), jnp.float32), eps=smooth)


def sobel_kernels_5x5() -> tuple[np.ndarray, np.ndarray]:
  """The official 5x5 gradient kernels h / (h^2 + v^2): (d/dx varying along columns, d/dy = its transpose)."""
  r = np.arange(-2, 3, dtype=np.float32)
  yy, xx = np.meshgrid(r, r, indexing='ij')
  kx = xx / (xx * xx + yy * yy + 1.0e-15)
  return kx, kx.T.copy()


def hv_gradients(hv: jax.Array, *, pytorch_kernels: bool = False) -> jax.Array:
  """[B, H, W, 2] -> [B, H, W, 2]: channel 0 d/dx of the x map, channel 1 d/dy of the y map (zero padding 2),
  or, with `pytorch_kernels`, the PyTorch port's transposed pair (d/dy of x, d/dx of y)."""
  kx, ky = sobel_kernels_5x5()
  k0, k1 = (ky, kx) if pytorch_kernels else (kx, ky)
  kernel = jnp.asarray(np.stack([k0, k1], axis=-1)[:, :, None, :])  # HWIO [5, 5, 1, 2]
  return grouped_conv.conv_general_dilated(hv.astype(jnp.float32), kernel, (1, 1), ((2, 2), (2, 2)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=2)


def msge_loss(pred: jax.Array, target: jax.Array, focus: jax.Array, *, pytorch_kernels: bool = False
              ) -> jax.Array:
  """Official `msge_loss`: squared error of the HV gradients on nuclear pixels,
  sum(focus * (g(pred) - g(target))^2) / (2 * sum(focus) + 1e-8) (focus counted once per channel).

  Args:
    pred, target: float[B, H, W, 2]; focus: float[B, H, W] (1 on nuclear pixels).
  Returns:
    float32 scalar.
  """
  diff = hv_gradients(pred, pytorch_kernels=pytorch_kernels) - hv_gradients(target, pytorch_kernels=pytorch_kernels)
  f = focus.astype(jnp.float32)[..., None]
  return jnp.sum(f * diff * diff) / (2.0 * jnp.sum(f) + 1.0e-8)


def asymmetric_np_loss(logits: jax.Array, fg: jax.Array, *, gamma_pos: float = 0.5, gamma_neg: float = 4.0,
                       clip: tuple[float, float] = (0.05, 0.95)) -> jax.Array:
  """HistoNeXt's NP loss: mean over pixels of -[y (1 - p)^gamma_pos log p + (1 - y) p^gamma_neg log(1 - p)]
  with p = softmax(logits)[..., 1] clipped to `clip` (so confident pixels cost little and pass no gradient).

  Args:
    logits: float[B, H, W, 2]; fg: {0, 1}[B, H, W].
  Returns:
    float32 scalar.
  """
  p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1], *clip)
  y = fg.astype(jnp.float32)
  return jnp.mean(-(y * (1.0 - p) ** gamma_pos * jnp.log(p) + (1.0 - y) * p ** gamma_neg * jnp.log(1.0 - p)))


def focal_tp_loss(logits: jax.Array, target_onehot: jax.Array, *, alpha: float = 0.25, gamma: float = 2.0
                  ) -> jax.Array:
  """HistoNeXt's TP loss (Lin et al. focal loss, softmax form): mean over pixels of
  -alpha (1 - p_t)^gamma log p_t, p_t the probability of the target class.

  Args:
    logits: float[B, H, W, C]; target_onehot: float[B, H, W, C].
  Returns:
    float32 scalar.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_pt = jnp.sum(target_onehot.astype(jnp.float32) * logp, axis=-1)
  return jnp.mean(-alpha * (1.0 - jnp.exp(log_pt)) ** gamma * log_pt)


def hovernet_loss(outputs: Mapping[str, jax.Array], class_map: jax.Array, hv_target: jax.Array,
                  loss_config: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the six official terms.

  Args:
    outputs: {'np': [B, h, w, 2], 'hv': [B, h, w, 2], optional 'tp': [B, h, w, K+1]}.
    class_map: int32[B, h, w] (0 background, 1..K) at output size.
    hv_target: float32[B, h, w, 2] at output size.
    loss_config: `config.loss` (LOSS_WEIGHTS fields, default 1; `hv_msge_pytorch_kernels`).
  Returns:
    (total, {'np_ce', 'np_dice', 'hv_mse', 'hv_msge'[, 'tp_ce', 'tp_dice'], 'total'}) float32 scalars.
  """
  w = {name: config_field(loss_config, name, 1.0) for name in LOSS_WEIGHTS}
  np_kind = config_field(loss_config, 'hv_np_loss', 'ce_dice')
  tp_kind = config_field(loss_config, 'hv_tp_loss', 'ce_dice')
  if np_kind not in ('ce_dice', 'asymmetric') or tp_kind not in ('ce_dice', 'focal'):
    raise ValueError(f"loss.hv_np_loss must be 'ce_dice' | 'asymmetric' and loss.hv_tp_loss 'ce_dice' | 'focal', "
                     f'got {np_kind!r}, {tp_kind!r}')
  fg = (class_map > 0).astype(jnp.int32)
  np_t = jax.nn.one_hot(fg, 2, dtype=jnp.float32)
  parts = {'hv_mse': losses.density_mse(outputs['hv'], hv_target),
           'hv_msge': msge_loss(outputs['hv'], hv_target, fg,
                                pytorch_kernels=bool(config_field(loss_config, 'hv_msge_pytorch_kernels', False)))}
  total = w['hv_mse'] * parts['hv_mse'] + w['hv_msge'] * parts['hv_msge']
  if np_kind == 'asymmetric':  # HistoNeXt: the asymmetric loss replaces CE + Dice (weight hv_np_ce)
    parts['np_asl'] = asymmetric_np_loss(outputs['np'], fg)
    total = total + w['hv_np_ce'] * parts['np_asl']
  else:
    parts['np_ce'], parts['np_dice'] = xentropy_loss(outputs['np'], np_t), dice_loss(outputs['np'], np_t)
    total = total + w['hv_np_ce'] * parts['np_ce'] + w['hv_np_dice'] * parts['np_dice']
  if 'tp' in outputs:
    tp_t = jax.nn.one_hot(class_map, outputs['tp'].shape[-1], dtype=jnp.float32)
    if tp_kind == 'focal':  # HistoNeXt: the focal loss replaces CE + Dice (weight hv_tp_ce)
      parts['tp_focal'] = focal_tp_loss(outputs['tp'], tp_t)
      total = total + w['hv_tp_ce'] * parts['tp_focal']
    else:
      parts['tp_ce'], parts['tp_dice'] = xentropy_loss(outputs['tp'], tp_t), dice_loss(outputs['tp'], tp_t)
      total = total + w['hv_tp_ce'] * parts['tp_ce'] + w['hv_tp_dice'] * parts['tp_dice']
  parts['total'] = total
  return total, parts


# ------------------------------------------------------------------------------------------- the method


# The official PyTorch model's parameters (vqdang/hover_net `HoVerNet`, counted by instantiating it) by
# (mode, K + 1 type channels): ../shared/reference/seed_systems.md; tests/test_hovernet.py checks ours equal.
OFFICIAL_PARAMETERS = {('original', 5): 54_744_457, ('original', 6): 54_744_522, ('fast', 5): 37_639_561,
                       ('fast', 6): 37_639_626}


class HoVerNetMethod(base.Method):
  name = 'hovernet'
  target_kinds = {'hv': 'hv'}
  map_kinds = {'class_probs': 'scalar', 'np': 'scalar', 'hv': 'hv'}
  postprocess_fn = staticmethod(postprocess_hv.postprocess_hv_maps)

  @staticmethod
  def mode(config: Any) -> str:
    return str(config_field(config.model, 'hovernet_mode', 'original'))

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    from dualunet_jax import models
    from dualunet_jax.models import hovernet
    return hovernet.HoVerNet(mode=self.mode(config), num_classes=num_classes,
                             width_multiplier=float(config.model.width_multiplier),
                             dtype=models.compute_dtype(config.model.dtype),
                             encoder_blocks=tuple(config_field(config.model, 'encoder_blocks', ())), rngs=rngs)

  def summary_notes(self, config: Any, model: nnx.Module, counts) -> list[str]:
    mode, types = self.mode(config), int(config.dataset.num_classes) + 1
    official = OFFICIAL_PARAMETERS.get((mode, types))
    if (official is None or float(config.model.width_multiplier) != 1.0
        or tuple(config_field(config.model, 'encoder_blocks', ())) not in ((), (3, 4, 6, 3))):
      return []
    same = 'equal' if counts['total'] == official else f"NOT equal ({counts['total']:,})"
    return [f'Official HoVer-Net {mode} with {types} type channels: {official:,} parameters ({same}).']

  def target_margin(self, config: Any) -> int:
    """Context px per side the model consumes: the HV rule 'too little of the nucleus inside the output'
    (`hv_targets.hv_map`'s `margin`) is judged on the output crop."""
    from dualunet_jax.models import hovernet
    return hovernet.MARGINS[self.mode(config)]

  def encoder_init(self, model: nnx.Module, path: str) -> None:
    from dualunet_jax import convert_hovernet  # torch only when asked for
    convert_hovernet.load_encoder_weights(model, path)

  # The official phase 1 (`net_desc.py`, freeze=True) runs d0's residual units and all of d1..d3 without
  # gradients; the stem (conv0 and its BatchNorm), d0's shortcut and block-end BatchNorm, and conv_bot train.
  PHASE1_TRAINABLE_ENCODER = (('conv0',), ('conv0_bn',), ('d0', 'shortcut'), ('d0', 'blk_bna'), ('conv_bot',))

  def encoder_filter(self, config: Any) -> Any:
    """The encoder's variables frozen in phase 1: all but `PHASE1_TRAINABLE_ENCODER`, as the official code."""
    keep = self.PHASE1_TRAINABLE_ENCODER

    def frozen(path: tuple, _) -> bool:
      if 'encoder' not in path:
        return False
      rest = tuple(path[path.index('encoder') + 1:])
      return not any(rest[:len(prefix)] == prefix for prefix in keep)

    return frozen

  def make_targets(self, instance_map: np.ndarray, instance_classes: np.ndarray, config: Any) -> dict[str, np.ndarray]:
    from dualunet_jax.data import hv_targets
    inst = np.asarray(instance_map, np.int32)
    lut = np.concatenate([np.zeros(1, np.int32), np.asarray(instance_classes, np.int32).reshape(-1)])
    hv = hv_targets.hv_map(inst, min_size=int(config_field(config.targets, 'hv_min_size',
                                                           hv_targets.OFFICIAL_MIN_SIZE)),
                           margin=self.target_margin(config))
    return {'class_map': lut[inst], 'instance_map': inst, 'hv': hv}

  def loss(self, outputs, batch, class_weights, config):
    del class_weights  # the official HoVer-Net losses are unweighted
    m = (batch['class_map'].shape[1] - outputs['np'].shape[1]) // 2
    return hovernet_loss(outputs, base.center_crop(batch['class_map'], m), base.center_crop(batch['hv'], m),
                         config.loss)

  def maps(self, outputs) -> base.Maps:
    fg = jax.nn.softmax(outputs['np'].astype(jnp.float32), axis=-1)
    tp = outputs.get('tp')
    probs = fg if tp is None else jax.nn.softmax(tp.astype(jnp.float32), axis=-1)  # no TP: K = 1
    return {'class_probs': probs, 'np': fg[..., 1:2], 'hv': outputs['hv'].astype(jnp.float32)}

  def postprocess_kwargs(self, config: Any) -> dict[str, Any]:
    pp = config.postprocess
    return {kw: pp[field] for field, kw in POSTPROCESS_FIELDS.items() if field in pp}

  def oracle_maps(self, instance_map, instance_classes, num_classes, config) -> dict[str, np.ndarray]:
    return postprocess_hv.oracle_maps(instance_map, instance_classes, num_classes)


class ConicMethod(HoVerNetMethod):
  """The CoNIC-challenge framework (seed 002) as a method: `models.conic_net.ConicNet` (SE-ResNeXt-50/101
  encoder, ONE merged HoVer-Net decoder with dropout after each upsampling, single-convolution NP / HV / NC
  heads, same-size outputs) with HoVer-Net's targets, loss terms and post-processing; the paper's loss
  weights (NP CE 2 + Dice 2, NC CE 3 + Dice 1, HV MSE 2 + MSGE 2) are set by configs/conic.py."""
  name = 'conic'

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    from dualunet_jax import models
    from dualunet_jax.models import conic_net, resnext
    return conic_net.ConicNet(encoder=config.model.encoder, num_classes=num_classes,
                              width_multiplier=float(config.model.width_multiplier),
                              cardinality=int(config_field(config.model, 'cardinality', resnext.CARDINALITY)),
                              dropout_rate=float(config_field(config.model, 'dropout_rate',
                                                              conic_net.DROPOUT_RATE)),
                              dtype=models.compute_dtype(config.model.dtype), rngs=rngs)

  def target_margin(self, config: Any) -> int:
    return 0  # same-size outputs

  def encoder_init(self, model: nnx.Module, path: str) -> None:
    from dualunet_jax.models import seresnext  # timm SE-ResNeXt ImageNet weights (.safetensors / .pth)
    seresnext.load_seresnext_weights(model.encoder, path)

  encoder_filter = base.Method.encoder_filter  # the whole encoder (not HoVer-Net's official partial freeze)


class HistoNeXtMethod(HoVerNetMethod):
  """HistoNeXt (seed 004) as a method: `models.histonext.HistoNeXt` (ConvNeXt encoder, dense-block NP and HV
  branches, ConvCAM type branch, 270 -> 80 valid geometry) with HoVer-Net's targets and post-processing; its
  losses (configs/histonext_consep.py): asymmetric NP (`asymmetric_np_loss`), HV MSE + MSGE on 5x5 gradient
  kernels over nuclear pixels (HoVer-Net's `msge_loss`), focal TP (`focal_tp_loss`)."""
  name = 'histonext'

  def build_model(self, config: Any, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
    from dualunet_jax import models
    from dualunet_jax.models import histonext
    return histonext.HistoNeXt(variant=str(config_field(config.model, 'histonext_variant', 'tiny')),
                               num_classes=num_classes, width_multiplier=float(config.model.width_multiplier),
                               dtype=models.compute_dtype(config.model.dtype), rngs=rngs)

  def target_margin(self, config: Any) -> int:
    from dualunet_jax.models import histonext
    return histonext.MARGIN

  encoder_filter = base.Method.encoder_filter  # the paper freezes the whole ConvNeXt encoder in phase 1
