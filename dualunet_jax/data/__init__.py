"""Datasets (TFDS builders without TensorFlow), targets, augmentation and the input pipeline."""
