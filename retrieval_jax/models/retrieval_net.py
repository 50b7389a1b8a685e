"""RetrievalNet: trunk -> pooling -> L2 -> optional whitening -> L2, built from config by name.

Pure function of its variables: `model.apply(variables, images, mask, train=...)` returns
  {"feature_map": [B, h, w, C], "pooled": [B, D0] (L2-normalised), "descriptor": [B, D]}.
The two halves are methods of their own, `trunk` (images -> feature maps) and `head` (maps ->
descriptor), which multi-scale early fusion calls apart: `model.apply(v, x, m,
method=RetrievalNet.trunk)`.
Images come in as uint8 (or float 0..255) RGB `[B, H, W, 3]`; the weights' mean/std
normalisation happens here, on the device.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from retrieval_jax.models import backbones
from retrieval_jax.models import layers
from retrieval_jax.models import pooling as pooling_lib
from retrieval_jax.models import pooling_ops
from retrieval_jax.models import superglobal

# Feature maps and their validity masks, as `RetrievalNet.trunk` returns them.
Maps = List[Tuple[jnp.ndarray, Optional[jnp.ndarray]]]


class GlobalAttributes(nn.Module):
  """RetrievalNet's attributes (also DelgNet's, which builds its RetrievalNet from them).

  Attributes:
    backbone: trunk name (backbones.backbone_names()).
    backbone_kwargs: extra trunk attributes (e.g. bn_mode, width for tiny test variants).
    pooling: pooling name (pooling.POOLINGS); pooling_kwargs: its attributes (e.g. p_init).
    whitening_dim: 0 for none, else the output size of a trainable whitening layer
      (initialisable from a learned whitening; see postprocess.whitening.whitening_params).
    multi_layer: concatenate the pooled last two stages (Seddati et al.) before whitening.
    mean, std: input normalisation of the trunk's weights (0..1 RGB scale).
    dtype: compute dtype of the trunk ("float32" or "bfloat16"); params stay float32 and
      pooling/normalisation run in float32.
    relup_alpha, regional_gem, regional_gem_p, regional_gem_size: SuperGlobal's ReLU+ and
      regional GeM on the maps before pooling (`prepare_maps`; 0 / False: off).
  """
  backbone: str = "mobilenet_v2"
  backbone_kwargs: Optional[Mapping[str, Any]] = None
  pooling: str = "gem"
  pooling_kwargs: Optional[Mapping[str, Any]] = None
  whitening_dim: int = 0
  multi_layer: bool = False
  mean: Sequence[float] = backbones.IMAGENET_MEAN
  std: Sequence[float] = backbones.IMAGENET_STD
  dtype: str = "float32"
  relup_alpha: float = 0.0
  regional_gem: bool = False
  regional_gem_p: float = superglobal.REGIONAL_GEM_P
  regional_gem_size: int = superglobal.REGIONAL_GEM_SIZE

  def global_attributes(self) -> Dict[str, Any]:
    """These attributes' values, by name (what builds an equal RetrievalNet)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(GlobalAttributes)
            if f.init and f.name not in ("parent", "name")}


class RetrievalNet(GlobalAttributes):
  """A global-descriptor network (attributes: `GlobalAttributes`)."""

  def __call__(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False
               ) -> Dict[str, jnp.ndarray]:
    return self._forward(images, mask, train, None, "head")

  def features(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False
               ) -> Dict[str, Any]:
    """The trunk's outputs {"feature_map", "mask", "stages", "stage_masks"} (a DELG local
    head reads an earlier stage; `maps_of` gives what `head` pools)."""
    return self._forward(images, mask, train, None, "features")

  def trunk(self, images, mask: Optional[jnp.ndarray] = None, train: bool = False) -> Maps:
    """Normalised images -> the feature maps that `head` pools, with their masks.

    Args:
      images: uint8 (or float 0..255) RGB [B, H, W, 3].
      mask: optional [B, H, W] bool validity mask (padding at the bottom/right).
      train: BatchNorm mode flag of the trunk.
    Returns:
      [(feature map [B, h, w, C] float32, mask [B, h, w] or None)], plus the previous
      stage's map and mask with `multi_layer`.
    """
    return self._forward(images, mask, train, None, "trunk")

  def head(self, maps: Maps) -> Dict[str, jnp.ndarray]:
    """Pooling, L2, optional whitening and L2 of `trunk`'s maps (or of fused ones).

    Returns:
      {"feature_map": maps[0][0], "pooled": [B, D0] L2-normalised, "descriptor": [B, D]}.
    """
    return self._forward(None, None, False, maps, "head")

  @nn.compact
  def _forward(self, images, mask, train: bool, maps: Optional[Maps], until: str):
    """The one compact body (submodule names "backbone", "pool", "pool_prev", "whiten"):
    images -> the trunk's features (unless `maps` are given; returned if `until` is
    "features"), -> maps (returned if "trunk"), then maps (and a ViT's class token) -> head."""
    cls = None
    if maps is None:
      feats = trunk_features(self, images, mask, train)
      if until == "features":
        return feats
      maps = maps_of(feats, self.multi_layer)
      if until == "trunk":
        return maps
      cls = feats.get("cls")  # a ViT's class token
    return global_head(self, maps, cls)


