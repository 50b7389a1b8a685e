"""SuperGlobal re-ranking (Shao et al., ICCV 2023): MDescAug then RerankwMDA, global only.

The official torch modules (ShihaoShao-GH/SuperGlobal `modules/reranking/MDescAug.py`,
`RerankwMDA.py`) loop over queries in Python; here one jit'd computation takes a block of
queries at once (split over the mesh's batch axis):

1. MDescAug: for each query, its top-M database descriptors X_M [M, D]; each is replaced
   by the weighted mean of its K + 1 nearest neighbours among X_M (itself first, weight 1;
   the others weight beta * similarity): x'_i = sum_j w_ij x_j / sum_j w_ij.
2. The query is scored against the refined descriptors: s1_i = q . x'_i.
3. RerankwMDA: the element-wise max of the refined descriptors of the K + 1 best s1 gives
   one descriptor x*; the final score is (s1_i + x* . x'_i) / 2 and orders the top M.
   Database images past the top M keep their global order.

Descriptors are rows, L2-normalised (the official code normalises them before ranking).
Defaults: M = 400, K = 9, beta = 0.15 (`config.eval.superglobal_m/_k/_beta`).

`eval.rerank="superglobal"` runs it as the evaluation pipeline's re-ranker
(`rerankers.RERANKERS`, `evaluation/pipeline.py`) on the final descriptors (after
whitening and alpha-QE / alpha-DBA), reported with a `_superglobal` suffix.
"""
import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import knn
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.evaluation import Ranking
from retrieval_jax.evaluation import rank as global_rank
from retrieval_jax.evaluation import rerankers

HIGHEST = jax.lax.Precision.HIGHEST
QUERY_BLOCK = 64  # queries per compiled call: the [block, M, M] and [block, M, D] arrays


@functools.partial(jax.jit, static_argnames=("k", "beta"))
def rerank_top(queries: jnp.ndarray, top_db: jnp.ndarray, top_index: jnp.ndarray, *,
               k: int, beta: float) -> jnp.ndarray:
  """The re-ranked top-M of a block of queries.

  Args:
    queries: [B, D] query descriptors.
    top_db: [B, M, D] their top-M database descriptors, in global-similarity order.
    top_index: [B, M] the database indices of those descriptors.
    k: neighbours per refined descriptor, itself excluded (K).
    beta: weight scale of the neighbours.
  Returns:
    ([B, M] database indices in the re-ranked order, [B, M] their final scores).
  """
  queries = queries.astype(jnp.float32)
  top_db = top_db.astype(jnp.float32)
  b, m, _ = top_db.shape
  # MDescAug: the K + 1 nearest of each top-M descriptor among the top M (itself included).
  gram = jnp.einsum("bid,bjd->bij", top_db, top_db, precision=HIGHEST)  # [B, M, M]
  values, neighbours = jax.lax.top_k(gram, k + 1)  # [B, M, K + 1]
  weights = jnp.concatenate([jnp.ones_like(values[..., :1]), beta * values[..., 1:]], -1)
  bi = jnp.arange(b)[:, None, None]
  mi = jnp.arange(m)[None, :, None]
  mix = jnp.zeros((b, m, m), jnp.float32).at[bi, mi, neighbours].add(weights)
  refined = jnp.einsum("bij,bjd->bid", mix, top_db, precision=HIGHEST)
  refined = refined / jnp.sum(weights, axis=-1, keepdims=True)  # [B, M, D]
  s1 = jnp.einsum("bd,bid->bi", queries, refined, precision=HIGHEST)  # [B, M]
  # RerankwMDA: the max of the K + 1 best refined descriptors, then the averaged score.
  _, best = jax.lax.top_k(s1, k + 1)  # [B, K + 1]
  aggregated = jnp.max(jnp.take_along_axis(refined, best[..., None], axis=1), axis=1)
  s2 = jnp.einsum("bd,bid->bi", aggregated, refined, precision=HIGHEST)
  scores = (s1 + s2) / 2.0
  order = jnp.argsort(-scores, axis=-1)
  return (jnp.take_along_axis(top_index, order, axis=-1),
          jnp.take_along_axis(scores, order, axis=-1))


