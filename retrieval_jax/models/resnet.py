"""ResNet-18/34/50/101/152 trunks (torchvision v1.5 layout) and the torchvision weight converter.

Fully convolutional: no average pool, no classifier. Padding is torch's (stem 7x7/2 pad 3,
max-pool 3x3/2 pad 1 with -inf, 3x3 convs pad 1), so converted torchvision weights give
torchvision's feature maps, and the validity mask is re-applied after every BatchNorm so a
bottom/right padded image gives exactly the unpadded image's features on its valid region.

Param tree (names chosen so that conversion is a table lookup; every conv+BN is a `ConvBN`
holding `conv/kernel`, `bn/{scale,bias}` and batch_stats `bn/{mean,var}`):

    stem                      <- conv1, bn1
    layer{1..4}_{j}/conv{1,2,3} <- layer{i}.{j}.conv{k}, layer{i}.{j}.bn{k}
    layer{1..4}_{j}/downsample  <- layer{i}.{j}.downsample.0, .downsample.1
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from retrieval_jax.models import layers

# depth -> (block kind, blocks per stage), as torchvision's resnet{depth}.
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}


class BasicBlock(nn.Module):
  """Two 3x3 ConvBNs (stride on the first) plus identity or 1x1 projection."""
  features: int
  stride: int = 1
  downsample: bool = False
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    """x: [B, H, W, Cin] -> ([B, H/s, W/s, features], mask [B, H/s, W/s] or None)."""
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    y, out_mask = layers.ConvBN(self.features, 3, self.stride, name="conv1", **kw)(x, mask, train)
    y, _ = layers.ConvBN(self.features, 3, 1, activation=None, name="conv2", **kw)(
        y, out_mask, train)
    identity = x
    if self.downsample:
      identity, _ = layers.ConvBN(self.features, 1, self.stride, activation=None,
                                  name="downsample", **kw)(x, mask, train)
    # Both branches are zero on padded positions, so relu(sum) is too: no extra mask needed.
    return nn.relu(y + identity), out_mask


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here: ResNet v1.5, as torchvision) -> 1x1 (x4), plus shortcut.

  `out_floor` / `inner_floor`: the output / the two inner activations clamped below at
  that value instead of 0 (SuperGlobal's in-trunk ReLU+, see `ResNet.superglobal_relup`).
  """
  features: int  # the bottleneck width; the block outputs 4 * features channels.
  stride: int = 1
  downsample: bool = False
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32
  out_floor: float = 0.0
  inner_floor: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    """x: [B, H, W, Cin] -> ([B, H/s, W/s, 4 * features], mask [B, H/s, W/s] or None)."""
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    y, _ = layers.ConvBN(self.features, 1, 1, name="conv1", relu_floor=self.inner_floor,
                         **kw)(x, mask, train)
    y, out_mask = layers.ConvBN(self.features, 3, self.stride, name="conv2",
                                relu_floor=self.inner_floor, **kw)(y, mask, train)
    y, _ = layers.ConvBN(4 * self.features, 1, 1, activation=None, name="conv3", **kw)(
        y, out_mask, train)
    identity = x
    if self.downsample:
      identity, _ = layers.ConvBN(4 * self.features, 1, self.stride, activation=None,
                                  name="downsample", **kw)(x, mask, train)
    if self.out_floor:  # the floor would leak into the padding: masked again
      return layers.apply_mask(jnp.maximum(y + identity, self.out_floor), out_mask), out_mask
    return nn.relu(y + identity), out_mask


