"""Global pooling of CNN feature maps: MAC, SPoC, GeM, R-MAC, NetVLAD and variants.

Every function takes a feature map `x` `[B, H, W, C]` (NHWC, any float dtype; the arithmetic
runs in float32) and an optional validity mask `[B, H, W]` bool (True on valid positions,
padding at the bottom/right only, see `layers.py`). With a mask, a padded map gives the
descriptor of the unpadded one: averages and maxima run over valid positions only, and the
region grids (R-MAC, Seddati et al.) are computed from each example's valid size, inside
`jax.jit` with a traced mask (a lookup table built on the host for R-MAC's float32-sensitive
grid, integer arithmetic for Seddati's, and sliding windows of traced size).

Conventions follow cnnimageretrieval-pytorch (`cirtorch/layers/functional.py`): MAC, SPoC
and GeM return unnormalised `[B, C]`; R-MAC, NetVLAD and the Seddati pooling include their
own final L2 normalisation. `l2n` divides by `(norm + 1e-6)` as the reference does.
"""
import functools
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

# cirtorch's l2n / L2N add 1e-6 to the norm; torch.nn.functional.normalize (NetVLAD) clamps
# the norm at 1e-12 instead. Each pooling uses the form of the implementation it follows.
L2N_EPS = 1e-6
_NORMALIZE_EPS = 1e-12

# NetVLAD's matmuls are small; full float32 keeps TPU results equal to the CPU reference.
_HIGHEST = jax.lax.Precision.HIGHEST


def l2n(x: Array, axis: int = -1, eps: float = L2N_EPS) -> Array:
  """cirtorch's `l2n`: `x / (||x|| + eps)` along `axis`."""
  return x / (jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)) + eps)


