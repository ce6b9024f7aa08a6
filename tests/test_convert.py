"""dualunet_jax.convert: key sets and shapes against reference §9, torch-vs-JAX numerics, Orbax round trip,
ImageNet encoder initialisation, and one clear error per broken input.

The torch modules below restate the reference DualU-Net (torchvision ResNeXt bottleneck, timm 0.9.8 ConvNeXt
block, SMP U-Net decoder block, heads) with the exact state-dict key names; there is no torchvision/timm here.
Tests that need torch skip when it is absent (`make test` installs it).
"""

import functools
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

from configs import consep
from dualunet_jax import checkpointing
from dualunet_jax import convert
from dualunet_jax import models
from dualunet_jax.models import dualunet

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = 0.125  # width multiplier of the tiny test models
K = 4  # CoNSeP classes
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# timm convnext_{name}: (depths, dims), restated from timm rather than imported from the model.
CONVNEXT = {'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)), 'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
            'base': ((3, 3, 27, 3), (128, 256, 512, 1024)), 'large': ((3, 3, 27, 3), (192, 384, 768, 1536))}


# ------------------------------------------------------------------------------------- reference key sets


def reference_shapes(encoder: str, num_classes: int = K, wm: float = 1.0,
                     batches_tracked: bool = False) -> dict[str, tuple[int, ...]]:
  """Reference §9 state-dict keys -> torch shapes, channels scaled by `wm` like the model does."""
  s = lambda c: dualunet.scale_channels(c, wm)
  shapes: dict[str, tuple[int, ...]] = {}

  def bn(prefix: str, c: int) -> None:
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.{name}'] = (c,)
    if batches_tracked:
      shapes[f'{prefix}.num_batches_tracked'] = ()

  if encoder == 'resnext50_32x4d':
    stem = s(64)
    shapes['encoder.conv1.weight'] = (stem, 3, 7, 7)
    bn('encoder.bn1', stem)
    cin, planes = stem, [s(p) for p in (64, 128, 256, 512)]
    for layer, (blocks, p) in enumerate(zip((3, 4, 6, 3), planes), 1):
      width, out = 2 * p, 4 * p
      for b in range(blocks):
        key = f'encoder.layer{layer}.{b}'
        shapes[f'{key}.conv1.weight'] = (width, cin, 1, 1)
        bn(f'{key}.bn1', width)
        shapes[f'{key}.conv2.weight'] = (width, width // math.gcd(32, width), 3, 3)
        bn(f'{key}.bn2', width)
        shapes[f'{key}.conv3.weight'] = (out, width, 1, 1)
        bn(f'{key}.bn3', out)
        if b == 0:
          shapes[f'{key}.downsample.0.weight'] = (out, cin, 1, 1)
          bn(f'{key}.downsample.1', out)
        cin = out
    enc_ch = [3, stem] + [4 * p for p in planes]
  else:
    depths, dims = CONVNEXT[encoder.removeprefix('convnext_')]
    dims = [s(d) for d in dims]
    t = 'encoder.timm_model.'
    shapes.update({t + 'stem.0.weight': (dims[0], 3, 4, 4), t + 'stem.0.bias': (dims[0],),
                   t + 'stem.1.weight': (dims[0],), t + 'stem.1.bias': (dims[0],)})
    for st, (depth, d) in enumerate(zip(depths, dims)):
      if st:
        shapes.update({f'{t}stages.{st}.downsample.0.weight': (dims[st - 1],),
                       f'{t}stages.{st}.downsample.0.bias': (dims[st - 1],),
                       f'{t}stages.{st}.downsample.1.weight': (d, dims[st - 1], 2, 2),
                       f'{t}stages.{st}.downsample.1.bias': (d,)})
      for b in range(depth):
        key = f'{t}stages.{st}.blocks.{b}.'
        shapes.update({key + 'gamma': (d,), key + 'conv_dw.weight': (d, 1, 7, 7), key + 'conv_dw.bias': (d,),
                       key + 'norm.weight': (d,), key + 'norm.bias': (d,), key + 'mlp.fc1.weight': (4 * d, d),
                       key + 'mlp.fc1.bias': (4 * d,), key + 'mlp.fc2.weight': (d, 4 * d),
                       key + 'mlp.fc2.bias': (d,)})
    enc_ch = [3, dims[0]] + dims
  dec = [s(c) for c in (256, 128, 64, 32, 16)]
  skips, ins = enc_ch[1:-1][::-1] + [0], [enc_ch[-1]] + dec[:-1]
  for name in ('decoder', 'decoder_count'):
    for i in range(5):
      shapes[f'{name}.blocks.{i}.conv1.0.weight'] = (dec[i], ins[i] + skips[i], 3, 3)
      bn(f'{name}.blocks.{i}.conv1.1', dec[i])
      shapes[f'{name}.blocks.{i}.conv2.0.weight'] = (dec[i], dec[i], 3, 3)
      bn(f'{name}.blocks.{i}.conv2.1', dec[i])
  shapes.update({'segmentation_head.0.weight': (num_classes + 1, dec[-1], 3, 3),
                 'segmentation_head.0.bias': (num_classes + 1,), 'count_head.0.weight': (1, dec[-1], 3, 3),
                 'count_head.0.bias': (1,)})
  return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith('num_batches_tracked'):
      out[key] = np.array(7, np.int64)
    elif key.endswith('running_var'):
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[key] = rng.standard_normal(shape).astype(np.float32)
  return out


def tiny_config(encoder: str) -> ml_collections.ConfigDict:
  config = consep.get_config()
  config.model.encoder = encoder
  config.model.width_multiplier = TINY
  return config


@functools.cache  # tracing takes seconds; tests read shapes only, or (re)set values
def abstract_model(encoder: str, wm: float = 1.0, num_classes: int = K) -> models.DualUNet:
  return nnx.eval_shape(lambda: models.DualUNet(encoder=encoder, num_classes=num_classes, width_multiplier=wm,
                                                rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('encoder', models.ENCODERS)
def test_encoder_inferred_from_keys(encoder):
  assert convert.infer_architecture(reference_shapes(encoder)) == (encoder, K)
  assert convert.infer_architecture(reference_shapes(encoder, wm=TINY), TINY) == (encoder, K)


@pytest.mark.parametrize('encoder', ['resnext50_32x4d', 'convnext_tiny', 'convnext_base'])
def test_full_size_key_set_and_shapes_match_reference(encoder):
  """Every full-size target maps to exactly the reference key set and shapes (abstract: no allocation)."""
  expected = reference_shapes(encoder)
  assert convert.expected_torch_shapes(abstract_model(encoder)) == expected
  # §9 / §1.8 literal cross-checks: entries incl. num_batches_tracked, parameter tensors.
  entries = len(reference_shapes(encoder, batches_tracked=True))
  params = sum(not k.endswith(('running_mean', 'running_var')) for k in expected)
  if encoder == 'resnext50_32x4d':
    assert (entries, params) == (442, 223)
    assert expected['decoder.blocks.0.conv1.0.weight'] == (256, 3072, 3, 3)
    assert expected['encoder.layer4.2.conv2.weight'] == (1024, 32, 3, 3)
  if encoder == 'convnext_base':
    assert (entries, params) == (464, 404)
    assert expected['decoder_count.blocks.3.conv1.0.weight'] == (32, 192, 3, 3)


def test_plan_on_full_convnext_base_shapes():
  """match_keys accepts the reference ConvNeXt-Base key set and names an extra key and a wrong shape."""
  model = abstract_model('convnext_base')
  targets = convert._flat_shapes(model)
  key_fn = lambda p: convert.torch_key(p, True)
  shapes = reference_shapes('convnext_base')
  plan = convert.match_keys(targets, shapes, key_fn, source='ref')
  assert sorted(plan.values()) == sorted(shapes)
  bad = dict(shapes, **{'encoder.timm_model.head.fc.weight': (1000, 1024),
                        'encoder.timm_model.stages.3.blocks.2.gamma': (7,)})
  with pytest.raises(convert.ConversionError, match=r'^ref: 1 source keys are left over: '
                     r'encoder\.timm_model\.head\.fc\.weight; 1 shapes differ: '
                     r'encoder\.timm_model\.stages\.3\.blocks\.2\.gamma is \[7\], '
                     r'the model expects \[1024\]$'):
    convert.match_keys(targets, bad, key_fn, source='ref')


# ------------------------------------------------------------------------------------- torch restatement


@pytest.fixture(scope='module')
def torch_mod():
  torch = pytest.importorskip('torch', reason='torch not installed (pip install -e ".[convert]")')
  torch.set_num_threads(1)
  return torch


def torch_dualunet(torch, encoder: str, wm: float, num_classes: int = K):
  """The reference DualU-Net in torch, module names as the reference state dict (eval mode, random stats)."""
  nn, F = torch.nn, torch.nn.functional
  s = lambda c: dualunet.scale_channels(c, wm)

  class Bottleneck(nn.Module):  # torchvision v1.5: stride on the grouped 3x3
    def __init__(self, cin, planes, stride):
      super().__init__()
      width, out = 2 * planes, 4 * planes
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=math.gcd(32, width), bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
      self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                         if stride != 1 or cin != out else None)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return F.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNeXt(nn.Module):
    def __init__(self):
      super().__init__()
      stem = s(64)
      self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
      cin = stem
      for layer, (blocks, p) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        mods = []
        for b in range(blocks):
          mods.append(Bottleneck(cin, s(p), (1 if layer == 1 or b else 2)))
          cin = 4 * s(p)
        setattr(self, f'layer{layer}', nn.Sequential(*mods))
      self.channels = [3, stem] + [4 * s(p) for p in (64, 128, 256, 512)]

    def forward(self, x):
      feats = [x]
      x = F.relu(self.bn1(self.conv1(x)))
      feats.append(x)
      x = F.max_pool2d(x, 3, 2, 1)
      for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
        x = layer(x)
        feats.append(x)
      return feats

  class LayerNorm2d(nn.LayerNorm):  # timm: LayerNorm over channels of NCHW
    def forward(self, x):
      x = x.permute(0, 2, 3, 1)
      return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)

  class Mlp(nn.Module):
    def __init__(self, d):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))

  class ConvNeXtBlock(nn.Module):  # timm 0.9.8, conv_mlp=False
    def __init__(self, d):
      super().__init__()
      self.conv_dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
      self.norm, self.mlp = nn.LayerNorm(d, eps=1e-6), Mlp(d)
      self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
      y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
      return y.mul(self.gamma.reshape(1, -1, 1, 1)) + x

  class Stage(nn.Module):
    def __init__(self, cin, d, depth, downsample):
      super().__init__()
      self.downsample = (nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, d, 2, 2)) if downsample
                         else nn.Identity())
      self.blocks = nn.Sequential(*[ConvNeXtBlock(d) for _ in range(depth)])

    def forward(self, x):
      return self.blocks(self.downsample(x))

  class Timm(nn.Module):
    def __init__(self, depths, dims):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
      self.stages = nn.Sequential(*[Stage(dims[max(i - 1, 0)], dims[i], depths[i], i > 0) for i in range(4)])

  class ConvNeXtEncoder(nn.Module):
    def __init__(self, name):
      super().__init__()
      depths, dims = CONVNEXT[name]
      dims = [s(d) for d in dims]
      self.timm_model = Timm(depths, dims)
      self.channels = [3, dims[0]] + dims

    def forward(self, x):
      feats = [x]
      x = self.timm_model.stem(x)
      feats.append(x)
      for stage in self.timm_model.stages:
        x = stage(x)
        feats.append(x)
      return feats

  def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

  class DecoderBlock(nn.Module):  # SMP: upsample, concat [x, skip], 2x conv-BN-ReLU, no residual
    def __init__(self, cin, skip, cout, upsample):
      super().__init__()
      self.upsample = upsample
      self.conv1, self.conv2 = conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout)

    def forward(self, x, skip=None):
      for _ in range(int(math.log2(self.upsample))):  # the ConvNeXt skip-less block upsamples x2 twice
        x = F.interpolate(x, scale_factor=2, mode='nearest')
      if skip is not None:
        x = torch.cat([x, skip], dim=1)
      return self.conv2(self.conv1(x))

  class Decoder(nn.Module):
    def __init__(self, enc_ch, dec, upsample):
      super().__init__()
      skips, ins = enc_ch[1:-1][::-1] + [0], [enc_ch[-1]] + dec[:-1]
      self.blocks = nn.ModuleList([DecoderBlock(*a) for a in zip(ins, skips, dec, upsample)])

    def forward(self, *features):
      features = features[1:][::-1]
      x, skips = features[0], features[1:]
      for i, block in enumerate(self.blocks):
        x = block(x, skips[i] if i < len(skips) else None)
      return x

  class DualUNet(nn.Module):
    def __init__(self):
      super().__init__()
      resnext = encoder == 'resnext50_32x4d'
      self.encoder = ResNeXt() if resnext else ConvNeXtEncoder(encoder[len('convnext_'):])
      dec = [s(c) for c in (256, 128, 64, 32, 16)]
      up = (2, 2, 2, 2, 2) if encoder == 'resnext50_32x4d' else (2, 2, 2, 1, 4)
      self.decoder = Decoder(self.encoder.channels, dec, up)
      self.segmentation_head = nn.Sequential(nn.Conv2d(dec[-1], num_classes + 1, 3, padding=1), nn.Identity(),
                                             nn.Identity())
      self.decoder_count = Decoder(self.encoder.channels, dec, up)
      self.count_head = nn.Sequential(nn.Conv2d(dec[-1], 1, 3, padding=1), nn.Identity(), nn.Identity())

    def forward(self, x):
      features = self.encoder(x)
      return (self.segmentation_head(self.decoder(*features)),
              self.count_head(self.decoder_count(*features)))

  torch.manual_seed(0)
  model = DualUNet()
  with torch.no_grad():  # random values of a sensible scale, BN statistics included (variance positive)
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.normal_(0, math.sqrt(1.0 / math.prod(p.shape[1:])))  # outputs O(1)
      elif name.endswith('bias'):
        p.normal_(0, 0.1)
      else:
        p.uniform_(0.5, 1.5)  # BN/LayerNorm weights, ConvNeXt gamma
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_(0, 0.1)
      elif name.endswith('running_var'):
        b.uniform_(0.5, 1.5)
  return model.eval()


