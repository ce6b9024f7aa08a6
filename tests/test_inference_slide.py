"""Whole-slide path: a synthetic pyramidal TIFF through OpenSlide (and the tifffile fallback), resolution
handling, tissue detection, level-0 coordinates of the exported nuclei."""

import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from dualunet_jax import inference
from dualunet_jax.data import synthetic
from dualunet_jax.inference import slide as slide_lib

LEVEL0_MPP = 0.25  # the slide; the model runs at 0.5 µm/px, so model px = 2 level-0 px
MODEL_MPP = 0.5
SIDE = 2048
PASTE = (1200, 700)  # level-0 (y, x) of the tissue patch (512x512 level-0 px)


@pytest.fixture(scope='module')
def tissue():
  """A synthetic 256x256 tile at 0.5 µm/px with its labels."""
  return synthetic.render_tile(3, size=256, num_classes=3)


def _level0(rec) -> np.ndarray:
  img = np.full((SIDE, SIDE, 3), 255, np.uint8)
  y, x = PASTE
  img[y:y + 512, x:x + 512] = np.asarray(Image.fromarray(rec['image']).resize((512, 512), Image.BILINEAR))
  return img


@pytest.fixture(scope='module')
def pyramid(tmp_path_factory, tissue):
  """2048^2 level 0 (0.25 µm/px, tiled, deflate) + a 1024^2 level 1, resolution tags in centimetres."""
  path = tmp_path_factory.mktemp('slide') / 'slide.tif'
  img = _level0(tissue)
  with tifffile.TiffWriter(path) as tw:
    for level, mpp in ((img, LEVEL0_MPP), (img[::2, ::2], 2 * LEVEL0_MPP)):
      tw.write(level, tile=(256, 256), photometric='rgb', compression='zlib', resolution=(1e4 / mpp, 1e4 / mpp),
               resolutionunit='CENTIMETER', subfiletype=0 if mpp == LEVEL0_MPP else 1)
  return path


