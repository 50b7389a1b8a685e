"""Torch transcription of CVNet's global network (sungonce/CVNet `model/resnet.py`: the pycls
ResNet and `GlobalHead`) and of SuperGlobal's single-scale forward on it
(ShihaoShao-GH/SuperGlobal `model/resnet.py`, `_forward_singlescale`, with its in-trunk ReLU+:
`relup=True`), for the import tests.
Inputs are BGR, normalised with the BGR-ordered ImageNet mean/std, NCHW, as in the original.
"""
import torch
from torch import nn
from torch.nn import functional as F

_IN_STAGE_DS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BN_EPS = 1e-5
BN_MOM = 0.1
BGR_MEAN = [0.406, 0.456, 0.485]
BGR_STD = [0.225, 0.224, 0.229]


class GeneralizedMeanPoolingP(nn.Module):
  def __init__(self, norm=3, output_size=1, eps=1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.ones(1) * norm)
    self.output_size = output_size
    self.eps = eps

  def forward(self, x):
    x = x.clamp(min=self.eps).pow(self.p)
    return F.adaptive_avg_pool2d(x, self.output_size).pow(1. / self.p)


class GlobalHead(nn.Module):
  def __init__(self, w_in, nc, pp=3):
    super().__init__()
    self.pool = GeneralizedMeanPoolingP(norm=pp)
    self.fc = nn.Linear(w_in, nc, bias=True)


class Relup(nn.Module):
  """SuperGlobal's `relup`: x.clamp(alpha) (alpha 0 is a ReLU)."""

  def __init__(self, alpha):
    super().__init__()
    self.alpha = alpha

  def forward(self, x):
    return x.clamp(self.alpha)


class BottleneckTransform(nn.Module):
  def __init__(self, w_in, w_out, stride, w_b, num_gs, relup=False):
    super().__init__()
    (s1, s3) = (1, stride)  # STRIDE_1X1 = False
    self.a = nn.Conv2d(w_in, w_b, 1, stride=s1, padding=0, bias=False)
    self.a_bn = nn.BatchNorm2d(w_b, eps=BN_EPS, momentum=BN_MOM)
    # SuperGlobal: relup(0.014) when w_out == 256 (its ResBlock always passes a truthy value).
    self.a_relu = Relup(0.014) if (w_out == 256 and relup) else nn.ReLU(inplace=True)
    self.b = nn.Conv2d(w_b, w_b, 3, stride=s3, padding=1, groups=num_gs, bias=False)
    self.b_bn = nn.BatchNorm2d(w_b, eps=BN_EPS, momentum=BN_MOM)
    self.b_relu = Relup(0.014) if (w_out == 256 and relup) else nn.ReLU(inplace=True)
    self.c = nn.Conv2d(w_b, w_out, 1, stride=1, padding=0, bias=False)
    self.c_bn = nn.BatchNorm2d(w_out, eps=BN_EPS, momentum=BN_MOM)

  def forward(self, x):
    for layer in self.children():
      x = layer(x)
    return x


class ResBlock(nn.Module):
  def __init__(self, w_in, w_out, stride, w_b=None, num_gs=1, relup=False):
    super().__init__()
    self.proj_block = (w_in != w_out) or (stride != 1)
    if self.proj_block:
      self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, padding=0, bias=False)
      self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS, momentum=BN_MOM)
    self.f = BottleneckTransform(w_in, w_out, stride, w_b, num_gs, relup)
    self.relu = nn.ReLU(True)
    self.w_out = w_out
    self.relup = Relup(0.014 if relup else 0.)

  def forward(self, x):
    if self.proj_block:
      x = self.bn(self.proj(x)) + self.f(x)
    else:
      x = x + self.f(x)
    if self.w_out != 2048:  # SuperGlobal: relup on every stage but the last
      return self.relup(x)
    return self.relu(x)


class ResStage(nn.Module):
  def __init__(self, w_in, w_out, stride, d, w_b=None, num_gs=1, relup=False):
    super().__init__()
    for i in range(d):
      b_stride = stride if i == 0 else 1
      b_w_in = w_in if i == 0 else w_out
      self.add_module("b{}".format(i + 1),
                      ResBlock(b_w_in, w_out, b_stride, w_b, num_gs, relup))

  def forward(self, x):
    for block in self.children():
      x = block(x)
    return x


class ResStemIN(nn.Module):
  def __init__(self, w_in, w_out):
    super().__init__()
    self.conv = nn.Conv2d(w_in, w_out, 7, stride=2, padding=3, bias=False)
    self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS, momentum=BN_MOM)
    self.relu = nn.ReLU(True)
    self.pool = nn.MaxPool2d(3, stride=2, padding=1)

  def forward(self, x):
    for layer in self.children():
      x = layer(x)
    return x


class ResNet(nn.Module):
  """CVNet's `encoder_q`."""

  def __init__(self, depth, reduction_dim, relup=False):
    super().__init__()
    (d1, d2, d3, d4) = _IN_STAGE_DS[depth]
    w_b = 64
    self.stem = ResStemIN(3, 64)
    self.s1 = ResStage(64, 256, stride=1, d=d1, w_b=w_b, relup=relup)
    self.s2 = ResStage(256, 512, stride=2, d=d2, w_b=w_b * 2, relup=relup)
    self.s3 = ResStage(512, 1024, stride=2, d=d3, w_b=w_b * 4, relup=relup)
    self.s4 = ResStage(1024, 2048, stride=2, d=d4, w_b=w_b * 8, relup=relup)
    self.head = GlobalHead(2048, nc=reduction_dim)

  def feature_map(self, x):
    return self.s4(self.s3(self.s2(self.s1(self.stem(x)))))

  def superglobal_singlescale(self, x, gemp_module=None, rgem_module=None):
    """SuperGlobal's `_forward_singlescale` (its in-trunk ReLU+ off), then F.normalize."""
    x5 = self.feature_map(x)
    if rgem_module is not None:
      x5 = rgem_module(x5)
    x5 = x5.view(x5.shape[0], x5.shape[1], -1)
    if gemp_module is not None:
      x6 = gemp_module(x5)
    else:  # head.pool on the flattened map, as the original
      x6 = F.adaptive_avg_pool1d(x5.clamp(min=self.head.pool.eps).pow(self.head.pool.p),
                                 1).pow(1. / self.head.pool.p)
    x6 = x6.view(x6.size(0), -1)
    x6 = F.normalize(x6, p=2, dim=-1)
    return F.normalize(self.head.fc(x6), p=2, dim=-1)


def bgr_input(images_rgb_uint8):
  """[B, H, W, 3] RGB uint8 -> the networks' NCHW BGR normalised tensor."""
  x = torch.from_numpy(images_rgb_uint8[..., ::-1].copy()).double().permute(0, 3, 1, 2) / 255.
  mean = torch.tensor(BGR_MEAN, dtype=torch.float64)[None, :, None, None]
  std = torch.tensor(BGR_STD, dtype=torch.float64)[None, :, None, None]
  return ((x - mean) / std).float()
