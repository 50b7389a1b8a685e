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
from retrieval_jax import learned_whitening
from retrieval_jax import search
from retrieval_jax import sharding
from retrieval_jax.data import datasets
from retrieval_jax.data import image_io
from retrieval_jax.evaluation import pictures as pictures_lib
from retrieval_jax.evaluation import rerank as rerank_lib


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


def _rotations(dataset: datasets.RetrievalSet, paths: Sequence[str]) -> Optional[List[int]]:
  if not dataset.rotations:
    return None
  return [int(dataset.rotations.get(p, 0)) for p in paths]


def with_saved_before(workdir: str, results: Dict[str, Any]) -> Dict[str, Any]:
  """`results` plus the "before training" numbers that the first training run saved.

  A resumed run, or a later --mode=evaluate, does not evaluate the untrained network again.
  """
  path = os.path.join(workdir, "results", "before.json")
  if results.get("before") is None and os.path.exists(path):
    with open(path) as f:
      return dict(results, before=json.load(f))
  return results


def rerank_config(eval_config) -> Dict[str, Any]:
  """The re-ranking fields of `config.eval` (alpha-QE / alpha-DBA; k = 0 turns one off)."""
  return {k: eval_config.get(k, d) for k, d in
          (("qe_k", 0), ("qe_alpha", 3.0), ("dba_k", 0), ("dba_alpha", 3.0))}


def evaluate(model, variables, dataset: datasets.RetrievalSet, *, mesh, extract_config,
             workdir: str = "", tag: str = "eval", pictures: int = 0,
             whitening: Optional[Mapping[str, Any]] = None, describe_fn=None,
             rerank: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Descriptors of the set's queries and database -> the evaluator's metrics (+ JSON file).

  Args:
    model, variables: the network (a RetrievalNet and its variables).
    dataset: a RetrievalSet.
    mesh: device mesh (extraction and search are sharded over "data").
    extract_config: `config.extract` (long_side, batch_size, scales, multiscale_combine).
    workdir: where results/ goes ("" writes nothing).
    tag: file name stem of the results.
    pictures: draw the top results of this many queries (0: none).
    whitening: optional {"m", "P", "kind", "dim"} (`learned_whitening.get_or_compute`);
      its metrics are added with a `_<kind>` suffix and its lines with `+ <kind>`, and the
      pictures show the whitened ranking.
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
    rerank: optional {"qe_k", "qe_alpha", "dba_k", "dba_alpha"} (`config.eval`): alpha-DBA
      then alpha-QE on the final descriptors, reported with a `_rerank` suffix. The
      pictures show the last variant's ranking.
  Returns:
    The evaluator's metrics and 'lines' (plus the whitened ones).
  """
  kw = extract.extract_kwargs(extract_config, variables)
  kw["describe_fn"] = describe_fn or extract.make_describe_fn(model, mesh)
  q = extract.extract_descriptors(model, variables, dataset.query_images,
                                  bboxes=dataset.query_bbx,
                                  rotations=_rotations(dataset, dataset.query_images),
                                  mesh=mesh, **kw)
  db = extract.extract_descriptors(model, variables, dataset.db_images,
                                   rotations=_rotations(dataset, dataset.db_images),
                                   mesh=mesh, **kw)
  name = evaluator_name(dataset)
  gt = ground_truth(dataset)
  score = evaluation.get_evaluator(name)
  result = dict(score(q, db, gt, mesh=mesh))

  def add_variant(suffix: str, label: str, q, db):
    extra = score(q, db, gt, mesh=mesh)
    result.update({f"{k}_{suffix}": v for k, v in extra.items() if k != "lines"})
    result["lines"] = list(result["lines"]) + [
        line.replace(":", f" + {label}:", 1) for line in extra["lines"]]

  if whitening is not None:
    kind = whitening.get("kind", "whiten")
    q = learned_whitening.apply(q, whitening, whitening.get("dim", 0))
    db = learned_whitening.apply(db, whitening, whitening.get("dim", 0))
    add_variant(kind, f"{kind} whitening ({q.shape[1]}D)", q, db)
  if rerank and (rerank.get("dba_k", 0) or rerank.get("qe_k", 0)):
    # On the final (whitened) descriptors: database-side augmentation, then query expansion.
    if rerank.get("dba_k", 0):
      db = rerank_lib.alpha_database_augmentation(
          db, rerank["dba_k"], rerank.get("dba_alpha", 3.0), mesh=mesh)
    if rerank.get("qe_k", 0):
      q = rerank_lib.alpha_query_expansion(
          q, db, rerank["qe_k"], rerank.get("qe_alpha", 3.0), mesh=mesh)
    add_variant("rerank", f"aQE k={rerank.get('qe_k', 0)} aDBA k={rerank.get('dba_k', 0)}",
                q, db)
  for line in result["lines"]:
    logging.info("%s %s", tag, line)
  if workdir and sharding.is_main_process():
    out = os.path.join(workdir, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
      json.dump({k: _jsonable(v) for k, v in result.items()}, f, indent=1)
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

  pictures_lib.save_results(os.path.join(out, f"{tag}_top.png"), queries, db_image, ranks,
                            gnd, k=8, thumb=96)
  pictures_lib.save_per_query(os.path.join(out, f"{tag}_queries"), queries, db_image, ranks,
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
