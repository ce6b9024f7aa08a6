"""dualunet_jax.convert_hovernet: official HoVer-Net files (`{'desc': state_dict}` .tar with DataParallel
`module.` keys, .npz encoders) into the Flax model, checked against the torch restatement
(tests/_hovernet_torch.py) with random weights; key coverage and errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import hovernet_consep
from dualunet_jax import convert_hovernet
from dualunet_jax.convert import ConversionError
from dualunet_jax.models import hovernet

torch = pytest.importorskip('torch')
import _hovernet_torch as ht  # noqa: E402  (needs torch)

TINY = 0.125


def _abstract(mode, num_classes):
  return nnx.eval_shape(lambda r: hovernet.HoVerNet(mode=mode, num_classes=num_classes, width_multiplier=TINY,
                                                    rngs=r), nnx.Rngs(0))


def test_expected_keys_are_the_official_ones():
  # Every key of the official layout (restated in torch) is a model key with the same shape, and vice versa,
  # except the constant unpooling buffer.
  for mode, types in (('original', 5), ('fast', None)):
    net = ht.HoVerNet(nr_types=types, mode=mode, width=TINY)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith(('num_batches_tracked', 'unpool_mat'))}
    model = _abstract(mode, None if types is None else types - 1)
    assert convert_hovernet.expected_torch_shapes(model) == want
  assert 'conv0./.weight' in want and 'd1.units.1.preact/bn.running_var' in want
  assert 'decoder.hv.u3.dense.units.0.preact_bna/bn.weight' in want and 'd3.blk_bna.bn.bias' in want


def test_tar_with_desc_converts_and_matches_torch(tmp_path):
  # A DataParallel checkpoint as the official PeriodicSaver writes it: {'desc': {'module.' + key: tensor}}.
  net = ht.randomise(ht.HoVerNet(nr_types=6, mode='fast', width=TINY), seed=5)
  path = tmp_path / 'hovernet_fast_pannuke_type_tf2pytorch.tar'
  torch.save({'desc': {'module.' + k: v for k, v in net.state_dict().items()}, 'epoch': 50}, path)
  config = hovernet_consep.get_config('original')  # the file's mode wins; K must match
  config.dataset.num_classes = 5
  config.model.width_multiplier = TINY
  model, config, info = convert_hovernet.convert_checkpoint(path, config)
  assert (config.method, config.model.hovernet_mode, info['num_classes']) == ('hovernet', 'fast', 5)
  images = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
  with torch.no_grad():
    want = net(torch.from_numpy(images).permute(0, 3, 1, 2).float())
  got = jax.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  for k, v in want.items():
    v = v.permute(0, 2, 3, 1).numpy()
    assert got[k].shape == v.shape == (1, 164, 164, v.shape[-1])
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-4, atol=1e-4 * np.abs(v).max())


def test_older_layer_names_are_read(tmp_path):
  # The pre-release net_desc names (conv0.conv, preact_bn, conv1_bn, conv2_bn) map onto the release ones.
  net = ht.randomise(ht.HoVerNet(nr_types=None, mode='fast', width=TINY), seed=1)
  new = ht.state_dict_numpy(net)
  old = {}
  for k, v in new.items():
    k = k.replace('conv0./.', 'conv0.conv.').replace('preact_bna/bn', 'preact_bn').replace('preact/bn', 'preact_bn')
    old[k.replace('conv1/bn', 'conv1_bn').replace('conv2/bn', 'conv2_bn')] = v
  np.savez(tmp_path / 'old.npz', **old)
  loaded = convert_hovernet.load_state_dict(tmp_path / 'old.npz')
  assert set(loaded) == {k for k in new if not k.endswith('num_batches_tracked')}
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, new[k])


def test_imagenet_encoder_init(tmp_path):
  # ImageNet-ResNet50-Preact_pytorch.tar holds encoder keys only (no conv_bot): every encoder tensor but
  # conv_bot is set, the decoders and conv_bot keep their values, extra keys are ignored.
  net = ht.randomise(ht.HoVerNet(nr_types=None, mode='original', width=TINY), seed=2)
  sd = {k: v for k, v in net.state_dict().items() if k.startswith(('conv0.', 'd0.', 'd1.', 'd2.', 'd3.'))}
  sd['linear.weight'] = torch.zeros(3, 3)  # a classifier the encoder does not have
  torch.save({'desc': sd}, tmp_path / 'ImageNet-ResNet50-Preact_pytorch.tar')
  model = _abstract('original', 4)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda s: np.full(s.shape, 7.0, np.float32), nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  convert_hovernet.load_encoder_weights(model, tmp_path / 'ImageNet-ResNet50-Preact_pytorch.tar')
  want = sd['d2.units.3.conv2.weight'].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(np.asarray(model.encoder.d2.units[3].conv2.kernel[...]), want)
  np.testing.assert_array_equal(np.asarray(model.encoder.d0.units[1].preact.mean[...]),
                                sd['d0.units.1.preact/bn.running_mean'].numpy())
  assert float(model.encoder.conv_bot.kernel[...].min()) == 7.0
  assert float(model.decoder_np.u3.conva.kernel[...].max()) == 7.0
  del sd['d1.units.2.conv3.weight']
  torch.save({'desc': sd}, tmp_path / 'broken.tar')
  with pytest.raises(ConversionError, match=r'd1\.units\.2\.conv3\.weight'):
    convert_hovernet.load_encoder_weights(model, tmp_path / 'broken.tar')


def test_errors_name_the_problem(tmp_path):
  net = ht.HoVerNet(nr_types=None, mode='fast', width=TINY)
  torch.save({'desc': net.state_dict()}, tmp_path / 'np_hv.tar')
  config = hovernet_consep.get_config('fast')
  config.model.width_multiplier = TINY
  with pytest.raises(ConversionError, match='no TP branch'):
    convert_hovernet.convert_checkpoint(tmp_path / 'np_hv.tar', config)
  model = _abstract('fast', None)
  sd = ht.state_dict_numpy(net)
  sd['decoder.np.extra.weight'] = np.zeros(1, np.float32)
  del sd['decoder.hv.u0.conv.bias']
  with pytest.raises(ConversionError, match=r'decoder\.hv\.u0\.conv\.bias.*left over: decoder\.np\.extra\.weight'):
    convert_hovernet.convert_state_dict(model, sd)
  with pytest.raises(ConversionError, match='not a HoVer-Net'):
    convert_hovernet.infer_architecture({'conv0./.weight': (64, 3, 7, 7)})
  assert convert_hovernet.infer_architecture({'decoder.np.u3.conva.weight': (256, 1024, 5, 5),
                                              'decoder.tp.u0.conv.weight': (5, 64, 1, 1)}) == ('original', 4)


def test_convert_cli_dispatches_on_the_method(tmp_path):
  """`python -m dualunet_jax.convert` with a HoVer-Net config reads the official file into a workdir that the
  shared restore loads (the same CLI as DualU-Net's reference checkpoints)."""
  import subprocess
  import sys
  from dualunet_jax import checkpointing
  net = ht.randomise(ht.HoVerNet(nr_types=5, mode='original', width=TINY), seed=2)
  torch.save({'desc': net.state_dict()}, tmp_path / 'hovernet_original_consep.tar')
  cmd = [sys.executable, '-m', 'dualunet_jax.convert', f'--from={tmp_path / "hovernet_original_consep.tar"}',
         '--config=configs/hovernet_consep.py', f'--workdir={tmp_path / "w"}',
         f'--config.model.width_multiplier={TINY}']
  import os
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(cmd, cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  model, config = checkpointing.restore_for_inference(tmp_path / 'w')
  assert config.method == 'hovernet' and config.model.hovernet_mode == 'original'
  # The workdir holds exactly the in-process conversion (whose outputs match torch: the test above).
  direct, _, _ = convert_hovernet.convert_checkpoint(tmp_path / 'hovernet_original_consep.tar', config)
  want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(direct)))
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
  assert len(got) == len(want) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))
