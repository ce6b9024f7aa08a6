"""PyTorch checkpoints -> Flax NNX DualU-Net: reference checkpoints to Orbax workdirs, ImageNet encoders.

Convert a reference DualU-Net checkpoint (`torch.save({'model': state_dict, ...})` or a bare state dict) into
a workdir that `dualunet_jax.eval` / `dualunet_jax.predict` load:

    python -m dualunet_jax.convert --from=consep-combined-resnext.pth --config=configs/consep.py \
        --workdir=workdirs/consep-reference-resnext

Library entry points:

  load_state_dict(path)                 -> {key: float32 ndarray}; `.safetensors` without torch, anything else
                                           with `torch.load(map_location='cpu', weights_only=True)` (never
                                           runs code from the file)
  convert_checkpoint(path, config)      -> (model in eval mode, config with the encoder the file holds, info)
  convert_to_workdir(path, config, W)   -> W, an Orbax checkpoint at step 0 (both `last` and `best`)
  load_encoder_weights(model, path)     -> sets every encoder parameter/statistic from torchvision
                                           `resnext50_32x4d` or timm `convnext_*` ImageNet weights (the
                                           trainer calls it when `config.model.encoder_init` is set)
  expected_torch_shapes(model)          -> {reference torch key: torch shape} of a (possibly abstract) model

Key mapping (the model docstrings in `models/` hold the per-module tables): the Flax state path is turned into
the reference key (`class_decoder.blocks.0.bn1.mean` <- `decoder.blocks.0.conv1.1.running_mean`), and every
target must find its key and every source key must be used, or `ConversionError` names what is missing or
left over. Source keys are normalised first: the `model` entry is taken when present, `module.` prefixes are
stripped, `decoder_seg.` (Feb-2025 checkpoints) is read as `decoder.`, `num_batches_tracked` is dropped.
Values: conv OIHW -> HWIO (`transpose(2, 3, 1, 0)`, grouped and depthwise kernels alike), Linear
(out, in) -> (in, out), BN/LayerNorm weight -> scale, running_mean/var -> mean/var, ConvNeXt `gamma` as is.

Architecture checks: the number of classes K comes from `segmentation_head.0.weight` ([K+1, 16, 3, 3]) and
must equal `config.dataset.num_classes` (it also fixes the class names and the evaluation, so a mismatch is
an error: use the config of the dataset the checkpoint was trained on). The encoder is read from the keys
(`encoder.timm_model.` -> ConvNeXt; depths and stem width -> tiny/small/base/large); when it differs from
`config.model.encoder` the checkpoint wins with a warning, and the workdir's config.json records the encoder
that was converted, so eval/predict rebuild the right model. `config.model.width_multiplier` is kept (1.0
for released checkpoints); a file of another width fails the shape check.
"""

from collections.abc import Callable, Iterable, Mapping
import hashlib
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dualunet_jax import checkpointing
from dualunet_jax import models
from dualunet_jax.models import convnext as convnext_lib
from dualunet_jax.models import dualunet as dualunet_lib
from dualunet_jax.models import resnext as resnext_lib

Path = tuple[str | int, ...]  # a Flax state path, e.g. ('encoder', 'layer1', 0, 'bn1', 'mean')

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var',
         'gamma': 'gamma'}
_RESNEXT_NAMES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_CONVNEXT_NAMES = {'stem_conv': 'stem.0', 'stem_norm': 'stem.1', 'downsample_norm': 'downsample.0',
                   'downsample_conv': 'downsample.1', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}
_DECODER_NAMES = {'conv1': 'conv1.0', 'bn1': 'conv1.1', 'conv2': 'conv2.0', 'bn2': 'conv2.1'}
_PARTS = {'class_decoder': 'decoder', 'density_decoder': 'decoder_count', 'class_head': 'segmentation_head.0',
          'density_head': 'count_head.0'}
_CONVNEXT_PREFIX = 'timm_model.'  # the reference wraps the timm model: encoder.timm_model.*
# ImageNet files carry a classifier (and timm a pre-head norm) that the encoder does not have.
_IMAGENET_IGNORED = ('fc.', 'head.', 'norm_pre.')
_LIST_SHOWN = 6  # names listed in an error before "... and N more"


class ConversionError(ValueError):
  """A checkpoint cannot be converted: unreadable, or keys/shapes/architecture do not match the model."""


