"""Local features of a test set, and the re-rankers that use them (`eval.rerank`).

`extract_local_features` writes the local features of a test set's queries (cropped by
their boxes) and database to `<workdir>/local/<tag>/<set>_<part>/` (store.py: streamed,
resumable; `<tag>` names the weights, "step<N>" or "pretrained", so features of another
step are never reused and `--mode=extract` and the evaluation share them), with the local
settings of `DescriptorSettings.local`.

The re-rankers re-rank the evaluation pipeline's final ranking (`evaluation/pipeline.py`,
registered in `evaluation.rerankers.RERANKERS`):

* "local": DELG geometric verification of the top `eval.rerank_top`
  (`geometric_rerank.rerank`);
* "asmk": by default (`eval.asmk_top=-1`, the HOW/ASMK protocol) the whole database ranked
  by ASMK similarity over the local descriptors; `eval.asmk_top=N` re-orders only the
  global top N (`geometric_rerank.rerank_by_scores`); its codebook learned once from
  `eval.asmk_train_images` images of `eval.asmk_codebook_dataset` (default: the training
  set) and kept in `<workdir>/local/<tag>/`;
* "d2r": Detect-to-Retrieve's VLAD / ASMK / ASMK* and regional kernels (`d2r.py`).
"""
from typing import Tuple

from absl import logging
import numpy as np

from retrieval_jax import networks
from retrieval_jax import paths
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.data import datasets
from retrieval_jax.evaluation import Ranking
from retrieval_jax.evaluation import rerankers
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.local import asmk_index
from retrieval_jax.local import extract as local_extract
from retrieval_jax.local import geometric_rerank
from retrieval_jax.local import store as store_lib


def local_dir(workdir: str, tag: str) -> str:
  return storage.join(workdir, "local", tag)


def _store(model, variables, images, folder: str, *, mesh, settings, bboxes=None,
           image_list=None) -> store_lib.LocalFeatureStore:
  """The local features of `images` under `settings.local`, extracted or found on disk."""
  if not networks.has_local_head(model) or settings.local is None:
    raise ValueError("local features need model.local_head='delg' (a network with a local "
                     "head); this config has none")
  local = settings.local
  return local_extract.extract_to_store(
      model, variables, images, folder, mesh=mesh, bboxes=bboxes, backbone=model.backbone,
      backbone_kwargs=dict(model.backbone_kwargs or {}), long_side=local.long_side,
      scales=local.scales, score_threshold=local.score_threshold,
      max_features=local.max_features, iou_threshold=local.iou_threshold,
      batch_size=local.batch_size, exif_transpose=settings.protocol.exif_transpose,
      image_list=image_list)


def extract_local_features(model, variables, mesh, settings, dataset: datasets.RetrievalSet,
                           *, workdir: str, tag: str, prefix: str = ""
                           ) -> Tuple[store_lib.LocalFeatureStore, store_lib.LocalFeatureStore]:
  """(query store, database store) of `dataset`, extracted now or found complete on disk in
  `<prefix>_query` / `<prefix>_db` (prefix: `TestSet.prefix`, default the set's name)."""
  out = []
  for part, images, bbx in (("query", dataset.query_images, dataset.query_bbx),
                            ("db", dataset.db_images, None)):
    folder = storage.join(local_dir(workdir, tag), f"{prefix or dataset.name}_{part}")
    out.append(_store(model, variables, images, folder, mesh=mesh, settings=settings,
                      bboxes=bbx))
    sharding_lib.sync(f"local_{part}")
  return out[0], out[1]


def _test_stores(context: rerankers.Context):
  return extract_local_features(context.model, context.variables, context.mesh,
                                context.settings, context.test.dataset,
                                workdir=context.workdir, tag=context.weights_tag,
                                prefix=context.test.prefix)


