"""Engine: resume after interruption, TTA de-augmentation, checkpoint ensembles, bad inputs."""

import json
import pathlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from dualunet_jax import inference
from dualunet_jax.data import synthetic, targets
from dualunet_jax.inference import engine, slide

CLASS_NAMES = ('lymphocyte', 'epithelial', 'spindle')


def _options(**kw) -> inference.Options:
  base = dict(model_mpp=0.5, class_names=CLASS_NAMES, tile_size=128, overlap=32, batch_size=3, workers=1,
              progress=False, formats=('geojson', 'csv', 'maps', 'overlay', 'composition'), predictor_id='oracle')
  return inference.Options(**{**base, **kw})


class CountingOracle(inference.MapsPredictor):
  def __init__(self, maps):
    super().__init__(maps)
    self.windows = 0

  def __call__(self, images, windows):
    self.windows += len(windows)
    return super().__call__(images, windows)


@pytest.fixture(scope='module')
def tile(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('resume')
  rec = synthetic.render_tile(5, size=384, num_classes=3)
  Image.fromarray(rec['image']).save(tmp / 'tile.png')
  t = targets.make_targets(rec['instance_map'], rec['instance_classes'], sigma=4.0)
  return tmp / 'tile.png', {'tile': {'class_probs': np.eye(4, dtype=np.float32)[t['class_map']],
                                     'density': t['density'][..., None]}}


def _outputs(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_after_interruption_gives_identical_outputs(tile, tmp_path):
  path, maps = tile
  spec = inference.InputSpec(path, mpp=0.5)
  inference.predict([spec], inference.MapsPredictor(maps), tmp_path / 'full', _options())
  full = _outputs(tmp_path / 'full')
  assert {'tile.geojson', 'tile.csv', 'tile_instances.npy', 'tile_classes.npy', 'tile_overlay.png',
          'tile_composition.json', 'composition.csv'} == set(full)

  out = tmp_path / 'resumed'
  with pytest.raises(inference.StopRun):
    inference.predict([spec], inference.MapsPredictor(maps), out, _options(), stop_after_rows=2)
  manifest = json.loads((out / engine.WORK_DIR / 'tile' / 'manifest.json').read_text())
  assert sorted(manifest['rows']) == ['0', '1'] and not manifest.get('finished')
  assert not (out / 'tile.geojson').exists()

  oracle = CountingOracle(maps)  # the rerun uses the process pool: same results either way
  inference.predict([spec], oracle, out, _options(workers=2))
  assert oracle.windows == 8  # 4x4 grid: only rows 2 and 3 were redone
  assert _outputs(out) == full

  again = CountingOracle(maps)  # a finished input is skipped, outputs untouched
  inference.predict([spec], again, out, _options())
  assert again.windows == 0 and _outputs(out) == full
  # Different settings never reuse stale shards.
  other = CountingOracle(maps)
  inference.predict([spec], other, out, _options(overlap=16))
  assert other.windows == 16


class _Pixelwise:
  """Builds a per-pixel nnx model (equivariant to flips/rotations, so TTA must not change its output)."""

  @staticmethod
  def make(seed: int):
    from flax import nnx

    class Pixelwise(nnx.Module):

      def __init__(self, rngs):
        self.cls = nnx.Linear(3, 4, rngs=rngs)
        self.den = nnx.Linear(3, 1, rngs=rngs)

      def __call__(self, x):
        x = x.astype('float32') / 255.0
        return self.cls(x) * 3.0, self.den(x)[..., 0]

    return Pixelwise(nnx.Rngs(seed))


def _pd(maps):
  """DualU-Net maps -> (class_probs [B, H, W, K+1], density [B, H, W])."""
  return maps['class_probs'], maps['density'][..., 0]


def test_tta_views_are_de_augmented_and_ensembles_average():
  rng = np.random.default_rng(0)
  for shape, views in (((2, 24, 24, 3), 8), ((2, 16, 40, 3), 4)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    model = _Pixelwise.make(0)
    p1, d1 = _pd(engine.model_predictor([model], probs_dtype='float32')(images))
    pt, dt = _pd(engine.model_predictor([model], tta_views=views, probs_dtype='float32')(images))
    np.testing.assert_allclose(np.asarray(pt), np.asarray(p1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dt), np.asarray(d1), atol=1e-5)
    assert np.asarray(p1).shape == shape[:3] + (4,) and np.asarray(d1).shape == shape[:3]
  other = _Pixelwise.make(1)
  p2, d2 = _pd(engine.model_predictor([other], probs_dtype='float32')(images))
  pe, de = _pd(engine.model_predictor([model, other], probs_dtype='float32')(images))
  np.testing.assert_allclose(np.asarray(pe), (np.asarray(p1) + np.asarray(p2)) / 2, atol=1e-5)
  np.testing.assert_allclose(np.asarray(de), (np.asarray(d1) + np.asarray(d2)) / 2, atol=1e-5)
  with pytest.raises(ValueError, match='tta_views'):
    engine.model_predictor([model], tta_views=3)


def test_predictor_splits_batches_over_devices():
  """4 simulated CPU devices (conftest) give the single-device outputs, also for a batch that needs padding."""
  import jax
  import ml_collections
  from dualunet_jax import models
  if jax.local_device_count() < 4:
    pytest.skip('needs 4 local devices (tests/conftest.py sets XLA_FLAGS for 4 CPU devices)')
  config = ml_collections.ConfigDict({'encoder': 'resnext50_32x4d', 'width_multiplier': 0.125, 'dtype': 'float32'})
  model = models.fill_random(models.abstract_model(config, 3))
  model.eval()
  images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  one = engine.model_predictor([model], probs_dtype='float32', devices=jax.local_devices()[:1])
  four = engine.model_predictor([model], probs_dtype='float32')
  assert (one.num_devices, four.num_devices) == (1, 4)
  assert len(four(images)['class_probs'].sharding.device_set) == 4  # a full batch: one tile per device
  images = images[:3]
  p1, d1 = _pd(one(images))
  p4, d4 = _pd(four(images))  # 3 tiles over 4 devices: one padded copy, cut off again
  assert p4.shape == (3, 64, 64, 4) and d4.shape == (3, 64, 64)
  # Per-device batches of 1 vs 3 run different XLA convolution kernels (summation order): float32 rounding,
  # amplified by random untrained weights, moves probabilities by ~2e-4.
  np.testing.assert_allclose(np.asarray(p4), np.asarray(p1), atol=1e-3)
  np.testing.assert_allclose(np.asarray(d4), np.asarray(d1), atol=1e-3 * float(np.abs(d1).max()))
  assert (np.asarray(p4).argmax(-1) == np.asarray(p1).argmax(-1)).mean() > 0.999


def _background(images):
  probs = np.zeros(images.shape[:3] + (4,), np.float32)
  probs[..., 0] = 1
  return {'class_probs': probs, 'density': np.zeros(images.shape[:3] + (1,), np.float32)}


def test_bad_inputs_give_one_clear_message(tmp_path):
  (tmp_path / 'corrupt.png').write_bytes(b'not a png at all' * 20)
  (tmp_path / 'corrupt.svs').write_bytes(b'not a slide' * 20)
  (tmp_path / 'notes.txt').write_text('hello')
  Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / 'gray.png')
  cases = {'corrupt.png': 'cannot decode image', 'corrupt.svs': 'OpenSlide does not recognise',
           'notes.txt': 'unsupported file type', 'gray.png': 'grayscale', 'missing.png': 'no such file'}
  for name, what in cases.items():
    with pytest.raises(slide.InputError) as e:
      slide.open_source(tmp_path / name)
    message = str(e.value)
    assert message.startswith(str(tmp_path / name)) and what in message and '\n' not in message
  # Through the engine the same error surfaces unchanged.
  with pytest.raises(slide.InputError, match='gray.png: grayscale'):
    inference.predict([tmp_path / 'gray.png'], _background, tmp_path / 'out', _options())


def test_rgba_and_16bit_are_accepted(tmp_path):
  rgba = np.full((50, 60, 4), 200, np.uint8)
  rgba[..., 3] = 0  # fully transparent: alpha is dropped (documented), the colour is kept
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  tifffile.imwrite(tmp_path / 'deep.tif', np.full((50, 60, 3), 51400, np.uint16), photometric='rgb')
  src = slide.open_source(tmp_path / 'rgba.png')
  assert src.read(0, 0, 0, 60, 50).shape == (50, 60, 3) and (src.read(0, 0, 0, 60, 50) == 200).all()
  deep = slide.open_source(tmp_path / 'deep.tif')
  assert (deep.read(0, 0, 0, 60, 50) == 200).all()
  with pytest.warns(UserWarning, match='no µm/px'):
    slide._warned_mpp = False
    out = inference.predict([tmp_path / 'rgba.png', tmp_path / 'deep.tif'], _background, tmp_path / 'out',
                            _options())
  assert [s['nuclei'] for s in out] == [0, 0]
  assert np.load(tmp_path / 'out' / 'deep_instances.npy').shape == (50, 60)
