"""VGG16 trunk (torchvision `vgg16().features` minus the last max-pool) and its converter.

cnnimageretrieval-pytorch keeps `list(net.features.children())[:-1]`: 13 3x3 convs (pad 1) with
ReLU, four 2x2/2 max-pools (floor), stride 16, 512 channels. The mask is re-applied after every
ReLU (the conv bias makes padded positions non-zero) and after every pool (a window that
straddles the valid border would otherwise carry valid values into a padded cell).

Param tree: `conv{b}_{i}/{kernel,bias}` for block b in 1..5, conv i in 1..(2 or 3), mapped
from torchvision's `features.{N}.{weight,bias}`.
"""
from typing import Any, Dict, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import layers

# Convs per block of configuration "D"; a 2x2 max-pool follows blocks 1-4 (the 5th is dropped).
VGG16_BLOCKS = (2, 2, 3, 3, 3)
# torchvision `features` index of every conv, in order (ReLU at N+1, pools at 4, 9, 16, 23, 30).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _conv_names():
  return [f"conv{b + 1}_{i + 1}" for b, n in enumerate(VGG16_BLOCKS) for i in range(n)]


class VGG16(nn.Module):
  """VGG16 convolutional trunk following the backbone contract of `layers`.

  Attributes:
    dtype: compute dtype; params stay float32.
    bn_mode: accepted for the common trunk interface; VGG16 has no BatchNorm.
    width: channels of block 1 (64 in torchvision); blocks have width * (1, 2, 4, 8, 8).
      Small values give tiny test models.
  """
  dtype: Any = jnp.float32
  bn_mode: str = "frozen_stats"
  width: int = 64

  @property
  def out_features(self) -> int:
    return 8 * self.width

  @nn.compact
  def __call__(self, x, mask=None, train=False) -> Dict[str, Any]:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] float, normalised for the weights (torchvision: RGB, ImageNet mean/std).
      mask: optional [B, H, W] bool, True on valid pixels (padding at the bottom/right).
      train: unused (no BatchNorm, no dropout in the trunk).
    Returns:
      {"feature_map": conv5_3 [B, H//16, W//16, 8*width], "mask": [B, h, w] bool or None,
       "stages": (conv4_3 after ReLU, before pool4 [B, H//8, W//8, 8*width], conv5_3),
       "stage_masks": matching masks}.
    """
    del train
    # Padding added before normalisation is -mean/std, not 0: zero it here.
    x = layers.apply_mask(x.astype(self.dtype), mask)
    names = iter(_conv_names())
    stages, stage_masks = [], []
    for b, n_convs in enumerate(VGG16_BLOCKS):
      features = self.width * min(2**b, 8)
      for _ in range(n_convs):
        x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, name=next(names))(x)
        x = layers.apply_mask(nn.relu(x), mask)
      if b >= 3:
        stages.append(x)
        stage_masks.append(mask)
      if b < len(VGG16_BLOCKS) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
        mask = layers.downsample_mask(mask, 2, mode="floor")
        x = layers.apply_mask(x, mask)
    return {"feature_map": x, "mask": mask, "stages": tuple(stages),
            "stage_masks": tuple(stage_masks)}


def convert_torchvision_vgg16(state_dict: Mapping[str, Any]) -> Dict[str, Dict]:
  """torchvision `vgg16().state_dict()` -> variables of `VGG16()` (classifier ignored).

  Args:
    state_dict: `features.N.{weight,bias}` (and optionally `classifier.*`) -> tensor.
  Returns:
    {"params": {"conv1_1": {"kernel": [3, 3, 3, 64], "bias": [64]}, ...}} of numpy arrays.
  Raises:
    ValueError: the file lacks tensors of VGG16's trunk or holds tensors it does not use
      (e.g. vgg16_bn's BatchNorm, or a final conv of VGG19).
  """
  needed = [f"features.{n}.{t}" for n in VGG16_CONV_INDICES for t in ("weight", "bias")]
  layers.require_keys(state_dict, needed, "VGG16")
  params = {}
  for name, n in zip(_conv_names(), VGG16_CONV_INDICES):
    params[name] = {"kernel": layers.torch_conv_kernel(state_dict[f"features.{n}.weight"]),
                    "bias": np.asarray(state_dict[f"features.{n}.bias"])}
  layers.check_all_used(state_dict, needed, ignore_prefixes=("classifier.",))
  return {"params": params}

