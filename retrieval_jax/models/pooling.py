"""Pooling layers as Flax modules, chosen by name (`config.model.pooling`) from `POOLINGS`.

The arithmetic is in `pooling_ops.py` (MAC, SPoC, GeM, R-MAC, Seddati), `cam.py` and
`netvlad.py`; the modules here own the params (GeM p, CAM classifier, NetVLAD codebook).
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import registry
from retrieval_jax.models import cam as cam_lib
from retrieval_jax.models import netvlad as netvlad_lib
from retrieval_jax.models import pooling_ops as ops

Array = jnp.ndarray

class MAC(nn.Module):
  """MAC pooling module: [B, H, W, C] -> [B, C] (unnormalised)."""

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return ops.mac(x, mask)


class SPoC(nn.Module):
  """SPoC (average) pooling module: [B, H, W, C] -> [B, C] (unnormalised)."""

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return ops.spoc(x, mask)


class GeM(nn.Module):
  """GeM pooling: [B, H, W, C] -> [B, C] (unnormalised).

  Attributes:
    p_init: initial exponent.
    per_channel: one exponent per channel (param shape [C]) instead of one ([1]).
    trainable: a param named "p" (the optimiser gives it its own learning rate and no weight
      decay) or a constant.
    eps: clamp before the power.
  """
  p_init: float = 3.0
  per_channel: bool = False
  trainable: bool = True
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    shape = (x.shape[-1],) if self.per_channel else (1,)
    if self.trainable:
      p = self.param("p", nn.initializers.constant(self.p_init), shape, jnp.float32)
    else:
      p = jnp.full(shape, self.p_init, jnp.float32)
    return ops.gem(x, p, self.eps, mask)


class ClassToken(nn.Module):
  """A ViT's class token as the descriptor (`cls`): [B, D] (unnormalised).

  Called as `pool(x, mask, cls=...)` by `retrieval_net.global_head` for the names in
  `TOKEN_POOLINGS`; the map is not used.
  """

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None,
               cls: Optional[Array] = None) -> Array:
    return _class_token(cls, "cls")


class ClassTokenGeM(nn.Module):
  """The class token and GeM over the patch tokens, each L2-normalised, concatenated
  (`cls_gem`): [B, 2D]. Attributes as GeM's."""
  p_init: float = 3.0
  trainable: bool = True
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None,
               cls: Optional[Array] = None) -> Array:
    token = _class_token(cls, "cls_gem")
    gem = GeM(p_init=self.p_init, trainable=self.trainable, eps=self.eps, name="gem")(x, mask)
    return jnp.concatenate([ops.l2n(token), ops.l2n(gem)], axis=-1)


def _class_token(cls: Optional[Array], name: str) -> Array:
  if cls is None:
    raise ValueError(f"pooling {name!r} takes a ViT trunk's class token (model.backbone "
                     "vit_s14 / vit_b14 / vit_l14), and no early fusion of scales")
  return jnp.asarray(cls, jnp.float32)


class RMAC(nn.Module):
  """R-MAC pooling module: [B, H, W, C] -> [B, C], L2-normalised."""
  levels: int = 3

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return ops.rmac(x, self.levels, mask)


class RegionalPool(nn.Module):
  """R-MAC grid with MAC / SPoC / GeM in the regions (`regional_pool`); GeM's p is a param."""
  levels: int = 3
  pool: str = "gem"
  p_init: float = 3.0
  trainable: bool = True
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    p = jnp.full((1,), self.p_init, jnp.float32)
    if self.pool == "gem" and self.trainable:
      p = self.param("p", nn.initializers.constant(self.p_init), (1,), jnp.float32)
    return ops.regional_pool(x, self.levels, self.pool, p, self.eps, mask)


class SeddatiPool(nn.Module):
  """Seddati et al.'s modified R-MAC (`seddati_rmac`): [B, H, W, C] -> [B, C], L2-normalised."""
  levels: int = 3

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return ops.seddati_rmac(x, self.levels, mask)


class CAMSeddatiPool(nn.Module):
  """Seddati et al.'s CAM-masked local R-MAC (`seddati_cam_rmac`): [B, H, W, C] -> [B, C].

  Params "class_kernel" [C, K] and "class_bias" [K]: the trunk's ImageNet classifier (load
  them with `cam.cam_classifier_params`, or pass `classifier_init`). They only select classes
  and weight the CAM; the binary mask stops gradients, and decoupled weight decay scales
  kernel and bias together, which changes neither the top classes nor the mask.

  Attributes:
    levels: R-MAC scales.
    top_k: number of top classes whose CAMs are averaged (paper: 1).
    threshold: mask threshold as a fraction of the average heatmap (paper: 0.9).
    num_classes: K when no `classifier_init` is given.
    classifier_init: optional {"class_kernel", "class_bias"} (e.g. `cam_classifier_params`).
  """
  levels: int = 3
  top_k: int = 1
  threshold: float = cam_lib.CAM_THRESHOLD
  num_classes: int = 1000
  classifier_init: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    channels = x.shape[-1]
    init = dict(self.classifier_init or {})

    def from_init(key, default):
      if key not in init:
        return default
      value = jnp.asarray(init[key], jnp.float32)
      return lambda rng, shape, dtype: _checked_init(value, shape, key).astype(dtype)

    num_classes = (np.shape(init["class_kernel"])[1] if "class_kernel" in init
                   else self.num_classes)
    kernel = self.param("class_kernel",
                        from_init("class_kernel", nn.initializers.lecun_normal()),
                        (channels, num_classes), jnp.float32)
    bias = self.param("class_bias", from_init("class_bias", nn.initializers.zeros),
                      (num_classes,), jnp.float32)
    return cam_lib.seddati_cam_rmac(x, kernel, self.top_k, self.levels, mask, bias,
                                    self.threshold)


