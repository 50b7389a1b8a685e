"""+1M-style sets: DBA, QE, exact search and evaluation in chunks, host memory bounded.

The chunked code equals an unchunked numpy re-derivation of the formulas on a small case
(chunks forced small), and a subprocess under `resource.setrlimit(RLIMIT_AS)` runs the
pipeline on 200,000 memory-mapped rows. A full DBA of 200,000 rows is 4e10 scores (minutes
on two cores), so the capped run augments its first 1,024 rows in two k-NN passes (the
code path of the whole DBA, `KNN_ROWS` lowered to 512), each against all 200,000 rows.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np

from retrieval_jax import knn as search
from retrieval_jax.evaluation import query_expansion as rerank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit_rows(rng, n, d):
  x = np.abs(rng.normal(size=(n, d))) + 0.05 * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_reweighted(queries, database, k, alpha, add_queries):
  """The alpha-QE / alpha-DBA formula (rerank's docstring), unchunked, in float64."""
  sim = queries.astype(np.float64) @ database.T.astype(np.float64)
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  w = np.maximum(np.take_along_axis(sim, top, 1), 0) ** alpha
  out = np.einsum("nk,nkd->nd", w, database.astype(np.float64)[top])
  if add_queries:
    out += queries
  return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-6)


def test_chunked_dba_qe_and_ranks_equal_the_unchunked_formula(monkeypatch):
  rng = np.random.default_rng(0)
  db, q = _unit_rows(rng, 203, 12), _unit_rows(rng, 9, 12)
  monkeypatch.setattr(rerank, "ROWS_PER_CHUNK", 7)
  monkeypatch.setattr(rerank, "KNN_ROWS", 30)
  opts = dict(db_block=64, query_batch=16)
  dba = rerank.alpha_database_augmentation(db, 4, 3.0, **opts)
  np.testing.assert_allclose(dba, _numpy_reweighted(db, db, 4, 3.0, False), atol=1e-5)
  qe = rerank.alpha_query_expansion(q, dba, 5, 3.0, **opts)
  np.testing.assert_allclose(qe, _numpy_reweighted(q, dba, 5, 3.0, True), atol=1e-5)
  ranks = search.rank_all(qe, dba, db_block=64, max_scores=100)
  ref = np.argsort(-(dba.astype(np.float64) @ qe.T.astype(np.float64)), axis=0, kind="stable")
  np.testing.assert_array_equal(ranks, ref)


_CAPPED = textwrap.dedent("""
    import resource, sys, time
    cap = int(sys.argv[2]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import numpy as np
    from retrieval_jax import knn as search
    from retrieval_jax.evaluation import query_expansion as rerank, revisited
    db = np.load(sys.argv[1], mmap_mode="r")
    n = db.shape[0]
    t = time.time()
    rerank.KNN_ROWS = 512  # two passes over the database, as in a whole DBA
    dba_head = rerank._reweighted(db[:1024], db, 10, 3.0, False, {})
    print("dba", time.time() - t)
    q = np.ascontiguousarray(db[::n // 70][:70])
    qe = rerank.alpha_query_expansion(q, db, 10, 3.0)
    s, i = search.knn(qe, db, 100)
    ranks = search.rank_all(qe, db)
    gnd = [{"easy": np.arange(j * 10, j * 10 + 5), "hard": np.arange(j * 10 + 5, j * 10 + 8),
            "junk": np.arange(j * 10 + 8, j * 10 + 10)} for j in range(70)]
    res = revisited.evaluate_revisited("synthetic", ranks, gnd)
    print("all", time.time() - t)
    assert np.isfinite(dba_head).all() and np.isfinite(res["mAP_M"])
    assert (ranks[0] == i[:, 0]).all()
    print("ok", res["mAP_M"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
""")


def test_dba_qe_search_and_evaluation_of_200k_rows_under_a_memory_cap(tmp_path):
  """200,000 x 64 rows (51 MB, memory-mapped) under a 2.5 GiB address-space cap.

  A jax process on CPU peaks at ~1.6 GiB of address space on its own; the former DBA alone
  needed [N, k, D] float64 = 1 GB more here (and `rank_all` a [Nq, N] sort on the device).
  """
  rng = np.random.default_rng(1)
  path = str(tmp_path / "db.npy")
  db = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(200_000, 64))
  for s in range(0, db.shape[0], 50_000):
    db[s:s + 50_000] = _unit_rows(rng, 50_000, 64)
  db.flush()
  del db
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "host_platform_device_count" not in f)
  out = subprocess.run([sys.executable, "-c", _CAPPED, path, str(2560)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
  print(out.stdout)
