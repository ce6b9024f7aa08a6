"""Output formats: RFC 7946 structure and QuPath fields of the GeoJSON, CSV, maps, overlay, composition."""

import csv
import json
import numbers

import numpy as np
import pytest
from PIL import Image

from dualunet_jax import inference
from dualunet_jax.data import synthetic, targets

CLASS_NAMES = ('lymphocyte', 'epithelial', 'spindle')


def _position(p) -> None:
  assert isinstance(p, list) and len(p) in (2, 3), p
  assert all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in p), p


def _ring(ring) -> None:
  assert isinstance(ring, list) and len(ring) >= 4, 'a linear ring has >= 4 positions'
  for p in ring:
    _position(p)
  assert ring[0] == ring[-1], 'a linear ring is closed'


def validate_geometry(g: dict) -> None:
  """RFC 7946 §3.1 geometry objects (the types these exporters write, plus the simple others)."""
  assert isinstance(g, dict) and 'coordinates' in g, g
  t, c = g['type'], g['coordinates']
  if t == 'Point':
    _position(c)
  elif t in ('MultiPoint', 'LineString'):
    assert isinstance(c, list) and (t == 'MultiPoint' or len(c) >= 2)
    for p in c:
      _position(p)
  elif t == 'Polygon':
    assert isinstance(c, list) and c
    for ring in c:
      _ring(ring)
  elif t == 'MultiPolygon':
    for poly in c:
      for ring in poly:
        _ring(ring)
  else:
    raise AssertionError(f'unexpected geometry type {t}')


def validate_feature_collection(fc: dict) -> None:
  """RFC 7946 §3.2-3.3: FeatureCollection of Features with geometry and properties members."""
  assert fc['type'] == 'FeatureCollection' and isinstance(fc['features'], list)
  for f in fc['features']:
    assert f['type'] == 'Feature'
    assert 'geometry' in f and 'properties' in f
    assert f['properties'] is None or isinstance(f['properties'], dict)
    if 'id' in f:
      assert isinstance(f['id'], (str, numbers.Number))
    validate_geometry(f['geometry'])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 512x512 png at 0.25 µm/px (a 0.5 µm/px synthetic tile upsampled), tiled at the model's 0.5 µm/px."""
  tmp = tmp_path_factory.mktemp('export')
  rec = synthetic.render_tile(11, size=256, num_classes=3)
  Image.fromarray(rec['image']).resize((512, 512), Image.BILINEAR).save(tmp / 'tile.png')
  t = targets.make_targets(rec['instance_map'], rec['instance_classes'], sigma=4.0)
  oracle = inference.MapsPredictor({'tile': {'class_probs': np.eye(4, dtype=np.float32)[t['class_map']],
                                            'density': t['density'][..., None]}})
  opt = inference.Options(model_mpp=0.5, class_names=CLASS_NAMES, tile_size=128, overlap=32, batch_size=4,
                          workers=1, progress=False, formats=inference.FORMATS)
  summary = inference.predict([inference.InputSpec(tmp / 'tile.png', mpp=0.25)], oracle, tmp / 'out', opt)[0]
  return tmp / 'out', summary, rec


def test_geojson_is_valid_and_carries_qupath_fields(run):
  out, summary, _ = run
  fc = json.loads((out / 'tile.geojson').read_text())
  validate_feature_collection(fc)
  assert len(fc['features']) == summary['nuclei'] > 10
  colors = set()
  for f in fc['features']:
    assert f['geometry']['type'] == 'Polygon'
    props = f['properties']
    assert props['objectType'] == 'detection'
    cls = props['classification']
    assert cls['name'] in CLASS_NAMES
    assert len(cls['color']) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls['color'])
    colors.add((cls['name'], tuple(cls['color'])))
    ring = np.array(f['geometry']['coordinates'][0])
    assert (ring >= 0).all() and (ring <= 512).all()  # level-0 px of the 512-px input
    assert set(props['measurements']) == {'nucleus_id', 'area_um2', 'class_probability'}
  assert len({n for n, _ in colors}) == len(colors)  # one colour per class
  ids = [f['properties']['measurements']['nucleus_id'] for f in fc['features']]
  assert ids == list(range(1, len(ids) + 1))
  points = json.loads((out / 'tile_points.geojson').read_text())
  validate_feature_collection(points)
  assert sum(len(f['geometry']['coordinates']) for f in points['features']) == summary['nuclei']


