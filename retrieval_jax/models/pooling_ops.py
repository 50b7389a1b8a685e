"""Global pooling of CNN feature maps as pure jnp functions: MAC, SPoC, GeM, R-MAC, Seddati.

Every function takes a feature map `x` `[B, H, W, C]` (NHWC, any float dtype; the arithmetic
runs in float32) and an optional validity mask `[B, H, W]` bool (True on valid positions,
padding at the bottom/right only, see `layers.py`). With a mask, a padded map gives the
descriptor of the unpadded one: averages and maxima run over valid positions only, and the
region grids (R-MAC, Seddati et al.) are computed from each example's valid size, inside
`jax.jit` with a traced mask (a lookup table built on the host for R-MAC's float32-sensitive
grid, `rmac_grid.py`, integer arithmetic for Seddati's, and sliding windows of traced size).

Conventions follow cnnimageretrieval-pytorch (`cirtorch/layers/functional.py`): MAC, SPoC
and GeM return unnormalised `[B, C]`; R-MAC and the Seddati pooling include their own final
L2 normalisation. The library's two L2 normalisations live here: `l2n` divides by
`(norm + 1e-6)` as the reference does; `normalize` is torch's `F.normalize` (NetVLAD,
margin heads). CAM: `cam.py`; NetVLAD: `netvlad.py`; Flax modules and the registry:
`pooling.py`.
"""
from typing import List, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from retrieval_jax.models import rmac_grid

Array = jnp.ndarray

# cirtorch's l2n / L2N add 1e-6 to the norm; torch.nn.functional.normalize (NetVLAD) clamps
# the norm at 1e-12 instead. Each pooling uses the form of the implementation it follows.
L2N_EPS = 1e-6
NORMALIZE_EPS = 1e-12

# Small matmuls (NetVLAD, CAM) in full float32 keep TPU results equal to the CPU reference.
HIGHEST = jax.lax.Precision.HIGHEST


def l2n(x: Array, axis: int = -1, eps: float = L2N_EPS) -> Array:
  """cirtorch's `l2n`: `x / (||x|| + eps)` along `axis`."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)) + eps)


def normalize(x: Array, axis: int = -1) -> Array:
  """torch's `F.normalize`: `x / max(||x||, 1e-12)` along `axis`.

  The max sits inside the sqrt, so an all-zero vector (a NetVLAD cluster that no descriptor
  is assigned to) has a zero gradient rather than sqrt'(0) = inf -> NaN.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, NORMALIZE_EPS ** 2))


def fill_padding(x: Array, mask: Optional[Array], value: float) -> Array:
  """Replaces padded positions of `x` [B, H, W, C] by `value`.

  `where` rather than a product, so that whatever the padding holds (inf, NaN) never reaches
  the result or its gradient.
  """
  if mask is None:
    return x
  return jnp.where(mask[..., None], x, jnp.asarray(value, x.dtype))


def valid_sizes(mask: Array) -> Tuple[Array, Array]:
  """Per-example valid height and width of a top-left aligned mask [B, H, W] -> ([B], [B])."""
  return (jnp.sum(mask[:, :, 0], axis=1, dtype=jnp.int32),
          jnp.sum(mask[:, 0, :], axis=1, dtype=jnp.int32))


# ----------------------------------------------------------------------------------------------
# Global poolings.


def mac(x: Array, mask: Optional[Array] = None) -> Array:
  """Maximum activations of convolutions: [B, H, W, C] -> [B, C].

  Padded positions become -inf before the max; an image must have one valid position.
  """
  x = fill_padding(jnp.asarray(x, jnp.float32), mask, -jnp.inf)
  return jnp.max(x, axis=(1, 2))


def spoc(x: Array, mask: Optional[Array] = None) -> Array:
  """Sum-pooled (averaged) convolutions: [B, H, W, C] -> [B, C], mean over valid positions."""
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return jnp.mean(x, axis=(1, 2))
  total = jnp.sum(fill_padding(x, mask, 0.0), axis=(1, 2))
  count = jnp.sum(mask, axis=(1, 2), dtype=jnp.float32)[:, None]
  return total / count


def gem(x: Array, p: Union[float, Array] = 3.0, eps: float = 1e-6,
        mask: Optional[Array] = None) -> Array:
  """Generalised mean: `mean(clamp(x, eps)^p)^(1/p)`, [B, H, W, C] -> [B, C].

  Args:
    x: [B, H, W, C].
    p: scalar, or an array broadcastable to [C] (`[1]` or `[C]`: one exponent per channel).
    eps: clamp before the power, as cirtorch (keeps the power defined for ReLU zeros).
    mask: optional [B, H, W] bool.
  Returns:
    [B, C] float32.
  """
  p = jnp.asarray(p, jnp.float32)
  # The fill value must survive the power: eps^p is finite where padding may not be.
  x = fill_padding(jnp.asarray(x, jnp.float32), mask, eps)
  return spoc(jnp.maximum(x, eps) ** p, mask) ** (1.0 / p)



