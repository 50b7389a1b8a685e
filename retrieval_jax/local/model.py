"""DelfNet (trunk + local head) and DelgNet (a RetrievalNet + local head), Flax modules.

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


def _local_outputs(head: heads.LocalHead, feats: Dict[str, Any], labels) -> Dict[str, Any]:
  """`head` on the trunk's earlier stage (stages[-2]), plus that "stage"."""
  stage, stage_mask = feats["stages"][-2], feats["stage_masks"][-2]
  out = head(stage, stage_mask, labels)
  out["stage"] = stage
  return out


class _LocalHeadAttributes(nn.Module):
  """The `heads.LocalHead` attributes DelfNet and DelgNet share, and the head they build."""
  num_classes: int = 0
  reduced_dim: int = 128
  attention_hidden: int = 512
  classifier: str = "softmax"

  def make_local_head(self, **kwargs) -> heads.LocalHead:
    return heads.LocalHead(num_classes=self.num_classes, reduced_dim=self.reduced_dim,
                           attention_hidden=self.attention_hidden, classifier=self.classifier,
                           **kwargs)


class DelfNet(_LocalHeadAttributes):
  """Trunk -> stages[-2] -> LocalHead.

  Attributes:
    backbone, backbone_kwargs, mean, std, dtype: as `RetrievalNet`.
    num_classes, reduced_dim, attention_hidden, classifier: `heads.LocalHead`'s.
  """
  backbone: str = "resnet50"
  backbone_kwargs: Optional[Mapping[str, Any]] = None
  mean: Sequence[float] = backbones.IMAGENET_MEAN
  std: Sequence[float] = backbones.IMAGENET_STD
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, mask: Optional[jnp.ndarray] = None,
               labels: Optional[jnp.ndarray] = None, train: bool = False) -> Dict[str, Any]:
    """images: [B, H, W, 3] uint8; mask: optional [B, H, W] bool; labels: [B] int."""
    return _local_outputs(self.make_local_head(name="local_head"),
                          retrieval_net.trunk_features(self, images, mask, train), labels)


class DelgNet(_LocalHeadAttributes, retrieval_net.GlobalAttributes):
  """DELG: a `RetrievalNet` (trunk, global head) plus a LocalHead on the trunk's stages[-2].

  The RetrievalNet is built from these attributes and shares this module's scope
  (`nn.share_scope`), so the parameters are RetrievalNet's own (`backbone`, `pool`,
  `pool_prev`, `whiten`) beside `local_head`: a DELG checkpoint's global part is a
  RetrievalNet's variables, checkpoints written before this composition load unchanged,
  and `trunk` / `head` are RetrievalNet's (early fusion works for DELG too). The local
  head sees the stage under stop_gradient (heads.LocalHead), so only the global loss
  trains the trunk, as in the DELG paper.

  Attributes:
    backbone, backbone_kwargs, pooling, pooling_kwargs, whitening_dim, multi_layer, mean,
      std, dtype, relup_alpha, regional_gem*: the RetrievalNet's
      (`retrieval_net.GlobalAttributes`; SuperGlobal's ReLU+ / regional GeM act on the
      global head's maps only, the local head reads the trunk's stage unchanged).
    num_classes, reduced_dim, attention_hidden, classifier: `heads.LocalHead`'s.
  """

  def setup(self):
    self.net = retrieval_net.RetrievalNet(**self.global_attributes())
    nn.share_scope(self, self.net)
    self.local_head = self.make_local_head()

  def __call__(self, images, mask: Optional[jnp.ndarray] = None,
               labels: Optional[jnp.ndarray] = None, train: bool = False) -> Dict[str, Any]:
    """images: [B, H, W, 3] uint8; mask: optional [B, H, W] bool; labels: [B] int."""
    feats = self.net.features(images, mask, train)
    out = self.net.head(retrieval_net.maps_of(feats, self.multi_layer))
    out.update(_local_outputs(self.local_head, feats, labels))
    return out

  def trunk(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False
            ) -> retrieval_net.Maps:
    """`RetrievalNet.trunk` (early fusion fuses these maps)."""
    return self.net.trunk(images, mask, train)

  def head(self, maps: retrieval_net.Maps) -> Dict[str, jnp.ndarray]:
    """`RetrievalNet.head`."""
    return self.net.head(maps)