def _oracle(rec, name: str) -> inference.MapsPredictor:
  """Ground-truth maps at the model's resolution: the 0.5 µm/px tile placed where it was pasted."""
  from dualunet_jax.data import targets
  t = targets.make_targets(rec['instance_map'], rec['instance_classes'], sigma=4.0)
  cls = np.zeros((SIDE // 2, SIDE // 2), np.int32)
  dens = np.zeros((SIDE // 2, SIDE // 2), np.float32)
  y, x = PASTE[0] // 2, PASTE[1] // 2
  cls[y:y + 256, x:x + 256] = t['class_map']
  dens[y:y + 256, x:x + 256] = t['density']
  return inference.MapsPredictor({name: {'class_probs': np.eye(4, dtype=np.float32)[cls], 'density': dens[..., None]}})


def _options(**kw) -> inference.Options:
  base = dict(model_mpp=MODEL_MPP, class_names=('lymphocyte', 'epithelial', 'spindle'), tile_size=256,
              overlap=32, batch_size=4, workers=1, progress=False)
  return inference.Options(**{**base, **kw})


def test_openslide_reads_pyramid_with_mpp(pyramid):
  src = slide_lib.open_source(pyramid)
  try:
    assert src.kind == 'openslide' and src.is_slide
    assert src.mpp == pytest.approx(LEVEL0_MPP)
    assert (src.width, src.height) == (SIDE, SIDE) and src.level_downsamples == (1.0, 2.0)
    view = slide_lib.ModelView(src, slide_lib.resolve_mpp(src, MODEL_MPP), MODEL_MPP)
    assert view.scale == 2.0 and view.level == 1 and (view.height, view.width) == (1024, 1024)
    window = view.read(-10, -10, 64, 64)  # partly outside: reflected, no transparency
    assert window.shape == (64, 64, 3) and window.dtype == np.uint8 and (window == 255).all()
    # The override wins over the file's value.
    assert slide_lib.resolve_mpp(src, MODEL_MPP, 0.3) == 0.3
    # Tissue detection: the pasted patch, not the glass.
    mask = slide_lib.tissue_mask(src.thumbnail(256))
    h = mask.shape[0]
    assert mask.mean() < 0.15
    y, x = (np.array(PASTE) + 256) * h // SIDE
    assert mask[y, x] and not mask[h // 10, h // 10]
  finally:
    src.close()


def test_slide_end_to_end_skips_background_and_exports_level0(pyramid, tissue, tmp_path):
  opt = _options(formats=('geojson', 'geojson_points', 'csv', 'maps', 'overlay', 'composition'))
  summary = inference.predict([pyramid], _oracle(tissue, 'slide'), tmp_path, opt)[0]
  grid_tiles = 5 * 5
  assert 4 <= summary['tiles'] <= 12 < grid_tiles  # tissue detection skipped the white glass
  n_gt = int(tissue['instance_map'].max())
  assert 0.85 * n_gt <= summary['nuclei'] <= 1.05 * n_gt

  # Centroids are level-0 px: compare with the ground truth (0.5 µm/px tile centroids * 2 + paste offset).
  from dualunet_jax.data import targets
  gt = (targets.instance_centroids(tissue['instance_map']) + 0.5) * 2 + np.array(PASTE)  # (y, x)
  rows = list(csv.DictReader(open(tmp_path / 'slide.csv')))
  assert len(rows) == summary['nuclei']
  pred = np.array([[float(r['y']), float(r['x'])] for r in rows])
  from scipy.spatial import cKDTree
  dist, _ = cKDTree(gt).query(pred)
  # Isolated nuclei come back exactly (any half-pixel, scale or offset error in the mapping would break
  # that); the watershed's 2-px cut between touching nuclei moves the others' centroids a little.
  assert (dist < 0.05).mean() > 0.2 and (dist < 4).mean() > 0.8

  gj = json.loads((tmp_path / 'slide.geojson').read_text())
  assert gj['type'] == 'FeatureCollection' and len(gj['features']) == summary['nuclei']
  ring = np.array(gj['features'][0]['geometry']['coordinates'][0])
  assert PASTE[1] <= ring[:, 0].min() and ring[:, 0].max() <= PASTE[1] + 512
  points = json.loads((tmp_path / 'slide_points.geojson').read_text())
  assert sum(len(f['geometry']['coordinates']) for f in points['features']) == summary['nuclei']
  assert {f['geometry']['type'] for f in points['features']} == {'MultiPoint'}

  with tifffile.TiffFile(tmp_path / 'slide_instances.tif') as tif:
    page = tif.pages[0]
    assert page.is_tiled and page.shape == (1024, 1024) and page.dtype == np.int32
    inst = page.asarray()
  assert len(np.unique(inst)) - 1 == summary['nuclei']
  with tifffile.TiffFile(tmp_path / 'slide_classes.tif') as tif:
    assert set(np.unique(tif.pages[0].asarray())) <= {0, 1, 2, 3}
  assert Image.open(tmp_path / 'slide_overlay.png').size[0] <= 4096
  comp = json.loads((tmp_path / 'slide_composition.json').read_text())
  assert comp['total'] == summary['nuclei'] and comp['mpp'] == pytest.approx(LEVEL0_MPP)
  assert (tmp_path / 'composition.csv').read_text().splitlines()[1].startswith('slide,')


def test_tifffile_fallback_for_strip_tiff(tmp_path, tissue):
  path = tmp_path / 'strips.tif'
  tifffile.imwrite(path, _level0(tissue), photometric='rgb', resolution=(1e4 / LEVEL0_MPP, 1e4 / LEVEL0_MPP),
                   resolutionunit='CENTIMETER')
  src = slide_lib.open_source(path)
  assert src.kind == 'tifffile' and src.mpp == pytest.approx(LEVEL0_MPP) and not src.is_slide
  src.close()
  summary = inference.predict([path], _oracle(tissue, 'strips'), tmp_path / 'out',
                              _options(formats=('csv',), tissue='on'))[0]
  assert summary['tiles'] < 25 and summary['nuclei'] >= 0.85 * tissue['instance_map'].max()


def test_slide_without_mpp_is_a_clear_error(tmp_path):
  path = tmp_path / 'nompp.tif'
  img = np.full((512, 512, 3), 200, np.uint8)
  with tifffile.TiffWriter(path) as tw:
    tw.write(img, tile=(256, 256), photometric='rgb')
    tw.write(img[::2, ::2], tile=(256, 256), photometric='rgb', subfiletype=1)
  with pytest.raises(inference.InputError, match=r'nompp\.tif: the slide has no resolution.*--mpp'):
    inference.predict([path], inference.MapsPredictor({}), tmp_path / 'o', _options())
