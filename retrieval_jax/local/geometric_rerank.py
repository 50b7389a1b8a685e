"""Re-ranking a global ranking's top-N by geometric verification of local features (DELG).

As `delg/perform_retrieval.py` with `detect_to_retrieve/image_reranking.py:
RerankByGeometricVerification`: for every query, the first `top_n` database images of the
global ranking that are not junk (junk does not use up the budget) are matched and
verified (`matching.verify_pair`), and the whole database is sorted by (inliers, global
score), raw counts, unverified images counting 0; so the verified head comes first by
decreasing inliers (ties: global order), then every other image in its global order.
`min_inliers > 0` (not the reference's) takes counts below it as 0.

Junk per protocol: on Revisited Oxford/Paris the reference re-ranks separately for each
protocol with that protocol's junk (Hard: junk + easy, so easy images do not use up the
verifications; Easy: junk + hard); `rerank_setups` does this, verifying every distinct
pair once, and gives one ranking per protocol.

Pairs run on a thread pool (numpy's matmul and the RANSAC loops release the GIL in their
heavy parts), with a progress line (pairs/s, ETA).

Rankings are `[n_db, n_queries]` (column j = query j), as `evaluation.compute_map`.
"""
import concurrent.futures
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from absl import logging
import numpy as np

from retrieval_jax import progress as progress_lib
from retrieval_jax.local import matching

# DELG's re-ranking defaults: the top 100 of the global ranking; raw inlier counts.
TOP_N = 100
MIN_INLIERS = 0


def rerank_order(order: np.ndarray, inliers: np.ndarray, min_inliers: int = MIN_INLIERS
                 ) -> np.ndarray:
  """One query's new ranking from its global ranking and the verified head's inliers.

  Args:
    order: [n_db] database indices by decreasing global similarity.
    inliers: [n_db] inlier count per database index (0 where not verified).
    min_inliers: > 0: counts below it count as 0; 0: raw counts (the reference).
  Returns:
    [n_db] the re-ranked indices.
  """
  order = np.asarray(order)
  counts = np.asarray(inliers)[order]
  if min_inliers > 0:
    counts = np.where(counts >= min_inliers, counts, 0)
  # Stable sort on -count: by decreasing inliers, ties (and the unverified) in global order.
  return order[np.argsort(-counts, kind="stable")]


def verified_head(order: np.ndarray, junk: Set[int], top_n: int) -> List[int]:
  """The first `top_n` database indices of `order` that are not junk."""
  return [int(i) for i in order if int(i) not in junk][:top_n]


def rerank_setups(ranks: np.ndarray, query_features: Callable[[int], Mapping[str, np.ndarray]],
                  db_features: Callable[[int], Mapping[str, np.ndarray]], *,
                  junk_by_setup: Mapping[str, Optional[Sequence[Set[int]]]],
                  top_n: int = TOP_N, min_inliers: int = MIN_INLIERS, num_threads: int = 2,
                  log_every_s: float = 10.0, verify_kwargs: Optional[Dict[str, Any]] = None
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """Re-ranks every query's global top-`top_n` by verified inliers, once per junk setting.

  Args:
    ranks: [n_db, n_queries] global rankings.
    query_features: query index -> record {"locations", "descriptors"} (e.g. a
      `store.LocalFeatureStore`'s `__getitem__`).
    db_features: database index -> record.
    junk_by_setup: setup name -> per-query sets of database indices not to verify (None:
      no junk), e.g. {"easy": ..., "medium": ..., "hard": ...} on Revisited sets.
    top_n: images verified per query and setup (0: no re-ranking).
    min_inliers: see `rerank_order`.
    num_threads: worker threads.
    log_every_s: progress line period.
    verify_kwargs: passed to `matching.verify_pair` (matcher, model, backend, thresholds).
  Returns:
    ({setup: new ranks [n_db, n_queries]}, {setup: inliers [n_queries, n_db] int32, 0
     outside that setup's verified heads}).
  """
  ranks = np.asarray(ranks)
  n_db, n_q = ranks.shape
  heads = {name: [verified_head(ranks[:, j], junk[j] if junk is not None else set(), top_n)
                  for j in range(n_q)] if top_n > 0 else [[] for _ in range(n_q)]
           for name, junk in junk_by_setup.items()}
  verify_kwargs = dict({"min_matches": min_inliers}, **dict(verify_kwargs or {}))
  pairs = sorted({(j, i) for head in heads.values() for j in range(n_q) for i in head[j]})

  def work(pair):
    j, i = pair
    return j, i, matching.verify_pair(query_features(j), db_features(i),
                                      **verify_kwargs)["inliers"]

  counts: Dict[Tuple[int, int], int] = {}
  progress = progress_lib.Progress(len(pairs), every_s=log_every_s)
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as pool:
    for j, i, n in pool.map(work, pairs):
      counts[(j, i)] = n
      progress.update(images=1)
      if progress.due():
        logging.info("re-ranking: %d/%d pairs, %.1f pairs/s, ETA %.0fs", progress.done,
                     len(pairs), progress.rate(), progress.eta_s())
  if pairs:
    logging.info("re-ranking: %d pairs verified in %.1fs", len(pairs), progress.elapsed())
  out, inliers = {}, {}
  for name, head in heads.items():
    inl = np.zeros((n_q, n_db), np.int32)
    for j in range(n_q):
      for i in head[j]:
        inl[j, i] = counts[(j, i)]
    inliers[name] = inl
    out[name] = np.stack([rerank_order(ranks[:, j], inl[j], min_inliers)
                          for j in range(n_q)], axis=1) if n_q else ranks.copy()
  return out, inliers


def rerank(ranks: np.ndarray, query_features: Callable[[int], Mapping[str, np.ndarray]],
           db_features: Callable[[int], Mapping[str, np.ndarray]], *, top_n: int = TOP_N,
           min_inliers: int = MIN_INLIERS, junk: Optional[Sequence[Set[int]]] = None,
           num_threads: int = 2, log_every_s: float = 10.0,
           verify_kwargs: Optional[Dict[str, Any]] = None
           ) -> Tuple[np.ndarray, np.ndarray]:
  """`rerank_setups` with one junk setting: (new ranks [n_db, n_queries], inliers
  [n_queries, n_db] int32 with 0 where unverified)."""
  out, inliers = rerank_setups(ranks, query_features, db_features, junk_by_setup={"": junk},
                               top_n=top_n, min_inliers=min_inliers, num_threads=num_threads,
                               log_every_s=log_every_s, verify_kwargs=verify_kwargs)
  return out[""], inliers[""]


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
