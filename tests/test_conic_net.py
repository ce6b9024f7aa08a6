"""CoNIC-framework network (models/conic_net.py): full-size parameter counts against the official HoVer-Net
decoder, encoder geometry, output contract at a tiny width, dropout only in train mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualunet_jax.models import conic_net
from model_helpers import abstract
from model_helpers import filled
from model_helpers import forward

TINY = 1 / 8
SERESNEXT50_TRUNK = 25_510_896
# Official HoVer-Net "fast" (seed reference table): 37,639,626 parameters with nr_types 6, 33,625,412 without the
# TP branch, 25,597,504 of them encoder + conv_bot (2048 x 1024 = 2,097,152). One branch without its output 1x1
# conv: (33,625,412 - 25,597,504) / 2 - (64 * 2 + 2) = 4,013,824. The CoNIC HoVer-Net (kernel 3, padded) has the
# same tensors; the merged decoder is conv_bot + one branch body.
HOVERNET_BRANCH_BODY = 4_013_824
CONV_BOT = 2048 * 1024


@functools.cache
def _tiny() -> conic_net.ConicNet:
  """Shared width-1/8 model in eval mode (tests that switch modes switch back); dropout 0.5 makes the
  train-mode test sharp."""
  model = filled(lambda rngs: conic_net.ConicNet(num_classes=4, width_multiplier=TINY, cardinality=1,
                                                 dropout_rate=0.5, rngs=rngs))
  model.eval()
  return model


@functools.cache
def _full_size(encoder: str, num_classes: int) -> conic_net.ConicNet:
  return abstract(lambda rngs: conic_net.ConicNet(encoder=encoder, num_classes=num_classes, rngs=rngs))


def test_full_size_parameter_counts():
  counts = conic_net.parameter_counts(_full_size('seresnext50_32x4d', 6))
  assert counts == {'encoder': SERESNEXT50_TRUNK, 'decoder': CONV_BOT + HOVERNET_BRANCH_BODY,
                    'np_head': 64 * 2 + 2, 'hv_head': 64 * 2 + 2, 'tp_head': 64 * 7 + 7,
                    'total': 31_622_587}


def test_encoder_runs_at_the_conic_hovernet_strides():
  """Stem stride 1 and no max pool: layer1..4 at strides 1, 2, 4, 8 (HoVer-Net's pre-activation ResNet)."""
  model = _tiny()
  features = nnx.eval_shape(lambda m, x: m.encoder(x), model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert [f.shape[1] for f in features] == [64, 64, 64, 32, 16, 8]
  assert model.encoder.layer1[0].se is not None and model.margin == 0


def test_outputs_are_input_sized_float32_for_uint8_and_odd_sizes():
  model = _tiny()
  images = np.random.default_rng(0).integers(0, 256, (2, 45, 38, 3), dtype=np.uint8)
  out, _ = forward(model, images)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      'np': ((2, 45, 38, 2), jnp.float32), 'hv': ((2, 45, 38, 2), jnp.float32), 'tp': ((2, 45, 38, 5), jnp.float32)}
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_dropout_active_in_train_mode_only():
  """The decoder alone on a batch of two identical random feature sets: in train mode each sample draws its own
  dropout masks (the outputs differ), in eval mode nothing is dropped (they agree)."""
  model = _tiny()
  decoder = nnx.clone(model.decoder)  # train mode updates BatchNorm statistics: keep the shared model as is
  rng = np.random.default_rng(1)
  strides = (1, 1, 1, 2, 4, 8)
  features = [np.repeat(rng.normal(size=(1, 16 // s, 16 // s, c)).astype(np.float32), 2, axis=0)
              for s, c in zip(strides, model.encoder.out_channels)]
  decoder.train()
  out, _ = forward(decoder, features)
  assert not np.allclose(out[0], out[1])
  decoder.eval()
  out, _ = forward(decoder, features)
  np.testing.assert_array_equal(out[0], out[1])
  assert conic_net.DROPOUT_RATE == 0.1


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='num_classes'):
    conic_net.ConicNet(num_classes=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown SE-ResNeXt'):
    abstract(lambda rngs: conic_net.ConicNet(encoder='resnext50_32x4d', num_classes=4, rngs=rngs))
