"""SE-ResNeXt encoders (models/seresnext.py): timm parameter counts (abstract), key mapping, and numerical
agreement with a pure-torch restatement of timm's `seresnext*_32x4d` (no timm here; torch tests skip without it).

The restatement follows timm's resnet.py `Bottleneck` with `attn_layer='se'` (SE after bn3, before the residual
sum) and layers/squeeze_excite.py `SEModule` (mean -> fc1 1x1 + bias -> ReLU -> fc2 1x1 + bias -> sigmoid,
hidden = make_divisible(C / 16, 8)), with timm's state-dict key names.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualunet_jax import convert
from dualunet_jax.models import dualunet
from dualunet_jax.models import seresnext
from model_helpers import abstract
from model_helpers import forward

TINY = 1 / 8
TIMM_TRUNK = {'seresnext50_32x4d': 25_510_896, 'seresnext101_32x4d': 46_906_416}  # timm, classifier removed


def _abstract(name: str, width: float = 1.0, **kwargs) -> seresnext.SEResNeXtEncoder:
  return abstract(lambda rngs: seresnext.SEResNeXtEncoder(name, width_multiplier=width, rngs=rngs, **kwargs))


@functools.cache
def _full_size(name: str) -> seresnext.SEResNeXtEncoder:
  """Read-only, shared: a full-size abstract build costs seconds here (the 101 ~10 s on a busy 2-core CPU)."""
  return _abstract(name)


@pytest.mark.parametrize('name', list(TIMM_TRUNK))
def test_full_size_parameter_counts_match_timm(name):
  assert dualunet.count_params(_full_size(name)) == TIMM_TRUNK[name]


def test_se_sits_in_every_block_with_timm_widths():
  encoder = _full_size('seresnext50_32x4d')
  block = encoder.layer3[5]
  assert (block.se.fc1.in_features, block.se.fc1.out_features) == (1024, 64)
  assert block.se.fc1.use_bias and block.se.fc2.use_bias
  assert encoder.layer1[0].conv2.feature_group_count == 32
  assert [len(layer) for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)] == [3, 4, 6, 3]
  assert len(_full_size('seresnext101_32x4d').layer3) == 23
  paths = [('layer1', 0, 'se', 'fc1', 'kernel'), ('layer4', 2, 'se', 'fc2', 'bias'),
           ('layer2', 0, 'downsample_bn', 'var'), ('conv1', 'kernel')]
  assert [seresnext.seresnext_torch_key(p) for p in paths] == [
      'layer1.0.se.fc1.weight', 'layer4.2.se.fc2.bias', 'layer2.0.downsample.1.running_var', 'conv1.weight']


def test_unknown_name_is_refused():
  with pytest.raises(ValueError, match='unknown SE-ResNeXt'):
    seresnext.SEResNeXtEncoder('seresnext26d_32x4d', rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------- torch restatement


@pytest.fixture(scope='module')
def torch_mod():
  torch = pytest.importorskip('torch', reason='torch not installed (pip install -e ".[convert]")')
  torch.set_num_threads(1)
  return torch


def torch_seresnext(torch, blocks, wm: float, device: str = 'cpu'):
  """timm seresnext*_32x4d (7x7 stem, stride on the grouped 3x3, SE after bn3), timm key names, eval mode."""
  nn, F = torch.nn, torch.nn.functional
  s = lambda c: dualunet.scale_channels(c, wm)

  class SEModule(nn.Module):
    def __init__(self, c):
      super().__init__()
      hidden = max(8, int(c / 16 + 4) // 8 * 8)  # timm make_divisible(c / 16, 8)
      self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
      return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

  class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      width, out = 2 * planes, 4 * planes
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=math.gcd(32, width), bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
      self.se = SEModule(out)
      self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                         if stride != 1 or cin != out else None)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.se(self.bn3(self.conv3(y)))
      return F.relu(y + (x if self.downsample is None else self.downsample(x)))

  class SEResNeXt(nn.Module):
    def __init__(self):
      super().__init__()
      stem = s(64)
      self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
      cin = stem
      for layer, (n, p) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
        mods = []
        for b in range(n):
          mods.append(Bottleneck(cin, s(p), 1 if layer == 1 or b else 2))
          cin = 4 * s(p)
        setattr(self, f'layer{layer}', nn.Sequential(*mods))
      self.fc = nn.Linear(cin, 1000)  # the classifier the loader must ignore

    def forward(self, x):
      feats = [x]
      x = F.relu(self.bn1(self.conv1(x)))
      feats.append(x)
      x = F.max_pool2d(x, 3, 2, 1)
      for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
        x = layer(x)
        feats.append(x)
      return feats

  with torch.device(device):
    model = SEResNeXt()
  if device == 'meta':
    return model
  torch.manual_seed(0)
  with torch.no_grad():  # sensible random scales, BN statistics included
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.normal_(0, math.sqrt(1.0 / math.prod(p.shape[1:])))
      elif name.endswith('bias'):
        p.normal_(0, 0.1)
      else:
        p.uniform_(0.5, 1.5)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_(0, 0.1)
      elif name.endswith('running_var'):
        b.uniform_(0.5, 1.5)
  return model.eval()


@pytest.mark.parametrize('name', list(TIMM_TRUNK))
def test_torch_restatement_has_the_same_count(torch_mod, name):
  model = torch_seresnext(torch_mod, seresnext.SERESNEXT_BLOCKS[name], 1.0, device='meta')
  assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith('fc.')) == TIMM_TRUNK[name]


def test_tiny_encoder_matches_torch_after_loading_its_pth(torch_mod, tmp_path):
  """timm-layout .pth (with fc.* and num_batches_tracked) -> load_seresnext_weights -> the same 6 features."""
  torch = torch_mod
  ref = torch_seresnext(torch, seresnext.SERESNEXT_BLOCKS['seresnext50_32x4d'], TINY)
  torch.save(ref.state_dict(), tmp_path / 'seresnext.pth')
  encoder = _abstract('seresnext50_32x4d', TINY)
  seresnext.load_seresnext_weights(encoder, tmp_path / 'seresnext.pth')
  encoder.eval()
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  got, _ = forward(encoder, images)
  with torch.no_grad():
    want = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  for g, w in zip(got, want):
    w = w.permute(0, 2, 3, 1).numpy()
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * max(1.0, float(np.abs(w).max())))


def test_state_dict_without_se_is_refused(torch_mod):
  """A plain ResNeXt file (no se.*) names the missing SE tensors instead of loading half a network."""
  state = {k: v.numpy() for k, v in torch_seresnext(torch_mod, (3, 4, 6, 3), TINY).state_dict().items()
           if '.se.' not in k}
  with pytest.raises(convert.ConversionError, match=r'model tensors have no source key: layer1\.0\.se\.fc1'):
    seresnext.load_seresnext_state_dict(_abstract('seresnext50_32x4d', TINY), state, source='resnext.pth')


def test_bfloat16_compute_keeps_float32_parameters():
  encoder = _abstract('seresnext50_32x4d', TINY, dtype=jnp.bfloat16)
  assert encoder.layer1[0].se.fc1.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param))} == {jnp.dtype(jnp.float32)}
