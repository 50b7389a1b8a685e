"""Backbone registry and weight import from files a user has on disk.

Weights are converted once from PyTorch layouts (torchvision, timm, cnnimageretrieval-pytorch)
to our param trees; `convert` saves them as `.npz`, which later loads without torch. The
preprocessing belongs to the weights, so each backbone records its input mean/std.

Security: `.pth` files are read with `torch.load(weights_only=True)`, which refuses arbitrary
pickled objects.
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

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


# Lazily imported, so a config only pays for the trunk it uses.
_BACKBONES: Dict[str, Callable[[], BackboneSpec]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet18": _resnet(18), "resnet34": _resnet(34), "resnet50": _resnet(50),
    "resnet101": _resnet(101), "resnet152": _resnet(152),
    "vgg16": _vgg16,
}


def register_backbone(name: str, spec_fn: Callable[[], BackboneSpec]) -> None:
  _BACKBONES[name] = spec_fn


def get_backbone(name: str) -> BackboneSpec:
  if name not in _BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; known: {sorted(_BACKBONES)}")
  return _BACKBONES[name]()


def backbone_names():
  return sorted(_BACKBONES)


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A `.pth` state dict (or a checkpoint holding one under 'state_dict') as numpy arrays."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs a CPU torch (pip install torch), or convert it "
                      "once elsewhere with `python -m retrieval_jax.models.pretrained`") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def save_npz(variables: Mapping[str, Any], path: str) -> None:
  flat = traverse_util.flatten_dict(variables, sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_npz(path: str) -> Dict[str, Any]:
  with np.load(path) as f:
    return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def load_backbone_variables(backbone: str, path: str) -> Dict[str, Any]:
  """Trunk variables {"params", "batch_stats"} from a torch `.pth` or our converted `.npz`."""
  if path.endswith(".npz"):
    return load_npz(path)
  return get_backbone(backbone).convert(read_torch_state_dict(path))


def merge_backbone(variables: Mapping[str, Any], trunk: Mapping[str, Any],
                   scope: str = "backbone") -> Dict[str, Any]:
  """Replaces `variables[col][scope]` by the pretrained trunk, checking shapes leaf by leaf."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, tree in trunk.items():
    if col not in out or scope not in out[col]:
      raise ValueError(f"model has no {col}/{scope} to load pretrained weights into")
    want = traverse_util.flatten_dict(out[col][scope], sep="/")
    got = traverse_util.flatten_dict(tree, sep="/")
    if set(want) != set(got):
      raise ValueError(f"pretrained {col} do not match the model: missing "
                       f"{sorted(set(want) - set(got))[:5]}, unexpected "
                       f"{sorted(set(got) - set(want))[:5]}")
    for k, v in got.items():
      if tuple(np.shape(v)) != tuple(want[k].shape):
        raise ValueError(f"pretrained {col}/{scope}/{k}: shape {np.shape(v)} != model "
                         f"{want[k].shape}")
    out[col][scope] = traverse_util.unflatten_dict(
        {k: np.asarray(v, want[k].dtype) for k, v in got.items()}, sep="/")
  return out


def main(argv=None):
  """`python -m retrieval_jax.models.pretrained BACKBONE SRC.pth DST.npz`: convert once."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("backbone", choices=backbone_names())
  parser.add_argument("src")
  parser.add_argument("dst")
  args = parser.parse_args(argv)
  save_npz(load_backbone_variables(args.backbone, args.src), args.dst)
  print(f"wrote {args.dst}")


if __name__ == "__main__":
  main()
