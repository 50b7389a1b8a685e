"""Evaluate a model on a retrieval set: describe queries and database, score, report.

`evaluate` extracts the query (cropped by their boxes) and database descriptors with the
`config.extract` settings, runs the dataset's evaluator (`retrieval_jax.evaluation`), and,
given a whitening, the same evaluator on the whitened descriptors too (as the reference's
test.py prints `dataset` and `dataset + whiten`). It writes `<workdir>/results/<tag>.json`
and pictures of the first queries' top results with correct (green) / junk (orange) /
wrong (red) borders: `<tag>_top.png` (one row per query) and `<tag>_queries/query_NNN.png`.
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from retrieval_jax import evaluation
from retrieval_jax import extract
from retrieval_jax import folder_search
from retrieval_jax import paths
from retrieval_jax import search
from retrieval_jax import sharding
from retrieval_jax import storage
from retrieval_jax.data import datasets
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.evaluation import pictures as pictures_lib
from retrieval_jax.evaluation import rerank as rerank_lib
from retrieval_jax.evaluation import superglobal as superglobal_rerank
from retrieval_jax.postprocess import whitening as whitening_lib


def ground_truth(dataset: datasets.RetrievalSet) -> Any:
  """What the dataset's evaluator expects (see retrieval_jax/evaluation/__init__.py)."""
  if dataset.gnd is not None:
    return {"gnd": dataset.gnd}
  if dataset.query_labels is not None:
    return {"query_labels": dataset.query_labels, "db_labels": dataset.db_labels}
  return None


def evaluator_name(dataset: datasets.RetrievalSet) -> str:
  return "labels" if dataset.gnd is None and dataset.query_labels is not None else dataset.name


def picture_gnd(dataset: datasets.RetrievalSet, n: int) -> List[Dict[str, np.ndarray]]:
  """Per query 'ok' / 'junk' database indices for the border colours of the first n queries.

  Revisited sets use the Medium setup (ok = easy + hard, junk = junk); the others their
  'ok' / 'junk' lists, or same-label images.
  """
  out = []
  for i in range(n):
    if dataset.gnd is not None:
      g = dataset.gnd[i]
      if "easy" in g:
        ok = np.concatenate([np.asarray(g["easy"], np.int64), np.asarray(g["hard"], np.int64)])
      else:
        ok = np.asarray(g.get("ok", []), np.int64)
      out.append({"ok": ok, "junk": np.asarray(g.get("junk", []), np.int64)})
    else:
      out.append({"ok": np.flatnonzero(np.asarray(dataset.db_labels)
                                       == dataset.query_labels[i]),
                  "junk": np.zeros((0,), np.int64)})
  return out


def _rotations(dataset: datasets.RetrievalSet, images: Sequence[str]) -> Optional[List[int]]:
  if not dataset.rotations:
    return None
  return [int(dataset.rotations.get(p, 0)) for p in images]


def with_saved_before(workdir: str, results: Dict[str, Any]) -> Dict[str, Any]:
  """`results` plus the "before training" numbers that the first training run saved.

  A resumed run, or a later --mode=evaluate, does not evaluate the untrained network again.
  """
  path = storage.join(paths.results_dir(workdir), "before.json")
  if results.get("before") is None and storage.exists(path):
    return dict(results, before=json.loads(storage.read_text(path)))
  return results


def rerank_config(eval_config) -> Dict[str, Any]:
  """The re-ranking fields of `config.eval` (alpha-QE / alpha-DBA; k = 0 turns one off),
  plus "superglobal": {"m", "k", "beta"} when `eval.rerank="superglobal"`."""
  out = {k: eval_config[k] for k in ("qe_k", "qe_alpha", "dba_k", "dba_alpha")}
  if eval_config.get("rerank", "") == SUPERGLOBAL:
    out[SUPERGLOBAL] = {"m": int(eval_config.superglobal_m), "k": int(eval_config.superglobal_k),
                        "beta": float(eval_config.superglobal_beta)}
  return out


# `eval.rerank` value of SuperGlobal's global-only re-ranking (evaluation/superglobal.py),
# run here on the final descriptors; "local" / "asmk" are evaluate_local's.
SUPERGLOBAL = "superglobal"


