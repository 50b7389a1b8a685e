"""eval.rerank=d2r: Detect-to-Retrieve's aggregated kernels rank the database.

As `detect_to_retrieve/perform_retrieval.py` does: every query (cropped by its box) is
aggregated with the query config (plain kernel, never regional), every database image with
the index config (`eval.d2r_regional`: R-VLAD / R-ASMK / R-ASMK* over the whole image plus
the detected boxes with score >= `detect.score_threshold`, boxes from `--mode=detect`),
both over one codebook; the similarity is the index config's, and the whole database is
ranked by it (`eval.d2r_top=-1`; N > 0 re-orders only the global top N instead).

Fields (`configs/common.py`): d2r_aggregation ("vlad", "asmk", "asmk_star"),
d2r_codebook_size (65536), d2r_num_assignments (1), d2r_alpha (3), d2r_tau (0),
d2r_regional (True), d2r_regions ("crop": each box's local features extracted anew from
the image cropped to the box, as the reference does; "select": the whole image's
keypoints inside the box), and the codebook's source: k-means (`d2r_kmeans_iterations`,
the reference's 50 Lloyd iterations from random points) over the local descriptors of
`d2r_train_images` images of `d2r_codebook_dataset` ("" = the config's training set; the
reference clusters the index set's own features), learned once per weights and kept in
`<workdir>/local/<tag>/d2r_codebook_<set>_<size>.npz`.
"""
from typing import List, Sequence, Tuple

from absl import logging
import numpy as np

from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.evaluation import Ranking
from retrieval_jax.evaluation import local_rerankers
from retrieval_jax.evaluation import rerankers
from retrieval_jax.local import aggregation as agg
from retrieval_jax.local import boxes as boxes_lib
from retrieval_jax.local import geometric_rerank

REGIONS = ("crop", "select")


def aggregation_configs(e) -> Tuple[agg.AggregationConfig, agg.AggregationConfig]:
  """(query config, index config) of `config.eval`'s d2r fields; L2 normalisation follows
  the reference's rule (on for plain kernels, off for the regional ones)."""
  common = dict(aggregation_type=str(e.d2r_aggregation),
                codebook_size=int(e.d2r_codebook_size),
                num_assignments=int(e.d2r_num_assignments), alpha=float(e.d2r_alpha),
                tau=float(e.d2r_tau))
  return (agg.AggregationConfig(use_regional_aggregation=False, **common),
          agg.AggregationConfig(use_regional_aggregation=bool(e.d2r_regional), **common))


def rank(query_features: Sequence[np.ndarray], db_features: Sequence[np.ndarray],
         db_regions, codebook: np.ndarray, query_config: agg.AggregationConfig,
         index_config: agg.AggregationConfig) -> Tuple[np.ndarray, np.ndarray]:
  """(ranks [n_db, n_queries] as `evaluation.compute_map`, scores [n_queries, n_db]).

  Args:
    query_features, db_features: per image [n, D] local descriptors (regional database:
      the regions' features one after the other, as `boxes.regions` gives them).
    db_regions: per database image its regions' feature counts, or None (not regional).
    codebook: [K, D].
  """
  queries = agg.aggregate_all(query_features, codebook, query_config)
  database = agg.aggregate_all(db_features, codebook, index_config, db_regions)
  scores = agg.similarity_matrix(queries, database, index_config)
  return np.argsort(-scores, axis=1, kind="stable").T, scores


def _codebook(context: rerankers.Context, size: int) -> np.ndarray:
  """The codebook of these weights, learned once (collectively) and kept as `.npz`."""
  config, e = context.config, context.config.eval
  source = str(e.d2r_codebook_dataset or config.data.name)
  path = storage.join(local_rerankers.local_dir(context.workdir, context.weights_tag),
                      f"d2r_codebook_{source}_{size}.npz")
  if sharding_lib.agree(storage.exists(path)):
    codebook = storage.load_npz(path)["codebook"]
    if codebook.shape[0] != size:
      raise ValueError(f"{path} holds {codebook.shape[0]} words, eval.d2r_codebook_size "
                       f"asks for {size}")
    return codebook
  sample = local_rerankers.training_descriptors(context, source, int(e.d2r_train_images),
                                                "d2r")
  logging.info("D2R: codebook of %d words from %d descriptors", size, len(sample))
  codebook = agg.kmeans(sample, size, iterations=int(e.d2r_kmeans_iterations),
                        seed=int(config.seed))
  if sharding_lib.is_main_process():
    storage.save_npz(path, codebook=codebook)
  return codebook