def _normalize(x: Array, axis: int = -1) -> Array:
  """torch's `F.normalize`: `x / max(||x||, 1e-12)` along `axis`.

  The max sits inside the sqrt, so an all-zero vector (a NetVLAD cluster that no descriptor
  is assigned to) has a zero gradient rather than sqrt'(0) = inf -> NaN.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, _NORMALIZE_EPS ** 2))


def _fill(x: Array, mask: Optional[Array], value: float) -> Array:
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
  x = _fill(jnp.asarray(x, jnp.float32), mask, -jnp.inf)
  return jnp.max(x, axis=(1, 2))


def spoc(x: Array, mask: Optional[Array] = None) -> Array:
  """Sum-pooled (averaged) convolutions: [B, H, W, C] -> [B, C], mean over valid positions."""
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return jnp.mean(x, axis=(1, 2))
  total = jnp.sum(_fill(x, mask, 0.0), axis=(1, 2))
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
  x = _fill(jnp.asarray(x, jnp.float32), mask, eps)
  return spoc(jnp.maximum(x, eps) ** p, mask) ** (1.0 / p)


# ----------------------------------------------------------------------------------------------
# R-MAC region grid (Tolias et al.), exactly as cirtorch's `rmac()` lays it out.

_RMAC_OVERLAP = 0.4
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)  # candidate numbers of regions along the long side
_RMAC_MAX_EXTRA = len(_RMAC_STEPS)  # Wd / Hd are at most 6


def _rmac_grid(h: int, w: int, levels: int) -> List[Tuple[int, List[int], List[int]]]:
  """Per level l = 1..L: (region side wl, row offsets, column offsets) of cirtorch's rmac().

  The reference computes in float32 (`torch.Tensor`) and its results depend on that
  rounding (e.g. 5x9 is an exact tie between 2 and 3 columns in real numbers, and a 2x32 map
  gets a last region at column 30, not 31); this emulates the same float32 operations.
  """
  big, small = max(h, w), min(h, w)
  steps = np.asarray(_RMAC_STEPS, np.float32)
  b = np.float32(big - small) / (steps - np.float32(1))
  sq = np.float32(small * small)
  with np.errstate(divide="ignore", invalid="ignore"):
    dev = np.abs((sq - np.float32(small) * b) / sq - np.float32(_RMAC_OVERLAP))
  idx = int(np.argmin(dev))  # first minimum, as torch.min on CPU
  wd = idx + 1 if h < w else 0
  hd = idx + 1 if h > w else 0
  grid = []
  for l in range(1, levels + 1):
    wl = (2 * small) // (l + 1)  # == floor(2 w / (l + 1))
    if wl == 0:  # the reference skips these regions
      grid.append((0, [], []))
      continue
    wl2 = wl // 2 - 1  # == floor(wl / 2 - 1)
    grid.append((wl, _rmac_offsets(h, wl, wl2, l + hd), _rmac_offsets(w, wl, wl2, l + wd)))
  return grid


def _rmac_offsets(size: int, wl: int, wl2: int, n: int) -> List[int]:
  """Region offsets along one side: `floor(wl2 + i*b) - wl2`, in float32 as the reference."""
  b = 0.0 if n == 1 else (size - wl) / (n - 1)
  cen = np.floor(np.float32(wl2) + np.arange(n, dtype=np.float32) * np.float32(b))
  return [int(c) - wl2 for c in cen]


def rmac_regions(h: int, w: int, levels: int = 3) -> np.ndarray:
  """The R-MAC regions of an `h` x `w` map, as cirtorch's `rmac()` enumerates them.

  Region side `wl = floor(2 min(h, w) / (l + 1))` at level l; the number of regions along
  the long side is `l + Wd`, Wd in 1..6 chosen so that neighbours overlap closest to 40%;
  offsets floored. Levels with wl = 0 are skipped; duplicated regions are kept (the
  reference adds them twice).

  Args:
    h, w: map height and width.
    levels: number of scales L.
  Returns:
    int64 [R, 4] rows `(top, left, bottom, right)`, bottom/right exclusive; row 0 is the
    whole map (the global MAC that the reference adds to the regional sum), then the
    regions in the reference's loop order (level, row, column).
  """
  boxes = [(0, 0, h, w)]
  for wl, cen_h, cen_w in _rmac_grid(h, w, levels):
    boxes.extend((t, l, t + wl, l + wl) for t in cen_h for l in cen_w)
  return np.asarray(boxes, np.int64)


@functools.lru_cache(maxsize=16)
def _rmac_grid_table(height: int, width: int, levels: int) -> Tuple[np.ndarray, np.ndarray]:
  """`_rmac_grid` of every valid size up to (height, width), for lookup inside jit.

  A table, rather than the float formulas in jnp, because the reference's grid hinges on
  float32 rounding that XLA does not reproduce (division may be computed as a reciprocal
  product, mul-adds may fuse), and ties in the overlap criterion are decided by it.

  Returns:
    wl: int16 [height + 1, width + 1, levels] region side per valid size and level.
    offsets: int16 [height + 1, width + 1, levels, 2, levels + 6] row (0) / column (1)
      offsets of the regions, -1 in unused slots.
  """
  slots = levels + _RMAC_MAX_EXTRA
  wl_table = np.zeros((height + 1, width + 1, levels), np.int16)
  offsets = np.full((height + 1, width + 1, levels, 2, slots), -1, np.int16)
  for h in range(1, height + 1):
    for w in range(1, width + 1):
      for li, (wl, cen_h, cen_w) in enumerate(_rmac_grid(h, w, levels)):
        wl_table[h, w, li] = wl
        offsets[h, w, li, 0, :len(cen_h)] = cen_h
        offsets[h, w, li, 1, :len(cen_w)] = cen_w
  return wl_table, offsets


def _rmac_level_weights(hv: Array, wv: Array, level: int, height: int, width: int,
                        levels: int = 3) -> Tuple[Array, Array, Array]:
  """One example's R-MAC regions of level `level` from its (possibly traced) valid size.

  Args:
    hv, wv: int32 scalars, the valid height and width, at most (height, width).
    level: l in 1..levels (static).
    height, width: the padded map size (static).
    levels: the number of levels of the grid (static; the table is built per value).
  Returns:
    wl: int32 scalar, the region side (0: no region at this level).
    cnt_h: [height] float32, how many regions of the level start at each row.
    cnt_w: [width] float32, same for columns. The regions of the level are the pairs
      (row, column) with weight `cnt_h[row] * cnt_w[column]` (counts keep duplicates).
  """
  wl_table, offsets = _rmac_grid_table(height, width, levels)
  wl = jnp.asarray(wl_table)[hv, wv, level - 1].astype(jnp.int32)
  off = jnp.asarray(offsets)[hv, wv, level - 1].astype(jnp.int32)  # [2, slots]

  def counts(cen, length):
    hits = (cen[:, None] == jnp.arange(length)[None, :]) & (cen[:, None] >= 0)
    return jnp.sum(hits, axis=0, dtype=jnp.float32)

  return wl, counts(off[0], height), counts(off[1], width)


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


def _window_pool(x: Array, k: Array, pool: str, p: Array, eps: float) -> Array:
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
  traced k (`_window_pool`) and weights each window by how many regions start there, so it
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
    for top, left, bottom, right in rmac_regions(height, width, levels):
      v = v + l2n(_pool_global(x[:, top:bottom, left:right], pool, p, eps, None))
    return l2n(v)

  hv, wv = valid_sizes(mask)
  x = _fill(x, mask, -jnp.inf if pool == "mac" else 0.0)
  v = l2n(_pool_global(x, pool, p, eps, mask))
  for level in range(1, levels + 1):
    wl, cnt_h, cnt_w = jax.vmap(
        lambda a, b, lv=level: _rmac_level_weights(a, b, lv, height, width, levels))(hv, wv)
    pooled = jax.vmap(lambda xi, ki: _window_pool(xi, ki, pool, p, eps))(x, wl)
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
  x = _fill(x, mask, -jnp.inf)
  small = jnp.minimum(hv, wv)
  rows, cols = jnp.arange(height), jnp.arange(width)
  for level in range(1, levels + 1):
    k = jnp.maximum(1, (2 * small + level) // (level + 1))  # ceil(2 small / (l + 1))
    s = jnp.maximum(1, (2 * k) // 5)
    pooled = jax.vmap(lambda xi, ki: _window_pool(xi, ki, "mac", 1.0, 0.0))(x, k)
    use_h = (rows[None] % s[:, None] == 0) & (rows[None] + k[:, None] <= hv[:, None])
    use_w = (cols[None] % s[:, None] == 0) & (cols[None] + k[:, None] <= wv[:, None])
    used = (use_h[:, :, None] & use_w[:, None, :])[..., None]
    pooled = jnp.where(used, pooled, 0.0)
    v = v + jnp.sqrt(jnp.sum(pooled * pooled, axis=(1, 2)))
  return l2n(v)


# ----------------------------------------------------------------------------------------------
# Seddati et al.'s CAM-based local masks ("Localization (optional)", after Zhou et al.'s CAM).

# The paper keeps positions whose heatmap reaches 0.9 x its average.
CAM_THRESHOLD = 0.9


def cam_class_scores(x: Array, class_kernel: Array, class_bias: Optional[Array] = None,
                     mask: Optional[Array] = None) -> Array:
  """The classifier's logits: FC of the spatial average (their adaptive average pool).

  Args:
    x: [B, H, W, C] last conv feature map (the one the classifier was trained on).
    class_kernel: [C, K] FC weights (torch `weight.T`).
    class_bias: optional [K].
    mask: optional [B, H, W] bool; the average runs over valid positions.
  Returns:
    [B, K] float32.
  """
  scores = jnp.einsum("bc,ck->bk", spoc(x, mask), jnp.asarray(class_kernel, jnp.float32),
                      precision=_HIGHEST)
  if class_bias is not None:
    scores = scores + jnp.asarray(class_bias, jnp.float32)
  return scores


def cam_heatmap(x: Array, class_kernel: Array, top_k: int = 1,
                class_bias: Optional[Array] = None, mask: Optional[Array] = None) -> Array:
  """Class activation map of the top-k predicted classes: [B, H, W, C] -> [B, H, W].

  CAM (Zhou et al.): `sum_c w_{k,c} x[h, w, c]` for the class k with the highest score. For
  `top_k > 1` (not in the paper, which uses the top class only) the maps of the k best
  classes are averaged, i.e. the CAM of their mean weight vector. Padded positions are 0.
  """
  x = _fill(jnp.asarray(x, jnp.float32), mask, 0.0)
  kernel = jnp.asarray(class_kernel, jnp.float32)
  if not 1 <= top_k <= kernel.shape[1]:
    raise ValueError(f"cam: top_k must be in [1, {kernel.shape[1]}], got {top_k}")
  _, idx = jax.lax.top_k(cam_class_scores(x, kernel, class_bias, mask), top_k)  # [B, k]
  weights = jnp.mean(kernel.T[idx], axis=1)  # [B, C]
  return jnp.einsum("bhwc,bc->bhw", x, weights, precision=_HIGHEST)


def cam_mask(x: Array, class_kernel: Array, top_k: int = 1, mask: Optional[Array] = None,
             class_bias: Optional[Array] = None,
             threshold: float = CAM_THRESHOLD) -> Array:
  """Seddati et al.'s binary CAM mask: [B, H, W, C], [C, K] -> [B, H, W] float32 in {0, 1}.

  1 where `cam_heatmap >= threshold * average(heatmap)`, the average over valid positions;
  0 elsewhere and on padding. The mask is piecewise constant: no gradient flows through it.

  Args:
    x: [B, H, W, C] last conv feature map.
    class_kernel: [C, K] ImageNet FC weights; class_bias: optional [K] (only picks classes).
    top_k: number of top-scoring classes whose CAMs are averaged (paper: 1).
    mask: optional [B, H, W] bool validity mask.
    threshold: fraction of the average heatmap (paper: 0.9).
  Returns:
    [B, H, W] float32.
  """
  heat = cam_heatmap(x, class_kernel, top_k, class_bias, mask)
  if mask is None:
    avg = jnp.mean(heat, axis=(1, 2))
  else:
    avg = (jnp.sum(jnp.where(mask, heat, 0.0), axis=(1, 2))
           / jnp.sum(mask, axis=(1, 2), dtype=jnp.float32))
  # `>=` rather than `>`: an all-zero map (mean 0) keeps everything instead of nothing.
  keep = heat >= threshold * avg[:, None, None]
  if mask is not None:
    keep = keep & mask
  return jax.lax.stop_gradient(keep.astype(jnp.float32))


def seddati_cam_rmac(x: Array, class_kernel: Array, top_k: int = 1, levels: int = 3,
                     mask: Optional[Array] = None, class_bias: Optional[Array] = None,
                     threshold: float = CAM_THRESHOLD) -> Array:
  """Seddati et al.'s local R-MAC: the CAM mask times the map, then `seddati_rmac`.

  The paper multiplies the binary mask with the feature maps (masked-out positions become
  0, the minimum of ReLU features) and computes the modified R-MAC on the product.

  Returns:
    [B, C] float32, L2-normalised.
  """
  x = jnp.asarray(x, jnp.float32)
  cam = cam_mask(x, class_kernel, top_k, mask, class_bias, threshold)
  # `where`, not a product: padding may hold inf / NaN (0 * inf); seddati_rmac masks it.
  local = jnp.where(cam[..., None] > 0, x, 0.0)
  return seddati_rmac(local, levels, mask)


# ImageNet classifier tensors of the supported weight files: (weight [K, C], bias [K]).
_CLASSIFIER_KEYS = (("classifier.1.weight", "classifier.1.bias"),  # torchvision MobileNetV2
                    ("_fc.weight", "_fc.bias"),                    # EfficientNet-Lite0
                    ("fc.weight", "fc.bias"))                      # torchvision / timm ResNet


def cam_classifier_params(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The params of `CAMSeddatiPool` from a trunk's weight file (torch state dict as numpy).

  Returns:
    {"class_kernel": [C, K] float32, "class_bias": [K] float32}.
  Raises:
    ValueError: no single-FC ImageNet classifier (e.g. VGG's three FC layers) in the file.
  """
  for wkey, bkey in _CLASSIFIER_KEYS:
    if wkey in state_dict:
      w = np.asarray(state_dict[wkey], np.float32)
      b = np.asarray(state_dict[bkey], np.float32) if bkey in state_dict else np.zeros(
          w.shape[0], np.float32)
      return {"class_kernel": np.ascontiguousarray(w.T), "class_bias": b}
  raise ValueError("no single-FC ImageNet classifier in the state dict (expected one of "
                   f"{[k for k, _ in _CLASSIFIER_KEYS]})")