def evaluate(model, variables, dataset: datasets.RetrievalSet, *, mesh, extract_config,
             workdir: str = "", tag: str = "eval", pictures: int = 0,
             whitening: Optional[Mapping[str, Any]] = None, describe_fn=None,
             rerank: Optional[Mapping[str, Any]] = None, allow_missing: bool = False,
             data_root: str = "",
             approximate: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Descriptors of the set's queries and database -> the evaluator's metrics (+ JSON file).

  Args:
    model, variables: the network (a RetrievalNet and its variables).
    dataset: a RetrievalSet.
    mesh: device mesh (extraction and search are split over its batch axis).
    extract_config: `config.extract` (long_side, batch_size, scales, multiscale_combine).
    workdir: where results/ goes ("" writes nothing).
    tag: file name stem of the results.
    pictures: draw the top results of this many queries (0: none).
    whitening: optional {"m", "P", "kind", "dim"} (`whitening_store.get_or_compute`);
      its metrics are added with a `_<kind>` suffix and its lines with `+ <kind>`, and the
      pictures show the whitened ranking.
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
    rerank: optional {"qe_k", "qe_alpha", "dba_k", "dba_alpha"} (`rerank_config`): alpha-DBA
      then alpha-QE on the final descriptors, reported with a `_rerank` suffix; with a
      "superglobal" entry, SuperGlobal's re-ranking of them after that, with a
      `_superglobal` suffix. The pictures show the last descriptors' global ranking.
    allow_missing: `config.eval.allow_missing`: evaluate without missing / unreadable
      images (else they are an error, `data/integrity.py`); the counts go into the result.
    data_root: the set's data root, for the download command in those errors.
    approximate: optional {"k", "factory", "nprobe"} (`approximate_config`): for a
      revisited set, also the mAP of the exact and of the faiss top-k lists and the
      recall@k of the faiss search (the index is built once under <workdir>/faiss/).
  Returns:
    The evaluator's metrics and 'lines' (plus the whitened ones), and "missing_queries" /
    "missing_db_images" when images were left out.
  """
  checked = integrity.check_retrieval_set(dataset, root=data_root, allow_missing=allow_missing)
  dataset = checked.dataset
  kw = extract.extract_kwargs(extract_config, variables, model, dataset.name)
  kw["describe_fn"] = describe_fn or extract.make_describe_fn(model, mesh)
  failed_q, failed_db = image_io.SkipCounter(), image_io.SkipCounter()
  q = extract.extract_descriptors(model, variables, dataset.query_images,
                                  bboxes=dataset.query_bbx,
                                  rotations=_rotations(dataset, dataset.query_images),
                                  mesh=mesh, skipped=failed_q, **kw)
  db = extract.extract_descriptors(model, variables, dataset.db_images,
                                   rotations=_rotations(dataset, dataset.db_images),
                                   mesh=mesh, skipped=failed_db, **kw)
  try:
    checked, drop_q, drop_db = integrity.after_extraction(
        checked, failed_q.entries, failed_db.entries, root=data_root)
  finally:  # The list of skipped files is written even when they stop the evaluation.
    if workdir:
      paths.write_skipped_list(workdir, dataset.name, checked.entries + failed_q.entries
                               + failed_db.entries)
  if drop_q or drop_db:
    dataset = checked.dataset
    q, db = np.delete(q, drop_q, axis=0), np.delete(db, drop_db, axis=0)
  name = evaluator_name(dataset)
  gt = ground_truth(dataset)
  score = evaluation.get_evaluator(name)
  result = dict(score(q, db, gt, mesh=mesh))
  if checked.entries:
    result.update(checked.summary())
    result["lines"] = list(result["lines"]) + [
        f"{dataset.name}: evaluated WITHOUT {len(checked.missing_queries)} missing queries "
        f"and {len(checked.missing_db)} missing database images (eval.allow_missing=True)"]

  if approximate and dataset.gnd is not None and "easy" in dataset.gnd[0]:
    report = folder_search.revisited_exact_and_approximate(
        dataset.name, q, db, dataset.gnd, k=int(approximate["k"]), mesh=mesh,
        index_dir=os.path.join(workdir or ".", "faiss", f"{dataset.name}_{tag}"),
        factory=approximate["factory"], nprobe=int(approximate["nprobe"]))
    result["lines"] = list(result["lines"]) + report.pop("lines")
    result.update(report)

  def add_variant(suffix: str, label: str, q, db, ranker=None):
    extra = score(q, db, gt, mesh=mesh) if ranker is None else score(q, db, gt, mesh=mesh,
                                                                        ranker=ranker)
    result.update({f"{k}_{suffix}": v for k, v in extra.items() if k != "lines"})
    result["lines"] = list(result["lines"]) + [
        line.replace(":", f" + {label}:", 1) for line in extra["lines"]]

  if whitening is not None:
    kind = whitening.get("kind", "whiten")
    q = whitening_lib.apply(q, whitening, whitening.get("dim", 0))
    db = whitening_lib.apply(db, whitening, whitening.get("dim", 0))
    add_variant(kind, f"{kind} whitening ({q.shape[1]}D)", q, db)
  if rerank and (rerank["dba_k"] or rerank["qe_k"]):
    # On the final (whitened) descriptors: database-side augmentation, then query expansion.
    if rerank["dba_k"]:
      db = rerank_lib.alpha_database_augmentation(
          db, rerank["dba_k"], rerank["dba_alpha"], mesh=mesh)
    if rerank["qe_k"]:
      q = rerank_lib.alpha_query_expansion(
          q, db, rerank["qe_k"], rerank["qe_alpha"], mesh=mesh)
    add_variant("rerank", f"aQE k={rerank['qe_k']} aDBA k={rerank['dba_k']}", q, db)
  if rerank and rerank.get(SUPERGLOBAL):
    sg = rerank[SUPERGLOBAL]
    add_variant(SUPERGLOBAL, f"SuperGlobal M={sg['m']} K={sg['k']} beta={sg['beta']}", q, db,
                ranker=superglobal_rerank.ranker(**sg))
  for line in result["lines"]:
    logging.info("%s %s", tag, line)
  if workdir and sharding.is_main_process():
    out = paths.results_dir(workdir)
    storage.write_text(storage.join(out, f"{tag}.json"),
                       json.dumps({k: _jsonable(v) for k, v in result.items()}, indent=1))
    n = min(pictures, len(dataset.query_images))
    if n and (dataset.gnd is not None or dataset.query_labels is not None):
      _pictures(out, tag, q, db, dataset, n)
  return result


def _pictures(out: str, tag: str, q: np.ndarray, db: np.ndarray,
              dataset: datasets.RetrievalSet, n: int) -> None:
  """Top-8 of the first n queries: one grid, and one picture per query."""
  ranks = search.rank_all(q[:n], db)
  gnd = picture_gnd(dataset, n)
  # Queries as the network saw them: cropped by their box, rotated where the set says so.
  rot = _rotations(dataset, dataset.query_images[:n]) or [0] * n
  queries = []
  for i in range(n):
    bbx = None if dataset.query_bbx is None else dataset.query_bbx[i]
    try:
      queries.append(image_io.load_rgb(dataset.query_images[i], bbx, rotate=rot[i]))
    except (image_io.ImageDecodeError, FileNotFoundError) as e:
      logging.warning("pictures: %s", e)
      queries.append(np.zeros((8, 8, 3), np.uint8))

  def db_image(i: int):
    try:
      return image_io.load_rgb(dataset.db_images[i])
    except (image_io.ImageDecodeError, FileNotFoundError):
      return np.zeros((8, 8, 3), np.uint8)

  pictures_lib.save_results(storage.join(out, f"{tag}_top.png"), queries, db_image, ranks,
                            gnd, k=8, thumb=96)
  pictures_lib.save_per_query(storage.join(out, f"{tag}_queries"), queries, db_image, ranks,
                              gnd, k=8, thumb=96)


def _jsonable(v):
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, dict):
    return {k: _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


def approximate_config(config) -> Optional[Dict[str, Any]]:
  """`evaluate(approximate=...)` from `config.eval.search_backend` ("faiss": report the
  approximate search too, with `config.search.faiss_factory` / `nprobe`), else None."""
  if config.eval.search_backend != "faiss":
    return None
  return {"k": int(config.eval.approx_k), "factory": config.search.faiss_factory,
          "nprobe": int(config.search.nprobe)}