def test_csv_maps_overlay_composition_agree(run):
  out, summary, rec = run
  rows = list(csv.DictReader(open(out / 'tile.csv')))
  assert list(rows[0]) == ['id', 'x', 'y', 'class', 'class_name', 'area_px', 'area_um2', 'probability']
  assert len(rows) == summary['nuclei']
  for r in rows:
    assert CLASS_NAMES[int(r['class']) - 1] == r['class_name']
    assert 0 < float(r['probability']) <= 1 and float(r['area_um2']) == pytest.approx(
        float(r['area_px']) * 0.25 ** 2, rel=0.01, abs=0.05)
  inst = np.load(out / 'tile_instances.npy')
  cls = np.load(out / 'tile_classes.npy')
  assert inst.shape == cls.shape == (512, 512) and inst.dtype == np.int32 and cls.dtype == np.uint8
  assert set(np.unique(inst)) - {0} <= set(range(1, len(rows) + 1))
  # Centroids (level-0 px) fall on their own instance in the map.
  hits = [inst[int(float(r['y'])), int(float(r['x']))] == int(r['id']) for r in rows]
  assert np.mean(hits) > 0.9
  assert Image.open(out / 'tile_overlay.png').size == (512, 512)
  comp = json.loads((out / 'tile_composition.json').read_text())
  assert comp['total'] == len(rows)
  assert sum(c['count'] for c in comp['classes'].values()) == len(rows)
  assert sum(c['fraction'] for c in comp['classes'].values()) == pytest.approx(1.0, abs=1e-5)
  table = list(csv.DictReader(open(out / 'composition.csv')))
  assert table[0]['image'] == 'tile' and int(table[0]['total']) == len(rows)


def test_unclassified_nuclei_are_named_not_mislabelled(tmp_path):
  """A class-0 nucleus (HoVer-Net's type vote can return background) is exported as 'unclassified', never as
  the last class (class_names[-1])."""
  from dualunet_jax.inference import exporters, tiling
  res = tiling.empty_result()
  ring = np.array([[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]], np.float32)
  res.update({'y': np.array([1.0, 5.0]), 'x': np.array([1.0, 5.0]), 'cls': np.array([0, 2], np.int32),
              'area': np.array([4, 4], np.int32), 'prob': np.array([0.6, 0.9], np.float32),
              'class_probs': np.zeros((2, 4), np.float32), 'bbox': np.zeros((2, 4), np.int32),
              'poly': np.concatenate([ring, ring + 4]), 'poly_len': np.array([5, 5], np.int32),
              'mask_len': np.zeros(2, np.int32)})
  chunks = lambda: iter([(np.array([1, 2]), res)])
  names = ('lymphocyte', 'epithelial', 'spindle')
  exporters.write_csv(tmp_path / 'n.csv', chunks, names, 1.0, 0.5)
  rows = list(csv.DictReader(open(tmp_path / 'n.csv')))
  assert [r['class_name'] for r in rows] == ['unclassified', 'epithelial']
  for points in (False, True):
    exporters.write_geojson(tmp_path / 'n.geojson', chunks, names, 1.0, 0.5, points=points)
    fc = json.loads((tmp_path / 'n.geojson').read_text())
    validate_feature_collection(fc)
    assert {f['properties']['classification']['name'] for f in fc['features']} == {'unclassified', 'epithelial'}
