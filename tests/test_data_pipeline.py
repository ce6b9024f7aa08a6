"""Host input pipeline: crops, targets, deterministic/resumable train order, global sharded batches, eval."""

import itertools

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import default
from dualunet_jax.data import pipeline, targets


def _config(**dataset):
  cfg = default.get_config()
  cfg.seed = 3
  cfg.dataset.num_classes = 3
  cfg.dataset.crop_size = 0
  cfg.dataset.num_workers = 0
  cfg.dataset.prefetch = 2
  cfg.targets.sigma = 2.0
  cfg.train.batch_size = 8
  cfg.dataset.update(dataset)
  return cfg


def _record(index: int, size=(32, 32), n: int = 6, seed: int = 0, classes=None) -> dict:
  """Image red = row, green = column, blue = record index (position and identity readable from pixels)."""
  rng = np.random.default_rng([seed, index])
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  image = np.stack([yy % 256, xx % 256, np.full((h, w), index % 256)], -1).astype(np.uint8)
  inst = np.zeros(size, np.int32)
  for i in range(n):
    y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
    inst[y:y + 4, x:x + 4] = i + 1
  inst, _ = targets.relabel_contiguous(inst)
  m = int(inst.max())
  cls = rng.integers(1, 4, m).astype(np.int32) if classes is None else np.asarray(classes[:m], np.int32)
  return {'image': image, 'instance_map': inst, 'instance_classes': cls, 'name': f'r{index}', 'tissue': '',
          'mpp': np.float32(0.5)}


def _records(n: int, **kw) -> list[dict]:
  return [_record(i, **kw) for i in range(n)]


def _take(it, n):
  return [jax.device_get(b) for b in itertools.islice(it, n)]


def test_train_transform_crop_shapes_and_targets():
  cfg = _config(crop_size=16)
  t = pipeline.TrainTransform(cfg)
  rec = _record(0, size=(40, 50), n=12)
  offsets = []
  for i in range(200):
    out = t(rec, epoch=i, index=0)
    assert out['image'].shape == (16, 16, 3) and out['image'].dtype == np.uint8
    assert out['class_map'].dtype == np.int32 and out['instance_map'].dtype == np.int32
    assert out['density'].dtype == np.float32 and out['density'].shape == (16, 16)
    y0, x0 = int(out['image'][0, 0, 0]), int(out['image'][0, 0, 1])
    np.testing.assert_array_equal(out['image'], rec['image'][y0:y0 + 16, x0:x0 + 16])
    offsets.append((y0, x0))
    # Targets are those of the relabelled crop: centroids of the visible parts of cut nuclei.
    ref = targets.make_targets(*_relabel(rec, y0, x0, 16), sigma=2.0, centroid='mass')
    np.testing.assert_array_equal(out['class_map'], ref['class_map'])
    np.testing.assert_allclose(out['density'], ref['density'], atol=1e-6)
    ids = np.unique(out['instance_map'])
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # contiguous 0..M
  ys, xs = np.array(offsets).T  # offsets span the whole tile: every row and column gets covered
  assert set(ys) == set(range(40 - 16 + 1)) and set(xs) == set(range(50 - 16 + 1))
  a, b = t(rec, epoch=1, index=5), t(rec, epoch=1, index=5)
  np.testing.assert_array_equal(a['image'], b['image'])


def _relabel(rec, y0, x0, c):
  inst, old = targets.relabel_contiguous(rec['instance_map'][y0:y0 + c, x0:x0 + c])
  return inst, rec['instance_classes'][old - 1]


def test_small_tile_is_padded():
  cfg = _config(crop_size=48)
  rec = _record(0, size=(30, 40))
  out = pipeline.TrainTransform(cfg)(rec)
  assert out['image'].shape == (48, 48, 3)
  np.testing.assert_array_equal(out['image'][:30, :40], rec['image'])
  np.testing.assert_array_equal(out['image'][30:32, :40], rec['image'][28:26:-1])  # reflect
  assert not out['class_map'][30:].any() and not out['instance_map'][:, 40:].any()


def test_resize_parity_mode_window_equals_full_resize():
  cfg = _config(crop_size=24, resize=40)
  rec = _record(1, size=(32, 32))
  out = pipeline.TrainTransform(cfg)(rec, epoch=0, index=1)
  full_img = pipeline.resize_image(rec['image'], (40, 40))
  full_inst = pipeline.resize_map(rec['instance_map'], (40, 40))
  hits = [(y, x) for y in range(17) for x in range(17) if np.array_equal(full_img[y:y + 24, x:x + 24],
                                                                            out['image'])]
  assert hits
  y, x = hits[0]
  inst, _ = targets.relabel_contiguous(full_inst[y:y + 24, x:x + 24])
  np.testing.assert_array_equal(out['instance_map'], inst)


