"""Local features in the evaluate / extract modes: stores beside the descriptors, re-ranking.

`extract_local_features` writes the local features of a test set's queries (cropped by
their boxes) and database to `<workdir>/local/<tag>/<set>_<part>/` (store.py: streamed,
resumable; `<tag>` is the checkpoint, so features of another step are never reused).
`evaluate_rerank` scores the global ranking and its re-ranking side by side
(`config.eval.rerank`: "local" = DELG geometric verification of the top
`eval.rerank_top`, "asmk" = ASMK over the local descriptors, its codebook learned once from
`eval.asmk_train_images` training images and kept in `<workdir>/local/<tag>/`).
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
import numpy as np

from retrieval_jax import evaluate as evaluate_lib
from retrieval_jax import extract as extract_lib
from retrieval_jax import networks
from retrieval_jax import paths
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import datasets
from retrieval_jax.local import asmk_index
from retrieval_jax.local import evaluate as local_eval
from retrieval_jax.local import extract as local_extract
from retrieval_jax.local import store as store_lib
from retrieval_jax.postprocess import whitening as whitening_lib

RERANK_MODES = ("", "local", "asmk")


def local_dir(workdir: str, tag: str) -> str:
  return os.path.join(workdir, "local", tag)


def _extract_kwargs(config) -> Dict[str, Any]:
  e = config.extract
  return dict(backbone=config.model.backbone,
              backbone_kwargs=dict(config.model.backbone_kwargs or {}),
              long_side=int(e.local_long_side or e.long_side),
              scales=tuple(float(s) for s in e.local_scales),
              score_threshold=float(e.local_score_threshold),
              max_features=int(e.local_max_features), iou_threshold=float(e.local_iou),
              batch_size=int(e.batch_size))


def extract_local_features(config, workdir: str, model, variables, mesh,
                           dataset: datasets.RetrievalSet, tag: str
                           ) -> Tuple[store_lib.LocalFeatureStore, store_lib.LocalFeatureStore]:
  """(query store, database store) of `dataset`, extracted now or found complete on disk."""
  if not networks.has_local_head(model):
    raise ValueError("local features need model.local_head='delg' (a network with a local "
                     "head); this config has none")
  kw = _extract_kwargs(config)
  out = []
  for part, images, bbx in (("query", dataset.query_images, dataset.query_bbx),
                            ("db", dataset.db_images, None)):
    folder = os.path.join(local_dir(workdir, tag), f"{dataset.name}_{part}")
    out.append(local_extract.extract_to_store(model, variables, images, folder, mesh=mesh,
                                              bboxes=bbx, **kw))
    sharding_lib.sync(f"local_{part}")
  return out[0], out[1]


def _asmk_index(config, workdir: str, model, variables, mesh, tag: str, db_store
                ) -> asmk_index.AsmkIndex:
  """ASMK over the database; the codebook from training images, learned once per tag."""
  size = int(config.eval.asmk_codebook_size)
  index = asmk_index.AsmkIndex(asmk_index.asmk_params(codebook_size=size))
  path = os.path.join(local_dir(workdir, tag), f"asmk_codebook_{size}.npz")
  if os.path.exists(path):
    index.load_codebook(path)
  else:
    train = datasets.get_dataset(config.data.name, paths.data_root(config, workdir),
                                 config.data.split, config=config)
    n = min(int(config.eval.asmk_train_images), len(train.images))
    pick = np.random.default_rng(config.seed).choice(len(train.images), n, replace=False)
    images = [train.images[i] for i in sorted(pick)]
    store = local_extract.extract_to_store(
        model, variables, images, os.path.join(local_dir(workdir, tag), "asmk_train"),
        mesh=mesh, **_extract_kwargs(config))
    sample = np.concatenate([store[i]["descriptors"] for i in range(len(store))])
    logging.info("ASMK: codebook of %d words from %d descriptors of %d training images",
                 size, len(sample), n)
    index.train_codebook(sample)
    if sharding_lib.is_main_process():
      index.save_codebook(path)
  index.build([db_store[i] for i in range(len(db_store))])
  return index


def evaluate_rerank(config, workdir: str, model, variables, mesh,
                    dataset: datasets.RetrievalSet, *, tag: str,
                    whitening: Optional[Dict[str, Any]] = None,
                    describe_fn=None) -> Dict[str, Any]:
  """Global-only and re-ranked metrics of `dataset` (see the module docstring).

  Returns:
    The evaluator's metrics of the global ranking, the re-ranked ones with a `_local` /
    `_asmk` suffix, and "lines" of both; also written to `results/<tag>_rerank.json`.
  """
  mode = config.eval.rerank
  if mode not in RERANK_MODES[1:]:
    raise ValueError(f"eval.rerank must be one of {RERANK_MODES}, got {mode!r}")
  kw = extract_lib.extract_kwargs(config.extract, variables)
  if describe_fn is not None:
    kw["describe_fn"] = describe_fn
  q = extract_lib.extract_descriptors(model, variables, dataset.query_images,
                                      bboxes=dataset.query_bbx, mesh=mesh, **kw)
  db = extract_lib.extract_descriptors(model, variables, dataset.db_images, mesh=mesh, **kw)
  if whitening is not None:
    q = whitening_lib.apply(q, whitening, whitening.get("dim", 0))
    db = whitening_lib.apply(db, whitening, whitening.get("dim", 0))
  q_store, db_store = extract_local_features(config, workdir, model, variables, mesh, dataset,
                                             tag)
  name = evaluate_lib.evaluator_name(dataset)
  gt = evaluate_lib.ground_truth(dataset)
  e = config.eval
  if mode == "local":
    verify = dict(matcher=e.rerank_matcher, ratio=float(e.rerank_ratio),
                  model=e.rerank_model, backend=e.rerank_backend,
                  residual_threshold=float(e.rerank_residual),
                  max_trials=int(e.rerank_max_trials),
                  stop_probability=float(e.rerank_stop_probability), seed=int(config.seed))
    result = local_eval.evaluate_reranked(
        q, db, name, gt, mode="local", top_n=int(e.rerank_top),
        query_features=q_store.__getitem__, db_features=db_store.__getitem__,
        min_inliers=int(e.rerank_min_inliers), verify_kwargs=verify,
        num_threads=int(e.rerank_threads), mesh=mesh)
  else:
    index = _asmk_index(config, workdir, model, variables, mesh, tag, db_store)
    result = local_eval.evaluate_reranked(
        q, db, name, gt, mode="asmk", top_n=int(e.rerank_top), asmk=index,
        query_records=[q_store[i] for i in range(len(q_store))], mesh=mesh)
  for line in result["lines"]:
    logging.info("%s %s", tag, line)
  if workdir and sharding_lib.is_main_process():
    out = paths.results_dir(workdir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}_rerank.json"), "w") as f:
      json.dump({k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                 for k, v in result.items()
                 if isinstance(v, (int, float, np.number)) or k in ("lines", "rerank")},
                f, indent=1)
  return result
