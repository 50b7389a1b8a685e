"""Epoch-level hard-negative mining, host side: cnnimageretrieval-pytorch's `create_epoch_tuples`.

For each query, pool images by decreasing similarity, never the query's cluster, at most one
image per cluster.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


# precision=HIGHEST: full float32 scores on TPU (bf16 passes) and GPU (TF32) too, so the
# accelerator mines the same negatives as the CPU.
_jit_scores = jax.jit(lambda q, pool: jnp.matmul(q, pool.T, precision=jax.lax.Precision.HIGHEST))


def _similarities(query_desc: np.ndarray, pool_desc: np.ndarray, use_jax: bool) -> np.ndarray:
  """[Nq, Np] dot products."""
  if use_jax:
    return np.asarray(_jit_scores(jnp.asarray(query_desc, jnp.float32),
                                  jnp.asarray(pool_desc, jnp.float32)))
  return np.asarray(query_desc) @ np.asarray(pool_desc).T


def _ranked_candidates(scores: np.ndarray, k: int) -> np.ndarray:
  """Pool indices of the k best scores (plus ties at the k-th), by score desc, then index."""
  if k >= scores.shape[0]:
    cand = np.arange(scores.shape[0])
  else:
    kth = -np.partition(-scores, k - 1)[k - 1]
    # Keeping every tie of the k-th score makes the order equal to a full stable sort's.
    cand = np.nonzero(scores >= kth)[0]
  return cand[np.lexsort((cand, -scores[cand]))]


def mine_epoch_negatives(query_desc: np.ndarray, pool_desc: np.ndarray,
                         query_clusters: np.ndarray, pool_clusters: np.ndarray,
                         num_negatives: int, pool_topk: Optional[int] = None,
                         use_jax: bool = False, chunk_size: int = 1024) -> np.ndarray:
  """Hard negatives of each query from a pool, as cirtorch's `create_epoch_tuples`.

  For each query, pool images are visited by decreasing similarity (ties: lower pool index
  first); an image is taken unless its cluster is the query's or already taken, until
  `num_negatives`. The same greedy result is computed per query with a bounded candidate list
  that grows only when too few clusters turned up.

  Args:
    query_desc: [Nq, D] query descriptors.
    pool_desc: [Np, D] negative-pool descriptors.
    query_clusters: [Nq] int cluster (3D model / landmark) ids of the queries.
    pool_clusters: [Np] int cluster ids of the pool images.
    num_negatives: negatives per query.
    pool_topk: if set, look only at the `pool_topk` most similar pool images (bounds the
      work); None searches the whole pool as the reference does.
    use_jax: compute the similarities with a jitted float32 matmul (accelerator) instead of
      numpy.
    chunk_size: queries scored at once ([chunk_size, Np] scores in memory).

  Returns:
    [Nq, num_negatives] int64 indices into the pool, hardest first; -1 where the searched
    pool holds fewer distinct admissible clusters (the reference would fail there).
  """
  query_clusters = np.asarray(query_clusters)
  pool_clusters = np.asarray(pool_clusters)
  num_pool = pool_desc.shape[0]
  limit = num_pool if pool_topk is None else min(pool_topk, num_pool)
  out = np.full((query_desc.shape[0], num_negatives), -1, np.int64)
  if num_negatives == 0:
    return out
  for start in range(0, query_desc.shape[0], chunk_size):
    scores = _similarities(query_desc[start:start + chunk_size], pool_desc, use_jax)
    for row, q_scores in enumerate(scores):
      q_cluster = query_clusters[start + row]
      k = min(limit, max(8 * num_negatives, 64))
      while True:
        ranked = _ranked_candidates(q_scores, k)[:limit]
        clusters = pool_clusters[ranked]
        admissible = clusters != q_cluster
        ranked, clusters = ranked[admissible], clusters[admissible]
        _, first = np.unique(clusters, return_index=True)  # first occurrence = most similar
        chosen = ranked[np.sort(first)][:num_negatives]
        if chosen.shape[0] == num_negatives or k >= limit:
          break
        k = min(limit, 4 * k)
      out[start + row, :chosen.shape[0]] = chosen
  return out