# ----------------------------------------------------------------------------------------------
# Sliding windows of a traced size (one example), used by the masked regional poolings.


def _shift(a: Array, s: Union[int, Array], axis: int, fill: float) -> Array:
  """`out[i] = a[i + s]` along `axis`, `fill` where `i + s` is past the end. s >= 0."""
  n = a.shape[axis]
  idx = jnp.arange(n) + s
  out = jnp.take(a, jnp.minimum(idx, n - 1), axis=axis)
  shape = [1] * a.ndim
  shape[axis] = n
  return jnp.where((idx < n).reshape(shape), out, jnp.asarray(fill, a.dtype))


def _window_reduce_1d(a: Array, k: Array, axis: int, nbits: int, op: str) -> Array:
  """`out[i] = max(a[i : i + k])` (op "max") or `sum(...)` (op "sum") along `axis`.

  k is traced, in [0, 2**nbits). Binary decomposition of k: `pw` holds the reduction over
  windows of 2**j, and the blocks of the bits set in k are chained at increasing offsets.
  O(nbits) passes, no data-dependent shapes, and sums add disjoint blocks (prefix-sum
  differences would cancel catastrophically on GeM's `x^p` of ReLU zeros). Windows that run
  past the end are truncated (callers only read windows that fit).
  """
  combine = jnp.maximum if op == "max" else jnp.add
  identity = -jnp.inf if op == "max" else 0.0
  res = jnp.full_like(a, identity)
  offset = jnp.zeros((), jnp.int32)
  pw = a
  for j in range(nbits):
    bit = (k >> j) & 1
    res = jnp.where(bit == 1, combine(res, _shift(pw, offset, axis, identity)), res)
    offset = offset + bit * (1 << j)
    if j + 1 < nbits:
      pw = combine(pw, _shift(pw, 1 << j, axis, identity))
  return res


def window_pool(x: Array, k: Array, pool: str, p: Array, eps: float) -> Array:
  """Pooling of every k x k window of one example's map: [H, W, C] -> [H, W, C].

  `out[y, x]` pools `x[y:y+k, x:x+k]`; entries whose window leaves the map are meaningless.
  For GeM/SPoC the result is the window's *sum* of `clamp(x)^p` / `x` (the caller divides).
  """
  nbits = max(1, min(x.shape[0], x.shape[1]).bit_length())
  if pool == "mac":
    op = "max"
  else:
    op = "sum"
    x = jnp.maximum(x, eps) ** p if pool == "gem" else x
  return _window_reduce_1d(_window_reduce_1d(x, k, 0, nbits, op), k, 1, nbits, op)


# ----------------------------------------------------------------------------------------------
# Regional pooling (R-MAC and its GeM / SPoC generalisation).

_POOL_FNS = ("mac", "spoc", "gem")


def _pool_global(x: Array, pool: str, p: Array, eps: float, mask: Optional[Array]) -> Array:
  if pool == "mac":
    return mac(x, mask)
  if pool == "spoc":
    return spoc(x, mask)
  return gem(x, p, eps, mask)


