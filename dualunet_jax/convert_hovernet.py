"""Official HoVer-Net PyTorch checkpoints (vqdang/hover_net) -> Flax `models.hovernet.HoVerNet`.

Files (`load_state_dict`):
  `.tar` / `.pth`  `torch.save({'desc': state_dict, ...})` as the official PeriodicSaver and the released
                   `hovernet_{original,fast}_*_pytorch.tar` / `ImageNet-ResNet50-Preact_pytorch.tar`
                   (a bare state dict, or one under 'model' / 'state_dict', also works); read with
                   `torch.load(weights_only=True)`, so the file cannot run code.
  `.npz`           the same keys as numpy arrays (the official `run_train.py` loads `.npz` pretrained files
                   with `dict(np.load(path))` and torch key names).
  `.safetensors`   read by `convert.load_state_dict` without torch.
Keys are normalised by `convert.normalize_keys` (`module.` from DataParallel stripped, `num_batches_tracked`
dropped) and `_canonical` (the older net_desc names `conv0.conv`, `preact_bn`, `conv1_bn`, `conv2_bn` read as
the released `conv0./`, `preact/bn` (`preact_bna/bn` in dense units), `conv1/bn`, `conv2/bn`).

Key mapping (`torch_key`): Flax path -> official key, leaves kernel/scale -> weight, mean/var ->
running_mean/running_var, kernels OIHW -> HWIO:
  encoder.conv0 / conv0_bn                     conv0./ / conv0.bn
  encoder.dN.units[i].{conv1,conv2,conv3}      dN.units.i.{conv1,conv2,conv3}
  encoder.dN.units[i].{preact,conv1_bn,conv2_bn}  dN.units.i.{preact/bn,conv1/bn,conv2/bn}
  encoder.dN.shortcut / blk_bna                dN.shortcut / dN.blk_bna.bn
  encoder.conv_bot                             conv_bot
  decoder_B.uS.conva / convf                   decoder.B.uS.conva / convf          (B in np, hv, tp)
  decoder_B.uS.dense.units[i].{preact_bna,conv1,conv1_bn,conv2}
                                               decoder.B.uS.dense.units.i.{preact_bna/bn,conv1,conv1/bn,conv2}
  decoder_B.uS.dense.blk_bna                   decoder.B.uS.dense.blk_bna.bn
  decoder_B.u1.conva, u0.bn, u0.conv           decoder.B.u1.conva, decoder.B.u0.bn, decoder.B.u0.conv
Every model tensor must find its key and every key must be used (except the constant `upsample2x.unpool_mat`
buffer), or `convert.ConversionError` names them.

Architecture from the file (`infer_architecture`): the mode from the conva kernel (5 'original', 3 'fast'),
K from `decoder.tp.u0.conv.weight` ([K+1, 64, 1, 1]; no TP branch -> None).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dualunet_jax import convert
from dualunet_jax import models
from dualunet_jax.convert import ConversionError
from dualunet_jax.models import hovernet as hovernet_lib

_NAMES = {'conv0': 'conv0./', 'conv0_bn': 'conv0.bn', 'preact': 'preact/bn', 'preact_bna': 'preact_bna/bn',
          'conv1_bn': 'conv1/bn', 'conv2_bn': 'conv2/bn', 'blk_bna': 'blk_bna.bn',
          'decoder_np': 'decoder.np', 'decoder_hv': 'decoder.hv', 'decoder_tp': 'decoder.tp'}
_CONSTANTS = ('upsample2x.unpool_mat',)  # the official unpooling's ones(2, 2) buffer, saved with the weights
_ENCODER_PREFIXES = ('conv0.', 'd0.', 'd1.', 'd2.', 'd3.', 'conv_bot.')
_OLD_NAMES = ((re.compile(r'^conv0\.conv\.'), 'conv0./.'),
              (re.compile(r'(\.dense\.units\.\d+\.)preact_bn\.'), r'\1preact_bna/bn.'),
              (re.compile(r'(^d\d\.units\.\d+\.)preact_bn\.'), r'\1preact/bn.'),
              (re.compile(r'\.conv1_bn\.'), '.conv1/bn.'),
              (re.compile(r'\.conv2_bn\.'), '.conv2/bn.'))


def _canonical(key: str) -> str:
  for pattern, repl in _OLD_NAMES:
    key = pattern.sub(repl, key)
  return key


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{official key: float32 ndarray} of a HoVer-Net `.tar`/`.pth`, `.npz` or `.safetensors` file, normalised."""
  path = pathlib.Path(path)
  source = str(path)
  if not path.is_file():
    raise ConversionError(f'{path}: no such file')
  if path.suffix == '.npz':
    with np.load(path) as f:
      raw = {k: np.asarray(f[k]) for k in f.files}
  elif path.suffix == '.safetensors':
    raw = convert.load_state_dict(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f'{path}: reading PyTorch files needs torch (pip install -e ".[convert]")') from e
    try:
      obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{path}: cannot read as a PyTorch checkpoint with weights_only=True: '
                            f'{" ".join(str(e).split())}') from e
    # `convert.load_state_dict` unwraps 'model' / 'state_dict' only; the official files use 'desc'.
    for entry in ('desc', 'model', 'state_dict'):
      if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
        obj = obj[entry]
        break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
      raise ConversionError(f'{path}: expected a state dict, or a dict with "desc" holding one')
    raw = {k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy() for k, v in obj.items()}
  raw = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in raw.items()}
  return normalize_keys(raw, source)


