"""Re-ranking a global ranking's top-N by geometric verification of local features (DELG).

For every query, the first `top_n` database images of the global ranking (junk images of
the query, when given, are skipped and do not use the budget, as the reference does) are
matched and verified (`matching.verify_pair`); an image is *verified* when its inlier count
reaches `min_inliers`. The new ranking puts verified images first, by decreasing inliers
(ties: global order), then every other image in its global order. This is the reference's
sort by (inliers, global score) (`detect_to_retrieve/image_reranking.py:
RerankByGeometricVerification`) with counts below the threshold taken as 0, as DELG does.
Consequences the tests check: a verified image never falls below an unverified one, the
unverified keep their relative order, and `top_n = 0` returns the global ranking itself.

Pairs run on a thread pool (numpy's matmul and the RANSAC loops release the GIL in their
heavy parts), with a progress line (pairs/s, ETA).

Rankings are `[n_db, n_queries]` (column j = query j), as `evaluation.compute_map`.
"""
import concurrent.futures
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

from absl import logging
import numpy as np

from retrieval_jax import progress as progress_lib
from retrieval_jax.local import matching

# DELG's re-ranking defaults: the top 100 of the global ranking; verified at >= this many.
TOP_N = 100
MIN_INLIERS = 15


def rerank_order(order: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
  """One query's new ranking from its global ranking and the verified head's inliers.

  Args:
    order: [n_db] database indices by decreasing global similarity.
    inliers: [n_db] inlier count per database index (0 where not verified).
    min_inliers: counts below it count as 0.
  Returns:
    [n_db] the re-ranked indices.
  """
  order = np.asarray(order)
  counts = np.asarray(inliers)[order]
  counts = np.where(counts >= min_inliers, counts, 0)
  # Stable sort on -count: verified by decreasing inliers, everything else in global order.
  return order[np.argsort(-counts, kind="stable")]


def rerank(ranks: np.ndarray, query_features: Callable[[int], Mapping[str, np.ndarray]],
           db_features: Callable[[int], Mapping[str, np.ndarray]], *, top_n: int = TOP_N,
           min_inliers: int = MIN_INLIERS, junk: Optional[Sequence[Set[int]]] = None,
           num_threads: int = 2, log_every_s: float = 10.0,
           verify_kwargs: Optional[Dict[str, Any]] = None
           ) -> Tuple[np.ndarray, np.ndarray]:
  """Re-ranks every query's global top-`top_n` by verified inliers.

  Args:
    ranks: [n_db, n_queries] global rankings.
    query_features: query index -> record {"locations", "descriptors"} (e.g. a
      `store.LocalFeatureStore`'s `__getitem__`).
    db_features: database index -> record.
    top_n: images verified per query (0: no re-ranking, `ranks` returned unchanged).
    min_inliers: inliers needed to count as verified.
    junk: optional per-query sets of database indices not to verify (Revisited junk).
    num_threads: worker threads.
    log_every_s: progress line period.
    verify_kwargs: passed to `matching.verify_pair` (matcher, model, backend, thresholds).
  Returns:
    (new ranks [n_db, n_queries], inliers [n_queries, n_db] int32 with 0 where unverified).
  """
  ranks = np.asarray(ranks)
  n_db, n_q = ranks.shape
  inliers = np.zeros((n_q, n_db), np.int32)
  if top_n <= 0:
    return ranks.copy(), inliers
  # Fewer putative matches than min_inliers can never verify: RANSAC is skipped for them.
  verify_kwargs = dict({"min_matches": min_inliers}, **dict(verify_kwargs or {}))
  pairs = []
  for j in range(n_q):
    skip = junk[j] if junk is not None else ()
    head = [int(i) for i in ranks[:, j] if int(i) not in skip][:top_n]
    pairs += [(j, i) for i in head]

  def work(pair):
    j, i = pair
    return j, i, matching.verify_pair(query_features(j), db_features(i),
                                      **verify_kwargs)["inliers"]

  progress = progress_lib.Progress(len(pairs), every_s=log_every_s)
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as pool:
    for j, i, n in pool.map(work, pairs):
      inliers[j, i] = n
      progress.update(images=1)
      if progress.due():
        logging.info("re-ranking: %d/%d pairs, %.1f pairs/s, ETA %.0fs", progress.done,
                     len(pairs), progress.rate(), progress.eta_s())
  out = np.stack([rerank_order(ranks[:, j], inliers[j], min_inliers) for j in range(n_q)],
                 axis=1)
  logging.info("re-ranking: %d pairs verified in %.1fs", len(pairs), progress.elapsed())
  return out, inliers


def rerank_by_scores(ranks: np.ndarray, scores: np.ndarray, top_n: int = TOP_N) -> np.ndarray:
  """Re-orders every query's global top-`top_n` by other scores (e.g. ASMK); the rest stays.

  Args:
    ranks: [n_db, n_queries] global rankings.
    scores: [n_queries, n_db] second-stage similarities (higher = better).
    top_n: re-ordered head length (0: unchanged).
  Returns:
    [n_db, n_queries]; ties keep the global order.
  """
  out = np.array(ranks, copy=True)
  if top_n <= 0:
    return out
  for j in range(out.shape[1]):
    head = out[:top_n, j]
    out[:top_n, j] = head[np.argsort(-scores[j, head], kind="stable")]
  return out
