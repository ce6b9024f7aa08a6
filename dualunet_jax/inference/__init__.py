"""Whole-image and whole-slide inference: tiling and stitching, slide readers, exporters, the engine.

    from dualunet_jax import inference
    predictor, config, identity = inference.checkpoint_predictor(['workdirs/consep'], tta_views=4)
    options = inference.Options(model_mpp=config.dataset.mpp, class_names=tuple(config.dataset.class_names),
                                postprocess=postprocess.from_config(config.postprocess), predictor_id=identity)
    inference.predict(['slide.svs', 'tile.png'], predictor, 'out/', options)

No JAX import here: worker processes import `tiling` through this package.
"""

from dualunet_jax.inference.engine import checkpoint_predictor
from dualunet_jax.inference.engine import InputSpec
from dualunet_jax.inference.engine import MapsPredictor
from dualunet_jax.inference.engine import model_predictor
from dualunet_jax.inference.engine import Options
from dualunet_jax.inference.engine import predict
from dualunet_jax.inference.engine import StopRun
from dualunet_jax.inference.engine import Window
from dualunet_jax.inference.exporters import FORMATS
from dualunet_jax.inference.slide import InputError
from dualunet_jax.inference.slide import open_source
from dualunet_jax.inference.tiling import TileGrid

__all__ = ['FORMATS', 'InputError', 'InputSpec', 'MapsPredictor', 'Options', 'StopRun', 'TileGrid', 'Window',
           'checkpoint_predictor', 'model_predictor', 'open_source', 'predict']
