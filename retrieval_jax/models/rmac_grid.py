"""R-MAC's region grid (Tolias et al.), exactly as cirtorch's `rmac()` lays it out (numpy).

`rmac_regions` lists the regions of one map size; `rmac_grid_table` tabulates them for every
valid size so that `pooling_ops.regional_pool` can look them up inside `jit` from a traced
mask (`rmac_level_weights`).
"""
import functools
from typing import List, Tuple

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

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
def rmac_grid_table(height: int, width: int, levels: int) -> Tuple[np.ndarray, np.ndarray]:
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


def rmac_level_weights(hv: Array, wv: Array, level: int, height: int, width: int,
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
  wl_table, offsets = rmac_grid_table(height, width, levels)
  wl = jnp.asarray(wl_table)[hv, wv, level - 1].astype(jnp.int32)
  off = jnp.asarray(offsets)[hv, wv, level - 1].astype(jnp.int32)  # [2, slots]

  def counts(cen, length):
    hits = (cen[:, None] == jnp.arange(length)[None, :]) & (cen[:, None] >= 0)
    return jnp.sum(hits, axis=0, dtype=jnp.float32)

  return wl, counts(off[0], height), counts(off[1], width)

