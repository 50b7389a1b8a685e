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
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import backbones
from retrieval_jax.models import retrieval_net


def subsample_stage(stage: jnp.ndarray, mask: Optional[jnp.ndarray], factor: int):
  """A 1x1 stride-`factor` max-pool (DELG's `block3_strides` subsampling): every
  `factor`-th row and column, [B, ceil(h / f), ceil(w / f), C], and the mask alike."""
  if int(factor) <= 1:
    return stage, mask
  return (stage[:, ::factor, ::factor],
          None if mask is None else mask[:, ::factor, ::factor])


def _local_outputs(head: heads.LocalHead, feats: Dict[str, Any], labels, train: bool,
                   subsample: int) -> Dict[str, Any]:
  """`head` on the trunk's earlier stage (stages[-2]) subsampled by `subsample`, plus that
  "stage" (the reconstruction target)."""
  stage, stage_mask = subsample_stage(feats["stages"][-2], feats["stage_masks"][-2],
                                      subsample)
  out = head(stage, stage_mask, labels, train)
  out["stage"] = stage
  return out


def local_receptive_field(model) -> rf_lib.ReceptiveField:
  """The receptive field of `model`'s local features (its trunk's stage, subsampled)."""
  return rf_lib.receptive_field(model.backbone, dict(model.backbone_kwargs or {}),
                                subsample=local_subsample(model))


def local_subsample(model) -> int:
  """The subsampling the local head's stage gets on top of the trunk's: none when the trunk
  already subsamples it (`block3_strides`)."""
  if dict(model.backbone_kwargs or {}).get("block3_strides"):
    return 1
  return int(getattr(model, "local_subsample", 1))


class _LocalHeadAttributes(nn.Module):
  """The `heads.LocalHead` attributes DelfNet and DelgNet share (plus the stage's
  `local_subsample`, see DelfNet), and the head they build."""
  num_classes: int = 0
  reduced_dim: int = 128
  attention_hidden: int = 512
  attention_bn: bool = True
  local_subsample: int = 2
  classifier: str = "softmax"

  def make_local_head(self, **kwargs) -> heads.LocalHead:
    return heads.LocalHead(num_classes=self.num_classes, reduced_dim=self.reduced_dim,
                           attention_hidden=self.attention_hidden,
                           attention_bn=self.attention_bn, classifier=self.classifier,
                           **kwargs)


class DelfNet(_LocalHeadAttributes):
  """Trunk -> stages[-2] -> LocalHead.

  Attributes:
    backbone, backbone_kwargs, mean, std, dtype: as `RetrievalNet`.
    num_classes, reduced_dim, attention_hidden, attention_bn, classifier:
      `heads.LocalHead`'s.
    local_subsample: the stride-`local_subsample` subsampling of the stage the head reads
      (DELG's `block3_strides`: 2, a stride-32 grid on ResNet layer3); ignored when the
      trunk subsamples it itself (ResNet `block3_strides`).
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
                          retrieval_net.trunk_features(self, images, mask, train),
                          labels, train, local_subsample(self))


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
    num_classes, reduced_dim, attention_hidden, attention_bn, classifier,
      local_subsample: as `DelfNet`.
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
    out.update(_local_outputs(self.local_head, feats, labels, train, local_subsample(self)))
    return out

  def trunk(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False
            ) -> retrieval_net.Maps:
    """`RetrievalNet.trunk` (early fusion fuses these maps)."""
    return self.net.trunk(images, mask, train)

  def head(self, maps: retrieval_net.Maps) -> Dict[str, jnp.ndarray]:
    """`RetrievalNet.head`."""
    return self.net.head(maps)
