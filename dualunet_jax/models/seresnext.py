"""SE-ResNeXt-50 / -101 32x4d encoders (timm `seresnext50_32x4d`, `seresnext101_32x4d`), NHWC, Flax NNX.

The ResNeXt trunk of resnext.py with timm's squeeze-excitation in every bottleneck: after bn3 (the last 1x1's
BatchNorm), before the residual sum; global mean -> fc1 1x1 (C -> C/16, rounded to a multiple of 8, bias) ->
ReLU -> fc2 1x1 (-> C, bias) -> sigmoid gate. timm's plain 7x7 stem (no deep stem), stride on the grouped 3x3,
1x1/stride downsample, BatchNorm eps 1e-5: the same layout and key names as torchvision's ResNeXt plus
`layer{L}.{b}.se.fc{1,2}.{weight, bias}`. Parameters without the classifier (2,049,000 more in timm):
25,510,896 (50) and 46,906,416 (101).

Attribute path (this encoder) -> timm key: as resnext.py's table (`conv1.weight`, `bn1.*`,
`layer{L}.{b}.conv{1,2,3}.weight`, `layer{L}.{b}.bn{1,2,3}.*`, `layer{L}.0.downsample.{0,1}.*`) plus
`layer{L}[b].se.fc{1,2}.{kernel, bias}` <- `layer{L}.{b}.se.fc{1,2}.{weight, bias}`; `seresnext_torch_key`
does the mapping and `load_seresnext_state_dict` loads a timm state dict (`fc.*` ignored). timm's older
`legacy_seresnext*` (Cadene layout: `layer0.*`, `se_module.*`, ceil-mode max pool) is a different network and
is not read.

`width_multiplier` scales every channel count (`dualunet.scale_channels`) and `cardinality` sets the 3x3
groups, as for DualU-Net's ResNeXt (resnext.py says why tiny CPU models use cardinality 1).
"""

from collections.abc import Mapping
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualunet_jax.models import dualunet
from dualunet_jax.models import resnext

SERESNEXT_BLOCKS = {'seresnext50_32x4d': (3, 4, 6, 3), 'seresnext101_32x4d': (3, 4, 23, 3)}
SE_REDUCTION = 16
_IGNORED = ('fc.',)  # the ImageNet classifier


class SEResNeXtEncoder(resnext.ResNeXtEncoder):
  """SE-ResNeXt trunk without avgpool/fc; returns resnext.py's 6 features (identity, stem, layer1..4).

  Args:
    name: 'seresnext50_32x4d' or 'seresnext101_32x4d'.
    width_multiplier: channel scale (1.0 = timm's model).
    cardinality: 3x3 groups (32 = timm's; the only value ImageNet weights fit).
    stem_stride, stem_pool: 2 and True = timm (features at strides 1, 2, 4, 8, 16, 32); 1 and False = the
      CoNIC HoVer-Net geometry (strides 1, 1, 1, 2, 4, 8), used by conic_net.py.
  """

  def __init__(self, name: str = 'seresnext50_32x4d', *, width_multiplier: float = 1.0,
               cardinality: int = resnext.CARDINALITY, stem_stride: int = 2, stem_pool: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if name not in SERESNEXT_BLOCKS:
      raise ValueError(f'unknown SE-ResNeXt {name!r}; expected one of {tuple(SERESNEXT_BLOCKS)}')
    scale = lambda c: dualunet.scale_channels(c, width_multiplier)
    super().__init__(stem_width=scale(dualunet.RESNEXT_STEM),
                     planes=tuple(scale(p) for p in dualunet.RESNEXT_PLANES), blocks=SERESNEXT_BLOCKS[name],
                     cardinality=cardinality, se_reduction=SE_REDUCTION, stem_stride=stem_stride,
                     stem_pool=stem_pool, dtype=dtype, rngs=rngs)
    self.name = name
    self.width_multiplier = width_multiplier
    self.cardinality = cardinality


def seresnext_torch_key(path: tuple[str | int, ...]) -> str:
  """Encoder state path -> timm key, e.g. ('layer1', 0, 'se', 'fc1', 'kernel') -> 'layer1.0.se.fc1.weight'."""
  from dualunet_jax import convert  # here, not at the top: convert imports the models package
  return convert.encoder_key(path, convnext=False)


def load_seresnext_state_dict(encoder: SEResNeXtEncoder, state_dict: Mapping[str, np.ndarray], *,
                              source: str = 'state dict') -> None:
  """Sets every parameter and BatchNorm statistic of `encoder` (concrete or `nnx.eval_shape`) in place from a
  timm `seresnext*_32x4d` state dict (torch layouts as numpy; `module.` prefixes, `num_batches_tracked` and
  `fc.*` are dropped). Raises convert.ConversionError naming missing, left-over or mis-shaped keys."""
  from dualunet_jax import convert
  state_dict = convert.normalize_keys(state_dict, source)
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  plan = convert.match_keys(convert._flat_shapes(encoder), shapes, seresnext_torch_key, source=source,
                            ignored=lambda key: key.startswith(_IGNORED))
  convert._assign(encoder, {path: convert._to_flax(path, np.asarray(state_dict[key], np.float32))
                            for path, key in plan.items()})


def load_seresnext_weights(encoder: SEResNeXtEncoder, path: str | os.PathLike) -> None:
  """`load_seresnext_state_dict` from a timm `.safetensors` / `.pth` file (`convert.load_state_dict`)."""
  from dualunet_jax import convert
  load_seresnext_state_dict(encoder, convert.load_state_dict(path), source=str(path))