class ResNet(nn.Module):
  """torchvision ResNet trunk, stride 32, following the backbone contract of `layers`.

  Attributes:
    depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
    dtype: compute dtype; params stay float32.
    bn_mode: one of `layers.BN_MODES`.
    width: stem width (64 in torchvision); stages have width * (1, 2, 4, 8) channels
      (times 4 for Bottleneck). Small values give tiny test models.
    stage_sizes: blocks per stage; None takes torchvision's for `depth`.
    superglobal_relup: SuperGlobal's ReLU+ where its official CVNet ResNet puts it
      (ShihaoShao-GH/SuperGlobal `model/resnet.py`, Bottleneck only): the block outputs of
      stages 1-3 and the inner activations of stage 1 clamped below at this value (0.014)
      instead of 0; the last stage keeps ReLU. 0 = off.
    block3_strides: DELG's layout (`delf/python/training/model/resnet50.py`,
      `block3_strides=True`): layer3's output is subsampled by a 1x1 stride-2 max-pool
      (stride 32) and layer4 runs at stride 1 on it. With the stride on layer4's 3x3 conv
      (v1.5, as torchvision) this changes the feature map, so it is off by default
      (`config.model.local_block3_strides`).
  """
  depth: int = 50
  dtype: Any = jnp.float32
  bn_mode: str = "frozen_stats"
  width: int = 64
  stage_sizes: Optional[Sequence[int]] = None
  superglobal_relup: float = 0.0
  block3_strides: bool = False

  @property
  def out_features(self) -> int:
    """Channels of the feature map (2048 for ResNet-50/101/152, 512 for 18/34)."""
    kind, _ = _spec(self.depth)
    return 8 * self.width * _EXPANSION[kind]

  @nn.compact
  def __call__(self, x, mask=None, train=False) -> Dict[str, Any]:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] float, normalised for the weights (torchvision: RGB, ImageNet mean/std).
      mask: optional [B, H, W] bool, True on valid pixels (padding at the bottom/right).
      train: BatchNorm uses batch statistics when True and bn_mode == "train".
    Returns:
      {"feature_map": [B, ceil(H/32), ceil(W/32), C], "mask": [B, h, w] bool or None,
       "stages": (layer3 output [B, H/16, W/16, C/2], layer4 output), "stage_masks": masks}.
    """
    kind, sizes = _spec(self.depth)
    if self.stage_sizes is not None:
      sizes = tuple(self.stage_sizes)
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    if self.superglobal_relup and kind != "bottleneck":
      raise ValueError("superglobal_relup follows SuperGlobal's Bottleneck ResNets (50/101/152)")

    x = x.astype(self.dtype)
    # Padding added before normalisation is -mean/std, not 0: zero it here.
    x = layers.apply_mask(x, mask)
    x, mask = layers.ConvBN(self.width, 7, 2, name="stem", **kw)(x, mask, train)
    # torch pads the max-pool with -inf; flax's max_pool pads with its -inf init value too.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    mask = layers.downsample_mask(mask, 2)
    x = layers.apply_mask(x, mask)

    in_features = self.width
    stages, stage_masks = [], []
    for i, n_blocks in enumerate(sizes):
      features = self.width * 2**i
      for j in range(n_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        if self.block3_strides and i == len(sizes) - 1:
          stride = 1  # layer3 was subsampled instead (below)
        downsample = j == 0 and (stride != 1 or in_features != features * _EXPANSION[kind])
        floors = {}
        if self.superglobal_relup:
          floors = dict(out_floor=self.superglobal_relup if i < 3 else 0.0,
                        inner_floor=self.superglobal_relup if i == 0 else 0.0)
        x, mask = block_cls(features, stride, downsample, name=f"layer{i + 1}_{j}", **kw,
                            **floors)(x, mask, train)
        in_features = features * _EXPANSION[kind]
      if self.block3_strides and i == len(sizes) - 2:
        x = x[:, ::2, ::2]  # the reference's MaxPooling2D((1, 1), strides=(2, 2))
        mask = layers.downsample_mask(mask, 2)
      stages.append(x)
      stage_masks.append(mask)
    return {"feature_map": x, "mask": mask, "stages": tuple(stages[-2:]),
            "stage_masks": tuple(stage_masks[-2:])}


def _spec(depth: int) -> Tuple[str, Tuple[int, ...]]:
  if depth not in RESNET_SPECS:
    raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
  return RESNET_SPECS[depth]


# ----------------------------------------------------------------------------------------------
# Weight conversion.


def convert_torchvision_resnet(state_dict: Mapping[str, Any], depth: int,
                               stage_sizes: Optional[Sequence[int]] = None) -> Dict[str, Dict]:
  """torchvision `resnet{depth}().state_dict()` -> variables of `ResNet(depth=depth)`.

  `fc.*` is ignored. Widths come from the tensors, so a scaled-width model converts too.

  Args:
    state_dict: torchvision key -> tensor (torch or numpy), e.g. from
      `torch.load(path, weights_only=True)`.
    depth: 18, 34, 50, 101 or 152.
    stage_sizes: blocks per stage when not torchvision's for `depth`.
  Returns:
    {"params": ..., "batch_stats": ...} of numpy float arrays, for `ResNet.apply`.
  Raises:
    ValueError: the file lacks tensors of this architecture or holds tensors it does not use.
  """
  kind, sizes = _spec(depth)
  if stage_sizes is not None:
    sizes = tuple(stage_sizes)
  n_convs = 2 if kind == "basic" else 3
  pairs: List[Tuple[Tuple[str, ...], str, str]] = [(("stem",), "conv1", "bn1")]
  for i, n_blocks in enumerate(sizes):
    for j in range(n_blocks):
      tv, fl = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      for k in range(1, n_convs + 1):
        pairs.append(((fl, f"conv{k}"), f"{tv}.conv{k}", f"{tv}.bn{k}"))
      # Block 0 of every stage has a projection in torchvision (layer1 too for Bottleneck);
      # the ResNet module decides the same from the channel counts.
      if j == 0 and (i > 0 or kind == "bottleneck"):
        pairs.append(((fl, "downsample"), f"{tv}.downsample.0", f"{tv}.downsample.1"))
  return layers.convert_convbn_pairs(state_dict, pairs, f"ResNet-{depth}",
                                     ignore_prefixes=("fc.",))
