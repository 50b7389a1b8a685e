"""Backbone registry: a trunk by name, the converter of its torch weights, its input norm.

The preprocessing belongs to the weights, so each backbone records its input mean/std.
Entries are built lazily, so a config only imports the trunk it uses.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Tuple

import numpy as np

from retrieval_jax import registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build a trunk by name and convert its torch weights."""
  make: Callable[..., Any]             # (**kwargs) -> flax Module honouring layers.py's contract
  convert: Callable[[Mapping[str, np.ndarray]], Dict[str, Any]]  # state dict -> variables
  channels: int                        # channels of "feature_map"
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD


def _mobilenet_v2():
  from retrieval_jax.models import mobilenet_v2  # pylint: disable=import-outside-toplevel
  return BackboneSpec(mobilenet_v2.MobileNetV2,
                      mobilenet_v2.convert_torchvision_mobilenet_v2, 1280)


def _resnet(depth):
  def spec():
    from retrieval_jax.models import resnet  # pylint: disable=import-outside-toplevel
    return BackboneSpec(lambda **kw: resnet.ResNet(depth=depth, **kw),
                        lambda sd: resnet.convert_torchvision_resnet(sd, depth),
                        512 if depth < 50 else 2048)
  return spec


def _vgg16():
  from retrieval_jax.models import vgg  # pylint: disable=import-outside-toplevel
  return BackboneSpec(vgg.VGG16, vgg.convert_torchvision_vgg16, 512)


def _efficientnet_lite0():
  from retrieval_jax.models import efficientnet_lite  # pylint: disable=import-outside-toplevel
  # RetrievalNet normalises `(images / 255 - mean) / std`: TF's (x - 127) / 128 on 0..255 RGB.
  mean = tuple(m / 255.0 for m in efficientnet_lite.INPUT_MEAN)
  std = tuple(s / 255.0 for s in efficientnet_lite.INPUT_STD)
  return BackboneSpec(efficientnet_lite.EfficientNetLite0,
                      efficientnet_lite.convert_efficientnet_lite0,
                      efficientnet_lite.EfficientNetLite0.out_features, mean, std)


def _vit(name):
  def spec():
    from retrieval_jax.models import vit  # pylint: disable=import-outside-toplevel
    return BackboneSpec(vit.make_vit(name), vit.convert_timm_vit, vit.VIT_SIZES[name][0])
  return spec


# Entries are spec factories, imported lazily, so a config only pays for the trunk it uses.
BACKBONES: registry.Registry[Callable[[], BackboneSpec]] = registry.Registry("backbone")
BACKBONES.register("mobilenet_v2", _mobilenet_v2)
for _depth in (18, 34, 50, 101, 152):
  BACKBONES.register(f"resnet{_depth}", _resnet(_depth))
BACKBONES.register("vgg16", _vgg16)
BACKBONES.register("efficientnet_lite0", _efficientnet_lite0)
# DINOv2-layout ViTs (models/vit.py): timm `vit_*_patch14_dinov2` / DINOv2 weights.
for _name in ("vit_s14", "vit_b14", "vit_l14"):
  BACKBONES.register(_name, _vit(_name))


def get_backbone(name: str) -> BackboneSpec:
  return BACKBONES.get(name)()


def backbone_names() -> List[str]:
  return BACKBONES.names()