def regional_pool(x: Array, levels: int = 3, pool: str = "mac", p: Union[float, Array] = 3.0,
                  eps: float = 1e-6, mask: Optional[Array] = None) -> Array:
  """R-MAC-style regional pooling with any of MAC / SPoC / GeM inside the regions.

  The regions are cirtorch's R-MAC grid (`rmac_regions`), including the whole map. Each
  region is pooled, L2-normalised (`l2n`), the regions summed, and the sum L2-normalised.

  Without a mask the grid comes from the static map size (a Python loop over slices). With a
  mask it comes from each example's valid size: every level pools all k x k windows with a
  traced k (`window_pool`) and weights each window by how many regions start there, so it
  jits with a traced mask and costs O(levels * log(min(H, W))) passes over the map.

  Args:
    x: [B, H, W, C].
    levels: number of scales L.
    pool: "mac", "spoc" or "gem".
    p: GeM exponent (scalar or [C]); ignored otherwise.
    eps: GeM clamp.
    mask: optional [B, H, W] bool, top-left aligned.
  Returns:
    [B, C] float32, L2-normalised.
  """
  if pool not in _POOL_FNS:
    raise ValueError(f"regional_pool: pool must be one of {_POOL_FNS}, got {pool!r}")
  x = jnp.asarray(x, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  _, height, width, _ = x.shape
  if mask is None:
    v = 0.0
    for top, left, bottom, right in rmac_grid.rmac_regions(height, width, levels):
      v = v + l2n(_pool_global(x[:, top:bottom, left:right], pool, p, eps, None))
    return l2n(v)

  hv, wv = valid_sizes(mask)
  x = fill_padding(x, mask, -jnp.inf if pool == "mac" else 0.0)
  v = l2n(_pool_global(x, pool, p, eps, mask))
  for level in range(1, levels + 1):
    wl, cnt_h, cnt_w = jax.vmap(
        lambda a, b, lv=level: rmac_grid.rmac_level_weights(a, b, lv, height, width, levels))(
            hv, wv)
    pooled = jax.vmap(lambda xi, ki: window_pool(xi, ki, pool, p, eps))(x, wl)
    weight = cnt_h[:, :, None] * cnt_w[:, None, :]  # [B, H, W]
    used = (weight > 0)[..., None]
    if pool != "mac":
      area = jnp.maximum(wl, 1).astype(jnp.float32) ** 2
      pooled = jnp.where(used, pooled, 1.0) / area[:, None, None, None]
      if pool == "gem":
        pooled = pooled ** (1.0 / p)
    # Unused windows may hold -inf / garbage: neutralise them before any nonlinearity, so
    # neither the value nor the gradient sees them.
    pooled = jnp.where(used, pooled, 1.0)
    v = v + jnp.sum(weight[..., None] * l2n(pooled), axis=(1, 2))
  return l2n(v)


def rmac(x: Array, levels: int = 3, mask: Optional[Array] = None) -> Array:
  """R-MAC (Tolias et al.), cirtorch's variant: [B, H, W, C] -> [B, C], L2-normalised.

  Global MAC plus every region's MAC, each L2-normalised, summed, L2-normalised. See
  `regional_pool` for the masked (per-example grid) computation.
  """
  return regional_pool(x, levels=levels, pool="mac", mask=mask)


# ----------------------------------------------------------------------------------------------
# Seddati et al., "Towards good practices for image retrieval based on CNN features".


def seddati_kernels(h: int, w: int, levels: int = 3) -> List[Tuple[int, int]]:
  """(kernel, stride) of each level of Seddati et al.'s modified R-MAC (Algorithm 1).

  `k = max(1, ceil(2 min(H, W) / (l + 1)))` and `s = max(1, floor(0.4 k))` (60% overlap);
  `floor(0.4 k)` is computed as `2k // 5` so that it is exact.
  """
  small = min(h, w)
  out = []
  for l in range(1, levels + 1):
    k = max(1, -(-2 * small // (l + 1)))
    out.append((k, max(1, (2 * k) // 5)))
  return out


def seddati_rmac(x: Array, levels: int = 3, mask: Optional[Array] = None) -> Array:
  """Seddati et al.'s modified R-MAC ("OS_RMAC" of their Algorithm 1): [B, H, W, C] -> [B, C].

  Per level l: a k x k max-pooling with stride s (`seddati_kernels`, no padding, floor
  mode as Torch7's SpatialMaxPooling), then square-sum pooling over all windows and a square
  root: `sqrt(sum_windows max^2)` per channel. The levels are summed and the sum
  L2-normalised. As in the algorithm, no per-region normalisation, no global-MAC region.
  Multi-resolution early fusion and the two-layer concatenation happen outside (model).

  Args:
    x: [B, H, W, C].
    levels: number of scales.
    mask: optional [B, H, W] bool; the windows then come from each example's valid size.
  Returns:
    [B, C] float32, L2-normalised.
  """
  x = jnp.asarray(x, jnp.float32)
  _, height, width, _ = x.shape
  v = 0.0
  if mask is None:
    for k, s in seddati_kernels(height, width, levels):
      pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                                     "VALID")
      v = v + jnp.sqrt(jnp.sum(pooled * pooled, axis=(1, 2)))
    return l2n(v)

  hv, wv = valid_sizes(mask)
  x = fill_padding(x, mask, -jnp.inf)
  small = jnp.minimum(hv, wv)
  rows, cols = jnp.arange(height), jnp.arange(width)
  for level in range(1, levels + 1):
    k = jnp.maximum(1, (2 * small + level) // (level + 1))  # ceil(2 small / (l + 1))
    s = jnp.maximum(1, (2 * k) // 5)
    pooled = jax.vmap(lambda xi, ki: window_pool(xi, ki, "mac", 1.0, 0.0))(x, k)
    use_h = (rows[None] % s[:, None] == 0) & (rows[None] + k[:, None] <= hv[:, None])
    use_w = (cols[None] % s[:, None] == 0) & (cols[None] + k[:, None] <= wv[:, None])
    used = (use_h[:, :, None] & use_w[:, None, :])[..., None]
    pooled = jnp.where(used, pooled, 0.0)
    v = v + jnp.sqrt(jnp.sum(pooled * pooled, axis=(1, 2)))
  return l2n(v)

