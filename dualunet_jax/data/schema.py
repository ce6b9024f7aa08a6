"""The one record layout every dataset in this package produces.

Each builder (PanNuke, CoNSeP, Lizard, CoNIC, MoNuSeg, user folders, synthetic) yields records with these
keys, so the pipeline, the targets, the evaluation and the oracle need to know nothing about the source:

    image             uint8[H, W, 3]  RGB
    instance_map      int32[H, W]     0 = background, nuclei numbered 1..N (contiguous)
    instance_classes  int32[N]        class of nucleus i + 1, in 1..K (0 = unlabelled, ignored by class metrics)
    name              str             source file / tile name, for reports
    tissue            str             tissue type where the dataset has one (PanNuke), else ''
    mpp               float32         microns per pixel of the stored image (0 if unknown)
"""

IMAGE = 'image'
INSTANCE_MAP = 'instance_map'
INSTANCE_CLASSES = 'instance_classes'
NAME = 'name'
TISSUE = 'tissue'
MPP = 'mpp'

KEYS = (IMAGE, INSTANCE_MAP, INSTANCE_CLASSES, NAME, TISSUE, MPP)


def tfds_features():
  """The TFDS feature spec of a record. Tensor/Text/Scalar features encode and decode without TensorFlow
  (checked with tensorflow-datasets 4.9.10 and TensorFlow absent); `name` and `tissue` decode to bytes."""
  import numpy as np
  import tensorflow_datasets as tfds

  return tfds.features.FeaturesDict({
      IMAGE: tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
      INSTANCE_MAP: tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding='zlib'),
      INSTANCE_CLASSES: tfds.features.Tensor(shape=(None,), dtype=np.int32),
      NAME: tfds.features.Text(),
      TISSUE: tfds.features.Text(),
      MPP: tfds.features.Scalar(dtype=np.float32),
  })


def decode_text(value) -> str:
  """`name` / `tissue` as str whether the source gives bytes (TFDS) or str (in-memory records)."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