def settings_of(eval_config) -> Dict[str, Any]:
  """{"m", "k", "beta"} of `config.eval.superglobal_*`."""
  return {"m": int(eval_config.superglobal_m), "k": int(eval_config.superglobal_k),
          "beta": float(eval_config.superglobal_beta)}


@rerankers.RERANKERS.register("superglobal")
def _superglobal(context: rerankers.Context, stage: rerankers.Stage) -> rerankers.Reranked:
  """MDescAug + RerankwMDA of the top `eval.superglobal_m` of the stage's descriptors."""
  sg = settings_of(context.config.eval)
  ranks = stage.ranking.ranks
  if ranks.shape[0] < min(sg["m"], stage.db.shape[0]):  # The ranking is too shallow.
    ranks = global_rank(stage.q, stage.db, sg["m"], mesh=context.mesh).ranks
  new = superglobal_ranks(stage.q, stage.db, mesh=context.mesh, ranks=ranks, **sg)
  return rerankers.Reranked(
      Ranking(new), f"SuperGlobal M={sg['m']} K={sg['k']} beta={sg['beta']}")


def superglobal_ranks(queries: np.ndarray, database: np.ndarray, *, m: int = 400, k: int = 9,
                      beta: float = 0.15, mesh: Optional[jax.sharding.Mesh] = None,
                      ranks: Optional[np.ndarray] = None,
                      query_block: int = QUERY_BLOCK) -> np.ndarray:
  """Rankings [Nd, Nq] (revisitop convention; [depth, Nq] for given `ranks`) after
  SuperGlobal re-ranking.

  Args:
    queries: [Nq, D] L2-normalised query descriptors.
    database: [Nd, D] L2-normalised database descriptors.
    m, k, beta: the top-M re-ranked, neighbours K, neighbour weight scale beta.
    mesh: device mesh; query blocks are split over its batch axis.
    ranks: the global rankings [depth, Nq] if already computed (`knn.rank_all`, or any
      depth >= M); rows past the top M keep their order.
    query_block: queries per compiled call (rounded up to the data parallelism).
  """
  queries = np.asarray(queries, np.float32)
  database = np.asarray(database, np.float32)
  if ranks is None:
    ranks = knn.rank_all(queries, database, mesh=mesh)
  ranks = np.array(ranks, np.int64, copy=True)
  m = min(int(m), database.shape[0], ranks.shape[0])
  k = min(int(k), m - 1)
  if m < 2 or queries.shape[0] == 0:
    return ranks
  parallel = sharding_lib.data_parallelism(mesh) if mesh is not None else 1
  block = -(-max(1, int(query_block)) // parallel) * parallel
  db_device = jnp.asarray(database)
  for start in range(0, queries.shape[0], block):
    q = queries[start:start + block]
    top = ranks[:m, start:start + block].T  # [b, M]
    n = q.shape[0]
    if n < block:  # A fixed block shape compiles once; the padding rows are dropped.
      q = np.concatenate([q, np.zeros((block - n, q.shape[1]), np.float32)])
      top = np.concatenate([top, np.repeat(top[-1:], block - n, axis=0)])
    top_device = jnp.asarray(top)
    q_device = jnp.asarray(q)
    top_db = db_device[top_device]
    if mesh is not None:
      batch = sharding_lib.batch_sharding(mesh)
      q_device, top_db, top_device = (jax.device_put(a, batch)
                                      for a in (q_device, top_db, top_device))
    new_top, _ = rerank_top(q_device, top_db, top_device, k=k, beta=float(beta))
    ranks[:m, start:start + n] = np.asarray(new_top)[:n].T
  return ranks