# ----------------------------------------------------------------------------------------------
# NetVLAD (Arandjelović et al.) and the multi-scale variant of Vaccaro et al.


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
    desc = _normalize(desc)
  if assign_kernel is None:
    assign_kernel = 2.0 * alpha * c.T
    assign_bias = -alpha * jnp.sum(c * c, axis=-1)
  logits = jnp.einsum("bnc,ck->bnk", desc, assign_kernel, precision=_HIGHEST)
  if assign_bias is not None:
    logits = logits + assign_bias
  a = jax.nn.softmax(logits, axis=-1)
  if valid is not None:
    a = a * valid[..., None].astype(jnp.float32)
  vlad = (jnp.einsum("bnk,bnc->bkc", a, desc, precision=_HIGHEST)
          - jnp.sum(a, axis=1)[..., None] * c[None])
  vlad = _normalize(vlad, axis=-1)  # intra-normalisation
  return _normalize(vlad.reshape(vlad.shape[0], -1))


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
  xf = _fill(x, mask, -jnp.inf)
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


# ----------------------------------------------------------------------------------------------
# k-means (numpy) for NetVLAD's codebook and for feature selection.


def kmeans(data: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> Tuple[np.ndarray,
                                                                               np.ndarray]:
  """Lloyd's k-means with k-means++ seeding, in numpy float64.

  Args:
    data: [N, D], N >= k.
    k: number of clusters.
    seed: numpy seed.
    iters: maximum Lloyd iterations (stops earlier when assignments are stable).
  Returns:
    centers [k, D] float64 and labels [N] int.
  """
  data = np.asarray(data, np.float64)
  n = data.shape[0]
  if n < k:
    raise ValueError(f"kmeans: {n} points for {k} clusters")
  rng = np.random.default_rng(seed)
  sq = np.sum(data * data, axis=1)

  def sqdist(centers):
    d = sq[:, None] - 2.0 * data @ centers.T + np.sum(centers * centers, axis=1)[None]
    return np.maximum(d, 0.0)

  centers = [data[rng.integers(n)]]
  closest = sqdist(np.asarray(centers))[:, 0]
  for _ in range(1, k):
    total = closest.sum()
    i = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
    centers.append(data[i])
    closest = np.minimum(closest, sqdist(data[i][None])[:, 0])
  centers = np.asarray(centers)

  labels = None
  for _ in range(iters):
    d = sqdist(centers)
    new = np.argmin(d, axis=1)
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    for j in range(k):
      members = labels == j
      if members.any():
        centers[j] = data[members].mean(axis=0)
      else:
        # An empty cluster takes the point worst served by the current centres.
        far = int(np.argmax(np.min(d, axis=1)))
        centers[j] = data[far]
        d[far] = 0.0
  labels = np.argmin(sqdist(centers), axis=1)
  return centers, labels


def kmeans_init(local_descriptors: np.ndarray, num_clusters: int, seed: int = 0,
                iters: int = 30) -> Tuple[np.ndarray, float]:
  """NetVLAD codebook: k-means of L2-normalised local descriptors, and a matching alpha.

  alpha makes the second-nearest centroid get on average 1% of the nearest one's weight:
  `alpha = -log(0.01) / mean(d2 - d1)`, d1 <= d2 the squared distances of each descriptor
  to its two nearest centroids (since `softmax(alpha (2 c.x - |c|^2)) =
  softmax(-alpha |x - c|^2)`). pytorch-NetVLAD writes the same formula but takes the
  k-NN of the centroids among descriptors, and reads the neighbours' indices instead of their
  distances; we use the distances the formula intends.

  Args:
    local_descriptors: [N, C], e.g. feature-map positions of sample images.
    num_clusters: K.
    seed, iters: k-means settings.
  Returns:
    centroids [K, C] float32 (not re-normalised) and alpha (float).
  """
  desc = np.asarray(local_descriptors, np.float64)
  desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), _NORMALIZE_EPS)
  centers, _ = kmeans(desc, num_clusters, seed, iters)
  d = (np.sum(desc ** 2, axis=1)[:, None] - 2.0 * desc @ centers.T
       + np.sum(centers ** 2, axis=1)[None])
  d = np.sort(np.maximum(d, 0.0), axis=1)
  gap = float(np.mean(d[:, 1] - d[:, 0])) if num_clusters > 1 else 0.0
  alpha = -math.log(0.01) / gap if gap > 0 else 100.0
  return centers.astype(np.float32), alpha


