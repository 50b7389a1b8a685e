"""Receptive fields of a trunk's stages, and DELF's receptive boxes / keypoint centres.

DELF places a keypoint at the centre of the receptive field of a feature-map position. Its
TF code hard-codes `(rf, stride, padding)`: ResNet-50 v1 block3 after DELG's 1x1 stride-2
max-pool (`block3_strides`) is `291, 16 * stride_factor = 32, 145`
(`delf/python/training/model/export_model_utils.py`; the older `feature_extractor.py`
writes 291, 32, 145 for TF-slim's `resnet_v1_50/block3`). Here they are derived from the
layers of our trunks, which differ (torchvision's ResNet v1.5 strides in the 3x3 conv:
layer3 is 267, 16, 133, and 267, 32, 133 after the stride-2 subsampling; EfficientNet-Lite
pads TF style, VGG's pools are unpadded), so every trunk gets its own exact numbers. For
ResNet-50 both put the centre of position i at pixel 32 * i (the reference's padding is
(rf - 1) / 2, ours too), so keypoints coincide; only the box sizes differ.

A chain of layers `(kernel k, stride s, padding before p)` gives, by the usual recursion
over the layers (`jump` = product of the earlier strides):

    rf    += (k - 1) * jump
    start -= p * jump          # first input pixel seen by output position 0
    jump  *= s

and the DELF parameters are `rf`, `stride = jump`, `padding = -start`: the box of position
(i, j) is `[i * stride - padding, j * stride - padding] .. + rf - 1` (inclusive pixel
coordinates, `CalculateReceptiveBoxes`), its centre the keypoint (`CalculateKeypointCenters`).
Only the longest path counts: a residual branch sees a sub-window of its block's window.

The chains are read from the trunk modules' own plans (block tables, paddings), so a change
of a trunk shows up here. `tests/test_local_geometry.py` checks the numbers against
hand-computed values and against the pixels that really influence a position of each trunk.
"""
import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from retrieval_jax import registry
from retrieval_jax.models import efficientnet_lite
from retrieval_jax.models import mobilenet_v2
from retrieval_jax.models import resnet
from retrieval_jax.models import vgg

# (kernel, stride, padding before) of one layer along the longest path.
Layer = Tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """DELF's receptive-field parameters of one feature map (pixels of the trunk's input).

  Attributes:
    size: rf, the side of the square window of one position.
    stride: distance between the windows of neighbouring positions.
    padding: the window of position 0 starts at pixel -padding.
  """
  size: int
  stride: int
  padding: int

  @property
  def center_offset(self) -> float:
    """Centre of position 0's window; position i's centre is `i * stride + center_offset`."""
    return -self.padding + (self.size - 1) / 2.0


def compose(layers: Sequence[Layer]) -> ReceptiveField:
  """The receptive field of a chain of layers (see the module docstring)."""
  rf, jump, start = 1, 1, 0
  for kernel, stride, pad in layers:
    rf += (kernel - 1) * jump
    start -= pad * jump
    jump *= stride
  return ReceptiveField(rf, jump, -start)


# ----------------------------------------------------------------------------------------------
# Layer chains per trunk, up to its returned stages: stage -1 is "feature_map", stage -2 the
# earlier stage of `stages` (ResNet layer3, MobileNetV2 features.13, EfficientNet-Lite0 block
# 10, VGG16 conv4_3), where DELF puts its attention.

ChainFn = Callable[..., Tuple[List[Layer], List[Layer]]]
CHAINS: registry.Registry[ChainFn] = registry.Registry("receptive-field chain")


def _resnet_chain(depth: int, stage_sizes: Optional[Sequence[int]] = None,
                  block3_strides: bool = False, **unused):
  """torchvision ResNet: 7x7/2 pad 3 stem, 3x3/2 pad 1 max-pool, v1.5 blocks (with
  `block3_strides`, a 1x1/2 max-pool after layer3 and layer4 at stride 1)."""
  del unused
  kind, sizes = resnet.RESNET_SPECS[depth]
  sizes = tuple(stage_sizes) if stage_sizes is not None else sizes
  chain: List[Layer] = [(7, 2, 3), (3, 2, 1)]
  ends = []
  for i, n_blocks in enumerate(sizes):
    for j in range(n_blocks):
      stride = 2 if (i > 0 and j == 0) else 1
      if block3_strides and i == len(sizes) - 1:
        stride = 1
      if kind == "basic":
        chain += [(3, stride, 1), (3, 1, 1)]
      else:
        chain += [(1, 1, 0), (3, stride, 1), (1, 1, 0)]
    if block3_strides and i == len(sizes) - 2:
      chain.append((1, 2, 0))
    ends.append(len(chain))
  return chain[:ends[-2]], chain