def _checked_init(value: Array, shape: Tuple[int, ...], name: str) -> Array:
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{name} init has shape {tuple(value.shape)}, expected {tuple(shape)}")
  return value


class _VLADBase(nn.Module):
  """Shared params of the NetVLAD modules.

  Attributes:
    num_clusters: K.
    alpha: assignment sharpness (the NetVLAD paper's default init uses 100 with normalised
      descriptors; `clustering.kmeans_init` suggests one from data).
    centroids_init: optional [K, C] array (e.g. from `clustering.kmeans_init`); else random
      unit rows.
    decoupled: also learn the assignment's 1x1 conv ("assign_kernel" [C, K], "assign_bias"
      [K], initialised from the centroids), as the NetVLAD paper's {w_k, b_k, c_k}.
    normalize_input: L2-normalise the local descriptors first.
  """
  num_clusters: int = 64
  alpha: float = 100.0
  centroids_init: Optional[Any] = None
  decoupled: bool = False
  normalize_input: bool = True

  def _vlad_params(self, channels: int) -> Dict[str, Array]:
    shape = (self.num_clusters, channels)
    if self.centroids_init is not None:
      init_value = jnp.asarray(self.centroids_init, jnp.float32)
      if init_value.shape != shape:
        raise ValueError(f"centroids_init has shape {init_value.shape}, expected {shape}")
      init = lambda rng, shp, dtype: init_value.astype(dtype)
    else:
      init = lambda rng, shp, dtype: ops.normalize(jax.random.normal(rng, shp, dtype))
    c = self.param("centroids", init, shape, jnp.float32)
    out = {"centroids": c, "assign_kernel": None, "assign_bias": None}
    if self.decoupled:
      out["assign_kernel"] = self.param(
          "assign_kernel", lambda rng: 2.0 * self.alpha * c.T)
      out["assign_bias"] = self.param(
          "assign_bias", lambda rng: -self.alpha * jnp.sum(c * c, axis=-1))
    return out


class NetVLAD(_VLADBase):
  """NetVLAD pooling: [B, H, W, C] -> [B, K*C], L2-normalised (see `vlad_aggregate`)."""

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    prm = self._vlad_params(x.shape[-1])
    return netvlad_lib.netvlad(x, prm["centroids"], self.alpha, mask, prm["assign_kernel"],
                               prm["assign_bias"], self.normalize_input)


class MultiScaleNetVLAD(_VLADBase):
  """Vaccaro et al.'s multi-scale NetVLAD: [B, H, W, C] -> [B, K*C], L2-normalised.

  Attributes (besides NetVLAD's):
    windows: stride-1 max-pooling windows whose column features are pooled together.
  """
  windows: Tuple[int, ...] = (2, 3)

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    prm = self._vlad_params(x.shape[-1])
    return netvlad_lib.multiscale_netvlad(x, prm["centroids"], self.alpha, tuple(self.windows),
                                          mask, assign_kernel=prm["assign_kernel"],
                                          assign_bias=prm["assign_bias"],
                                          normalize_input=self.normalize_input)


POOLINGS: registry.Registry = registry.Registry("pooling")
for _name, _module in (("mac", MAC), ("spoc", SPoC), ("gem", GeM), ("rmac", RMAC),
                       ("regional", RegionalPool), ("netvlad", NetVLAD),
                       ("ms_netvlad", MultiScaleNetVLAD), ("seddati", SeddatiPool),
                       ("seddati_cam", CAMSeddatiPool), ("cls", ClassToken),
                       ("cls_gem", ClassTokenGeM)):
  POOLINGS.register(_name, _module)

# Poolings that take a ViT trunk's class token (`cls=`) beside the patch-token map.
TOKEN_POOLINGS = ("cls", "cls_gem")


def build_pooling(pooling_name: str, /, **kwargs) -> nn.Module:
  """The pooling module registered as `pooling_name`, built with `kwargs` (`name=` allowed)."""
  return POOLINGS.get(pooling_name)(**kwargs)
