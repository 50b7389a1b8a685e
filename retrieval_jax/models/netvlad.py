"""NetVLAD (Arandjelović et al.) and the multi-scale variant of Vaccaro et al. (pure jnp).

`netvlad_params` turns a codebook (`postprocess.clustering.kmeans_init`) into the params of
the `NetVLAD` / `MultiScaleNetVLAD` modules (`pooling.py`).
"""
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import pooling_ops as ops

Array = jnp.ndarray

def vlad_aggregate(desc: Array, centroids: Array, alpha: float, valid: Optional[Array] = None,
                   assign_kernel: Optional[Array] = None, assign_bias: Optional[Array] = None,
                   normalize_input: bool = True) -> Array:
  """NetVLAD aggregation of a set of local descriptors.

  Soft assignment `softmax_k(alpha (2 c_k.x - |c_k|^2))`, i.e. a 1x1 conv with kernel
  `2 alpha c` and bias `-alpha |c|^2` (NetVLAD's initialisation; pass `assign_kernel` /
  `assign_bias` for the decoupled, separately trained form). Residuals
  `sum_i a_k(x_i) (x_i - c_k)` over valid descriptors, intra-normalised per cluster,
  flattened cluster-major, L2-normalised. Normalisations are `F.normalize`'s.

  Args:
    desc: [B, N, C] local descriptors.
    centroids: [K, C].
    alpha: assignment sharpness (used only when `assign_kernel` is None).
    valid: optional [B, N] bool; invalid descriptors get zero assignment.
    assign_kernel: optional [C, K]; assign_bias: optional [K].
    normalize_input: L2-normalise each local descriptor first (NetVLAD does).
  Returns:
    [B, K * C] float32, L2-normalised.
  """
  desc = jnp.asarray(desc, jnp.float32)
  c = jnp.asarray(centroids, jnp.float32)
  if valid is not None:
    desc = jnp.where(valid[..., None], desc, 0.0)
  if normalize_input:
    desc = ops.normalize(desc)
  if assign_kernel is None:
    assign_kernel = 2.0 * alpha * c.T
    assign_bias = -alpha * jnp.sum(c * c, axis=-1)
  logits = jnp.einsum("bnc,ck->bnk", desc, assign_kernel, precision=ops.HIGHEST)
  if assign_bias is not None:
    logits = logits + assign_bias
  a = jax.nn.softmax(logits, axis=-1)
  if valid is not None:
    a = a * valid[..., None].astype(jnp.float32)
  vlad = (jnp.einsum("bnk,bnc->bkc", a, desc, precision=ops.HIGHEST)
          - jnp.sum(a, axis=1)[..., None] * c[None])
  vlad = ops.normalize(vlad, axis=-1)  # intra-normalisation
  return ops.normalize(vlad.reshape(vlad.shape[0], -1))


def netvlad(x: Array, centroids: Array, alpha: float, mask: Optional[Array] = None,
            assign_kernel: Optional[Array] = None, assign_bias: Optional[Array] = None,
            normalize_input: bool = True) -> Array:
  """NetVLAD of a feature map: [B, H, W, C] -> [B, K * C] (see `vlad_aggregate`)."""
  b, h, w, ch = x.shape
  valid = None if mask is None else mask.reshape(b, h * w)
  return vlad_aggregate(x.reshape(b, h * w, ch), centroids, alpha, valid, assign_kernel,
                        assign_bias, normalize_input)


def multiscale_column_features(x: Array, windows: Sequence[int] = (2, 3),
                               mask: Optional[Array] = None
                               ) -> Tuple[Array, Optional[Array]]:
  """Vaccaro et al.'s multi-scale "column features" of a feature map.

  For each window k: a k x k max-pooling with stride 1 and no padding (the paper's "2x2 and
  3x3 (both using stride=1)"); each output position is a `1x1xC` column feature. The sets of
  all windows are concatenated along positions (more local descriptors, each of dimension
  C), which is what the paper's "sets of column features are concatenated" and a C-wide
  NetVLAD (K=64 -> 32k-D on VGG16) imply. A window is valid when it lies in the valid region.

  Args:
    x: [B, H, W, C].
    windows: window sizes; a window larger than the map contributes nothing.
    mask: optional [B, H, W] bool.
  Returns:
    desc [B, N, C] float32 with N = sum_k (H-k+1)(W-k+1), and valid [B, N] bool (None when
    mask is None). Invalid rows are zero.
  """
  x = jnp.asarray(x, jnp.float32)
  b, h, w, ch = x.shape
  xf = ops.fill_padding(x, mask, -jnp.inf)
  descs, valids = [], []
  for k in windows:
    if k > h or k > w:
      continue
    pooled = jax.lax.reduce_window(xf, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1),
                                   "VALID")
    n = pooled.shape[1] * pooled.shape[2]
    if mask is not None:
      # Valid iff every position of the window is: a min-pool of the mask.
      ok = jax.lax.reduce_window(mask.astype(jnp.float32), jnp.inf, jax.lax.min, (1, k, k),
                                 (1, 1, 1), "VALID").reshape(b, n) > 0.5
      valids.append(ok)
      pooled = jnp.where(ok.reshape(pooled.shape[:3])[..., None], pooled, 0.0)
    descs.append(pooled.reshape(b, n, ch))
  if not descs:
    raise ValueError(f"multiscale_column_features: map {h}x{w} smaller than windows {windows}")
  desc = jnp.concatenate(descs, axis=1)
  return desc, (jnp.concatenate(valids, axis=1) if mask is not None else None)


def multiscale_netvlad(x: Array, centroids: Array, alpha: float, windows: Sequence[int] = (2, 3),
                       mask: Optional[Array] = None, **kwargs) -> Array:
  """Vaccaro et al.'s multi-scale NetVLAD: [B, H, W, C] -> [B, K * C].

  Column features of stride-1 max-poolings (`multiscale_column_features`), then one NetVLAD
  over all of them (`vlad_aggregate`, kwargs passed on).
  """
  desc, valid = multiscale_column_features(x, windows, mask)
  return vlad_aggregate(desc, centroids, alpha, valid, **kwargs)


def netvlad_params(centroids: np.ndarray, alpha: float, decoupled: bool = False
                   ) -> Dict[str, np.ndarray]:
  """Params of `NetVLAD` / `MultiScaleNetVLAD` from a codebook (`clustering.kmeans_init`)."""
  c = np.asarray(centroids, np.float32)
  params = {"centroids": c}
  if decoupled:
    params["assign_kernel"] = (2.0 * alpha * c.T).astype(np.float32)
    params["assign_bias"] = (-alpha * np.sum(c * c, axis=1)).astype(np.float32)
  return params