# ----------------------------------------------------------------------------------------------
# Flax modules (chosen by name from configs).


class MAC(nn.Module):
  """MAC pooling module: [B, H, W, C] -> [B, C] (unnormalised)."""

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return mac(x, mask)


class SPoC(nn.Module):
  """SPoC (average) pooling module: [B, H, W, C] -> [B, C] (unnormalised)."""

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return spoc(x, mask)


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
    return gem(x, p, self.eps, mask)


class RMAC(nn.Module):
  """R-MAC pooling module: [B, H, W, C] -> [B, C], L2-normalised."""
  levels: int = 3

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return rmac(x, self.levels, mask)


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
    return regional_pool(x, self.levels, self.pool, p, self.eps, mask)


class SeddatiPool(nn.Module):
  """Seddati et al.'s modified R-MAC (`seddati_rmac`): [B, H, W, C] -> [B, C], L2-normalised."""
  levels: int = 3

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    return seddati_rmac(x, self.levels, mask)


class CAMSeddatiPool(nn.Module):
  """Seddati et al.'s CAM-masked local R-MAC (`seddati_cam_rmac`): [B, H, W, C] -> [B, C].

  Params "class_kernel" [C, K] and "class_bias" [K]: the trunk's ImageNet classifier (load
  them with `cam_classifier_params`, or pass `classifier_init`). They only select classes
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
  threshold: float = CAM_THRESHOLD
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
    return seddati_cam_rmac(x, kernel, self.top_k, self.levels, mask, bias, self.threshold)


def _checked_init(value: Array, shape: Tuple[int, ...], name: str) -> Array:
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{name} init has shape {tuple(value.shape)}, expected {tuple(shape)}")
  return value


def netvlad_params(centroids: np.ndarray, alpha: float, decoupled: bool = False
                   ) -> Dict[str, np.ndarray]:
  """Params of `NetVLAD` / `MultiScaleNetVLAD` from a codebook (e.g. `kmeans_init`)."""
  c = np.asarray(centroids, np.float32)
  params = {"centroids": c}
  if decoupled:
    params["assign_kernel"] = (2.0 * alpha * c.T).astype(np.float32)
    params["assign_bias"] = (-alpha * np.sum(c * c, axis=1)).astype(np.float32)
  return params


class _VLADBase(nn.Module):
  """Shared params of the NetVLAD modules.

  Attributes:
    num_clusters: K.
    alpha: assignment sharpness (the NetVLAD paper's default init uses 100 with normalised
      descriptors; `kmeans_init` suggests one from data).
    centroids_init: optional [K, C] array (e.g. from `kmeans_init`); else random unit rows.
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
      init = lambda rng, shp, dtype: _normalize(jax.random.normal(rng, shp, dtype))
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
    return netvlad(x, prm["centroids"], self.alpha, mask, prm["assign_kernel"],
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
    return multiscale_netvlad(x, prm["centroids"], self.alpha, tuple(self.windows), mask,
                              assign_kernel=prm["assign_kernel"],
                              assign_bias=prm["assign_bias"],
                              normalize_input=self.normalize_input)


POOLINGS: Dict[str, Callable[..., nn.Module]] = {
    "mac": MAC,
    "spoc": SPoC,
    "gem": GeM,
    "rmac": RMAC,
    "regional": RegionalPool,
    "netvlad": NetVLAD,
    "ms_netvlad": MultiScaleNetVLAD,
    "seddati": SeddatiPool,
    "seddati_cam": CAMSeddatiPool,
}


def build_pooling(pooling_name: str, /, **kwargs) -> nn.Module:
  """The pooling module registered as `pooling_name`, built with `kwargs` (`name=` allowed)."""
  if pooling_name not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling_name!r}; valid: {sorted(POOLINGS)}")
  return POOLINGS[pooling_name](**kwargs)