def normalize_keys(state_dict: Mapping[str, np.ndarray], source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """`convert.normalize_keys` (no `module.`, no `num_batches_tracked`), then the release layer names."""
  out = {}
  for key, value in convert.normalize_keys(state_dict, source).items():
    new = _canonical(key)
    if new in out:
      raise ConversionError(f'{source}: two keys map to {new!r} (old and new layer names together?)')
    out[new] = value
  return out


def torch_key(path: tuple[str | int, ...]) -> str:
  """Flax state path of a HoVerNet -> official state-dict key (module docstring)."""
  *inner, leaf = path
  if inner and inner[0] == 'encoder':
    inner = inner[1:]
  parts = [_NAMES.get(p, p) if isinstance(p, str) else str(p) for p in inner]
  return '.'.join(parts + [convert._LEAF.get(leaf, leaf)])


def expected_torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{official key: torch shape} of a (possibly abstract) HoVerNet."""
  return {torch_key(p): convert._torch_shape(p, s) for p, s in convert._flat_shapes(model).items()}


def infer_architecture(shapes: Mapping[str, tuple[int, ...]], source: str = 'checkpoint') -> tuple[str, int | None]:
  """(mode, K or None) of an official state dict's shapes."""
  conva = shapes.get('decoder.np.u3.conva.weight')
  if conva is None or len(conva) != 4:
    raise ConversionError(f'{source}: no decoder.np.u3.conva.weight; not a HoVer-Net checkpoint')
  modes = {5: 'original', 3: 'fast'}
  if conva[-1] not in modes:
    raise ConversionError(f'{source}: conva kernel {conva[-1]}x{conva[-1]} is neither 5 (original) nor 3 (fast)')
  tp = shapes.get('decoder.tp.u0.conv.weight')
  return modes[conva[-1]], (None if tp is None else int(tp[0]) - 1)


def convert_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = 'checkpoint'
                       ) -> None:
  """Sets every parameter and BatchNorm statistic of a HoVerNet from an official state dict (numpy values)."""
  state_dict = normalize_keys(state_dict, source)
  targets = convert._flat_shapes(model)
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  plan = convert.match_keys(targets, shapes, torch_key, source=source, ignored=lambda k: k in _CONSTANTS)
  convert._assign(model, {p: convert._to_flax(p, np.asarray(state_dict[k], np.float32)) for p, k in plan.items()})


def convert_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict
                       ) -> tuple[hovernet_lib.HoVerNet, ml_collections.ConfigDict, dict[str, Any]]:
  """Reads an official checkpoint: (model in eval mode, config copy with the file's mode, info).

  K must equal `config.dataset.num_classes` (a file without a TP branch cannot serve a typed dataset).
  """
  source = str(path)
  state_dict = load_state_dict(path)
  mode, num_classes = infer_architecture({k: np.shape(v) for k, v in state_dict.items()}, source)
  if num_classes != config.dataset.num_classes:
    found = 'no TP branch' if num_classes is None else f'{num_classes} types + background'
    raise ConversionError(f'{source}: holds {found} but config.dataset.num_classes is '
                          f'{config.dataset.num_classes}; use the config of the dataset it was trained on')
  config = ml_collections.ConfigDict(config.to_dict())
  config.method = 'hovernet'
  if config.model.get('hovernet_mode') != mode:
    logging.warning('%s is a %r HoVer-Net; setting config.model.hovernet_mode', source, mode)
  config.model.hovernet_mode = mode
  config.model.encoder_init = ''
  model = nnx.eval_shape(lambda: hovernet_lib.HoVerNet(
      mode=mode, num_classes=num_classes, width_multiplier=float(config.model.width_multiplier),
      dtype=models.compute_dtype(config.model.dtype), rngs=nnx.Rngs(0)))
  convert_state_dict(model, state_dict, source=source)
  model.eval()
  info = {'converted_from': str(pathlib.Path(path).absolute()), 'source_sha256': convert._sha256(path),
          'method': 'hovernet', 'hovernet_mode': mode, 'num_classes': num_classes,
          'source_tensors': len(state_dict)}
  return model, config, info


def convert_to_workdir(path: str | os.PathLike, config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> pathlib.Path:
  """`convert.convert_to_workdir` for HoVer-Net files: step 0 of a new workdir."""
  return convert.convert_to_workdir(path, config, workdir, convert_fn=convert_checkpoint)


def load_encoder_weights(model: hovernet_lib.HoVerNet, path: str | os.PathLike) -> None:
  """Initialises `model.encoder` from the official ImageNet pre-activation ResNet-50
  (`ImageNet-ResNet50-Preact_pytorch.tar` or an `.npz` with the same keys) or from a whole HoVer-Net file.

  Every encoder tensor must be in the file except `conv_bot` (HoVer-Net's own 1x1, absent from ImageNet
  files: kept at its initialisation when missing). Keys outside the encoder (decoders, a classifier) are
  ignored, as the official `load_state_dict(strict=False)` does.
  """
  source = str(path)
  state_dict = {k: v for k, v in load_state_dict(path).items() if k.startswith(_ENCODER_PREFIXES)}
  targets = convert._flat_shapes(model.encoder)
  if not any(k.startswith('conv_bot.') for k in state_dict):
    targets = {p: s for p, s in targets.items() if p[0] != 'conv_bot'}
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  plan = convert.match_keys(targets, shapes, lambda p: torch_key(('encoder',) + p), source=source)
  convert._assign(model.encoder,
                  {p: convert._to_flax(p, np.asarray(state_dict[k], np.float32)) for p, k in plan.items()})
  logging.info('HoVer-Net encoder initialised from %s (%d tensors)', source, len(plan))