for _depth in resnet.RESNET_SPECS:
  CHAINS.register(f"resnet{_depth}",
                  lambda depth=_depth, **kw: _resnet_chain(depth, **kw))


@CHAINS.register("mobilenet_v2")
def _mobilenet_v2_chain(width_mult: float = 1.0, **unused):
  """torchvision MobileNetV2: 3x3/2 stem, blocks 1..17 (1x1 expand, 3x3 depthwise, 1x1)."""
  del unused
  chain: List[Layer] = [(3, 2, 1)]
  stage16 = None
  plan = mobilenet_v2._block_plan(width_mult)  # pylint: disable=protected-access
  for i, (_, _, stride, expand) in enumerate(plan):
    chain += ([(1, 1, 0)] if expand != 1 else []) + [(3, stride, 1), (1, 1, 0)]
    if i + 1 == 13:  # MobileNetV2's stride-16 stage (see mobilenet_v2.MobileNetV2)
      stage16 = list(chain)
  return stage16, chain + [(1, 1, 0)]


@CHAINS.register("efficientnet_lite0")
def _efficientnet_lite0_chain(**unused):
  """EfficientNet-Lite0: TF "SAME" pads frozen for even sizes (pad before = (k - s) // 2)."""
  del unused
  def pad(k, s):
    return efficientnet_lite.same_padding(k, s)[0][0]
  chain: List[Layer] = [(3, 2, pad(3, 2))]
  stage16 = None
  blocks = efficientnet_lite._block_configs()  # pylint: disable=protected-access
  for i, (k, s, e, _, _) in enumerate(blocks):
    chain += ([(1, 1, 0)] if e != 1 else []) + [(k, s, pad(k, s)), (1, 1, 0)]
    if i == efficientnet_lite._STRIDE16_BLOCK:  # pylint: disable=protected-access
      stage16 = list(chain)
  return stage16, chain + [(1, 1, 0)]


@CHAINS.register("vgg16")
def _vgg16_chain(**unused):
  """VGG16 trunk: 3x3 pad 1 convs, unpadded 2x2/2 pools; stages conv4_3 and conv5_3."""
  del unused
  chain: List[Layer] = []
  stage8 = None
  for b, n_convs in enumerate(vgg.VGG16_BLOCKS):
    chain += [(3, 1, 1)] * n_convs
    if b == 3:
      stage8 = list(chain)
    if b < len(vgg.VGG16_BLOCKS) - 1:
      chain.append((2, 2, 0))
  return stage8, chain


def receptive_field(backbone: str, backbone_kwargs: Optional[Mapping[str, Any]] = None,
                    stage: int = -2, subsample: int = 1) -> ReceptiveField:
  """The receptive field of `stages[stage]` of trunk `backbone` (config.model.backbone).

  Args:
    backbone: trunk name, e.g. "resnet50".
    backbone_kwargs: the trunk's attributes (config.model.backbone_kwargs); only those that
      change the layer chain matter (ResNet `stage_sizes`, MobileNetV2 `width_mult`).
    stage: -2 for the earlier stage (DELF's), -1 for the final feature map.
    subsample: a 1x1 stride-`subsample` max-pool on that stage (the local head's
      `subsample`): the window is unchanged, the stride multiplied.
  Raises:
    ValueError: an unknown trunk or stage.
  """
  if stage not in (-2, -1):
    raise ValueError(f"receptive_field: stage must be -2 or -1, got {stage}")
  earlier, last = CHAINS.get(backbone)(**dict(backbone_kwargs or {}))
  chain = list(earlier if stage == -2 else last)
  if int(subsample) > 1:
    chain.append((1, int(subsample), 0))
  return compose(chain)


def receptive_boxes(height: int, width: int, rf: ReceptiveField) -> np.ndarray:
  """DELF's `CalculateReceptiveBoxes`: [height * width, 4] (ymin, xmin, ymax, xmax), row-major."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  pos = np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64)
  starts = pos * rf.stride - rf.padding
  return np.concatenate([starts, starts + rf.size - 1], axis=1)


def box_centers(boxes: np.ndarray) -> np.ndarray:
  """DELF's `CalculateKeypointCenters`: [N, 4] boxes -> [N, 2] (y, x) centres."""
  return (boxes[:, :2] + boxes[:, 2:]) / 2.0
