"""Multi-scale inputs on the accelerator, exactly as the reference makes them.

cnnimageretrieval-pytorch's `extract_ms` feeds the network, for every scale s != 1,
`F.interpolate(input, scale_factor=s, mode="bilinear", align_corners=False)` of the
`long_side` input: output size `floor(size * s)`, no antialiasing, and (PyTorch >= 1.6,
`recompute_scale_factor` unset) the source coordinate of output pixel i is
`max((i + 0.5) / s - 0.5, 0)`, rows/columns `floor` and `min(floor + 1, size - 1)`.
`rescale_batch_like_torch` does the same for a padded, masked batch: each image is interpolated
within its own valid region (the padding never leaks in, and the border is clamped to
the image's last valid row/column as for an unpadded tensor), so the result equals the
reference's per-image tensors in the top-left corner of a statically shaped batch.

Interpolation is linear and commutes with the per-channel normalisation, so it may run on
the uint8-valued images before the model normalises them (differences ~1e-6).
"""
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def scaled_size(n: int, scale: float) -> int:
  """torch's output size for `scale_factor`: floor(n * s) in double precision."""
  return int(math.floor(float(n) * float(scale)))


def axis_plan(out_len: int, valid: jnp.ndarray, inv_scale: jnp.ndarray):
  """Per-image source indices [n, out_len] (i0, i1) and weights (w0, w1), as torch's
  bilinear `align_corners=False`: output i reads `max((i + 0.5) * inv_scale - 0.5, 0)`,
  neighbours clamped to the valid length `valid` [n] (padding never contributes)."""
  dst = jnp.arange(out_len, dtype=jnp.float32)[None, :]
  src = jnp.maximum(inv_scale[:, None] * (dst + 0.5) - 0.5, 0.0)
  last = jnp.maximum(valid[:, None] - 1, 0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = jnp.minimum(i0 + 1, last)
  return i0, i1, 1.0 - w1, w1


def rescale_batch_like_torch(images: jnp.ndarray, mask: jnp.ndarray, scale: float,
                  recompute_scale_factor: bool = False) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """A padded batch at `scale`, as `F.interpolate(bilinear, align_corners=False)` per image.

  Args:
    images: [n, H, W, C] (uint8 or float) padded at the bottom/right.
    mask: [n, H, W] bool, True on each image's valid top-left h x w rectangle (all False
      for empty padding rows).
    scale: the scale factor s (> 0). 1 returns the inputs (the reference's `clone`).
    recompute_scale_factor: use in/out sizes for the coordinate mapping instead of 1/s,
      as PyTorch < 1.6 (the version cirtorch was published with) always did.

  Returns:
    (images float32 [n, floor(H s), floor(W s), C], mask [n, floor(H s), floor(W s)]);
    image r's valid region is floor(h_r s) x floor(w_r s), zeros outside.
  """
  scale = float(scale)
  if scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  if scale == 1.0:
    return images.astype(jnp.float32), mask
  n, h_pad, w_pad = mask.shape
  out_h, out_w = scaled_size(h_pad, scale), scaled_size(w_pad, scale)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"scale {scale} makes the {h_pad}x{w_pad} batch empty")
  # Valid sizes per image, and their floor(size * s) from a host table (exact, in double).
  valid_h = jnp.sum(mask[:, :, 0], axis=1).astype(jnp.int32)
  valid_w = jnp.sum(mask[:, 0, :], axis=1).astype(jnp.int32)
  table = jnp.asarray(np.asarray([scaled_size(i, scale) for i in range(max(h_pad, w_pad) + 1)],
                                 np.int32))
  out_vh, out_vw = table[valid_h], table[valid_w]
  if recompute_scale_factor:
    inv_h = valid_h.astype(jnp.float32) / jnp.maximum(out_vh, 1).astype(jnp.float32)
    inv_w = valid_w.astype(jnp.float32) / jnp.maximum(out_vw, 1).astype(jnp.float32)
  else:
    # torch: static_cast<float>(1.0 / scale), the division in double.
    inv = jnp.full((n,), np.float32(1.0 / scale), jnp.float32)
    inv_h = inv_w = inv
  x = images.astype(jnp.float32)
  yi0, yi1, yw0, yw1 = axis_plan(out_h, valid_h, inv_h)
  xi0, xi1, xw0, xw1 = axis_plan(out_w, valid_w, inv_w)

  def one(img, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1):
    # Columns first, then rows: h0l * (w0l * a + w1l * b) + h1l * (w0l * c + w1l * d), the
    # order of torch's CPU kernel.
    cols = img[:, xi0] * xw0[None, :, None] + img[:, xi1] * xw1[None, :, None]
    return cols[yi0] * yw0[:, None, None] + cols[yi1] * yw1[:, None, None]

  out = jax.vmap(one)(x, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1)
  out_mask = ((jnp.arange(out_h)[None, :, None] < out_vh[:, None, None])
              & (jnp.arange(out_w)[None, None, :] < out_vw[:, None, None]))
  return jnp.where(out_mask[..., None], out, 0.0), out_mask
