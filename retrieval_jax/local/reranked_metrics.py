"""Global-only and re-ranked metrics side by side (`--config.eval.rerank=local|asmk`).

The dataset evaluators of `retrieval_jax.evaluation` rank descriptors themselves; re-ranking
changes the ranking, so here every rank-based protocol is scored from a ranking
(`RANKED`: Revisited E/M/H, classic Oxford/Paris, Holidays, UKBench, GLDv2 mAP@100, same-
label mAP), once for the global ranking and once for the re-ranked one:

* "local": DELG's geometric re-ranking of the global top-N (`rerank.rerank`);
* "asmk": the global top-N re-ordered by ASMK similarity (`rerank.rerank_by_scores`), or
  with `top_n < 0` ASMK's own full ranking (first-stage ASMK).
"""
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from retrieval_jax import registry
from retrieval_jax import knn
from retrieval_jax.evaluation import classic
from retrieval_jax.evaluation import revisited
from retrieval_jax.local import asmk_index as asmk_lib
from retrieval_jax.local import geometric_rerank as rerank_lib

RankedEvaluator = Callable[[np.ndarray, Any], Dict[str, Any]]
RANKED: registry.Registry[RankedEvaluator] = registry.Registry("ranked evaluator")


def _gnd(gt: Any) -> Sequence[Mapping[str, Any]]:
  return gt["gnd"] if isinstance(gt, Mapping) and "gnd" in gt else gt


for _name in ("roxford5k", "rparis6k"):
  RANKED.register(_name, lambda r, gt, name=_name: revisited.evaluate_revisited(
      name, r, _gnd(gt), (1, 5, 10)))
for _name in ("oxford5k", "paris6k"):
  RANKED.register(_name, lambda r, gt, name=_name: classic.evaluate_classic(name, r, _gnd(gt)))


@RANKED.register("holidays")
def _holidays(ranks, gt):
  if isinstance(gt, Mapping) and "gnd" in gt:
    m = 100. * revisited.compute_map(ranks, gt["gnd"], kappas=())[0]
  else:
    m = classic.holidays_map(ranks, gt["imlist"] if isinstance(gt, Mapping) else gt)
  return {"mAP": m, "lines": [f">> holidays: mAP {m:.2f}"]}


@RANKED.register("ukbench")
def _ukbench(ranks, gt):
  if isinstance(gt, Mapping) and "gnd" in gt:
    s = float(np.mean([np.isin(ranks[:4, i], np.asarray(g["ok"])).sum()
                       for i, g in enumerate(gt["gnd"])]))
  else:
    s = classic.ukbench_score(ranks, 4)
  return {"N-S": s, "lines": [f">> ukbench: N-S score {s:.3f}"]}


def _gldv2(ranks, gt):
  if isinstance(gt, Mapping) and "gnd" in gt:
    positives = [g["ok"] for g in gt["gnd"]]
  else:
    positives = gt["positives"]
  m = 100. * classic.gldv2_retrieval_map(np.asarray(ranks)[:100].T, positives, 100)
  return {"mAP@100": m, "lines": [f">> gldv2_retrieval: mAP@100 {m:.2f}"]}


RANKED.register("gldv2_retrieval", _gldv2)
RANKED.register("gldv2", _gldv2)


@RANKED.register("labels")
def _labels(ranks, gt):
  db_labels = np.asarray(gt["db_labels"])
  gnd = [{"ok": np.flatnonzero(db_labels == l), "junk": np.empty(0, np.int64)}
         for l in np.asarray(gt["query_labels"])]
  m = 100. * revisited.compute_map(ranks, gnd, kappas=())[0]
  return {"mAP": m, "lines": [f">> labels: mAP {m:.2f}"]}


def junk_sets(gt: Any, n_queries: int) -> Optional[Sequence[set]]:
  """Per-query junk database indices (not spent on verification), or None."""
  gnd = _gnd(gt)
  if not isinstance(gnd, Sequence) or not gnd or not isinstance(gnd[0], Mapping):
    return None
  return [set(int(i) for i in np.asarray(gnd[j].get("junk", []), np.int64).ravel())
          for j in range(n_queries)]


def evaluate_reranked(q_desc: np.ndarray, db_desc: np.ndarray, name: str, gt: Any, *,
                      mode: str, top_n: int = rerank_lib.TOP_N,
                      query_features: Optional[Callable[[int], Mapping[str, np.ndarray]]] = None,
                      db_features: Optional[Callable[[int], Mapping[str, np.ndarray]]] = None,
                      min_inliers: int = rerank_lib.MIN_INLIERS,
                      verify_kwargs: Optional[Dict[str, Any]] = None, num_threads: int = 2,
                      asmk: Optional[asmk_lib.AsmkIndex] = None,
                      query_records: Optional[Sequence[Mapping[str, np.ndarray]]] = None,
                      mesh=None) -> Dict[str, Any]:
  """Metrics of the global ranking and of its re-ranking, side by side.

  Args:
    q_desc, db_desc: [Nq, D], [Nd, D] global descriptors (L2-normalised).
    name: evaluator name (`RANKED`), e.g. "roxford5k", "labels".
    gt: the evaluator's ground truth (see `retrieval_jax.evaluation`).
    mode: "local" or "asmk".
    top_n: re-ranked head length (asmk: < 0 ranks by ASMK alone).
    query_features, db_features: index -> local features ("local").
    min_inliers, verify_kwargs, num_threads: see `rerank.rerank`.
    asmk: a built `AsmkIndex` over the database ("asmk"); query_records: its queries.
    mesh: for the global search.
  Returns:
    The global metrics, the re-ranked ones with a `_<mode>` suffix, "lines" of both, and
    "rerank" {"mode", "top_n"}.
  """
  base = name.split("+", 1)[0]
  score = RANKED.get(base)
  ranks = knn.rank_all(q_desc, db_desc, mesh=mesh)
  result = dict(score(ranks, gt))
  if mode == "local":
    if query_features is None or db_features is None:
      raise ValueError("rerank='local' needs the query and database local features")
    new, inliers = rerank_lib.rerank(ranks, query_features, db_features, top_n=top_n,
                                     min_inliers=min_inliers,
                                     junk=junk_sets(gt, ranks.shape[1]),
                                     num_threads=num_threads, verify_kwargs=verify_kwargs)
    result["verified_per_query_local"] = float(np.mean((inliers >= min_inliers).sum(1)))
  elif mode == "asmk":
    if asmk is None or query_records is None:
      raise ValueError("rerank='asmk' needs a built AsmkIndex and the query local features")
    asmk_ranks, asmk_scores = asmk.search(query_records)
    new = asmk_ranks if top_n < 0 else rerank_lib.rerank_by_scores(ranks, asmk_scores, top_n)
  else:
    raise ValueError(f"rerank mode must be 'local' or 'asmk', got {mode!r}")
  again = score(new, gt)
  label = f"{mode} re-ranking of the top {top_n}" if top_n >= 0 else "ASMK ranking"
  result.update({f"{k}_{mode}": v for k, v in again.items() if k != "lines"})
  result["rerank_lines"] = [line.replace(":", f" + {label}:", 1) for line in again["lines"]]
  result["lines"] = list(result["lines"]) + result["rerank_lines"]
  result["rerank"] = {"mode": mode, "top_n": int(top_n)}
  return result
