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
from typing import Any, Dict, Optional

import numpy as np

from retrieval_jax import knn

_EPS = 1e-6


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + _EPS)


# Rows augmented at once: bounds the [rows, k, D] float64 neighbour block (~64 MB at k = 10,
# D = 2048) and the [rows, k] neighbour lists, whatever the number of rows.
ROWS_PER_CHUNK = 400
KNN_ROWS = 8192  # rows whose k-NN are searched in one pass over the database


def _weighted_sum(database: np.ndarray, scores: np.ndarray, indices: np.ndarray,
                  alpha: float) -> np.ndarray:
  """sum_i max(s_i, 0)^alpha d_i for every row: [n, k] scores/indices -> [n, D] float64."""
  w = np.power(np.maximum(scores, 0.).astype(np.float64), alpha)  # [n, k]
  flat = np.sort(np.unique(indices))  # rows read from a memory-mapped database in order
  neighbours = np.asarray(database[flat], np.float64)[np.searchsorted(flat, indices)]
  return np.einsum('nk,nkd->nd', w, neighbours)


def _reweighted(queries: np.ndarray, database: np.ndarray, k: int, alpha: float,
                add_queries: bool, knn_options: Dict[str, Any],
                out: Optional[np.ndarray] = None) -> np.ndarray:
  """normalise([queries +] sum of the top-k database rows weighted max(s, 0)^alpha), float32.

  queries [N, D], database [Nd, D] (either may be memory-mapped) -> [N, D] float32, written
  into `out` if given (e.g. a memory-mapped file). Done `ROWS_PER_CHUNK` rows at a time
  (their k-NN against the whole database, see `knn.knn`), so host memory beyond the
  descriptors does not grow with N.
  """
  n = queries.shape[0]
  if out is None:
    out = np.empty((n, database.shape[1]), np.float32)
  for outer in range(0, n, KNN_ROWS):  # one pass over the database per KNN_ROWS rows
    s_all, i_all = knn.knn(np.asarray(queries[outer:outer + KNN_ROWS], np.float32),
                              database, k, **knn_options)
    for start in range(0, len(s_all), ROWS_PER_CHUNK):
      end = min(start + ROWS_PER_CHUNK, len(s_all))
      rows = slice(outer + start, outer + end)
      summed = _weighted_sum(database, s_all[start:end], i_all[start:end], alpha)
      if add_queries:
        summed += np.asarray(queries[rows], np.float64)
      out[rows] = _l2n(summed).astype(np.float32)
  return out


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
