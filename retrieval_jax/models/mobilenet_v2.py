"""MobileNetV2 trunk (torchvision layout), the demo's backbone: real ImageNet weights install offline.

Output stride 32, 1280 channels (torchvision's `features`, classifier dropped).
"""
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from retrieval_jax.models import layers

# (expansion t, channels c, repeats n, first stride s), torchvision's inverted_residual_setting.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _block_plan(width_mult: float) -> List[Tuple[int, int, int, int]]:
  """[(in, out, stride, expand_ratio)] for features.1 .. features.17."""
  plan, cin = [], _make_divisible(32 * width_mult)
  for t, c, n, s in _SETTING:
    cout = _make_divisible(c * width_mult)
    for i in range(n):
      plan.append((cin, cout, s if i == 0 else 1, t))
      cin = cout
  return plan


class InvertedResidual(nn.Module):
  cin: int
  cout: int
  stride: int
  expand_ratio: int
  bn_mode: str
  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    hidden = int(round(self.cin * self.expand_ratio))
    y, m = x, mask
    if self.expand_ratio != 1:
      y, m = layers.ConvBN(hidden, 1, activation="relu6", name="expand", **kw)(y, m, train)
    y, m = layers.ConvBN(hidden, 3, self.stride, groups=hidden, activation="relu6",
                         name="depthwise", **kw)(y, m, train)
    y, m = layers.ConvBN(self.cout, 1, activation=None, name="project", **kw)(y, m, train)
    if self.stride == 1 and self.cin == self.cout:
      y = y + x
    return y, m


class MobileNetV2(nn.Module):
  """torchvision MobileNetV2 `features`; see layers.py for the trunk contract.

  "stages" are the outputs at stride 16 (features.13, 96 ch) and 32 (features.18, 1280 ch).

  `frozen_blocks`: the stem and the first `frozen_blocks` inverted-residual blocks run under
  `stop_gradient`, so their backward pass is never computed (pair it with `optim.freeze` so
  weight decay leaves them alone too). On CPUs the depthwise-convolution gradients dominate a
  step; fine-tuning only the top blocks is what makes the demo fast there.
  """
  width_mult: float = 1.0
  bn_mode: str = "frozen_stats"
  dtype: Any = jnp.float32
  frozen_blocks: int = 0

  @nn.compact
  def __call__(self, x, mask=None, train=False) -> Dict[str, Any]:
    kw = dict(bn_mode=self.bn_mode, dtype=self.dtype)
    x = x.astype(self.dtype)
    x, mask = layers.ConvBN(_make_divisible(32 * self.width_mult), 3, 2, activation="relu6",
                            name="stem", **kw)(x, mask, train)
    stride16 = stride16_mask = None
    if self.frozen_blocks:
      x = jax.lax.stop_gradient(x)
    for i, (cin, cout, s, t) in enumerate(_block_plan(self.width_mult)):
      x, mask = InvertedResidual(cin, cout, s, t, name=f"block{i + 1}", **kw)(x, mask, train)
      if i + 1 <= self.frozen_blocks:
        x = jax.lax.stop_gradient(x)
      if i + 1 == 13:
        stride16, stride16_mask = x, mask
    last = _make_divisible(1280 * max(1.0, self.width_mult))
    x, mask = layers.ConvBN(last, 1, activation="relu6", name="head", **kw)(x, mask, train)
    return {"feature_map": x, "mask": mask, "stages": (stride16, x),
            "stage_masks": (stride16_mask, mask)}


def convert_torchvision_mobilenet_v2(state_dict, width_mult: float = 1.0) -> Dict[str, Any]:
  """torchvision `mobilenet_v2` state dict -> {"params", "batch_stats"} of `MobileNetV2`."""
  pairs = [(("stem",), "features.0.0", "features.0.1")]
  for i, (_, _, _, t) in enumerate(_block_plan(width_mult)):
    pre, blk = f"features.{i + 1}.conv", f"block{i + 1}"
    # torchvision: [expand ConvBNReLU (t != 1)], depthwise ConvBNReLU, project conv, BN.
    names = (["expand"] if t != 1 else []) + ["depthwise"]
    pairs += [((blk, name), f"{pre}.{j}.0", f"{pre}.{j}.1") for j, name in enumerate(names)]
    pairs.append(((blk, "project"), f"{pre}.{len(names)}", f"{pre}.{len(names) + 1}"))
  pairs.append((("head",), "features.18.0", "features.18.1"))
  return layers.convert_convbn_pairs(state_dict, pairs, "MobileNetV2",
                                     ignore_prefixes=("classifier.",))