def test_train_loader_global_sharded_batches_and_order():
  cfg = _config()
  source = _records(20)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  it = pipeline.train_loader(cfg, source, mesh=mesh)
  first = next(it)
  assert first['image'].shape == (8, 32, 32, 3) and first['density'].shape == (8, 32, 32)
  assert first['image'].sharding.is_equivalent_to(NamedSharding(mesh, P('data')), 4)
  assert len(first['image'].addressable_shards) == 4
  assert all(s.data.shape == (2, 32, 32) for s in first['class_map'].addressable_shards)
  batches = [jax.device_get(first)] + _take(it, 5)
  ids = [b['image'][:, 0, 0, 2] for b in batches]
  assert pipeline.steps_per_epoch(cfg, source) == 2  # 20 // 8, the remainder dropped
  for e in range(3):
    epoch_ids = np.concatenate(ids[2 * e:2 * e + 2])
    assert len(set(epoch_ids.tolist())) == 16  # no repeats within a pass
  assert not np.array_equal(np.concatenate(ids[0:2]), np.concatenate(ids[2:4]))  # reshuffled per epoch
  again = _take(pipeline.train_loader(cfg, source, mesh=mesh), 6)
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  cfg.seed = 4
  other = _take(pipeline.train_loader(cfg, source, mesh=mesh), 2)
  assert not np.array_equal(other[0]['image'], batches[0]['image'])


def test_resume_equals_uninterrupted_run():
  cfg = _config(crop_size=16)
  source = _records(20)
  full = _take(pipeline.train_loader(cfg, source), 7)
  resumed = _take(pipeline.train_loader(cfg, source, start_step=3), 4)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_resume_does_not_read_skipped_records():
  cfg = _config()

  class Counting(list):
    reads = 0

    def __getitem__(self, i):
      Counting.reads += 1
      return super().__getitem__(i)

  source = Counting(_records(16))
  _take(pipeline.train_loader(cfg, source, start_step=1000), 1)
  assert Counting.reads <= 6 * 8  # a few batches (device look-ahead, prefetch), never 8000 skipped ones


def test_workers_give_the_same_batches():
  cfg = _config(crop_size=16, num_workers=2)
  source = _records(16)
  mp = _take(pipeline.train_loader(cfg, source, start_step=2), 3)
  cfg.dataset.num_workers = 0
  inproc = _take(pipeline.train_loader(cfg, source, start_step=2), 3)
  for a, b in zip(mp, inproc):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_class_balanced_sampling_oversamples_rare_class():
  # One tile: 15 nuclei of class 1 spread around, one class-3 nucleus in a corner.
  inst = np.zeros((96, 96), np.int32)
  k = 0
  for y in range(8, 90, 20):
    for x in range(8, 90, 24):
      if k < 15:
        k += 1
        inst[y:y + 5, x:x + 5] = k
  inst[90:95, 2:7] = 16
  classes = np.array([1] * 15 + [3], np.int32)
  rec = {'image': np.zeros((96, 96, 3), np.uint8), 'instance_map': inst, 'instance_classes': classes}

  def rare_rate(balanced):
    t = pipeline.TrainTransform(_config(crop_size=24, class_balanced_sampling=balanced))
    return np.mean([(t(rec, epoch=e, index=0)['class_map'] == 3).any() for e in range(300)])

  uniform, balanced = rare_rate(False), rare_rate(True)
  assert uniform < 0.15
  assert balanced > 0.4 and balanced > 3 * uniform


def test_eval_batches_mixed_sizes_each_image_once():
  cfg = _config()
  sizes = [(32, 32), (32, 32), (24, 40), (32, 32), (24, 40), (24, 40), (24, 40), (32, 32)]
  source = [_record(i, size=s) for i, s in enumerate(sizes)]
  seen = []
  for batch, records in pipeline.eval_batches(cfg, source, batch_size=3):
    b = jax.device_get(batch)
    assert b['image'].shape[0] == 4  # 3 rounded up to the 4 devices
    valid = b['valid']
    assert valid.sum() == len(records) and valid[:len(records)].all()
    for row, rec in zip(b['image'][valid], records):
      np.testing.assert_array_equal(row, rec['image'])
    assert not b['image'][~valid].any()
    seen += [r['name'] for r in records]
  assert seen == [r['name'] for r in source]


def test_too_small_source_raises():
  with pytest.raises(pipeline.PipelineError):
    pipeline.steps_per_epoch(_config(), _records(5))


def test_resize_matches_torch():
  torch = pytest.importorskip('torch')
  img = np.random.default_rng(0).integers(0, 256, (50, 50, 3)).astype(np.uint8)
  inst = np.random.default_rng(1).integers(0, 9, (50, 50)).astype(np.int32)
  t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
  for dst in (64, 40):
    ref = torch.nn.functional.interpolate(t, size=(dst, dst), mode='bicubic', antialias=True,
                                          align_corners=False)
    ref = np.clip(ref[0].permute(1, 2, 0).numpy(), 0, 255)
    assert np.abs(pipeline.resize_image(img, (dst, dst)) - ref).max() <= 0.5 + 1e-3  # uint8 rounding only
    ref_map = torch.nn.functional.interpolate(torch.from_numpy(inst)[None, None].float(), size=(dst, dst),
                                              mode='nearest')[0, 0].numpy().astype(np.int32)
    np.testing.assert_array_equal(pipeline.resize_map(inst, (dst, dst)), ref_map)


def test_unlabelled_nuclei_keep_density_and_get_class_zero():
  rec = _record(0, size=(32, 32), n=4)
  rec['instance_classes'] = rec['instance_classes'].copy()
  rec['instance_classes'][0] = 0
  out = pipeline.eval_example(rec, _config())
  inst = out['instance_map']
  assert (out['class_map'][inst == 1] == 0).all() and (out['class_map'][inst == 2] > 0).all()
  ref = targets.density_from_instances(rec['instance_map'], sigma=2.0)
  np.testing.assert_allclose(out['density'], ref, atol=1e-6)
