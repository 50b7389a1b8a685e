"""Key mapping per backbone: torch state-dict names -> the names our trunk converters read.

* timm ResNets: plain timm `resnet18/34/50/101/152` (7x7 stem, conv shortcut: the
  `resnet50.a1_in1k` / `.tv_in1k` kind) use torchvision's names exactly (`conv1`, `bn1`,
  `layer1.0.conv1`, ..., `layer1.0.downsample.0/1`, `fc`; the activations hold no weights),
  so the torchvision converters read them; the deep-stem / average-pool-shortcut variants
  (`resnet50d`, `resnet50c`, ...) are refused with a clear error.
* cnnimageretrieval-pytorch (cirtorch) ResNets: `features.N.*` (features.0 = conv1, .1 = bn1,
  .4-.7 = layer1-4) -> torchvision names. cirtorch VGGs already use torchvision's
  `features.N`.
"""
from typing import Any, Dict, Mapping

import numpy as np

# cirtorch's `features` of a ResNet is `list(net.children())[:-2]`: conv1, bn1, relu, maxpool,
# layer1, ..., layer4 (ReLU and max-pool hold no weights).
_CIRTORCH_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2",
                             "6": "layer3", "7": "layer4"}


def cirtorch_resnet_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """cirtorch ResNet `features.N.*` keys -> torchvision names (other keys dropped)."""
  out = {}
  for k, v in state_dict.items():
    if not k.startswith("features."):
      continue
    child, _, rest = k[len("features."):].partition(".")
    if child not in _CIRTORCH_RESNET_CHILDREN:
      raise ValueError(f"unexpected cirtorch ResNet tensor {k}: features.{child} should have "
                       "no weights")
    out[f"{_CIRTORCH_RESNET_CHILDREN[child]}.{rest}"] = v
  return out


def check_plain_resnet(state_dict: Mapping[str, Any]) -> None:
  """Refuses timm's deep-stem / average-pool-shortcut ResNets, whose names differ."""
  if any(k.startswith("conv1.0.") for k in state_dict) or any(
      ".downsample.2." in k for k in state_dict):
    raise ValueError("this is a timm ResNet variant with a deep stem or an average-pool "
                     "shortcut (resnet50d / c / s / e ...), which our ResNet does not have; use "
                     "plain ResNet weights (torchvision, or timm 'resnet50.a1_in1k' / "
                     "'resnet50.tv_in1k').")


def prepare_trunk_dict(backbone: str, sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Key renames before a trunk converter: cirtorch ResNet `features.N`; timm checks."""
  if backbone.startswith("resnet"):
    if any(k.startswith("features.") for k in sd):
      return cirtorch_resnet_state_dict(sd)
    check_plain_resnet(sd)
  return sd
