"""Query expansion and database-side augmentation with alpha weights.

alpha-QE (Radenovic, Tolias, Chum, TPAMI 2018): the query is replaced by the L2-normalised
weighted sum of itself and its top-k database vectors,

    q' = normalise(q + sum_{i=1..k} max(q.d_i, 0)^alpha d_i),

the query's own weight being (q.q)^alpha = 1 for an L2-normalised query. alpha = 0 gives
average QE; `k = 0` leaves the (normalised) query unchanged.

alpha-DBA (Gordo et al. / the same TPAMI paper): every database vector is replaced by the
normalised weighted sum of its top-k database neighbours, itself included (it is its own
first neighbour, with weight 1):

    x' = normalise(sum_{i=1..k} max(x.d_i, 0)^alpha d_i),   d_1 = x.

Convention (`config.eval.dba_k`): k COUNTS THE IMAGE ITSELF. The TPAMI paper's "weighted
sum of itself and its top n_DBA ranked images" is `dba_k = n_DBA + 1`; `dba_k = 1` leaves
the database unchanged. (alpha-QE's `qe_k` does not count the query: it is n_QE.)

Negative similarities get weight 0 rather than a sign-dependent (or nan, for non-integer
alpha) power; they are rare inside a top-k list and the papers' alpha=3 then agrees.

Descriptors are rows, `[N, D]`; neighbours come from `knn.knn`, so the mesh / dtype /
batching options are those of `knn`. Outputs are float32 numpy arrays.
"""
from typing import Any, Dict

import numpy as np

from retrieval_jax import knn

_EPS = 1e-6


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + _EPS)


def _weighted_sum(database: np.ndarray, scores: np.ndarray, indices: np.ndarray,
                  alpha: float) -> np.ndarray:
  """sum_i max(s_i, 0)^alpha d_i for every row: [N, k] scores/indices -> [N, D]."""
  w = np.power(np.maximum(scores, 0.).astype(np.float64), alpha)  # [N, k]
  return np.einsum('nk,nkd->nd', w, database[indices].astype(np.float64))


def _reweighted(queries: np.ndarray, database: np.ndarray, k: int, alpha: float,
                add_queries: bool, knn_options: Dict[str, Any]) -> np.ndarray:
  """normalise([queries +] sum of the top-k database rows weighted max(s, 0)^alpha), float32.

  queries [N, D] float32, database [Nd, D] float32 -> [N, D].
  """
  s, i = knn.knn(queries, database, k, **knn_options)
  out = _weighted_sum(database, s, i, alpha)
  if add_queries:
    out = queries.astype(np.float64) + out
  return _l2n(out).astype(np.float32)


def alpha_query_expansion(queries: np.ndarray, database: np.ndarray, k: int,
                          alpha: float = 3., **knn_options: Any) -> np.ndarray:
  """alpha-QE of the queries against the database.

  Args:
    queries: [Nq, D] L2-normalised query descriptors.
    database: [Nd, D] L2-normalised database descriptors.
    k: number of top database vectors added to each query (0 disables QE).
    alpha: weight exponent.
    **knn_options: `mesh`, `dtype`, `query_batch` of `knn.knn`.

  Returns:
    [Nq, D] float32 expanded, L2-normalised queries.
  """
  queries = np.asarray(queries, np.float32)
  if k <= 0:
    return _l2n(queries).astype(np.float32)
  return _reweighted(queries, np.asarray(database, np.float32), k, alpha, True, knn_options)


def alpha_database_augmentation(database: np.ndarray, k: int, alpha: float = 3.,
                                **knn_options: Any) -> np.ndarray:
  """alpha-DBA: every database vector becomes the weighted mean of its top-k neighbours.

  Args:
    database: [Nd, D] L2-normalised database descriptors.
    k: neighbours per vector, ITSELF INCLUDED: the paper's n_DBA neighbours is
      k = n_DBA + 1 (k <= 1 leaves the database unchanged but normalised).
    alpha, **knn_options: as in `alpha_query_expansion`.

  Returns:
    [Nd, D] float32 augmented, L2-normalised database.
  """
  database = np.asarray(database, np.float32)
  if k <= 1:
    return _l2n(database).astype(np.float32)
  return _reweighted(database, database, k, alpha, False, knn_options)