@rerankers.RERANKERS.register("local")
def _local(context: rerankers.Context, stage: rerankers.Stage) -> rerankers.Reranked:
  """DELG: the top `eval.rerank_top` verified by RANSAC inliers of the local features, once
  per Revisited protocol with its junk (`delg/perform_retrieval.py`)."""
  q_store, db_store = _test_stores(context)
  e, ranks = context.config.eval, stage.ranking.ranks
  top_n, min_inliers = int(e.rerank_top), int(e.rerank_min_inliers)
  verify = dict(matcher=e.rerank_matcher, ratio=float(e.rerank_ratio),
                max_distance=float(e.rerank_distance) if e.rerank_matcher == "distance"
                else None,
                model=e.rerank_model, backend=e.rerank_backend,
                residual_threshold=float(e.rerank_residual),
                max_trials=int(e.rerank_max_trials),
                stop_probability=float(e.rerank_stop_probability),
                seed=int(context.config.seed))
  gt = test_set_lib.ground_truth(context.test.dataset)
  new, inliers = geometric_rerank.rerank_setups(
      ranks, q_store.__getitem__, db_store.__getitem__, top_n=top_n,
      min_inliers=min_inliers, junk_by_setup=rerankers.junk_by_setup(gt, ranks.shape[1]),
      num_threads=int(e.rerank_threads), verify_kwargs=verify)
  main = "medium" if "medium" in new else ""
  verified = np.mean((inliers[main] >= max(min_inliers, 1)).sum(1)) if ranks.size else 0.0
  return rerankers.Reranked(
      Ranking(new[main], per_setup=None if main == "" else new),
      f"local re-ranking of the top {top_n}", {"verified_per_query": float(verified)})


def training_descriptors(context: rerankers.Context, source: str, num_images: int,
                         name: str) -> np.ndarray:
  """The local descriptors of `num_images` seeded random images of the set `source` (its
  training split; the config's own split for `data.name`), kept in
  `<workdir>/local/<tag>/<name>_train_<source>/`: what a codebook is learned from."""
  config, workdir = context.config, context.workdir
  split = config.data.split if source == config.data.name else "train"
  train = datasets.get_dataset(source, paths.data_root(config, workdir), split,
                               config=config)
  n = min(int(num_images), len(train.images))
  pick = np.random.default_rng(config.seed).choice(len(train.images), n, replace=False)
  images = [train.images[i] for i in sorted(pick)]
  store = _store(context.model, context.variables, images,
                 storage.join(local_dir(workdir, context.weights_tag),
                              f"{name}_train_{source}"),
                 mesh=context.mesh, settings=context.settings)
  return np.concatenate([store[i]["descriptors"] for i in range(len(store))])


def _asmk_index(context: rerankers.Context, db_store) -> asmk_index.AsmkIndex:
  """ASMK over the database; the codebook from training images, learned once per tag."""
  config, workdir, tag = context.config, context.workdir, context.weights_tag
  size = int(config.eval.asmk_codebook_size)
  index = asmk_index.AsmkIndex(asmk_index.asmk_params(codebook_size=size))
  source = str(config.eval.asmk_codebook_dataset or config.data.name)
  path = storage.join(local_dir(workdir, tag), f"asmk_codebook_{source}_{size}.npz")
  if sharding_lib.agree(storage.exists(path)):  # learning it is collective: agree first
    index.load_codebook(path)
  else:
    n = int(config.eval.asmk_train_images)
    sample = training_descriptors(context, source, n, "asmk")
    logging.info("ASMK: codebook of %d words from %d descriptors of %d training images",
                 size, len(sample), n)
    index.train_codebook(sample)
    if sharding_lib.is_main_process():
      index.save_codebook(path)
  index.build([db_store[i] for i in range(len(db_store))])
  return index


@rerankers.RERANKERS.register("asmk")
def _asmk(context: rerankers.Context, stage: rerankers.Stage) -> rerankers.Reranked:
  """ASMK's own ranking of the whole database (`eval.asmk_top < 0`, the default), or the
  global top `eval.asmk_top` re-ordered by ASMK similarity."""
  q_store, db_store = _test_stores(context)
  index = _asmk_index(context, db_store)
  top_n = int(context.config.eval.asmk_top)
  asmk_ranks, asmk_scores = index.search([q_store[i] for i in range(len(q_store))])
  if top_n < 0:
    return rerankers.Reranked(Ranking(np.asarray(asmk_ranks)), "ASMK ranking")
  return rerankers.Reranked(
      Ranking(geometric_rerank.rerank_by_scores(stage.ranking.ranks, asmk_scores, top_n)),
      f"asmk re-ranking of the top {top_n}")
