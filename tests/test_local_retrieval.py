"""Local-feature storage (resumable), geometric re-ranking and ASMK on synthetic scenes.

A synthetic "landmark" is a set of 2D points with random unit descriptors; a positive view of
it is the same descriptors (slightly noisy) at affinely moved points, mixed with clutter;
a negative is unrelated points and descriptors. No network is needed, so these tests are
fast and check the retrieval logic itself.
"""
import json

import numpy as np
import pytest

from retrieval_jax import evaluation
from retrieval_jax.local import asmk_index
from retrieval_jax.local import geometric_rerank as rerank_lib
from retrieval_jax.local import store as store_lib

import numpy_references  # pylint: disable=g-bad-import-order

DIM = 32  # binary ASMK packs bits in 32-bit words (see asmk_index)


# 60 of 100 points are true matches: 100 RANSAC trials find them with certainty.
FAST = {"max_trials": 100}


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _scene(rng, n=80):
  return {"locations": rng.uniform(0, 300, (n, 2)).astype(np.float32),
          "descriptors": _unit(rng.normal(size=(n, DIM))),
          "scales": np.ones(n, np.float32), "scores": rng.uniform(size=n).astype(np.float32)}


def _view(rng, scene, keep=60, clutter=40):
  a = np.array([[0.9, 0.1], [-0.1, 0.95]])
  idx = rng.choice(len(scene["scores"]), keep, replace=False)
  loc = scene["locations"][idx] @ a.T + np.array([12.0, -7.0]) + rng.normal(0, 1.0, (keep, 2))
  desc = _unit(scene["descriptors"][idx] + rng.normal(0, 0.05, (keep, DIM)))
  junk = _scene(rng, clutter)
  return {"locations": np.concatenate([loc, junk["locations"]]).astype(np.float32),
          "descriptors": np.concatenate([desc, junk["descriptors"]]),
          "scales": np.ones(keep + clutter, np.float32),
          "scores": np.ones(keep + clutter, np.float32)}


@pytest.fixture(scope="module")
def world():
  """3 queries; database: 2 positives per query + 14 negatives (20 images)."""
  rng = np.random.default_rng(0)
  scenes = [_scene(rng) for _ in range(3)]
  queries = [_view(rng, s) for s in scenes]
  db, owner = [], []
  for q, s in enumerate(scenes):
    for _ in range(2):
      db.append(_view(rng, s))
      owner.append(q)
  for _ in range(14):
    db.append(_scene(rng, 100))
    owner.append(-1)
  return queries, db, np.asarray(owner)


def test_store_streams_and_resumes(tmp_path, world):
  _, db, _ = world
  folder = str(tmp_path / "local")
  writer = store_lib.LocalFeatureWriter(folder, len(db), DIM, chunk_size=8,
                                        config={"scales": [1.0]})
  for i in range(11):  # chunk 0 complete, chunk 1 half: an interrupted run
    writer.add(i, db[i])
  files = sorted(p.name for p in (tmp_path / "local").iterdir())
  assert files == ["chunk-00000.npz", "meta.json"]
  # Resume: a new writer sees chunk 0 done, redoes only the rest.
  writer = store_lib.LocalFeatureWriter(folder, len(db), DIM, chunk_size=8,
                                        config={"scales": [1.0]})
  assert [writer.done(i) for i in (0, 7, 8, 19)] == [True, True, False, False]
  for i in range(8, len(db)):
    writer.add(i, db[i])
  store = writer.close()
  assert len(store) == len(db)
  for i in range(len(db)):
    for k in ("locations", "scales", "scores", "descriptors"):
      np.testing.assert_array_equal(store[i][k], db[i][k], err_msg=f"{i} {k}")
  with pytest.raises(ValueError, match="other settings"):
    store_lib.LocalFeatureWriter(folder, len(db), DIM, chunk_size=8, config={"scales": [2.0]})
  assert json.loads((tmp_path / "local" / "meta.json").read_text())["num_images"] == 20


def test_store_float16_and_missing(tmp_path):
  rng = np.random.default_rng(1)
  writer = store_lib.LocalFeatureWriter(str(tmp_path), 3, DIM, chunk_size=2, dtype="float16")
  writer.add(0, _scene(rng, 5))
  store = writer.close()  # images 1 and 2 never came: empty records, not an error
  assert store[0]["descriptors"].dtype == np.float32 and len(store[0]["scores"]) == 5
  assert len(store[1]["scores"]) == 0 and len(store[2]["scores"]) == 0
  with pytest.raises(FileNotFoundError, match="meta.json"):
    store_lib.LocalFeatureStore(str(tmp_path / "nothing"))


