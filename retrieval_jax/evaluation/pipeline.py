"""The one evaluation pipeline: an image's way from the network to a mAP.

`evaluate` runs, in order, each stage on what the previous one produced:

  1. global    the test set's query (cropped by their boxes) and database descriptors,
               described as `DescriptorSettings` says, ranked and scored by the set's
               evaluator (`retrieval_jax.evaluation.EVALUATORS`);
  2. whitening the post-hoc whitening (`postprocess/whitening_store.py`) applied to them,
               metrics with a `_<kind>` suffix (the reference's `dataset + whiten` line);
  3. qe_dba    alpha-DBA then alpha-QE on the final descriptors (`query_expansion.py`),
               suffix `_rerank`;
  4. rerank    a second-stage re-ranker of the final ranking (`rerankers.RERANKERS`,
               `config.eval.rerank`: "local" DELG verification, "asmk", "d2r", "superglobal"
               SuperGlobal's MDescAug + RerankwMDA), suffix `_<name>`;
  5. approximate  for a revisited set, the mAP of the exact and of the faiss top-k lists
               of the final descriptors and the faiss recall@k.

`Stages` says which run (`stages_of(config)`); training's periodic evaluations run the same
pipeline, `train.eval_skip` switching stages off there (named in the result's lines).
`<workdir>/results/<tag>.json` gets every number, and pictures of the first queries' top
results of the final ranking get correct (green) / junk (orange) / wrong (red) borders:
`<tag>_top.png` (one row per query) and `<tag>_queries/query_NNN.png`.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import numpy as np

from retrieval_jax import descriptor_settings
from retrieval_jax import evaluation
from retrieval_jax import extract
from retrieval_jax import index_search
from retrieval_jax import paths
from retrieval_jax import sharding
from retrieval_jax import storage
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.evaluation import pictures as pictures_lib
from retrieval_jax.evaluation import query_expansion
from retrieval_jax.evaluation import rerankers
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.evaluation import local_rerankers  # pylint: disable=unused-import
from retrieval_jax.evaluation import d2r  # pylint: disable=unused-import
from retrieval_jax.evaluation import superglobal  # pylint: disable=unused-import
from retrieval_jax.postprocess import whitening as whitening_lib
from retrieval_jax.postprocess import whitening_store

# The stages after the global ranking, by the names `train.eval_skip` uses.
STAGES = ("whitening", "qe_dba", "rerank", "approximate", "pictures")


@dataclasses.dataclass(frozen=True)
class Stages:
  """Which stages run, with their parameters.

  Attributes:
    whitening: the learned whitening {"m", "P", "kind", "dim"} or None.
    qe_k, qe_alpha, dba_k, dba_alpha: alpha-QE / alpha-DBA (k = 0 turns one off).
    rerank: a `rerankers.RERANKERS` name, "" for none; rerank_top: its head length (the
      global ranking is computed at least this deep; < 0: the whole ranking).
    approximate: {"k", "factory", "nprobe"} of the faiss report, or None.
    pictures: draw the top results of this many queries (0: none).
    skipped: stages switched off (`train.eval_skip`), reported in the lines.
  """
  whitening: Optional[Mapping[str, Any]] = None
  qe_k: int = 0
  qe_alpha: float = 3.0
  dba_k: int = 0
  dba_alpha: float = 3.0
  rerank: str = ""
  rerank_top: int = 0
  approximate: Optional[Mapping[str, Any]] = None
  pictures: int = 0
  skipped: Tuple[str, ...] = ()


def stages_of(config, whitening: Optional[Mapping[str, Any]] = None,
              skip: Tuple[str, ...] = ()) -> Stages:
  """The stages `config.eval` asks for, less those named in `skip`."""
  unknown = sorted(set(skip) - set(STAGES))
  if unknown:
    raise ValueError(f"train.eval_skip: {unknown} are not stages; stages: {list(STAGES)}")
  e = config.eval
  on = lambda name: name not in skip
  approximate = None
  if e.search_backend == "faiss" and on("approximate"):
    approximate = {"k": int(e.approx_k), "factory": config.search.faiss_factory,
                   "nprobe": int(config.search.nprobe)}
  asked = {"whitening": whitening is not None, "qe_dba": bool(e.qe_k or e.dba_k),
           "rerank": bool(e.rerank), "approximate": e.search_backend == "faiss",
           "pictures": bool(e.pictures)}
  return Stages(
      whitening=whitening if on("whitening") else None,
      qe_k=int(e.qe_k) if on("qe_dba") else 0, qe_alpha=float(e.qe_alpha),
      dba_k=int(e.dba_k) if on("qe_dba") else 0, dba_alpha=float(e.dba_alpha),
      rerank=str(e.rerank or "") if on("rerank") else "",
      rerank_top=int({"asmk": e.asmk_top, "d2r": e.get("d2r_top", -1)}.get(
          e.rerank, e.rerank_top)),
      approximate=approximate, pictures=int(e.pictures) if on("pictures") else 0,
      skipped=tuple(s for s in STAGES if s in skip and asked[s]))


def with_saved_before(workdir: str, results: Dict[str, Any]) -> Dict[str, Any]:
  """`results` plus the "before training" numbers that the first training run saved.

  A resumed run, or a later --mode=evaluate, does not evaluate the untrained network again.
  """
  path = storage.join(paths.results_dir(workdir), "before.json")
  if results.get("before") is None and storage.exists(path):
    return dict(results, before=json.loads(storage.read_text(path)))
  return results


def evaluate_network(config, workdir: str, model, variables, mesh, *, step: Optional[int],
                     tag: str, skip: Tuple[str, ...] = (), describe_fn=None
                     ) -> Optional[Dict[str, Any]]:
  """`config.eval`'s test set through the pipeline for one network, or None without one.

  The one entry of `--mode=evaluate` and of training's evaluations: the test set checked
  once per process (`test_set.load`), the whitening of these weights learned or reused
  (`whitening_store`), the settings built once, then `evaluate`.

  Args:
    config, workdir: the experiment.
    model, variables, mesh, step: the network (step None: off-the-shelf weights).
    tag: the results' name ("before", "step<N>", "evaluate_step<N>", ...).
    skip: stages not run (`train.eval_skip`; named in the result's lines).
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
  """
  test = test_set_lib.load(config, workdir)
  if test is None:
    return None
  describe_fn = describe_fn or extract.make_describe_fn(model, mesh)
  white = None
  if "whitening" not in skip:
    white = whitening_store.get_or_compute(config, workdir, model, variables, mesh, step,
                                           describe_fn=describe_fn)
  settings = descriptor_settings.build(config, model, variables, test.dataset.name)
  context = rerankers.Context(config, workdir, tag, model, variables, mesh, settings, test,
                              weights_tag="pretrained" if step is None else f"step{step}")
  stages = stages_of(config, white, tuple(skip))
  result = evaluate(context, stages, describe_fn)
  extras = test_set_lib.extra_splits(config)
  if not extras:
    return result
  # `eval.extra_splits` (the demo's real views): the same network and stages, less the
  # second-stage re-ranking, the faiss report and the pictures; under the split's name in
  # the result (and its file), its lines prefixed with the split.
  result = dict(result)
  for split in extras:
    extra = test_set_lib.load(config, workdir, split)
    extra_context = dataclasses.replace(
        context, workdir="", tag=f"{tag}_{split}", test=extra,
        settings=descriptor_settings.build(config, model, variables, extra.dataset.name))
    got = evaluate(extra_context, dataclasses.replace(stages, rerank="", approximate=None,
                                                      pictures=0), describe_fn)
    result[split] = got
    result["lines"] = list(result["lines"]) + [f"{split}: {line}" for line in got["lines"]]
  write_result(workdir, tag, result)
  return result


def write_result(workdir: str, tag: str, result: Mapping[str, Any]) -> None:
  """`<workdir>/results/<tag>.json` (main process only; nothing for workdir "")."""
  if workdir and sharding.is_main_process():
    storage.write_text(storage.join(paths.results_dir(workdir), f"{tag}.json"),
                       json.dumps({k: _jsonable(v) for k, v in result.items()}, indent=1))


def describe_test_set(context: rerankers.Context, describe_fn=None
                      ) -> Tuple[test_set_lib.TestSet, np.ndarray, np.ndarray]:
  """(test set without images that failed to decode, queries [Nq, D], database [Nd, D]).

  Raises:
    IncompleteDatasetError: an image could not be decoded and `eval.allow_missing` is off.
  """
  test, settings = context.test, context.settings
  dataset = test.dataset
  kw = dict(settings.extract_kwargs(),
            describe_fn=describe_fn or extract.make_describe_fn(context.model, context.mesh))
  failed_q, failed_db = image_io.SkipCounter(), image_io.SkipCounter()
  q = extract.extract_descriptors(
      context.model, context.variables, dataset.query_images, bboxes=dataset.query_bbx,
      rotations=settings.image_rotations(dataset.rotations, dataset.query_images),
      mesh=context.mesh, skipped=failed_q, **kw)
  db = extract.extract_descriptors(
      context.model, context.variables, dataset.db_images,
      rotations=settings.image_rotations(dataset.rotations, dataset.db_images),
      mesh=context.mesh, skipped=failed_db, **kw)
  completeness = test.completeness
  try:
    completeness, drop_q, drop_db = integrity.after_extraction(
        completeness, failed_q.entries, failed_db.entries, root=test.root)
  finally:  # The list of skipped files is written even when they stop the evaluation.
    if context.workdir:
      paths.write_skipped_list(context.workdir, dataset.name, completeness.entries
                               + failed_q.entries + failed_db.entries)
  if drop_q or drop_db:
    test = dataclasses.replace(test, dataset=completeness.dataset, completeness=completeness)
    q, db = np.delete(q, drop_q, axis=0), np.delete(db, drop_db, axis=0)
  return test, q, db


def evaluate(context: rerankers.Context, stages: Stages, describe_fn=None) -> Dict[str, Any]:
  """The test set's metrics through every stage (see the module docstring).

  Args:
    context: the network, the settings, the checked test set, workdir ("" writes
      nothing) and tag (the results' file name stem).
    stages: which stages run (`stages_of`).
    describe_fn: a compiled `extract.make_describe_fn(model, mesh)` to reuse.
  Returns:
    The evaluator's metrics and 'lines', every later stage's metrics with its suffix, and
    "missing_queries" / "missing_db_images" when images were left out.
  """
  test, q, db = describe_test_set(context, describe_fn)
  context = dataclasses.replace(context, test=test)
  dataset, mesh = test.dataset, context.mesh
  evaluator, printed = evaluation.get_evaluator(test_set_lib.evaluator_name(dataset))
  gt = test_set_lib.ground_truth(dataset)
  depth = evaluator.depth
  if depth is not None and stages.rerank:
    depth = None if stages.rerank_top < 0 else max(depth, stages.rerank_top)

  def ranked(name: str, q, db) -> rerankers.Stage:
    return rerankers.Stage(name, q, db, evaluation.rank(q, db, depth, mesh=mesh))

  stage = ranked("global", q, db)
  result = dict(evaluator.score(printed, stage.ranking, gt))
  if test.completeness.entries:
    result.update(test.completeness.summary())
    result["lines"] = list(result["lines"]) + [
        f"{dataset.name}: evaluated WITHOUT {len(test.completeness.missing_queries)} missing "
        f"queries and {len(test.completeness.missing_db)} missing database images "
        "(eval.allow_missing=True)"]

  def add_variant(suffix: str, label: str, ranking: evaluation.Ranking) -> None:
    extra = evaluator.score(printed, ranking, gt)
    result.update({f"{k}_{suffix}": v for k, v in extra.items() if k != "lines"})
    result["lines"] = list(result["lines"]) + [
        line.replace(":", f" + {label}:", 1) for line in extra["lines"]]

  w = stages.whitening
  if w is not None:
    kind = w.get("kind", "whiten")
    stage = ranked(kind, whitening_lib.apply(stage.q, w, w.get("dim", 0)),
                   whitening_lib.apply(stage.db, w, w.get("dim", 0)))
    add_variant(kind, f"{kind} whitening ({stage.q.shape[1]}D)", stage.ranking)
  if stages.dba_k or stages.qe_k:
    q, db = stage.q, stage.db
    if stages.dba_k:
      db = query_expansion.alpha_database_augmentation(db, stages.dba_k, stages.dba_alpha,
                                                       mesh=mesh)
    if stages.qe_k:
      q = query_expansion.alpha_query_expansion(q, db, stages.qe_k, stages.qe_alpha,
                                                mesh=mesh)
    stage = ranked("rerank", q, db)
    add_variant("rerank", f"aQE k={stages.qe_k} aDBA k={stages.dba_k}", stage.ranking)
  if stages.rerank:
    got = rerankers.RERANKERS.get(stages.rerank)(context, stage)
    stage = dataclasses.replace(stage, name=stages.rerank, ranking=got.ranking)
    result.update({f"{k}_{stages.rerank}": v for k, v in got.metrics.items()})
    result["rerank"] = {"mode": stages.rerank, "top_n": int(stages.rerank_top)}
    add_variant(stages.rerank, got.label, got.ranking)
  if stages.approximate and test_set_lib.is_revisited(dataset):
    a = stages.approximate
    report = index_search.revisited_exact_and_approximate(
        dataset.name, stage.q, stage.db, dataset.gnd, k=int(a["k"]), mesh=mesh,
        index_dir=storage.join(context.workdir or ".", "faiss",
                               f"{dataset.name}_{context.tag}_{stage.name}"),
        factory=a["factory"], nprobe=int(a["nprobe"]))
    result["lines"] = list(result["lines"]) + report.pop("lines")
    result.update(report)
  if stages.skipped:
    result["lines"] = list(result["lines"]) + [
        f"stages not run (train.eval_skip): {', '.join(stages.skipped)}"]
  for line in result["lines"]:
    logging.info("%s %s", context.tag, line)
  write_result(context.workdir, context.tag, result)
  if context.workdir and sharding.is_main_process():
    out = paths.results_dir(context.workdir)
    n = min(stages.pictures, len(dataset.query_images))
    if n and (dataset.gnd is not None or dataset.query_labels is not None):
      _pictures(out, context, dataset, stage.ranking.ranks[:8, :n])
  return result


def _pictures(out: str, context: rerankers.Context, dataset, ranks: np.ndarray) -> None:
  """Top-8 of the first n queries (`ranks` [8, n]): one grid, and one picture per query."""
  n = ranks.shape[1]
  gnd = test_set_lib.picture_gnd(dataset, n)
  # Queries as the network saw them: cropped by their box, rotated where the set says so.
  rot = (context.settings.image_rotations(dataset.rotations, dataset.query_images[:n])
         or [0] * n)
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

  tag = context.tag
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
