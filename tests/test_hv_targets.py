"""HoVer-Net HV targets: the vectorised `hv_map` against a plain per-instance restatement of the official
`gen_instance_hv_map` on the three real fixtures, and known answers on a hand-made disk."""

import numpy as np
import pytest
from scipy import ndimage

from dualunet_jax.data import consep
from dualunet_jax.data import hv_targets


def _official_hv(ann: np.ndarray) -> np.ndarray:
  """The official loop: pad by 2 so the grown boxes stay inside, box, centre of mass rounded half up, grids
  from 1, split normalisation."""
  pad = 2
  ann = np.pad(ann, pad)
  x_map = np.zeros(ann.shape, np.float32)
  y_map = np.zeros(ann.shape, np.float32)
  for inst_id in np.unique(ann)[1:]:
    inst_map = np.array(ann == inst_id, np.uint8)
    rows, cols = np.flatnonzero(inst_map.any(1)), np.flatnonzero(inst_map.any(0))
    box = [rows[0] - 2, rows[-1] + 1 + 2, cols[0] - 2, cols[-1] + 1 + 2]
    inst_map = inst_map[box[0]:box[1], box[2]:box[3]]
    com = list(ndimage.center_of_mass(inst_map))
    com = [int(com[0] + 0.5), int(com[1] + 0.5)]
    inst_x, inst_y = np.meshgrid(np.arange(1, inst_map.shape[1] + 1) - com[1],
                                 np.arange(1, inst_map.shape[0] + 1) - com[0])
    inst_x[inst_map == 0] = 0
    inst_y[inst_map == 0] = 0
    inst_x, inst_y = inst_x.astype('float32'), inst_y.astype('float32')
    for v in (inst_x, inst_y):
      if v.min() < 0:
        v[v < 0] /= -np.amin(v[v < 0])
      if v.max() > 0:
        v[v > 0] /= np.amax(v[v > 0])
    x_map[box[0]:box[1], box[2]:box[3]][inst_map > 0] = inst_x[inst_map > 0]
    y_map[box[0]:box[1], box[2]:box[3]][inst_map > 0] = inst_y[inst_map > 0]
  return np.dstack([x_map, y_map])[pad:-pad, pad:-pad]


def test_matches_the_official_loop_on_real_fixtures(fixtures_dir):
  for mat in sorted((fixtures_dir / 'masks').glob('*.mat')):
    inst = consep.read_tile(fixtures_dir / 'imgs' / f'{mat.stem}.png', mat)['instance_map']
    got = hv_targets.hv_map(inst)
    assert got.dtype == np.float32 and got.shape == inst.shape + (2,)
    np.testing.assert_array_equal(got, _official_hv(inst))
    assert got.min() == -1.0 and got.max() == 1.0
    np.testing.assert_array_equal(hv_targets.np_map(inst), (inst > 0).astype(np.int32))
    # Any positive ids work (the fixtures' raw ids are not contiguous).
    np.testing.assert_array_equal(hv_targets.hv_map(np.where(inst > 0, inst * 7 + 100, 0)), got)


def test_disk_known_answers():
  # Disk of radius 5 centred on (20, 30): centre of mass exactly (20, 30). The official grid starts at 1, so
  # x = X + 1 - 30 runs -4..6 along the middle row: -4 -> -1, 0 at X = 29, the centre pixel 1/6, X = 35 -> 1.
  yy, xx = np.mgrid[:48, :64]
  inst = (((yy - 20) ** 2 + (xx - 30) ** 2) <= 25).astype(np.int32)
  hv = hv_targets.hv_map(inst)
  row = hv[20, 25:36, 0]
  np.testing.assert_allclose(row, np.float32([-4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6]) / np.float32([4] * 4 + [1] * 7)
                             / np.float32([1] * 5 + [6] * 6), rtol=0, atol=0)
  np.testing.assert_array_equal(hv[15:26, 30, 1], row)  # y the same way down the middle column
  assert hv[20, 30].tolist() == pytest.approx([1 / 6, 1 / 6])
  assert (hv[inst == 0] == 0).all()
  # Two pixels right of the disk, a second instance: its own centre, unaffected by the first.
  inst2 = inst.copy()
  inst2[40:43, 50:53] = 2
  np.testing.assert_array_equal(hv_targets.hv_map(inst2)[inst == 1], hv[inst == 1])
  # A 3 x 3 square centred on X = 51: x = X + 1 - 51 = 0, 1, 2 -> 0, 1/2, 1 (the offset leaves no negative side).
  assert hv_targets.hv_map(inst2)[41, 50:53, 0].tolist() == [0.0, 0.5, 1.0]


def test_min_size_inside_the_output_crop():
  # The official drops instances with < 30 pixels inside the output crop (here: margin 10 of a 60 x 60 crop).
  inst = np.zeros((60, 60), np.int32)
  inst[5:12, 20:30] = 1  # 70 px, 20 of them inside [10, 50)
  inst[30:40, 30:40] = 2  # wholly inside
  hv = hv_targets.hv_map(inst, min_size=30, margin=10)
  assert (hv[inst == 1] == 0).all() and np.abs(hv[inst == 2]).max() == 1.0
  assert np.abs(hv_targets.hv_map(inst, min_size=20, margin=10)[inst == 1]).max() == 1.0
  assert not hv_targets.hv_map(np.zeros((8, 8), np.int32)).any()