def test_rerank_lifts_verified_positives(world):
  queries, db, owner = world
  rng = np.random.default_rng(2)
  # A bad global ranking: every query sees all negatives before its positives.
  ranks = []
  for q in range(3):
    neg = rng.permutation(np.nonzero(owner != q)[0])
    pos = np.nonzero(owner == q)[0]
    ranks.append(np.concatenate([neg, pos]))
  ranks = np.stack(ranks, axis=1)  # [n_db, n_q]
  new, inliers = rerank_lib.rerank(ranks, queries.__getitem__, db.__getitem__, top_n=20,
                                   min_inliers=15, num_threads=2, verify_kwargs=FAST)
  for q in range(3):
    verified = set(np.nonzero(inliers[q] >= 15)[0])
    assert verified == set(np.nonzero(owner == q)[0])  # positives verified, nothing else
    pos_rank = [list(new[:, q]).index(i) for i in verified]
    assert sorted(pos_rank) == [0, 1]
    # Unverified images keep their global order.
    rest = [i for i in new[:, q] if i not in verified]
    assert rest == [i for i in ranks[:, q] if i not in verified]
  # Off: unchanged.
  same, none = rerank_lib.rerank(ranks, queries.__getitem__, db.__getitem__, top_n=0)
  np.testing.assert_array_equal(same, ranks)
  assert not none.any()


def test_rerank_order_invariants():
  """Random rankings and inlier counts: verified never below unverified; top_n limits it."""
  rng = np.random.default_rng(3)
  for _ in range(50):
    n = 30
    order = rng.permutation(n)
    inliers = np.where(rng.uniform(size=n) < 0.3, rng.integers(0, 60, n), 0)
    out = rerank_lib.rerank_order(order, inliers, 15)
    assert sorted(out) == list(range(n))
    verified = inliers[out] >= 15
    assert not np.any(np.diff(verified.astype(int)) > 0)  # no unverified before a verified
    head = inliers[out][verified]
    assert np.all(np.diff(head) <= 0)
    np.testing.assert_array_equal(out[~verified], order[inliers[order] < 15])


def test_rerank_skips_junk(world):
  """Junk images are not verified and do not use the top-N budget (as the reference)."""
  queries, db, owner = world
  ranks, junk = [], []
  for q in range(3):
    pos = np.nonzero(owner == q)[0]
    ranks.append(np.concatenate([pos, np.nonzero(owner != q)[0]]))
    junk.append({int(pos[0])})
  ranks = np.stack(ranks, axis=1)
  _, inliers = rerank_lib.rerank(ranks, queries.__getitem__, db.__getitem__, top_n=1,
                                 min_inliers=15, junk=junk, verify_kwargs=FAST)
  for q in range(3):
    pos = np.nonzero(owner == q)[0]
    assert inliers[q, pos[0]] == 0 and inliers[q, pos[1]] >= 15
    assert np.count_nonzero(inliers[q]) == 1


