"""The in-memory Python API (`dualunet_jax.Segmenter`): same nuclei as the file-based engine, any image size,
resampling to the model's µm/px, every method's maps."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
import ml_collections

import dualunet_jax
from dualunet_jax import inference
from dualunet_jax.data import synthetic

CLASS_NAMES = ('lymphocyte', 'epithelial', 'spindle')


def _config(mpp: float = 0.5) -> ml_collections.ConfigDict:
  from configs import default
  config = default.get_config()
  config.dataset.mpp = mpp
  config.dataset.class_names = CLASS_NAMES
  config.postprocess.workers = 1
  return config


def _darkness_predictor(images: np.ndarray) -> dict[str, np.ndarray]:
  """A deterministic stand-in model: dark pixels are nuclei (class by darkness band), the blurred darkness is
  the density. Pixel-local up to the blur, so tiles see the image as a whole image would away from borders."""
  dark = 1.0 - np.asarray(images, np.float32).mean(-1) / 255.0
  fg = dark > 0.5
  cls = np.where(dark > 0.62, 1, np.where(dark > 0.56, 2, 3)) * fg
  probs = np.eye(4, dtype=np.float32)[cls] * 0.9 + 0.025
  density = np.stack([ndi.gaussian_filter(d * f, 2.0) for d, f in zip(dark, fg)])
  return {'class_probs': probs, 'density': density[..., None]}


@pytest.fixture(scope='module')
def mosaic():
  tiles = [synthetic.render_tile(i, size=128, num_classes=3)['image'] for i in range(6)]
  return np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)])[:230, :350]


@pytest.mark.parametrize('mpp', [0.5, 0.25])
def test_segmenter_matches_the_file_engine(mosaic, tmp_path, mpp):
  # At 0.25 µm/px the image is the same tissue upsampled x2: both paths resample it to the model's 0.5.
  if mpp == 0.25:
    mosaic = np.repeat(np.repeat(mosaic, 2, 0), 2, 1)
  seg = dualunet_jax.Segmenter(_darkness_predictor, _config(), tile_size=128, overlap=32, batch_size=3)
  result = seg(mosaic, mpp=mpp)
  Image.fromarray(mosaic).save(tmp_path / 'mosaic.png')
  options = inference.Options(model_mpp=0.5, class_names=CLASS_NAMES, tile_size=128, overlap=32, batch_size=3,
                              workers=1, progress=False, formats=('maps', 'csv'))
  inference.predict([inference.InputSpec(tmp_path / 'mosaic.png', mpp=mpp)], _darkness_predictor,
                    tmp_path / 'out', options)
  engine_map = np.load(tmp_path / 'out' / 'mosaic_instances.npy')
  engine_classes = np.load(tmp_path / 'out' / 'mosaic_classes.npy')
  assert result.num_nuclei > 20  # several tiles' worth of nuclei, stitched
  np.testing.assert_array_equal(result.instance_map, engine_map)
  np.testing.assert_array_equal(result.class_map, engine_classes)
  assert result.instance_map.shape == mosaic.shape[:2] and result.instance_map.max() == result.num_nuclei
  assert sum(result.counts().values()) == result.num_nuclei and set(result.counts()) == set(CLASS_NAMES)
  # Per-nucleus probabilities: rows sum to 1 and the assigned class is the majority-vote one.
  np.testing.assert_allclose(result.class_probabilities.sum(1), 1.0, atol=1e-5)
  # Centroids lie inside the nuclei they describe.
  ys, xs = np.round(result.centroids).astype(int).T
  assert (result.instance_map[ys, xs] == np.arange(1, result.num_nuclei + 1)).mean() > 0.9


def test_segmenter_resampling_keeps_the_nuclei(mosaic):
  seg = dualunet_jax.Segmenter(_darkness_predictor, _config(mpp=0.5), tile_size=128, overlap=32)
  native = seg(mosaic, mpp=0.5)
  fine = seg(np.repeat(np.repeat(mosaic, 2, 0), 2, 1), mpp=0.25)  # the same tissue at 0.25 µm/px
  assert fine.instance_map.shape == (2 * mosaic.shape[0], 2 * mosaic.shape[1])
  # The x2 resampling smooths a little, so a few faint nuclei differ; the rest are where they were.
  assert abs(fine.num_nuclei - native.num_nuclei) <= 0.2 * native.num_nuclei
  d = np.linalg.norm(fine.centroids[:, None] / 2 - native.centroids[None], axis=-1).min(1)
  assert np.median(d) < 1.0
  with pytest.raises(ValueError, match='uint8'):
    seg(mosaic.astype(np.float32))


def test_segmenter_from_workdir_with_a_real_model(tmp_path):
  from dualunet_jax import checkpointing, models
  config = _config()
  config.model.width_multiplier = 0.125
  config.model.cardinality = 1
  model = models.fill_random(models.abstract_model(config.model, 3))
  checkpointing.save_model_checkpoint(tmp_path / 'w', config, model)
  seg = dualunet_jax.Segmenter.from_workdir(tmp_path / 'w', tile_size=64, overlap=16, tta_views=2)
  image = synthetic.render_tile(1, size=96, num_classes=3)['image'][:90, :70]
  result = seg(image)
  assert result.instance_map.shape == (90, 70) and result.class_names == CLASS_NAMES
  assert result.class_probabilities.shape == (result.num_nuclei, 4)
  assert result.centroids.shape == (result.num_nuclei, 2)


def test_stain_normalisation_undoes_a_darker_lab(mosaic, tmp_path):
  """Stain normalisation onto the training statistics, in the Segmenter and in the engine: a darker copy of the
  same tissue, normalised, gives about the nuclei of the original; unnormalised it does not (the stand-in model
  thresholds darkness, like a stain-sensitive network)."""
  from dualunet_jax.data import stain
  from dualunet_jax.robustness import scale_density
  stats = stain.fit_statistics([mosaic])
  darker = scale_density(mosaic, 1.7)
  plain = dualunet_jax.Segmenter(_darkness_predictor, _config(), tile_size=128, overlap=32)
  normed = dualunet_jax.Segmenter(_darkness_predictor, _config(), tile_size=128, overlap=32,
                                  stain_norm=stain.Normalizer('reinhard', stats))
  reference = plain(mosaic).num_nuclei
  assert abs(plain(darker).num_nuclei - reference) > 0.2 * reference
  assert abs(normed(darker).num_nuclei - reference) <= 0.2 * reference
  # The engine fits one mapping per input (on its thumbnail) and applies it to every tile.
  Image.fromarray(darker).save(tmp_path / 'darker.png')
  options = inference.Options(model_mpp=0.5, class_names=CLASS_NAMES, tile_size=128, overlap=32, workers=1,
                              progress=False, formats=('maps',), stain_norm=stain.Normalizer('reinhard', stats))
  inference.predict([inference.InputSpec(tmp_path / 'darker.png', mpp=0.5)], _darkness_predictor,
                    tmp_path / 'out', options)
  engine_count = int(np.load(tmp_path / 'out' / 'darker_instances.npy').max())
  assert abs(engine_count - reference) <= 0.2 * reference
