"""Width-scalable torch ResNet and VGG16 with torchvision's module names, for tiny test files.

torchvision's ResNet fixes its stem at 64 channels, so the tests that write small weight files
(width 8) use these re-writings of `torchvision/models/resnet.py` and `vgg.py`, whose
`state_dict()` keys are torchvision's: `conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1,
fc` and `features.N`, `classifier.N`. ResNet is v1.5 (the stride sits on the 3x3 conv).
test_backbones checks that at width 64 they load torchvision's own state dicts strictly and give
its outputs; the backbone parity tests themselves compare against torchvision / timm directly.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


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
