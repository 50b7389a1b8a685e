"""SuperGlobal's changes to GeM pooling (Shao et al., ICCV 2023), as pure jnp functions.

"Global Features are All You Need for Image Retrieval and Reranking"; the official torch
modules are `modules/coarse_retrieval/{gemp,relup,rgem,sgem}.py` of ShihaoShao-GH/SuperGlobal.

* GeM+ is plain GeM with a fixed p = 4.6: `pooling.GeM(p_init=4.6, trainable=False)`
  (config `model.pooling_kwargs.p_init=4.6`, `model.pooling_kwargs.trainable=False`).
* ReLU+ (`relu_plus`): activations clamped below at alpha = 0.014 (`model.relup_alpha`), on
  the pooled feature map of any trunk. The official code clamps inside its ResNet instead
  (the block outputs of stages 1-3 and stage 1's inner activations; the last stage keeps
  ReLU): `resnet.ResNet.superglobal_relup` (`model.backbone_kwargs.superglobal_relup`).
* Regional GeM (`regional_gem`, `model.regional_gem`): `0.5 * LPPool(p, k, stride 1)(
  ReflectionPad((k-1)//2)(x / (k^2)^(1/p))) + 0.5 * x` on the feature map before pooling.
* Scale-GeM (`scale_gem`, `extract.multiscale_combine=sgem` / `sgem_power`): the per-scale
  descriptors' element-wise max after L2 normalisation (the official `infinity=True`), or
  their power mean with p = 10 shifted by the image's minimum.

Feature maps are [B, H, W, C] with an optional validity mask [B, H, W] (padding at the
bottom/right, see `layers.py`): the regional GeM reflects at each image's valid border, so a
padded image gives the unpadded image's map on its valid region.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from retrieval_jax.models import pooling_ops

Array = jnp.ndarray

GEM_PLUS_P = 4.6
RELU_PLUS_ALPHA = 0.014
REGIONAL_GEM_P = 2.5
REGIONAL_GEM_SIZE = 5
SGEM_P = 10.0


def relu_plus(x: Array, alpha: float = RELU_PLUS_ALPHA, mask: Optional[Array] = None) -> Array:
  """ReLU+: `max(x, alpha)`; padded positions stay zero."""
  return pooling_ops.fill_padding(jnp.maximum(x, jnp.asarray(alpha, x.dtype)), mask, 0.0)


def _reflect(index: Array, size: Array) -> Array:
  """torch's ReflectionPad index of `index` (may be < 0 or >= size) in [0, size).

  Indices that a reflection cannot reach (past the valid region of a padded image, or a
  region smaller than the pad) are clipped into it: they only feed padded outputs.
  """
  out = jnp.where(index < 0, -index, index)
  out = jnp.where(out >= size, 2 * (size - 1) - out, out)
  return jnp.clip(out, 0, jnp.maximum(size - 1, 0))


def _safe_root(s: Array, p: float) -> Array:
  """`s^(1/p)` for s >= 0 whose gradient is 0 (not inf -> NaN) where s = 0."""
  positive = s > 0
  return jnp.where(positive, jnp.where(positive, s, 1.0) ** (1.0 / p), 0.0)


def regional_gem(x: Array, p: float = REGIONAL_GEM_P, size: int = REGIONAL_GEM_SIZE,
                 mask: Optional[Array] = None) -> Array:
  """SuperGlobal's regional GeM: [B, H, W, C] -> [B, H, W, C] (float32).

  Args:
    x: the trunk's feature map (non-negative, as after a ReLU: the power of a negative
      value is NaN in the official LPPool too).
    p: the LP-pooling exponent (2.5).
    size: the odd window side (5); the map is reflection-padded by (size - 1) // 2.
    mask: optional [B, H, W] bool validity mask.
  """
  x = jnp.asarray(x, jnp.float32)
  b, h, w, _ = x.shape
  pad = (size - 1) // 2
  if mask is None:
    valid_h = jnp.full((b,), h, jnp.int32)
    valid_w = jnp.full((b,), w, jnp.int32)
  else:
    valid_h, valid_w = pooling_ops.valid_sizes(mask)
  rows = _reflect(jnp.arange(-pad, h + pad)[None, :], valid_h[:, None])  # [B, H + 2 pad]
  cols = _reflect(jnp.arange(-pad, w + pad)[None, :], valid_w[:, None])  # [B, W + 2 pad]
  padded = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
  padded = jnp.take_along_axis(padded, cols[:, None, :, None], axis=2)
  padded = padded / (float(size * size) ** (1.0 / p))
  sums = jax.lax.reduce_window(padded ** p, 0.0, jax.lax.add, (1, size, size, 1),
                               (1, 1, 1, 1), "VALID")
  out = 0.5 * _safe_root(sums, p) + 0.5 * x
  return pooling_ops.fill_padding(out, mask, 0.0)


def scale_gem(descriptors: Array, p: float = SGEM_P, infinity: bool = True) -> Array:
  """Scale-GeM over the scales of each image: [B, S, D] -> [B, D] (not normalised).

  `infinity=True`: the element-wise max of the L2-normalised (torch `F.normalize`)
  per-scale descriptors. Else `mean_s((x - gamma)^p)^(1/p) + gamma` with gamma the minimum
  of the image's S x D values (the official code runs one image at a time, so its
  `x.min()` is that image's).
  """
  x = jnp.asarray(descriptors, jnp.float32)
  if infinity:
    return jnp.max(pooling_ops.normalize(x, axis=-1), axis=1)
  gamma = jnp.min(x, axis=(1, 2), keepdims=True)[:, 0]  # [B, 1]
  shifted = jnp.mean((x - gamma[:, None]) ** p, axis=1)
  return _safe_root(shifted, p) + gamma