def maps_of(feats: Dict[str, Any], multi_layer: bool) -> Maps:
  """The maps `global_head` pools: the last stage (float32, with its mask), plus the
  previous stage's with `multi_layer`."""
  maps = [(feats["feature_map"].astype(jnp.float32), feats["mask"])]
  if multi_layer:
    maps.append((feats["stages"][-2].astype(jnp.float32), feats["stage_masks"][-2]))
  return maps


def normalize_images(images: jnp.ndarray, mean: Sequence[float], std: Sequence[float],
                     mask: Optional[jnp.ndarray]) -> jnp.ndarray:
  """uint8 (or 0..255 float) RGB -> the weights' normalisation, zero on padding (as torch)."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return layers.apply_mask(x, mask)  # Padding is zero *after* normalisation, as torch pads.


def trunk_features(net: nn.Module, images, mask, train: bool) -> Dict[str, Any]:
  """The trunk's outputs ({"feature_map", "mask", "stages", "stage_masks"}) for `net`.

  Called from the compact body of a network with RetrievalNet's trunk attributes
  (backbone, backbone_kwargs, mean, std, dtype): the trunk becomes its submodule "backbone",
  so RetrievalNet and the DELG networks share one parameter layout.
  """
  x = normalize_images(images, net.mean, net.std, mask)
  trunk = backbones.get_backbone(net.backbone).make(
      dtype=jnp.dtype(net.dtype), **dict(net.backbone_kwargs or {}), name="backbone")
  return trunk(x, mask, train)


def global_head(net: nn.Module, maps: Maps, cls: Optional[jnp.ndarray] = None
                ) -> Dict[str, jnp.ndarray]:
  """Pooling, L2, optional whitening and L2 of `maps` for `net` (submodules "pool",
  "pool_prev" when two maps are given, "whiten"); called from a network's compact body.
  `cls`: a ViT's class token [B, D], for the `pooling.TOKEN_POOLINGS`.

  Returns:
    {"feature_map": maps[0][0], "pooled": [B, D0] L2-normalised, "descriptor": [B, D]}.
  """
  pool_kwargs = dict(net.pooling_kwargs or {})
  prepared = [prepare_maps(net, x, m) for x, m in maps]
  token = {"cls": cls} if net.pooling in pooling_lib.TOKEN_POOLINGS else {}
  pooled = pooling_lib.build_pooling(net.pooling, name="pool", **pool_kwargs)(*prepared[0],
                                                                             **token)
  if len(maps) > 1:
    extra = pooling_lib.build_pooling(net.pooling, name="pool_prev", **pool_kwargs)(
        *prepared[1], **token)
    pooled = jnp.concatenate([pooling_ops.l2n(pooled), pooling_ops.l2n(extra)], axis=-1)
  pooled = pooling_ops.l2n(pooled)
  descriptor = pooled
  if net.whitening_dim:
    descriptor = pooling_ops.l2n(nn.Dense(net.whitening_dim, name="whiten")(pooled))
  return {"feature_map": maps[0][0], "pooled": pooled, "descriptor": descriptor}


def prepare_maps(net: nn.Module, x: jnp.ndarray, mask: Optional[jnp.ndarray]
                 ) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """SuperGlobal's ReLU+ then regional GeM on a map before pooling, where `net` asks."""
  alpha = float(getattr(net, "relup_alpha", 0.0) or 0.0)
  if alpha:
    x = superglobal.relu_plus(x, alpha, mask)
  if getattr(net, "regional_gem", False):
    x = superglobal.regional_gem(x, float(net.regional_gem_p), int(net.regional_gem_size), mask)
  return x, mask


def dummy_images(image_size: int) -> jnp.ndarray:
  """The uint8 [1, S, S, 3] batch that model init and shape inference trace with."""
  return jnp.zeros((1, image_size, image_size, 3), jnp.uint8)


def build_retrieval_net(model_config) -> RetrievalNet:
  """Builds a RetrievalNet from `config.model` (fields and defaults: configs/common.py)."""
  spec = backbones.get_backbone(model_config.backbone)
  net = RetrievalNet(
      backbone=model_config.backbone,
      backbone_kwargs=dict(model_config.backbone_kwargs or {}),
      pooling=model_config.pooling,
      pooling_kwargs=dict(model_config.pooling_kwargs or {}),
      whitening_dim=int(model_config.whitening_dim),
      multi_layer=bool(model_config.multi_layer),
      mean=tuple(spec.mean), std=tuple(spec.std),
      dtype=model_config.dtype, **superglobal_fields(model_config))
  return net


def superglobal_fields(model_config) -> Dict[str, Any]:
  """RetrievalNet's SuperGlobal attributes from `config.model` (absent keys: off)."""
  get = lambda k, d: model_config.get(k, d) if hasattr(model_config, "get") else d
  return dict(relup_alpha=float(get("relup_alpha", 0.0)),
              regional_gem=bool(get("regional_gem", False)),
              regional_gem_p=float(get("regional_gem_p", superglobal.REGIONAL_GEM_P)),
              regional_gem_size=int(get("regional_gem_size", superglobal.REGIONAL_GEM_SIZE)))