def torch_outputs(torch, model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """images float[B, H, W, 3] in [0, 1] -> (logits [B, H, W, K+1], density [B, H, W]) from the torch model."""
  x = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    seg, den = model(x)
  return seg.permute(0, 2, 3, 1).numpy(), den[:, 0].numpy()


@nnx.jit  # one compilation is quicker than op-by-op dispatch of the whole model
def _forward(model, images):
  return model(images)


def jax_outputs(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  logits, density = _forward(model, jnp.asarray(images))
  return np.asarray(logits), np.asarray(density)


IMAGES = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)


def _assert_close(got, want, tol=1e-4):
  for g, w in zip(got, want):
    assert g.shape == w.shape
    diff = float(np.max(np.abs(g - w)))
    print(f'max |jax - torch| = {diff:.2e} (output max |.| {float(np.max(np.abs(w))):.2f})')
    assert diff <= tol


@pytest.mark.parametrize('encoder, wrap',
                         [('resnext50_32x4d', 'training_dict'), ('convnext_tiny', 'ddp_seg')])
def test_tiny_model_matches_torch(torch_mod, tmp_path, encoder, wrap):
  """Whole tiny model (grouped-conv bottlenecks / ConvNeXt blocks, both decoders, heads): torch == JAX."""
  torch = torch_mod
  ref = torch_dualunet(torch, encoder, TINY)
  state = ref.state_dict()
  assert ({k: tuple(v.shape) for k, v in state.items()}
          == reference_shapes(encoder, wm=TINY, batches_tracked=True))
  if wrap == 'training_dict':  # what the reference train.py writes
    opt = torch.optim.Adam(ref.parameters())
    obj = {'model': state, 'optimizer': opt.state_dict(), 'epoch': 100,
           'lr_scheduler': torch.optim.lr_scheduler.MultiStepLR(opt, [70, 90]).state_dict()}
  else:  # a bare DDP state dict with the Feb-2025 decoder name
    rename = lambda k: 'decoder_seg.' + k[len('decoder.'):] if k.startswith('decoder.') else k
    obj = {'module.' + rename(k): v for k, v in state.items()}
  path = tmp_path / 'ref.pth'
  torch.save(obj, path)
  config = tiny_config('resnext50_32x4d')
  model, config, info = convert.convert_checkpoint(path, config)
  assert (config.model.encoder, info['encoder'], info['num_classes']) == (encoder, encoder, K)
  _assert_close(jax_outputs(model, IMAGES), torch_outputs(torch, ref, IMAGES))


def test_cli_round_trip_through_orbax(torch_mod, tmp_path):
  """CLI -> workdir -> restore_for_inference gives the torch outputs; every key consumed, every target set."""
  torch = torch_mod
  ref = torch_dualunet(torch, 'resnext50_32x4d', TINY)
  torch.save({'model': ref.state_dict()}, tmp_path / 'ref.pth')
  workdir = tmp_path / 'w'
  cmd = [sys.executable, '-m', 'dualunet_jax.convert', f'--from={tmp_path / "ref.pth"}',
         '--config=configs/consep.py', f'--workdir={workdir}', f'--config.model.width_multiplier={TINY}']
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  # restore_for_inference, except that the model is built abstractly: its concrete random initialisation
  # compiles ~70 initialisers (a minute on a loaded 2-core CPU) only to overwrite them.
  config = checkpointing.load_config(workdir)
  model = nnx.eval_shape(
      lambda: models.build_model(config.model, config.dataset.num_classes, rngs=nnx.Rngs(0)))
  assert checkpointing.restore_model(workdir, model)['step'] == 0
  model.eval()
  assert config.model.encoder == 'resnext50_32x4d' and config.dataset.num_classes == K
  _assert_close(jax_outputs(model, IMAGES), torch_outputs(torch, ref, IMAGES))
  # A second conversion into the same workdir is refused rather than mixing checkpoints.
  with pytest.raises(convert.ConversionError,
                     match=r'w/checkpoints: already holds checkpoints; convert into a new --workdir'):
    convert.convert_to_workdir(tmp_path / 'ref.pth', config, workdir)


# ------------------------------------------------------------------------------------- without torch


@pytest.fixture
def no_torch(monkeypatch):
  """Makes `import torch` fail, as on an install without the [convert] extra."""
  monkeypatch.setitem(sys.modules, 'torch', None)


def _flat_values(module) -> dict[tuple, np.ndarray]:
  pure = nnx.to_pure_dict(nnx.state(module))
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {tuple(k.key for k in keys): np.asarray(v) for keys, v in leaves}


def test_safetensors_without_torch(no_torch, tmp_path):
  """A .safetensors reference checkpoint converts with torch unavailable; layouts are transposed right."""
  state = random_state_dict(reference_shapes('convnext_tiny', wm=TINY, batches_tracked=True))
  st_numpy.save_file(state, str(tmp_path / 'ref.safetensors'))
  model, config, _ = convert.convert_checkpoint(tmp_path / 'ref.safetensors', tiny_config('convnext_tiny'))
  values = _flat_values(model)
  assert len(values) == len(reference_shapes('convnext_tiny', wm=TINY))  # every target set, once
  p = 'encoder.timm_model.stages.1.'
  np.testing.assert_array_equal(values[('encoder', 'stages', 1, 'downsample_conv', 'kernel')],
                                state[p + 'downsample.1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(values[('encoder', 'stages', 1, 'blocks', 2, 'conv_dw', 'kernel')],
                                state[p + 'blocks.2.conv_dw.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(values[('encoder', 'stages', 1, 'blocks', 2, 'fc1', 'kernel')],
                                state[p + 'blocks.2.mlp.fc1.weight'].T)
  np.testing.assert_array_equal(values[('encoder', 'stages', 1, 'blocks', 2, 'gamma')],
                                state[p + 'blocks.2.gamma'])
  np.testing.assert_array_equal(values[('density_decoder', 'blocks', 4, 'bn2', 'var')],
                                state['decoder_count.blocks.4.conv2.1.running_var'])
  np.testing.assert_array_equal(values[('class_head', 'bias')], state['segmentation_head.0.bias'])
  assert config.model.encoder == 'convnext_tiny'


def test_pth_without_torch_names_the_extra(no_torch, tmp_path):
  (tmp_path / 'ref.pth').write_bytes(b'PK')
  with pytest.raises(convert.ConversionError,
                     match=r'ref\.pth: reading PyTorch files needs torch; install the \[convert\] extra'):
    convert.load_state_dict(tmp_path / 'ref.pth')


# ------------------------------------------------------------------------------------- one clear error each


def _write(tmp_path, state, name='ref.safetensors') -> pathlib.Path:
  st_numpy.save_file(state, str(tmp_path / name))
  return tmp_path / name


@pytest.fixture(scope='module')
def tiny_state():
  return random_state_dict(reference_shapes('resnext50_32x4d', wm=TINY))


def _convert(path, encoder='resnext50_32x4d'):
  return convert.convert_checkpoint(path, tiny_config(encoder))


def test_truncated_safetensors(tmp_path, tiny_state):
  data = _write(tmp_path, tiny_state).read_bytes()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError,
                     match=r'cut\.safetensors: cannot read as \.safetensors \(truncated'):
    _convert(tmp_path / 'cut.safetensors')


def test_truncated_pth(torch_mod, tmp_path, tiny_state):
  torch_mod.save({'model': {k: torch_mod.from_numpy(v) for k, v in tiny_state.items()}}, tmp_path / 'ref.pth')
  data = (tmp_path / 'ref.pth').read_bytes()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError,
                     match=r'cut\.pth: cannot read as a PyTorch checkpoint .*truncated'):
    _convert(tmp_path / 'cut.pth')


class _RunsCode:
  """Pickles as a call of os.system: what a malicious checkpoint would do on an unrestricted torch.load."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_pth_with_code_is_refused(torch_mod, tmp_path):
  """weights_only=True: a pickled call is rejected, never executed."""
  marker = tmp_path / 'pwned'
  torch_mod.save({'model': _RunsCode(marker)}, tmp_path / 'evil.pth')
  with pytest.raises(convert.ConversionError, match=r'evil\.pth: cannot read as a PyTorch checkpoint with '
                     r'weights_only=True'):
    convert.load_state_dict(tmp_path / 'evil.pth')
  assert not marker.exists()


def test_missing_key(tmp_path, tiny_state):
  state = dict(tiny_state)
  del state['decoder_count.blocks.2.conv1.1.running_var']
  with pytest.raises(convert.ConversionError, match=r'ref\.safetensors: 1 model tensors have no source key: '
                     r'decoder_count\.blocks\.2\.conv1\.1\.running_var$'):
    _convert(_write(tmp_path, state))


def test_extra_key(tmp_path, tiny_state):
  state = dict(tiny_state, **{'decoder.blocks.5.conv1.0.weight': np.zeros((1,), np.float32)})
  with pytest.raises(convert.ConversionError, match=r'ref\.safetensors: 1 source keys are left over: '
                     r'decoder\.blocks\.5\.conv1\.0\.weight$'):
    _convert(_write(tmp_path, state))


def test_wrong_shape(tmp_path, tiny_state):
  state = dict(tiny_state, **{'encoder.layer2.0.conv2.weight': np.zeros((32, 2, 3, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match=r'ref\.safetensors: 1 shapes differ: '
                     r'encoder\.layer2\.0\.conv2\.weight is \[32, 2, 3, 3\], '
                     r'the model expects \[32, 1, 3, 3\]$'):
    _convert(_write(tmp_path, state))


def test_num_classes_mismatch(tmp_path):
  state = random_state_dict(reference_shapes('resnext50_32x4d', num_classes=5, wm=TINY))
  with pytest.raises(convert.ConversionError, match=r'segmentation_head\.0\.weight has 6 channels '
                     r'\(5 classes \+ background\) but config\.dataset\.num_classes is 4'):
    _convert(_write(tmp_path, state))


def test_width_mismatch_is_one_line(tmp_path, tiny_state):
  with pytest.raises(convert.ConversionError, match=r'encoder\.conv1\.weight has 8 channels, '
                     r'width_multiplier 1\.0 expects 64; set --config\.model\.width_multiplier'):
    convert.convert_checkpoint(_write(tmp_path, tiny_state), consep.get_config())


def test_both_decoder_prefixes_is_an_error(tmp_path, tiny_state):
  state = dict(tiny_state)
  state['decoder_seg.blocks.0.conv2.0.weight'] = tiny_state['decoder.blocks.0.conv2.0.weight']
  with pytest.raises(convert.ConversionError, match=r"both map to 'decoder\.blocks\.0\.conv2\.0\.weight'"):
    _convert(_write(tmp_path, state))


def test_encoder_override_warns(tmp_path, tiny_state):
  """A ResNeXt file with a ConvNeXt config: the file wins, with a warning, and the config records it."""
  from absl import logging as absl_logging
  with pytest.MonkeyPatch.context() as mp:
    warnings = []
    mp.setattr(absl_logging, 'warning', lambda msg, *args: warnings.append(msg % args))
    _, config, _ = _convert(_write(tmp_path, tiny_state), encoder='convnext_base')
  assert config.model.encoder == 'resnext50_32x4d'
  assert len(warnings) == 1 and "overriding config.model.encoder='convnext_base'" in warnings[0]


# ------------------------------------------------------------------------------------- ImageNet encoder init


def _imagenet(encoder: str, wm: float, batches_tracked: bool = True) -> dict[str, tuple[int, ...]]:
  """torchvision / timm ImageNet key set: the reference encoder keys without prefixes, plus the classifier."""
  shapes = {k.removeprefix('encoder.').removeprefix('timm_model.'): v
            for k, v in reference_shapes(encoder, wm=wm, batches_tracked=batches_tracked).items()
            if k.startswith('encoder.')}
  if encoder == 'resnext50_32x4d':
    shapes.update({'fc.weight': (1000, shapes['layer4.2.conv3.weight'][0]), 'fc.bias': (1000,)})
  else:
    d = shapes['stages.3.blocks.0.gamma'][0]
    shapes.update({'head.norm.weight': (d,), 'head.norm.bias': (d,), 'head.fc.weight': (1000, d),
                   'head.fc.bias': (1000,)})
  return shapes


def test_full_resnext_imagenet_pth(torch_mod, tmp_path):
  """The full torchvision resnext50_32x4d key set (23M floats, fc ignored) sets every encoder tensor."""
  arrays = random_state_dict(_imagenet('resnext50_32x4d', 1.0))
  state = {k: torch_mod.from_numpy(v) for k, v in arrays.items()}
  torch_mod.save(state, tmp_path / 'resnext50_32x4d.pth')
  model = abstract_model('resnext50_32x4d')  # encoder values become concrete; decoders stay abstract
  convert.load_encoder_weights(model, tmp_path / 'resnext50_32x4d.pth')
  values = _flat_values(model.encoder)
  assert len(values) == 265  # 318 entries - 53 num_batches_tracked
  np.testing.assert_array_equal(values[('layer3', 5, 'conv2', 'kernel')],
                                state['layer3.5.conv2.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(values[('layer1', 0, 'downsample_bn', 'mean')],
                                state['layer1.0.downsample.1.running_mean'].numpy())


def test_resnext_weights_refuse_a_dense_3x3_model(no_torch, tmp_path):
  path = _write(tmp_path, random_state_dict(_imagenet('resnext50_32x4d', TINY)), 'resnext50_32x4d.safetensors')
  model = nnx.eval_shape(lambda: models.DualUNet(encoder='resnext50_32x4d', num_classes=K, width_multiplier=TINY,
                                                 cardinality=1, rngs=nnx.Rngs(0)))
  with pytest.raises(convert.ConversionError, match=r'resnext50_32x4d\.safetensors: ResNeXt weights have 32-group '
                     r'3x3 convolutions but the model was built with cardinality 1'):
    convert.load_encoder_weights(model, path)


def test_timm_convnext_safetensors_keeps_decoders(no_torch, tmp_path):
  """timm keys (head.* ignored) from .safetensors without torch set every encoder tensor and nothing else."""
  state = random_state_dict(_imagenet('convnext_tiny', TINY, batches_tracked=False))
  path = _write(tmp_path, state, 'convnext_tiny.safetensors')
  # Built abstractly so that "nothing else is touched" is visible: every other leaf stays a ShapeDtypeStruct.
  model = nnx.eval_shape(lambda: models.DualUNet(encoder='convnext_tiny', num_classes=K,
                                                 width_multiplier=TINY, rngs=nnx.Rngs(0)))
  convert.load_encoder_weights(model, path)
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  for keys, leaf in leaves:
    assert isinstance(leaf, jax.Array) == (keys[0].key == 'encoder'), keys
  np.testing.assert_array_equal(np.asarray(model.encoder.stem_norm.scale[...]), state['stem.1.weight'])
  np.testing.assert_array_equal(np.asarray(model.encoder.stages[3].blocks[2].fc2.kernel[...]),
                                state['stages.3.blocks.2.mlp.fc2.weight'].T)


def test_facebook_convnext_keys(no_torch, tmp_path):
  """The original facebookresearch ConvNeXt release (`downsample_layers`, `dwconv`, `pwconv1`) loads too."""
  timm = random_state_dict(_imagenet('convnext_tiny', TINY, batches_tracked=False))
  fb = {}
  for key, value in timm.items():
    new = key.replace('stem.', 'downsample_layers.0.').replace('.conv_dw.', '.dwconv.')
    new = new.replace('.mlp.fc1.', '.pwconv1.').replace('.mlp.fc2.', '.pwconv2.')
    new = new.replace('head.norm.', 'norm.')
    new = new.replace('head.fc.', 'head.').replace('.blocks.', '.')
    for st in (1, 2, 3):
      new = new.replace(f'stages.{st}.downsample.', f'downsample_layers.{st}.')
    fb[new] = value
  assert 'downsample_layers.2.1.weight' in fb and 'stages.2.8.pwconv2.bias' in fb and 'norm.weight' in fb
  model = abstract_model('convnext_tiny', TINY)
  convert.load_encoder_weights(model, _write(tmp_path, fb, 'fb.safetensors'))
  np.testing.assert_array_equal(np.asarray(model.encoder.stages[2].blocks[8].fc2.bias[...]),
                                timm['stages.2.blocks.8.mlp.fc2.bias'])
  np.testing.assert_array_equal(np.asarray(model.encoder.stages[2].downsample_conv.kernel[...]),
                                timm['stages.2.downsample.1.weight'].transpose(2, 3, 1, 0))


def test_encoder_init_errors(no_torch, tmp_path):
  model = abstract_model('resnext50_32x4d', TINY)
  state = random_state_dict(_imagenet('resnext50_32x4d', TINY))
  del state['layer2.1.bn2.running_mean'], state['conv1.weight']
  with pytest.raises(convert.ConversionError, match=r'r\.safetensors: 2 model tensors have no source key: '
                     r'conv1\.weight, layer2\.1\.bn2\.running_mean$'):
    convert.load_encoder_weights(model, _write(tmp_path, state, 'r.safetensors'))
  timm = random_state_dict(_imagenet('convnext_tiny', TINY))
  with pytest.raises(convert.ConversionError, match=r'c\.safetensors: holds timm ConvNeXt .* keys but the '
                     r'model encoder is resnext50_32x4d'):
    convert.load_encoder_weights(model, _write(tmp_path, timm, 'c.safetensors'))
  with pytest.raises(convert.ConversionError, match=r'holds convnext_tiny weights but the model encoder is '
                     r'convnext_small; set --config.model.encoder=convnext_tiny'):
    convert.load_encoder_weights(abstract_model('convnext_small', TINY), tmp_path / 'c.safetensors')