def _box_features(context: rerankers.Context, db_store, boxes: boxes_lib.BoxSet,
                  threshold: float) -> List[List[np.ndarray]]:
  """Per database image, the local descriptors of each selected box."""
  e = context.config.eval
  dataset = context.test.dataset
  selected = [boxes_lib.select(boxes.boxes(i), boxes.scores(i), threshold)
              for i in range(len(boxes))]
  if e.d2r_regions == "select":
    out = []
    for i, sel in enumerate(selected):
      rec, (h, w) = db_store[i], boxes.size(i)
      out.append([rec["descriptors"][boxes_lib.features_in_box(rec["locations"], b, h, w)]
                  for b in sel])
    return out
  if context.settings.protocol.exif_transpose:
    raise ValueError("eval.d2r_regions='crop' crops the stored image frame, but this set's "
                     "images are EXIF-rotated (extract.exif_transpose): use "
                     "--config.eval.d2r_regions=select")
  out = [[] for _ in range(len(selected))]
  owner, paths, crops, names = [], [], [], []
  for i, sel in enumerate(selected):
    h, w = boxes.size(i)
    for b in sel:
      crop = boxes_lib.crop_box(b, h, w)
      if crop[2] <= crop[0] or crop[3] <= crop[1]:  # an empty crop: a region without features
        out[i].append(np.zeros((0, db_store.dim), np.float32))
        continue
      owner.append((i, len(out[i])))
      out[i].append(None)
      paths.append(dataset.db_images[i])
      crops.append(crop)
      names.append(f"{dataset.db_images[i]}@{','.join(map(str, crop))}")
  if not paths:
    return out
  folder = storage.join(local_rerankers.local_dir(context.workdir, context.weights_tag),
                        f"{context.test.prefix}_db_boxes_t{threshold:g}")
  # Box crops are extracted as the queries' crops are, at the whole image's scale; the
  # store records every crop by name, so other boxes in the same folder are refused.
  store = local_rerankers._store(  # pylint: disable=protected-access
      context.model, context.variables, paths, folder, mesh=context.mesh,
      settings=context.settings, bboxes=crops, image_list=names)
  sharding_lib.sync("d2r_box_features")
  for j, (i, k) in enumerate(owner):
    out[i][k] = store[j]["descriptors"]
  return out


@rerankers.RERANKERS.register("d2r")
def _d2r(context: rerankers.Context, stage: rerankers.Stage) -> rerankers.Reranked:
  """Detect-to-Retrieve's ranking of the whole database (`eval.d2r_top < 0`), or the
  global top `eval.d2r_top` re-ordered by its similarity."""
  e = context.config.eval
  q_store, db_store = local_rerankers._test_stores(context)  # pylint: disable=protected-access
  query_config, index_config = aggregation_configs(e)
  codebook = _codebook(context, index_config.codebook_size)
  q_feats = [q_store[i]["descriptors"] for i in range(len(q_store))]
  db_feats, regions, n_boxes = [], None, 0
  if index_config.use_regional_aggregation:
    dataset = context.test.dataset
    threshold = float(context.config.detect.score_threshold)
    boxes = boxes_lib.read(boxes_lib.folder(context.workdir, context.test.prefix, "db"),
                           len(dataset.db_images))
    regions = []
    for i, box_feats in enumerate(_box_features(context, db_store, boxes, threshold)):
      feats, counts = boxes_lib.regions(db_store[i]["descriptors"], box_feats)
      db_feats.append(feats)
      regions.append(counts)
      n_boxes += len(box_feats)
  else:
    db_feats = [db_store[i]["descriptors"] for i in range(len(db_store))]
  ranks, scores = rank(q_feats, db_feats, regions, codebook, query_config, index_config)
  kind = ("r-" if index_config.use_regional_aggregation else "") + index_config.aggregation_type
  metrics = {"boxes_per_image": n_boxes / max(len(db_feats), 1)} if regions else {}
  top_n = int(e.d2r_top)
  if top_n < 0:
    return rerankers.Reranked(Ranking(np.asarray(ranks)), f"D2R {kind} ranking", metrics)
  return rerankers.Reranked(
      Ranking(geometric_rerank.rerank_by_scores(stage.ranking.ranks, scores, top_n)),
      f"D2R {kind} re-ranking of the top {top_n}", metrics)