# ------------------------------------------------------------------------------------------- reading files


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split())


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a `.pth`/`.pt`/`.bin` (torch) or `.safetensors` file as numpy arrays, keys as stored.

  A dict holding `model` (the reference's training checkpoint) or `state_dict` is unwrapped to it; other
  top-level entries (optimizer, scheduler, epoch) are not returned. Floating tensors become float32.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f'{path}: no such file')
  if path.suffix == '.safetensors':
    from safetensors import numpy as st_numpy  # no torch needed
    try:
      tensors = st_numpy.load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on truncated/corrupt headers
      raise ConversionError(
          f'{path}: cannot read as .safetensors (truncated or corrupt?): {_one_line(e)}') from e
    return {k: _to_numpy(v) for k, v in tensors.items()}
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f'{path}: reading PyTorch files needs torch; install the [convert] extra '
                          '(pip install -e ".[convert]"), or convert the file to .safetensors') from e
  try:
    # weights_only: the unpickler accepts tensors and plain containers only, so the file cannot run code.
    obj = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:
    raise ConversionError(f'{path}: cannot read as a PyTorch checkpoint with weights_only=True (truncated, '
                          f'not a torch.save file, or it pickles code objects): {_one_line(e)}') from e
  if isinstance(obj, Mapping):
    for entry in ('model', 'state_dict'):
      if isinstance(obj.get(entry), Mapping):
        obj = obj[entry]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path}: holds a {type(obj).__name__}, not a state dict (or a dict with "model")')
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a '
                            'state dict or a dict with "model"')
    value = value.detach().cpu()
    out[key] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def _to_numpy(value: Any) -> np.ndarray:
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def normalize_keys(state_dict: Mapping[str, np.ndarray], source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """Strips `module.`, reads `decoder_seg.` as `decoder.`, drops `num_batches_tracked`."""
  out: dict[str, np.ndarray] = {}
  original: dict[str, str] = {}
  for key, value in state_dict.items():
    new = key
    while new.startswith('module.'):
      new = new[len('module.'):]
    if new.endswith('num_batches_tracked'):
      continue
    if new.startswith('decoder_seg.'):
      new = 'decoder.' + new[len('decoder_seg.'):]
    if new in out:
      raise ConversionError(f'{source}: keys {original[new]!r} and {key!r} both map to {new!r} '
                            '(decoder. and decoder_seg. together?)')
    out[new], original[new] = value, key
  return out


# ------------------------------------------------------------------------------------------- key mapping


def _join(path: Iterable[str | int], names: Mapping[str, str]) -> str:
  *inner, leaf = path
  inner = [names.get(p, p) if isinstance(p, str) else str(p) for p in inner]
  return '.'.join(inner + [_LEAF.get(leaf, leaf)])


def encoder_key(path: Path, convnext: bool) -> str:
  """Encoder state path (relative to `model.encoder`) -> torchvision / timm key (`layer1.0.conv2.weight`)."""
  return _join(path, _CONVNEXT_NAMES if convnext else _RESNEXT_NAMES)


def torch_key(path: Path, convnext: bool) -> str:
  """Full-model state path -> reference key, e.g. ('class_head', 'kernel') -> segmentation_head.0.weight."""
  part, rest = path[0], path[1:]
  if part == 'encoder':
    return 'encoder.' + (_CONVNEXT_PREFIX if convnext else '') + encoder_key(rest, convnext)
  if part in ('class_decoder', 'density_decoder'):
    return f'{_PARTS[part]}.{_join(rest, _DECODER_NAMES)}'
  if part in _PARTS:
    return f'{_PARTS[part]}.{_join(rest, {})}'
  return _join(path, {})  # an attribute this converter does not know: reported as a missing key


def _torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax leaf shape -> the torch shape of its source tensor."""
  if path[-1] == 'kernel' and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if path[-1] == 'kernel' and len(shape) == 2:
    return tuple(reversed(shape))
  return tuple(shape)


def _to_flax(path: Path, value: np.ndarray) -> np.ndarray:
  """Torch tensor -> Flax layout: OIHW -> HWIO (grouped/depthwise alike), Linear (out, in) -> (in, out)."""
  if path[-1] == 'kernel' and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if path[-1] == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _flat_shapes(module: nnx.Module) -> dict[Path, tuple[int, ...]]:
  """Every parameter and BatchNorm statistic of a concrete or abstract module: path -> shape."""
  pure = nnx.to_pure_dict(nnx.state(module))
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {tuple(k.key for k in keys): tuple(leaf.shape) for keys, leaf in leaves}


def _is_convnext(model: nnx.Module) -> bool:
  return isinstance(model.encoder, convnext_lib.ConvNeXtEncoder)


def expected_torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """{reference DualU-Net key: torch shape} for every target of `model` (works on `nnx.eval_shape` models)."""
  convnext = _is_convnext(model)
  return {torch_key(p, convnext): _torch_shape(p, s) for p, s in _flat_shapes(model).items()}


def _listing(names: list[str]) -> str:
  shown = ', '.join(names[:_LIST_SHOWN])
  return shown + (f' ... and {len(names) - _LIST_SHOWN} more' if len(names) > _LIST_SHOWN else '')


def match_keys(targets: Mapping[Path, tuple[int, ...]], source_shapes: Mapping[str, tuple[int, ...]],
               key_fn: Callable[[Path], str], *, source: str,
               ignored: Callable[[str], bool] = lambda key: False) -> dict[Path, str]:
  """Pairs every target path with its source key, checking coverage both ways and shapes.

  Raises ConversionError (one line) naming the missing keys, the left-over keys and the shape mismatches.
  """
  plan = {path: key_fn(path) for path in targets}
  used = set(plan.values())
  missing = sorted(key for key in used if key not in source_shapes)
  left_over = sorted(key for key in source_shapes if key not in used and not ignored(key))
  wrong = [f'{key} is {list(source_shapes[key])}, the model expects {list(_torch_shape(path, targets[path]))}'
           for path, key in sorted(plan.items(), key=lambda item: item[1])
           if key in source_shapes and tuple(source_shapes[key]) != _torch_shape(path, targets[path])]
  problems = []
  if missing:
    problems.append(f'{len(missing)} model tensors have no source key: {_listing(missing)}')
  if left_over:
    problems.append(f'{len(left_over)} source keys are left over: {_listing(left_over)}')
  if wrong:
    problems.append(f'{len(wrong)} shapes differ: {_listing(wrong)}')
  if problems:
    raise ConversionError(f'{source}: ' + '; '.join(problems))
  return plan


def _assign(module: nnx.Module, values: Mapping[Path, np.ndarray]) -> None:
  """Sets the listed leaves of `module` (concrete or from `nnx.eval_shape`) in place, as float32 arrays."""
  state = nnx.state(module)
  pure = nnx.to_pure_dict(state)
  for path, value in values.items():
    node = pure
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = jnp.asarray(value, dtype=node[path[-1]].dtype)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


# ------------------------------------------------------------------------------------------- architecture


def _convnext_variant(shapes: Mapping[str, tuple[int, ...]], prefix: str, width_multiplier: float,
                      source: str) -> str:
  """Variant name ('convnext_base', ...) of the timm ConvNeXt keys under `prefix`, from depths and widths."""
  depths, dims = [], []
  for s in range(4):
    marker = f'{prefix}stages.{s}.blocks.'
    depths.append(len({k[len(marker):].split('.')[0] for k in shapes if k.startswith(marker)}))
    dims.append(shapes.get(f'{marker}0.gamma', (0,))[0])
  for name, (spec_depths, spec_dims) in convnext_lib.CONVNEXT_SPECS.items():
    scaled = [dualunet_lib.scale_channels(d, width_multiplier) for d in spec_dims]
    if tuple(depths) == spec_depths and dims == scaled:
      return f'convnext_{name}'
  raise ConversionError(f'{source}: ConvNeXt with depths {tuple(depths)} and widths {tuple(dims)} is none of '
                        f'convnext_{{{",".join(convnext_lib.CONVNEXT_SPECS)}}} at width_multiplier '
                        f'{width_multiplier}')


def infer_architecture(shapes: Mapping[str, tuple[int, ...]], width_multiplier: float = 1.0,
                       source: str = 'checkpoint') -> tuple[str, int]:
  """(encoder name, K classes) of a normalised reference DualU-Net state dict (key -> shape)."""
  head = shapes.get('segmentation_head.0.weight')
  if head is None:
    raise ConversionError(f'{source}: no segmentation_head.0.weight; not a DualU-Net checkpoint? (keys: '
                          f'{_listing(sorted(shapes))})')
  if any(k.startswith('encoder.' + _CONVNEXT_PREFIX) for k in shapes):
    encoder = _convnext_variant(shapes, 'encoder.' + _CONVNEXT_PREFIX, width_multiplier, source)
  elif 'encoder.conv1.weight' in shapes:
    encoder = 'resnext50_32x4d'
    stem = dualunet_lib.scale_channels(dualunet_lib.RESNEXT_STEM, width_multiplier)
    if shapes['encoder.conv1.weight'][0] != stem:  # one line instead of hundreds of shape mismatches
      raise ConversionError(f'{source}: encoder.conv1.weight has {shapes["encoder.conv1.weight"][0]} '
                            f'channels, width_multiplier {width_multiplier} expects {stem}; set '
                            '--config.model.width_multiplier to the width the file was trained at (1.0 for '
                            'the released checkpoints)')
  else:
    raise ConversionError(f'{source}: no encoder keys (encoder.conv1.weight for ResNeXt, '
                          'encoder.timm_model.* for ConvNeXt)')
  return encoder, int(head[0]) - 1


# ------------------------------------------------------------------------------------------- conversion


def convert_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = 'checkpoint'
                       ) -> None:
  """Sets every parameter and BatchNorm statistic of `model` from a normalised reference state dict."""
  convnext = _is_convnext(model)
  targets = _flat_shapes(model)
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  plan = match_keys(targets, shapes, lambda p: torch_key(p, convnext), source=source)
  _assign(model,
          {path: _to_flax(path, np.asarray(state_dict[key], np.float32)) for path, key in plan.items()})


def convert_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict
                       ) -> tuple[models.DualUNet, ml_collections.ConfigDict, dict[str, Any]]:
  """Reads a reference DualU-Net checkpoint and returns (model in eval mode, config, info).

  The returned config is a copy of `config` with `model.encoder` set to the encoder found in the file (a
  warning when that changes it); K must equal `config.dataset.num_classes`.
  """
  source = str(path)
  state_dict = normalize_keys(load_state_dict(path), source)
  width = float(config.model.width_multiplier)
  encoder, num_classes = infer_architecture({k: np.shape(v) for k, v in state_dict.items()}, width, source)
  if num_classes != config.dataset.num_classes:
    raise ConversionError(f'{source}: segmentation_head.0.weight has {num_classes + 1} channels '
                          f'({num_classes} classes + background) but config.dataset.num_classes is '
                          f'{config.dataset.num_classes}; use the config of the dataset it was trained on')
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked
  if encoder != config.model.encoder:
    logging.warning('%s holds a %s encoder; overriding config.model.encoder=%r', source, encoder,
                    config.model.encoder)
    config.model.encoder = encoder
  config.model.encoder_init = ''  # the converted weights replace any ImageNet initialisation
  # Build abstractly and fill: no random initialisation of ~100M parameters that would be overwritten.
  model = nnx.eval_shape(lambda: models.build_model(config.model, num_classes, rngs=nnx.Rngs(0)))
  convert_state_dict(model, state_dict, source=source)
  model.eval()
  info = {'converted_from': str(pathlib.Path(path).absolute()), 'source_sha256': _sha256(path),
          'encoder': encoder, 'num_classes': num_classes, 'source_tensors': len(state_dict)}
  return model, config, info


def _sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def convert_to_workdir(path: str | os.PathLike, config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike, *, convert_fn: Any = None) -> pathlib.Path:
  """Converts `path` and writes it as step 0 of a new workdir (config.json, checkpoints/0, best/0).
  `convert_fn(path, config) -> (model, config, info)`: default `convert_checkpoint` (DualU-Net); HoVer-Net
  passes its own (convert_hovernet.py)."""
  workdir = pathlib.Path(workdir)
  for sub in (checkpointing.PERIODIC_DIR, checkpointing.BEST_DIR):
    if (workdir / sub).is_dir() and any((workdir / sub).iterdir()):
      raise ConversionError(f'{workdir / sub}: already holds checkpoints; convert into a new --workdir')
  model, config, info = (convert_fn or convert_checkpoint)(path, config)
  return checkpointing.save_model_checkpoint(workdir, config, model, step=0, meta=info)


# ------------------------------------------------------------------------------------------- ImageNet weights


def _from_facebook_convnext(key: str) -> str:
  """Original facebookresearch/ConvNeXt key -> timm key (as timm's own checkpoint filter remaps them)."""
  key = re.sub(r'^downsample_layers\.0\.', 'stem.', key)
  key = re.sub(r'^downsample_layers\.(\d+)\.(\d+)\.', r'stages.\1.downsample.\2.', key)
  key = re.sub(r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.', key)
  key = key.replace('.dwconv.', '.conv_dw.')
  key = key.replace('.pwconv1.', '.mlp.fc1.').replace('.pwconv2.', '.mlp.fc2.')
  return re.sub(r'^norm\.', 'head.norm.', key)  # the final norm belongs to the classifier head


def load_encoder_weights(model: models.DualUNet, path: str | os.PathLike) -> None:
  """Initialises `model.encoder` from ImageNet weights; the decoders and heads keep their initialisation.

  Accepts torchvision `resnext50_32x4d` keys (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...; `fc.*`
  ignored) and timm `convnext_*` keys (`stem.0.*`, `stages.N.*`; `head.*`, `norm_pre.*` ignored), from `.pth`
  or `.safetensors`; also the original facebookresearch ConvNeXt files (`downsample_layers.*`, `dwconv`,
  `pwconv1`, ...) and the `encoder.` part of a reference DualU-Net checkpoint (other keys ignored).
  Every encoder parameter and BatchNorm statistic must be set and every encoder key used.
  """
  source = str(path)
  raw = load_state_dict(path)
  state_dict = {}
  for key, value in raw.items():
    while key.startswith('module.'):
      key = key[len('module.'):]
    if not key.endswith('num_batches_tracked'):
      state_dict[key] = value
  if any(k.startswith('encoder.') for k in state_dict):  # a DualU-Net checkpoint: take its encoder
    state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    state_dict = {k.removeprefix(_CONVNEXT_PREFIX): v for k, v in state_dict.items()}
  if any(k.startswith('downsample_layers.') for k in state_dict):  # facebookresearch/ConvNeXt release
    state_dict = {_from_facebook_convnext(k): v for k, v in state_dict.items()}
  convnext = _is_convnext(model)
  file_is_convnext = any(k.startswith('stem.') or k.startswith('stages.') for k in state_dict)
  if convnext != file_is_convnext:
    found = 'timm ConvNeXt (stem.*, stages.*)' if file_is_convnext else 'non-ConvNeXt (no stem.*/stages.*)'
    raise ConversionError(f'{source}: holds {found} keys but the model encoder is {model.encoder_name}')
  if convnext:
    shapes = {k: np.shape(v) for k, v in state_dict.items()}
    variant = _convnext_variant(shapes, '', float(model.width_multiplier), source)
    if variant != model.encoder_name:
      raise ConversionError(f'{source}: holds {variant} weights but the model encoder is '
                            f'{model.encoder_name}; set --config.model.encoder={variant}')
  elif model.cardinality != resnext_lib.CARDINALITY:
    raise ConversionError(f'{source}: ResNeXt weights have {resnext_lib.CARDINALITY}-group 3x3 convolutions but '
                          f'the model was built with cardinality {model.cardinality}; drop '
                          '--config.model.cardinality')
  targets = _flat_shapes(model.encoder)
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  plan = match_keys(targets, shapes, lambda p: encoder_key(p, convnext), source=source,
                    ignored=lambda k: k.startswith(_IMAGENET_IGNORED))
  _assign(model.encoder,
          {path: _to_flax(path, np.asarray(state_dict[key], np.float32)) for path, key in plan.items()})
  logging.info('encoder %s initialised from %s (%d tensors)', model.encoder_name, source, len(plan))


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> None:
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  from dualunet_jax import methods
  convert = convert_to_workdir
  if methods.method_name(flag_values.config) == 'hovernet':  # the official HoVer-Net .tar / .npz checkpoints
    from dualunet_jax import convert_hovernet
    convert = convert_hovernet.convert_to_workdir
  try:
    workdir = convert(flag_values['from'].value, flag_values.config, flag_values.workdir)
  except (ConversionError, checkpointing.CheckpointError) as e:
    raise SystemExit(f'error: {e}') from None
  logging.info('wrote %s; evaluate with: python -m dualunet_jax.eval --workdir=%s', workdir, workdir)
  print(f'converted {flag_values["from"].value} -> {workdir}')


def run() -> None:
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py); fixes the dataset '
                                  '(num_classes must match the checkpoint).')
  flags.DEFINE_string('from', None, 'Reference DualU-Net checkpoint (.pth, or .safetensors); with a HoVer-Net '
                      'config (config.method=hovernet) an official HoVer-Net .tar / .npz.')
  flags.DEFINE_string('workdir', None, 'New workdir to write config.json and the Orbax checkpoint into.')
  flags.mark_flags_as_required(['from', 'config', 'workdir'])
  app.run(main)


if __name__ == '__main__':
  run()