def _numpy_asmk_scores(centroids, q_desc, db_descs, alpha=3.0, thr=0.0):
  """Binary ASMK (no idf, single assignment) re-derived from Tolias et al. 2013, Eq. 11-13."""
  def aggregate(desc):
    words = np.argmin(((desc[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return {w: np.sign(np.maximum((desc[words == w] - centroids[w]).sum(0), 0)) * 2 - 1
            for w in np.unique(words)}  # residual sums binarised to +-1 (> 0 -> +1)
  q = aggregate(q_desc)
  out = []
  for d_desc in db_descs:
    d = aggregate(d_desc)
    s = 0.0
    for w in set(q) & set(d):
      sim = float(q[w] @ d[w]) / len(q[w])  # 1 - 2 * normalised Hamming distance
      if sim >= thr:
        s += sim ** alpha
    out.append(s / np.sqrt(len(q)) / np.sqrt(len(d)))
  return np.asarray(out)


def test_asmk_matches_numpy_and_ranks_positives_first(tmp_path, world):
  queries, db, owner = world
  params = asmk_index.asmk_params(codebook_size=16, query_multiple_assignment=1)
  index = asmk_index.AsmkIndex(params)
  train = np.concatenate([r["descriptors"] for r in db])
  index.train_codebook(train)
  index.save_codebook(str(tmp_path / "codebook.npz"))
  index.build(db)
  ranks, scores = index.search(queries)
  centroids = np.load(tmp_path / "codebook.npz")["centroids"]
  for q in range(3):
    ref = _numpy_asmk_scores(centroids, queries[q]["descriptors"],
                             [r["descriptors"] for r in db])
    np.testing.assert_allclose(scores[q], ref, rtol=1e-5, atol=1e-6)
    assert set(ranks[:2, q]) == set(np.nonzero(owner == q)[0])
  # A reloaded codebook gives the same index.
  again = asmk_index.AsmkIndex(params)
  again.load_codebook(str(tmp_path / "codebook.npz"))
  again.build(db)
  np.testing.assert_allclose(again.search(queries)[1], scores)


def test_regional_asmk_finds_a_boxed_object(world):
  """A positive buried in clutter scores higher once its box is indexed as a region."""
  queries, db, owner = world
  rng = np.random.default_rng(4)
  pos = int(np.nonzero(owner == 0)[0][0])
  clutter = _scene(rng, 400)
  clutter["locations"] += 400.0  # clutter lies outside the object's box
  buried = {k: np.concatenate([db[pos][k], clutter[k]]) for k in ("locations", "descriptors")}
  database = [buried] + [db[i] for i in np.nonzero(owner == -1)[0]]
  params = asmk_index.asmk_params(codebook_size=128)
  train = np.concatenate([r["descriptors"] for r in db] + [clutter["descriptors"]])
  plain, regional = asmk_index.AsmkIndex(params), asmk_index.AsmkIndex(params)
  plain.train_codebook(train)
  regional._method = plain._method  # the same codebook  pylint: disable=protected-access
  plain.build(database)
  box = np.array([[-50.0, -50.0, 350.0, 350.0]])
  regional.build(database, boxes=[box] + [None] * (len(database) - 1))
  s_plain = plain.search(queries[:1])[1][0, 0]
  s_region = regional.search(queries[:1])[1][0, 0]
  assert s_region > 2 * s_plain
  with pytest.raises(ValueError, match="at least as many"):
    asmk_index.AsmkIndex(asmk_index.asmk_params(codebook_size=10**6)).train_codebook(train)


def test_rerank_by_scores_reorders_only_the_head():
  rng = np.random.default_rng(5)
  ranks = np.stack([rng.permutation(12) for _ in range(3)], axis=1)
  scores = rng.uniform(size=(3, 12))
  out = rerank_lib.rerank_by_scores(ranks, scores, top_n=5)
  for j in range(3):
    head = sorted(ranks[:5, j], key=lambda i: -scores[j, i])
    np.testing.assert_array_equal(out[:5, j], head)
    np.testing.assert_array_equal(out[5:, j], ranks[5:, j])
  np.testing.assert_array_equal(rerank_lib.rerank_by_scores(ranks, scores, top_n=0), ranks)


def test_ranked_revisited_evaluator_equals_revisitop():
  """The registry's revisited evaluator, scoring a ranking, gives revisitop's numbers
  (tests/numpy_references.py, a numpy transcription of compute_map)."""
  rng = np.random.default_rng(6)
  q, db = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(40, 8)))
  gnd = [{"easy": rng.choice(40, 3, replace=False), "hard": rng.choice(40, 2, replace=False),
          "junk": rng.choice(40, 2, replace=False)} for _ in range(6)]
  for g in gnd:  # disjoint lists, as in the real files
    g["hard"] = np.setdiff1d(g["hard"], g["easy"])
    g["junk"] = np.setdiff1d(g["junk"], np.concatenate([g["easy"], g["hard"]]))
  evaluator, printed = evaluation.get_evaluator("roxford5k")
  got = evaluator.score(printed, evaluation.rank(q, db), {"gnd": gnd})
  independent = numpy_references.ranks_by_inner_product(q, db)
  for setup in ("easy", "medium", "hard"):
    assert got[f"mAP_{setup[0].upper()}"] == pytest.approx(
        numpy_references.revisited_map_percent(independent, gnd, setup), abs=1e-9), setup


def test_local_reranking_of_the_global_ranking_side_by_side(world):
  """The "local" re-ranker's core on one global ranking, both scored by one evaluator."""
  queries, db, owner = world
  rng = np.random.default_rng(7)
  # Global descriptors that know nothing: positives land anywhere in the global ranking.
  q_desc, db_desc = _unit(rng.normal(size=(3, 8))), _unit(rng.normal(size=(len(db), 8)))
  gt = {"query_labels": np.arange(3), "db_labels": owner}
  labels, printed = evaluation.get_evaluator("labels")
  ranking = evaluation.rank(q_desc, db_desc)
  before = labels.score(printed, ranking, gt)
  new, inliers = rerank_lib.rerank(ranking.ranks, queries.__getitem__, db.__getitem__,
                                   top_n=20, verify_kwargs=FAST)
  after = labels.score(printed, evaluation.Ranking(new), gt)
  assert before["mAP"] < 60.0 and after["mAP"] == pytest.approx(100.0)
  assert float(np.mean((inliers >= 15).sum(1))) == 2.0
  off, _ = rerank_lib.rerank(ranking.ranks, queries.__getitem__, db.__getitem__, top_n=0)
  assert labels.score(printed, evaluation.Ranking(off), gt)["mAP"] == before["mAP"]
