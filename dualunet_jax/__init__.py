"""Nucleus detection, classification and segmentation in JAX/Flax: DualU-Net (one encoder, two U-Net
decoders) and the methods it is measured against, from tiles to whole slides.

    seg = dualunet_jax.Segmenter.from_workdir('workdirs/consep')
    result = seg(image, mpp=0.25)   # instance map, classes, centroids, class probabilities
"""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy: `import dualunet_jax` stays light (worker processes import submodules without JAX).
  if name in ('Segmenter', 'Segmentation'):
    from dualunet_jax import segmenter
    return getattr(segmenter, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
