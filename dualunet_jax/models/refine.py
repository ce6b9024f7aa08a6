"""The enhancement network of the two-stage method (seed 003, `../shared/reference/seed_systems.md` §D).

A small fully convolutional network that sees the image again together with a stage-1 foreground
probability and predicts a refined foreground:

  input  = [RGB scaled to [0, 1], stage-1 foreground probability]      4 channels
  3 x (conv 3x3, 64 filters, SAME, ReLU), no downsampling
  output = conv 1x1 -> 1 logit (the paper's sigmoid is applied by the caller)

Parameters: 4*9*64 + 64 + 2 * (64*9*64 + 64) + 64 + 1 = 76,289 (tested).

Why logits and not probabilities: the training loss is BCE, and BCE from logits (log-sigmoid,
`optax.sigmoid_binary_cross_entropy`) is exact for confident pixels, where log(sigmoid(z)) of a float32
probability saturates to log(0) or log(1) and loses the gradient. The refinement stage (refinement.py)
applies `jax.nn.sigmoid` wherever a probability is needed.

The receptive field is 7x7 pixels: the network can only sharpen, fill or trim the stage-1 mask using local
colour, which is what the paper proposes (cheap, model-agnostic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURES = 64
NUM_CONVS = 3
IN_CHANNELS = 4  # RGB + stage-1 foreground probability


class EnhancementNet(nnx.Module):
  """Refined foreground logits from an image and a stage-1 foreground probability.

  Args:
    features: filters of the 3x3 convolutions (64 = the paper).
    num_convs: number of 3x3 convolutions (3 = the paper).
    dtype: compute dtype of the 3x3 convolutions; parameters float32, the 1x1 output in float32.
  """

  def __init__(self, *, features: int = FEATURES, num_convs: int = NUM_CONVS, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    # He uniform for the ReLU layers (the paper does not give its initialisation).
    init = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
    self.convs = nnx.List([
        nnx.Conv(IN_CHANNELS if i == 0 else features, features, (3, 3), padding='SAME', kernel_init=init,
                 dtype=dtype, param_dtype=jnp.float32, rngs=rngs) for i in range(num_convs)])
    self.out = nnx.Conv(features, 1, (1, 1), kernel_init=jax.nn.initializers.glorot_uniform(),
                        dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, images: jax.Array, foreground: jax.Array) -> jax.Array:
    """Refined logits.

    Args:
      images: uint8[B, H, W, 3] (0..255) or float[B, H, W, 3] already in [0, 1].
      foreground: float[B, H, W] (or [B, H, W, 1]) stage-1 foreground probability in [0, 1].
    Returns:
      float32[B, H, W] logits; sigmoid gives the refined foreground probability.
    """
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x / 255.0
    fg = foreground.astype(jnp.float32)
    if fg.ndim == 3:
      fg = fg[..., None]
    if x.shape[:3] != fg.shape[:3]:
      raise ValueError(f'image {x.shape} and foreground {fg.shape} differ in batch or size')
    x = jnp.concatenate([x, fg], axis=-1).astype(self.dtype)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.out(x.astype(jnp.float32))[..., 0]
