"""Evaluate a model on a retrieval set: describe queries and database, score, report."""
import json
import os
from typing import Any, Dict

from absl import logging
import numpy as np

from retrieval_jax import evaluation
from retrieval_jax import extract
from retrieval_jax import search
from retrieval_jax.data import datasets
from retrieval_jax.evaluation import pictures as pictures_lib


def ground_truth(dataset: datasets.RetrievalSet) -> Any:
  """What the dataset's evaluator expects (see retrieval_jax/evaluation/__init__.py)."""
  if dataset.gnd is not None:
    return {"gnd": dataset.gnd}
  if dataset.query_labels is not None:
    return {"query_labels": dataset.query_labels, "db_labels": dataset.db_labels}
  return None


def evaluator_name(dataset: datasets.RetrievalSet) -> str:
  return "labels" if dataset.gnd is None and dataset.query_labels is not None else dataset.name


def evaluate(model, variables, dataset: datasets.RetrievalSet, *, mesh, extract_config,
             workdir: str = "", tag: str = "eval", pictures: int = 0) -> Dict[str, Any]:
  """Descriptors of the set's queries and database -> the evaluator's metrics (+ JSON file)."""
  kw = dict(mesh=mesh, long_side=extract_config.long_side,
            batch_size=extract_config.batch_size, scales=tuple(extract_config.scales),
            multiscale_p=extract.multiscale_p_from(
                variables, extract_config.get("multiscale_combine", "gem")),
            describe_fn=extract.make_describe_fn(model, mesh))
  q = extract.extract_descriptors(model, variables, dataset.query_images,
                                  bboxes=dataset.query_bbx, **kw)
  db = extract.extract_descriptors(model, variables, dataset.db_images, **kw)
  name = evaluator_name(dataset)
  gt = ground_truth(dataset)
  result = evaluation.get_evaluator(name)(q, db, gt, mesh=mesh)
  for line in result["lines"]:
    logging.info("%s %s", tag, line)
  if workdir:
    out = os.path.join(workdir, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
      json.dump({k: _jsonable(v) for k, v in result.items()}, f, indent=1)
    if pictures and dataset.query_labels is not None:
      _pictures(os.path.join(out, f"{tag}_top.png"), q, db, dataset, pictures)
  return result


def _pictures(path, q, db, dataset, n):
  """Top-8 results of the first `n` queries, bordered correct/wrong (labels protocol)."""
  ranks = search.rank_all(q[:n], db)
  gnd = [{"ok": np.flatnonzero(dataset.db_labels == dataset.query_labels[i]), "junk": []}
         for i in range(min(n, len(q)))]
  pictures_lib.save_results(path, list(dataset.query_images[:n]), list(dataset.db_images),
                            ranks, gnd, k=8, thumb=96)


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
