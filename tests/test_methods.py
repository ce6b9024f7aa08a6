"""The method interface: registry, TTA undo of scalar and vector maps, vector-field augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dualunet_jax import methods
from dualunet_jax.data import augment
from dualunet_jax.inference.engine import VIEWS
from dualunet_jax.methods import base


def _centre_vectors(instance_map: np.ndarray) -> np.ndarray:
  """float32[H, W, 2]: (x - cx, y - cy) of every nuclear pixel to its nucleus' centre of mass (no
  normalisation), an independent vector field with the geometry of HoVer-Net's HV targets."""
  out = np.zeros(instance_map.shape + (2,), np.float32)
  yy, xx = np.indices(instance_map.shape)
  for i in np.unique(instance_map[instance_map > 0]):
    m = instance_map == i
    out[m, 0] = xx[m] - xx[m].mean()
    out[m, 1] = yy[m] - yy[m].mean()
  return out


def _blobs(h: int, w: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  inst = np.zeros((h, w), np.int32)
  for i in range(1, 7):
    cy, cx = rng.integers(4, h - 4), rng.integers(4, w - 4)
    ry, rx = rng.integers(2, 5, size=2)
    yy, xx = np.ogrid[:h, :w]
    inst[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
  return inst


def test_registry_defaults_and_errors():
  assert methods.get(ml_collections.ConfigDict({'seed': 0})).name == 'dualunet'  # pre-method workdirs
  assert methods.get('dualunet') is methods.get(ml_collections.ConfigDict({'method': 'dualunet'}))
  with pytest.raises(ValueError, match='unknown method'):
    methods.get('nope')


@pytest.mark.parametrize('k,flip', VIEWS)
def test_undo_view_restores_scalar_and_vector_maps(k, flip):
  # A view's vector field, computed on the transformed labels, undone, equals the original field.
  inst = _blobs(24, 24 if k % 2 else 30)
  view = np.rot90(inst, k)
  view = view[:, ::-1] if flip else view
  field = _centre_vectors(np.ascontiguousarray(view))[None]
  undone = np.asarray(base.undo_view(jnp.asarray(field), 'hv', k, flip))[0]
  np.testing.assert_allclose(undone, _centre_vectors(inst), atol=1e-5)
  scalar = np.asarray(base.undo_view(jnp.asarray(np.ascontiguousarray(view)[None, ..., None]), 'scalar', k, flip))
  np.testing.assert_array_equal(scalar[0, ..., 0], inst)


def test_augment_moves_vector_targets_consistently():
  # Every dihedral view drawn by the augmentation keeps the vector target equal to the field of the moved
  # instance map.
  inst = _blobs(32, 32, seed=3)
  batch = {'image': np.zeros((8, 32, 32, 3), np.uint8), 'instance_map': np.repeat(inst[None], 8, 0),
           'hv': np.repeat(_centre_vectors(inst)[None], 8, 0)}
  cfg = {'flips': True, 'rot90': True}
  seen = set()
  for step in range(3):
    out = augment.augment_batch(jax.random.key(step), batch, cfg, vector_keys=('hv',))
    for moved, hv in zip(np.asarray(out['instance_map']), np.asarray(out['hv'])):
      np.testing.assert_allclose(hv, _centre_vectors(moved), atol=1e-5)
      seen.add(moved.tobytes())
  assert len(seen) >= 4  # several distinct views were drawn
