"""U-Net++ (Zhou et al., DLMIA 2018, "UNet++: A Nested U-Net Architecture"), binary logits, NHWC, Flax NNX.

A stage-1 base model of the two-stage enhancement protocol (seed 003; methods/binary.py). Built as the
authors' Keras code (MrGiovanni/UNetPlusPlus `Nest_Net`), the VGG-style variant:

  X(i, 0) = block(pool(X(i-1, 0)))                                  the backbone, i = 0..4 (X(0,0) on the input)
  X(i, j) = block([up(X(i+1, j-1)), X(i, 0), ..., X(i, j-1)])       the nested dense skip pathways, j >= 1

where block = (conv3x3 -> ReLU) x 2 at level i's channels base x 2**i, pool = 2x2 max pooling and up(i, j) is
a 2x2 stride-2 transposed convolution to level i's channels. Output: a 1x1 convolution on X(0, 4); with
`deep_supervision`, one 1x1 head on each of X(0, 1..4) (the paper's deep supervision), stacked as channels.

Shared choices with models/unet.py (its docstring says why): SAME padding with reflect padding to multiples
of 16, optional BatchNorm (off = the authors' code; their dropout is left out), ImageNet input normalisation,
float32 output convolutions.

Parameter counts (`nnx.eval_shape`, tests/test_binary_methods.py): base 32, 1 input channel, no BN, no deep
supervision: 9,041,601 = the "Standard UNet++ [Zhou et al., 2018] Total params: 9,041,601" of the authors'
code (their paper's table: 9.04 M); RGB input: 9,042,177.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dualunet_jax.models.unet import (LEVELS, ConvBlock, level_channels, max_pool, output_conv, prepare_input,
                                      up_conv)

DEPTH = LEVELS - 1  # nested columns j = 1..4


class UNetPlusPlus(nnx.Module):
  """U-Net++ with 1 logit channel (or one per supervised column with `deep_supervision`).

  Args:
    base_channels: channels of level 0 (32 = Zhou et al.'s variant).
    width_multiplier: scales every level (multiples of 8); 1/8 for tiny test models.
    batch_norm: BatchNorm after each 3x3 convolution.
    deep_supervision: 1x1 heads on X(0, 1..4); the output then has 4 channels (the method averages their
      probabilities at inference, the paper's "accurate mode", and averages the loss over them).
    in_channels: 3 (RGB); 1 reproduces the grayscale counts of the authors' code.
    dtype: compute dtype; parameters are float32.
  """

  def __init__(self, *, base_channels: int = 32, width_multiplier: float = 1.0, batch_norm: bool = False,
               deep_supervision: bool = False, in_channels: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    ch = level_channels(base_channels, width_multiplier)
    self.channels = ch
    self.dtype = jnp.dtype(dtype)
    self.deep_supervision = deep_supervision
    block = lambda cin, cout: ConvBlock(cin, cout, batch_norm=batch_norm, dtype=dtype, rngs=rngs)
    for i in range(LEVELS):
      setattr(self, f'x{i}_0', block(in_channels if i == 0 else ch[i - 1], ch[i]))
    for j in range(1, DEPTH + 1):
      for i in range(LEVELS - j):
        setattr(self, f'up{i}_{j}', up_conv(ch[i + 1], ch[i], dtype=dtype, rngs=rngs))
        setattr(self, f'x{i}_{j}', block((j + 1) * ch[i], ch[i]))
    columns = range(1, DEPTH + 1) if deep_supervision else (DEPTH,)
    self.heads = nnx.List([output_conv(ch[0], 1, rngs=rngs) for _ in columns])

  def __call__(self, images: jax.Array) -> jax.Array:
    """images float[B, H, W, C] in [0, 1] or uint8, any H, W -> logits float32[B, H, W, D], D = 4 with deep
    supervision (columns 1..4), else 1."""
    x, (h, w) = prepare_input(images, self.dtype)
    nodes: dict[tuple[int, int], jax.Array] = {}
    for i in range(LEVELS):
      nodes[i, 0] = getattr(self, f'x{i}_0')(x if i == 0 else max_pool(nodes[i - 1, 0]))
    for j in range(1, DEPTH + 1):
      for i in range(LEVELS - j):
        up = getattr(self, f'up{i}_{j}')(nodes[i + 1, j - 1])
        nodes[i, j] = getattr(self, f'x{i}_{j}')(jnp.concatenate([up] + [nodes[i, k] for k in range(j)], -1))
    columns = range(1, DEPTH + 1) if self.deep_supervision else (DEPTH,)
    logits = [head(nodes[0, j].astype(jnp.float32)) for head, j in zip(self.heads, columns)]
    return jnp.concatenate(logits, axis=-1)[:, :h, :w]
