"""A pure-torch restatement of the official HoVer-Net (vqdang/hover_net `models/hovernet/net_desc.py` and
`net_utils.py`, the release layout), for tests: same modules, same state-dict key names (`conv0./.weight`,
`d1.units.2.preact/bn.running_mean`, `decoder.tp.u3.dense.units.0.preact_bna/bn.weight`, ...), same forward
(TF-same padding layer, valid dense units with crop-and-concat, fixed skip crops, TensorPack unpooling).

`width` scales channels like the Flax model (restated here, not imported): c -> max(4, round(c w / 4) * 4).
Not collected by pytest (no test_ prefix); imported by test_hovernet.py and test_convert_hovernet.py.
"""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def scaled(c: int, width: float) -> int:
  return c if width == 1 else max(4, int(round(c * width / 4)) * 4)


def crop_op(x, cropping):
  t, l = cropping[0] // 2, cropping[1] // 2
  return x[:, :, t:-(cropping[0] - t), l:-(cropping[1] - l)]


def crop_to_shape(x, y):
  return crop_op(x, (x.shape[2] - y.shape[2], x.shape[3] - y.shape[3]))


class TFSamepaddingLayer(nn.Module):

  def __init__(self, ksize, stride):
    super().__init__()
    self.ksize, self.stride = ksize, stride

  def forward(self, x):
    if x.shape[2] % self.stride == 0:
      pad = max(self.ksize - self.stride, 0)
    else:
      pad = max(self.ksize - (x.shape[2] % self.stride), 0)
    a = pad // 2
    return F.pad(x, (a, pad - a, a, pad - a), 'constant', 0)


class DenseBlock(nn.Module):

  def __init__(self, in_ch, unit_ksize, unit_ch, unit_count, split=1):
    super().__init__()
    self.nr_unit = unit_count
    unit_in_ch = in_ch
    self.units = nn.ModuleList()
    for _ in range(unit_count):
      self.units.append(nn.Sequential(OrderedDict([
          ('preact_bna/bn', nn.BatchNorm2d(unit_in_ch, eps=1e-5)),
          ('preact_bna/relu', nn.ReLU()),
          ('conv1', nn.Conv2d(unit_in_ch, unit_ch[0], unit_ksize[0], stride=1, padding=0, bias=False)),
          ('conv1/bn', nn.BatchNorm2d(unit_ch[0], eps=1e-5)),
          ('conv1/relu', nn.ReLU()),
          ('conv2', nn.Conv2d(unit_ch[0], unit_ch[1], unit_ksize[1], groups=split, stride=1, padding=0,
                              bias=False)),
      ])))
      unit_in_ch += unit_ch[1]
    self.blk_bna = nn.Sequential(OrderedDict([('bn', nn.BatchNorm2d(unit_in_ch, eps=1e-5)), ('relu', nn.ReLU())]))
    self.out_ch = unit_in_ch

  def forward(self, prev_feat):
    for idx in range(self.nr_unit):
      new_feat = self.units[idx](prev_feat)
      prev_feat = crop_to_shape(prev_feat, new_feat)
      prev_feat = torch.cat([prev_feat, new_feat], dim=1)
    return self.blk_bna(prev_feat)


class ResidualBlock(nn.Module):

  def __init__(self, in_ch, unit_ksize, unit_ch, unit_count, stride=1):
    super().__init__()
    unit_in_ch = in_ch
    self.units = nn.ModuleList()
    for idx in range(unit_count):
      layers = [
          ('preact/bn', nn.BatchNorm2d(unit_in_ch, eps=1e-5)),
          ('preact/relu', nn.ReLU()),
          ('conv1', nn.Conv2d(unit_in_ch, unit_ch[0], unit_ksize[0], stride=1, padding=0, bias=False)),
          ('conv1/bn', nn.BatchNorm2d(unit_ch[0], eps=1e-5)),
          ('conv1/relu', nn.ReLU()),
          ('conv2/pad', TFSamepaddingLayer(ksize=unit_ksize[1], stride=stride if idx == 0 else 1)),
          ('conv2', nn.Conv2d(unit_ch[0], unit_ch[1], unit_ksize[1], stride=stride if idx == 0 else 1, padding=0,
                              bias=False)),
          ('conv2/bn', nn.BatchNorm2d(unit_ch[1], eps=1e-5)),
          ('conv2/relu', nn.ReLU()),
          ('conv3', nn.Conv2d(unit_ch[1], unit_ch[2], unit_ksize[2], stride=1, padding=0, bias=False)),
      ]
      self.units.append(nn.Sequential(OrderedDict(layers if idx != 0 else layers[2:])))
      unit_in_ch = unit_ch[-1]
    self.shortcut = (nn.Conv2d(in_ch, unit_ch[-1], 1, stride=stride, bias=False)
                     if in_ch != unit_ch[-1] or stride != 1 else None)
    self.blk_bna = nn.Sequential(OrderedDict([('bn', nn.BatchNorm2d(unit_in_ch, eps=1e-5)), ('relu', nn.ReLU())]))

  def forward(self, prev_feat):
    shortcut = prev_feat if self.shortcut is None else self.shortcut(prev_feat)
    for unit in self.units:
      prev_feat = unit(prev_feat) + shortcut
      shortcut = prev_feat
    return self.blk_bna(prev_feat)


