r"""Peak host memory and time of +1M evaluation steps on a memory-mapped [N, D] database.

  python benchmarks/large_scale.py --rows 1000000 --dim 2048 --dba_rows 1024

Writes a random L2-normalised float32 [N, D] array to a temporary .npy (N x D x 4 bytes of
disk), then, memory-mapped, times: exact k-NN of 70 queries (k = 100), alpha-QE of the 70
queries (k = 10), `search.rank_all` + the revisited mAP of the 70 queries, and alpha-DBA of
the first `--dba_rows` rows (k = 10, the code path of the whole DBA in two k-NN passes; a
whole DBA costs N / dba_rows times that). Each step runs in its own process, so
`ru_maxrss` is that step's peak resident memory (the mapped descriptors it touched
included). Prints one JSON line per step.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS = ("knn", "qe", "rank_and_map", "dba_head")


def _write(path: str, rows: int, dim: int, seed: int = 0) -> None:
  db = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
  rng = np.random.default_rng(seed)
  for s in range(0, rows, 16384):
    x = rng.standard_normal((min(16384, rows - s), dim), dtype=np.float32)
    db[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  db.flush()


def _step(name: str, path: str, dba_rows: int) -> dict:
  from retrieval_jax import knn as search  # pylint: disable=import-outside-toplevel
  from retrieval_jax.evaluation import query_expansion as rerank, revisited  # pylint: disable=import-outside-toplevel
  db = np.load(path, mmap_mode="r")
  n = db.shape[0]
  q = np.ascontiguousarray(db[::n // 70][:70])
  t = time.time()
  if name == "knn":
    search.knn(q, db, 100)
  elif name == "qe":
    rerank.alpha_query_expansion(q, db, 10, 3.0)
  elif name == "rank_and_map":
    ranks = search.rank_all(q, db)
    gnd = [{"easy": np.arange(j, j + 5), "hard": np.arange(j + 5, j + 8),
            "junk": np.arange(j + 8, j + 10)} for j in range(70)]
    revisited.evaluate_revisited("synthetic", ranks, gnd)
  elif name == "dba_head":
    rerank.KNN_ROWS = max(1, dba_rows // 2)
    rerank._reweighted(db[:dba_rows], db, 10, 3.0, False, {})  # pylint: disable=protected-access
  return {"step": name, "rows": n, "dim": db.shape[1], "seconds": round(time.time() - t, 1),
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--dba_rows", type=int, default=1024)
  parser.add_argument("--steps", default=",".join(STEPS))
  parser.add_argument("--_step", default="")
  parser.add_argument("--_path", default="")
  args = parser.parse_args()
  if args._step:
    print(json.dumps(_step(args._step, args._path, args.dba_rows)), flush=True)
    return
  with tempfile.TemporaryDirectory(prefix="large_scale_") as tmp:
    path = os.path.join(tmp, "db.npy")
    t = time.time()
    _write(path, args.rows, args.dim)
    print(json.dumps({"step": "write", "seconds": round(time.time() - t, 1),
                      "gib": round(args.rows * args.dim * 4 / 2**30, 2)}), flush=True)
    for step in args.steps.split(","):
      subprocess.run([sys.executable, __file__, f"--_step={step}", f"--_path={path}",
                      f"--dba_rows={args.dba_rows}"], check=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))


if __name__ == "__main__":
  main()
