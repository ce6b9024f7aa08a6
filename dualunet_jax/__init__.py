"""DualU-Net in JAX/Flax: one encoder, two U-Net decoders (class logits, centroid density)."""

__version__ = '0.1.0'
