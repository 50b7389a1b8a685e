"""RetrievalNet: trunk -> pooling -> L2 -> optional whitening -> L2, built from config by name.

Pure function of its variables: `model.apply(variables, images, mask, train=...)` returns
  {"feature_map": [B, h, w, C], "pooled": [B, D0] (L2-normalised), "descriptor": [B, D]}.
Images come in as uint8 (or float 0..255) RGB `[B, H, W, 3]`; the weights' mean/std
normalisation happens here, on the device.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from retrieval_jax.models import layers
from retrieval_jax.models import pooling as pooling_lib
from retrieval_jax.models import pretrained


class RetrievalNet(nn.Module):
  """A global-descriptor network.

  Attributes:
    backbone: trunk name (pretrained.backbone_names()).
    backbone_kwargs: extra trunk attributes (e.g. bn_mode, width for tiny test variants).
    pooling: pooling name (pooling.POOLINGS); pooling_kwargs: its attributes (e.g. p_init).
    whitening_dim: 0 for none, else the output size of a trainable whitening layer
      (initialisable from a learned whitening; see whitening.whitening_params).
    multi_layer: concatenate the pooled last two stages (Seddati et al.) before whitening.
    mean, std: input normalisation of the trunk's weights (0..1 RGB scale).
    dtype: compute dtype of the trunk ("float32" or "bfloat16"); params stay float32 and
      pooling/normalisation run in float32.
  """
  backbone: str = "mobilenet_v2"
  backbone_kwargs: Optional[Mapping[str, Any]] = None
  pooling: str = "gem"
  pooling_kwargs: Optional[Mapping[str, Any]] = None
  whitening_dim: int = 0
  multi_layer: bool = False
  mean: Sequence[float] = pretrained.IMAGENET_MEAN
  std: Sequence[float] = pretrained.IMAGENET_STD
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False):
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    x = layers.apply_mask(x, mask)  # Padding is zero *after* normalisation, as torch pads.
    spec = pretrained.get_backbone(self.backbone)
    trunk = spec.make(dtype=jnp.dtype(self.dtype), **dict(self.backbone_kwargs or {}),
                      name="backbone")
    feats = trunk(x, mask, train)
    pool_kwargs = dict(self.pooling_kwargs or {})
    fmap = feats["feature_map"].astype(jnp.float32)
    pooled = pooling_lib.build_pooling(self.pooling, name="pool", **pool_kwargs)(
        fmap, feats["mask"])
    if self.multi_layer:
      prev, prev_mask = feats["stages"][-2], feats["stage_masks"][-2]
      extra = pooling_lib.build_pooling(self.pooling, name="pool_prev", **pool_kwargs)(
          prev.astype(jnp.float32), prev_mask)
      pooled = jnp.concatenate([pooling_lib.l2n(pooled), pooling_lib.l2n(extra)], axis=-1)
    pooled = pooling_lib.l2n(pooled)
    descriptor = pooled
    if self.whitening_dim:
      descriptor = pooling_lib.l2n(nn.Dense(self.whitening_dim, name="whiten")(pooled))
    return {"feature_map": fmap, "pooled": pooled, "descriptor": descriptor}


def from_config(model_config) -> Tuple[RetrievalNet, pretrained.BackboneSpec]:
  """Builds a RetrievalNet from `config.model` (see configs/common.py)."""
  spec = pretrained.get_backbone(model_config.backbone)
  net = RetrievalNet(
      backbone=model_config.backbone,
      backbone_kwargs=dict(model_config.get("backbone_kwargs", {}) or {}),
      pooling=model_config.pooling,
      pooling_kwargs=dict(model_config.get("pooling_kwargs", {}) or {}),
      whitening_dim=int(model_config.get("whitening_dim", 0)),
      multi_layer=bool(model_config.get("multi_layer", False)),
      mean=tuple(spec.mean), std=tuple(spec.std),
      dtype=model_config.get("dtype", "float32"))
  return net, spec
