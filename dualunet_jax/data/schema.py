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
