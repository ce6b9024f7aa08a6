"""ConvNeXt encoders (timm 0.9.8 layout, tiny/small/base/large), NHWC, Flax NNX.

Reference: `../shared/reference/dualunet_reference.md` §1.4 (architecture) and §9 (checkpoint keys).

Attribute path (under `DualUNet.encoder`) -> reference torch key (under `encoder.timm_model.`):

  stem_conv.{kernel, bias}  [4, 4, 3, d0]       <- stem.0.{weight [d0, 3, 4, 4], bias}  (OIHW -> HWIO)
  stem_norm.{scale, bias}                       <- stem.1.{weight, bias}                 (LayerNorm2d)
  stages[s].downsample_norm.{scale, bias}       <- stages.{s}.downsample.0.{weight, bias}  (s = 1..3)
  stages[s].downsample_conv.{kernel, bias}      <- stages.{s}.downsample.1.{weight, bias}  (2x2/2)
  stages[s].blocks[b].gamma          [d]        <- stages.{s}.blocks.{b}.gamma
  stages[s].blocks[b].conv_dw.{kernel, bias}    <- stages.{s}.blocks.{b}.conv_dw.{weight [d, 1, 7, 7], bias}
                                                   (depthwise: HWIO [7, 7, 1, d], same transpose)
  stages[s].blocks[b].norm.{scale, bias}        <- stages.{s}.blocks.{b}.norm.{weight, bias}
  stages[s].blocks[b].fc1.{kernel, bias}        <- stages.{s}.blocks.{b}.mlp.fc1.{weight [4d, d] -> .T, bias}
  stages[s].blocks[b].fc2.{kernel, bias}        <- stages.{s}.blocks.{b}.mlp.fc2.{weight [d, 4d] -> .T, bias}

Stage 0 has no downsample (`downsample_norm`/`downsample_conv` are None). All LayerNorms eps 1e-6, GELU exact
(erf), drop_path none. Initialisation as timm (trunc-normal std 0.02, zero biases, gamma 1e-6); the real
weights come from ImageNet by conversion.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models import grouped_conv

# name -> (depths, dims), timm convnext_{tiny,small,base,large}.
CONVNEXT_SPECS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
_INIT = jax.nn.initializers.truncated_normal(stddev=0.02)


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ConvNeXtBlock(nnx.Module):
  """dwconv 7x7 -> LN -> Dense 4d -> GELU(erf) -> Dense d -> * gamma -> + input."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.conv_dw = grouped_conv.Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                                     kernel_init=_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm = _layer_norm(dim, dtype, rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, kernel_init=_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, kernel_init=_INIT, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), LAYER_SCALE_INIT, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.norm(self.conv_dw(x))
    y = self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))
    return x + (y * self.gamma[...].astype(y.dtype)).astype(x.dtype)


class ConvNeXtStage(nnx.Module):
  """Optional downsample (LN -> 2x2/2 conv) followed by `depth` blocks."""

  def __init__(self, in_dim: int, dim: int, depth: int, *, downsample: bool, dtype, rngs: nnx.Rngs):
    if downsample:
      self.downsample_norm = _layer_norm(in_dim, dtype, rngs)
      self.downsample_conv = nnx.Conv(in_dim, dim, (2, 2), strides=(2, 2), padding='VALID', kernel_init=_INIT,
                                      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    else:
      self.downsample_norm = None
      self.downsample_conv = None
    self.blocks = nnx.List([ConvNeXtBlock(dim, dtype=dtype, rngs=rngs) for _ in range(depth)])

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.downsample_conv is not None:
      x = self.downsample_conv(self.downsample_norm(x))
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXtEncoder(nnx.Module):
  """timm ConvNeXt without head. Returns the 6 features of reference §1.4 (identity, stem, stages 0..3)."""

  def __init__(self, *, depths: Sequence[int], dims: Sequence[int], dtype=jnp.float32, rngs: nnx.Rngs):
    if len(depths) != 4 or len(dims) != 4:
      raise ValueError(f'ConvNeXt needs 4 depths and 4 dims, got depths={depths}, dims={dims}')
    self.stem_conv = nnx.Conv(3, dims[0], (4, 4), strides=(4, 4), padding='VALID', kernel_init=_INIT,
                              dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.stem_norm = _layer_norm(dims[0], dtype, rngs)
    self.stages = nnx.List([
        ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0, dtype=dtype, rngs=rngs)
        for i in range(4)
    ])
    self.out_channels = (3, dims[0]) + tuple(dims)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, 3] normalised, H and W multiples of 32 -> 6 features at strides 1, 4, 4, 8, 16, 32."""
    features = [x]
    x = self.stem_norm(self.stem_conv(x))
    features.append(x)
    for stage in self.stages:
      x = stage(x)
      features.append(x)
    return features