class UpSample2x(nn.Module):

  def __init__(self):
    super().__init__()
    self.register_buffer('unpool_mat', torch.from_numpy(np.ones((2, 2), dtype='float32')))

  def forward(self, x):
    shape = list(x.shape)
    ret = torch.tensordot(x.unsqueeze(-1), self.unpool_mat.unsqueeze(0), dims=1)
    return ret.permute(0, 1, 2, 4, 3, 5).reshape((-1, shape[1], shape[2] * 2, shape[3] * 2))


class HoVerNet(nn.Module):

  def __init__(self, nr_types=None, mode='original', width=1.0):
    super().__init__()
    s = lambda c: scaled(c, width)
    self.mode = mode
    layers = [('/', nn.Conv2d(3, s(64), 7, stride=1, padding=0, bias=False)),
              ('bn', nn.BatchNorm2d(s(64), eps=1e-5)), ('relu', nn.ReLU())]
    if mode == 'fast':
      layers = [('pad', TFSamepaddingLayer(ksize=7, stride=1))] + layers
    self.conv0 = nn.Sequential(OrderedDict(layers))
    self.d0 = ResidualBlock(s(64), [1, 3, 1], [s(64), s(64), s(256)], 3, stride=1)
    self.d1 = ResidualBlock(s(256), [1, 3, 1], [s(128), s(128), s(512)], 4, stride=2)
    self.d2 = ResidualBlock(s(512), [1, 3, 1], [s(256), s(256), s(1024)], 6, stride=2)
    self.d3 = ResidualBlock(s(1024), [1, 3, 1], [s(512), s(512), s(2048)], 3, stride=2)
    self.conv_bot = nn.Conv2d(s(2048), s(1024), 1, stride=1, padding=0, bias=False)
    k = 5 if mode == 'original' else 3

    def branch(out_ch):
      dense3 = DenseBlock(s(256), [1, k], [s(128), s(32)], 8, split=4)
      u3 = nn.Sequential(OrderedDict([('conva', nn.Conv2d(s(1024), s(256), k, stride=1, padding=0, bias=False)),
                                      ('dense', dense3),
                                      ('convf', nn.Conv2d(dense3.out_ch, s(512), 1, stride=1, padding=0,
                                                          bias=False))]))
      dense2 = DenseBlock(s(128), [1, k], [s(128), s(32)], 4, split=4)
      u2 = nn.Sequential(OrderedDict([('conva', nn.Conv2d(s(512), s(128), k, stride=1, padding=0, bias=False)),
                                      ('dense', dense2),
                                      ('convf', nn.Conv2d(dense2.out_ch, s(256), 1, stride=1, padding=0,
                                                          bias=False))]))
      u1 = nn.Sequential(OrderedDict([('conva/pad', TFSamepaddingLayer(ksize=k, stride=1)),
                                      ('conva', nn.Conv2d(s(256), s(64), k, stride=1, padding=0, bias=False))]))
      u0 = nn.Sequential(OrderedDict([('bn', nn.BatchNorm2d(s(64), eps=1e-5)), ('relu', nn.ReLU()),
                                      ('conv', nn.Conv2d(s(64), out_ch, 1, stride=1, padding=0, bias=True))]))
      return nn.Sequential(OrderedDict([('u3', u3), ('u2', u2), ('u1', u1), ('u0', u0)]))

    names = [('np', 2), ('hv', 2)] if nr_types is None else [('tp', nr_types), ('np', 2), ('hv', 2)]
    self.decoder = nn.ModuleDict(OrderedDict((n, branch(c)) for n, c in names))
    self.upsample2x = UpSample2x()

  def forward(self, imgs):
    imgs = imgs / 255.0
    d0 = self.d0(self.conv0(imgs))
    d1 = self.d1(d0)
    d2 = self.d2(d1)
    d3 = self.conv_bot(self.d3(d2))
    d = [d0, d1, d2, d3]
    if self.mode == 'original':
      d[0], d[1] = crop_op(d[0], [184, 184]), crop_op(d[1], [72, 72])
    else:
      d[0], d[1] = crop_op(d[0], [92, 92]), crop_op(d[1], [36, 36])
    out = OrderedDict()
    for name, desc in self.decoder.items():
      u3 = desc[0](self.upsample2x(d[-1]) + d[-2])
      u2 = desc[1](self.upsample2x(u3) + d[-3])
      u1 = desc[2](self.upsample2x(u2) + d[-4])
      out[name] = desc[3](u1)
    return out


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics (so eval-mode BN is not the identity), eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in net.state_dict().items():
      if name.endswith('num_batches_tracked') or name.endswith('unpool_mat'):
        continue
      if name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith('weight') and t.ndim == 4:
        fan_in = t.shape[1] * t.shape[2] * t.shape[3]
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif name.endswith('weight'):
        t.copy_(0.8 + 0.4 * torch.rand(t.shape, generator=g))
      else:
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
  return net.eval()


def state_dict_numpy(net: nn.Module) -> dict:
  """The state dict as numpy (including the constant `upsample2x.unpool_mat` buffer, as official files do)."""
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
