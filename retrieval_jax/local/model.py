"""DelfNet (trunk + local head) and DelgNet (trunk + global head + local head), Flax modules.

Pure functions of their variables, like `RetrievalNet`:
`model.apply(variables, images, mask, labels=None, train=False)` returns the `LocalHead`
outputs ({"attention", "local_descriptors", "local_mask", ...}) plus "stage" (the trunk stage
the head reads, [B, h, w, C]); DelgNet adds RetrievalNet's {"feature_map", "pooled",
"descriptor"}. Param names are RetrievalNet's (`backbone`, `pool`, `whiten`) plus
`local_head`, so a DELG checkpoint's global part is a RetrievalNet's variables, and the trunk
imports from torchvision / timm files exactly as for RetrievalNet.
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from retrieval_jax.local import heads
from retrieval_jax.models import backbones
from retrieval_jax.models import retrieval_net


def _local_head(net: nn.Module, feats: Dict[str, Any], labels) -> Dict[str, Any]:
  """LocalHead on the trunk's earlier stage (submodule "local_head"), plus that "stage"."""
  stage, stage_mask = feats["stages"][-2], feats["stage_masks"][-2]
  out = heads.LocalHead(num_classes=net.num_classes, reduced_dim=net.reduced_dim,
                        attention_hidden=net.attention_hidden, classifier=net.classifier,
                        name="local_head")(stage, stage_mask, labels)
  out["stage"] = stage
  return out


class DelfNet(nn.Module):
  """Trunk -> stages[-2] -> LocalHead.

  Attributes:
    backbone, backbone_kwargs, mean, std, dtype: as `RetrievalNet`.
    num_classes, reduced_dim, attention_hidden, classifier: `heads.LocalHead`'s.
  """
  backbone: str = "resnet50"
  backbone_kwargs: Optional[Mapping[str, Any]] = None
  num_classes: int = 0
  reduced_dim: int = 128
  attention_hidden: int = 512
  classifier: str = "softmax"
  mean: Sequence[float] = backbones.IMAGENET_MEAN
  std: Sequence[float] = backbones.IMAGENET_STD
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, mask: Optional[jnp.ndarray] = None,
               labels: Optional[jnp.ndarray] = None, train: bool = False) -> Dict[str, Any]:
    """images: [B, H, W, 3] uint8; mask: optional [B, H, W] bool; labels: [B] int."""
    return _local_head(self, retrieval_net.trunk_features(self, images, mask, train), labels)


class DelgNet(nn.Module):
  """DELG: one trunk, RetrievalNet's global head on the last stage, LocalHead on stages[-2].

  The local head sees the stage under stop_gradient (heads.LocalHead), so only the global
  loss trains the trunk, as in the DELG paper.

  Attributes:
    backbone, backbone_kwargs, pooling, pooling_kwargs, whitening_dim, mean, std, dtype:
      as `RetrievalNet` (same submodule names).
    num_classes, reduced_dim, attention_hidden, classifier: `heads.LocalHead`'s.
  """
  backbone: str = "resnet50"
  backbone_kwargs: Optional[Mapping[str, Any]] = None
  pooling: str = "gem"
  pooling_kwargs: Optional[Mapping[str, Any]] = None
  whitening_dim: int = 0
  num_classes: int = 0
  reduced_dim: int = 128
  attention_hidden: int = 512
  classifier: str = "softmax"
  mean: Sequence[float] = backbones.IMAGENET_MEAN
  std: Sequence[float] = backbones.IMAGENET_STD
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, mask: Optional[jnp.ndarray] = None,
               labels: Optional[jnp.ndarray] = None, train: bool = False) -> Dict[str, Any]:
    """images: [B, H, W, 3] uint8; mask: optional [B, H, W] bool; labels: [B] int."""
    feats = retrieval_net.trunk_features(self, images, mask, train)
    out = retrieval_net.global_head(
        self, [(feats["feature_map"].astype(jnp.float32), feats["mask"])])
    out.update(_local_head(self, feats, labels))
    return out
