"""Which images look like this one: top-k over a described folder, as JSON and a picture.

The index is a folder written by `describe.describe_images` (or any
`descriptor_store.load_descriptors` folder): descriptors.npy [N, D] + images.txt. Backends:

* "exact": `knn.knn` on the device mesh (database rows sharded over "data");
* "faiss": an approximate faiss index ("IVF<nlist>,PQ<m>" or "HNSW<M>", any
  `faiss.index_factory` string), built once and saved next to the descriptors as
  `faiss_<factory>.index` (+ `.json` recording N and D, so a changed index is rebuilt).

Results: [{"query": path, "results": [{"rank": 1, "image": path, "score": s}, ...]}], and
a picture per query: the query, then its top k, each tile labelled "#rank score".
"""
import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from retrieval_jax import describe as describe_lib
from retrieval_jax import errors
from retrieval_jax import descriptor_store
from retrieval_jax import extract as extract_lib
from retrieval_jax import knn as search_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.data import image_io
from retrieval_jax.evaluation import pictures
from retrieval_jax.evaluation import revisited

BACKENDS = ("exact", "faiss")
SKIPPED_FILE = "skipped.txt"  # in search.out: the query images that could not be read


class QueryError(errors.UserError, ValueError):
  """No query image could be read (a one-line error, exit code 2)."""
_QUERY_COLOUR = (0, 90, 255)
_RESULT_COLOUR = (60, 60, 60)


def _faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel  (optional and slow to import)
  except ImportError as e:
    raise ImportError("search.backend='faiss' needs faiss: pip install faiss-cpu") from e
  return faiss


def faiss_index_path(index_dir: str, factory: str) -> str:
  return storage.join(index_dir,
                      "faiss_" + re.sub(r"[^A-Za-z0-9_.-]", "_", factory) + ".index")


def _read_saved_index(path: str, meta: Dict[str, Any]):
  """The saved faiss index at `path` (local or in a bucket) if it matches `meta`, else None.

  faiss reads local files only: an index in a bucket is copied to a local temporary file.
  """
  if not (storage.exists(path) and storage.exists(path + ".json")):
    return None
  if json.loads(storage.read_text(path + ".json")) != meta:
    return None
  faiss = _faiss()
  if not storage.is_remote(path):
    return faiss.read_index(path)
  with tempfile.TemporaryDirectory(prefix="retrieval_jax_faiss_") as tmp:
    local = os.path.join(tmp, "index")
    with storage.open_file(path, "rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    return faiss.read_index(local)


def _write_index(index, path: str, meta: Dict[str, Any]) -> None:
  """faiss writes local files only: written locally, then copied (a bucket is fine)."""
  faiss = _faiss()
  if storage.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="retrieval_jax_faiss_") as tmp:
      local = os.path.join(tmp, "index")
      faiss.write_index(index, local)
      with open(local, "rb") as src, storage.open_file(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
  else:
    storage.makedirs(os.path.dirname(path))
    faiss.write_index(index, path + ".tmp")
    os.replace(path + ".tmp", path)
  storage.write_text(path + ".json", json.dumps(meta))  # last: marks the index complete


def _build_index(database: np.ndarray, factory: str, train_size: int, seed: int):
  faiss = _faiss()
  x = database
  index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
  if not index.is_trained:
    train = x
    if train_size and train_size < len(x):
      train = x[np.sort(np.random.default_rng(seed).choice(len(x), train_size, False))]
    index.train(np.ascontiguousarray(train, np.float32))
  for s in range(0, len(x), 1 << 16):  # a memory-mapped database is read chunk by chunk
    index.add(np.ascontiguousarray(x[s:s + (1 << 16)], np.float32))
  return index


def build_or_load_faiss(index_dir: str, database: np.ndarray, factory: str,
                        nprobe: int = 16, ef_search: int = 128, train_size: int = 0,
                        seed: int = 0):
  """A faiss inner-product index of `database`, built once and saved in `index_dir`.

  On several processes, process 0 builds and saves it while the others wait at a barrier,
  then read it (or build it themselves where `index_dir` is a folder they cannot see).

  Args:
    index_dir: the descriptor folder (local or gs://); the index goes to `faiss_index_path`.
    database: [N, D] float32 descriptors (may be memory-mapped).
    factory: `faiss.index_factory` string, e.g. "IVF1024,PQ32" or "HNSW32".
    nprobe: IVF lists visited per query; ef_search: HNSW search depth.
    train_size: rows used to train IVF/PQ (0: all, capped at 256 per centroid by faiss).
    seed: which rows train, when sampled.

  Returns:
    The faiss index, search parameters set.
  """
  path = faiss_index_path(index_dir, factory)
  meta = {"factory": factory, "n": int(database.shape[0]), "d": int(database.shape[1])}
  index = None
  if sharding_lib.is_main_process():
    index = _read_saved_index(path, meta)
    if index is not None:
      logging.info("search: reusing the faiss index %s", path)
    else:
      index = _build_index(database, factory, train_size, seed)
      _write_index(index, path, meta)
      logging.info("search: built and saved the faiss index %s (%d vectors)", path,
                   len(database))
  sharding_lib.sync("faiss_index", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  if index is None:
    index = _read_saved_index(path, meta)
  if index is None:  # a local folder that process 0 wrote on another machine
    index = _build_index(database, factory, train_size, seed)
  ivf = _faiss().try_extract_index_ivf(index)
  if ivf is not None:
    ivf.nprobe = nprobe
  if hasattr(index, "hnsw"):
    index.hnsw.efSearch = ef_search
  return index


def top_k(queries: np.ndarray, database: np.ndarray, k: int, *, backend: str = "exact",
          mesh=None, index_dir: Optional[str] = None, factory: str = "HNSW32",
          nprobe: int = 16, ef_search: int = 128) -> Tuple[np.ndarray, np.ndarray]:
  """(scores [Nq, k] float32, indices [Nq, k] int32), best first, by inner product.

  Args:
    queries: [Nq, D]; database: [N, D].
    k: neighbours (capped at N).
    backend: "exact" (`knn.knn` on `mesh`) or "faiss" (needs `index_dir`).
    mesh: device mesh for the exact backend.
    index_dir, factory, nprobe, ef_search: the faiss index (see `build_or_load_faiss`).
  """
  if backend not in BACKENDS:
    raise ValueError(f"search.backend must be one of {BACKENDS}, got {backend!r}")
  k = min(int(k), database.shape[0])
  if backend == "exact":
    return search_lib.knn(np.asarray(queries, np.float32), np.asarray(database, np.float32), k,
                          mesh=mesh)
  if index_dir is None:
    raise ValueError("the faiss backend saves its index next to the descriptors: give index_dir")
  index = build_or_load_faiss(index_dir, database, factory, nprobe, ef_search)
  s, i = index.search(np.ascontiguousarray(queries, np.float32), k)
  return s.astype(np.float32), i.astype(np.int32)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
  """Mean fraction of each query's exact top k found in its approximate top k.

  Args:
    approx, exact: [Nq, k] database indices (faiss' -1 never matches).
  """
  approx, exact = np.asarray(approx), np.asarray(exact)
  k = exact.shape[1]
  hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
  return float(np.mean(hits) / k) if len(hits) else 1.0


def exact_and_approximate(queries: np.ndarray, database: np.ndarray, k: int, *, mesh=None,
                          index_dir: str, factory: str = "IVF1024,PQ32", nprobe: int = 16,
                          ef_search: int = 128) -> Dict[str, Any]:
  """Both searches of the 1M-distractor protocol, and how far the approximate one gets.

  The rankings are top-k lists, [k, Nq] in the revisitop convention: the revisited mAP of
  a top-k list counts positives beyond k as not found (a lower bound of the full mAP).

  Returns:
    {"exact_ranks": [k, Nq], "approx_ranks": [k, Nq], "recall_at_k": float, "k": k}.
  """
  _, exact = top_k(queries, database, k, backend="exact", mesh=mesh)
  _, approx = top_k(queries, database, k, backend="faiss", index_dir=index_dir,
                    factory=factory, nprobe=nprobe, ef_search=ef_search)
  return {"exact_ranks": np.ascontiguousarray(exact.T.astype(np.int64)),
          "approx_ranks": np.ascontiguousarray(approx.T.astype(np.int64)),
          "recall_at_k": recall_at_k(approx, exact), "k": int(exact.shape[1])}


def revisited_exact_and_approximate(name: str, queries: np.ndarray, database: np.ndarray,
                                    gnd, *, k: int = 100, mesh=None, index_dir: str,
                                    factory: str = "IVF1024,PQ32", nprobe: int = 16,
                                    ef_search: int = 128) -> Dict[str, Any]:
  """Revisited mAP of the exact and of the approximate top-k lists, and recall@k.

  The 1M-distractor protocol at scale: both rankings are the top k only (positives beyond
  k count as not found), so the two mAPs compare like with like; `recall@k` is the share
  of the exact top k the approximate search finds.

  Args:
    name: the dataset name for the printed lines.
    queries, database: [Nq, D], [N, D].
    gnd: per-query dicts with 'easy', 'hard', 'junk' (revisited ground truth).
    k: list length (100 in the issue's protocol).
    mesh, index_dir, factory, nprobe, ef_search: see `exact_and_approximate`.
  Returns:
    {"mAP_{E,M,H}_exact@k", "mAP_{E,M,H}_approx@k", "recall@k", "lines"}.
  """
  both = exact_and_approximate(queries, database, k, mesh=mesh, index_dir=index_dir,
                               factory=factory, nprobe=nprobe, ef_search=ef_search)
  k = both["k"]
  out: Dict[str, Any] = {f"recall@{k}": both["recall_at_k"]}
  lines = []
  for kind in ("exact", "approx"):
    res = revisited.evaluate_revisited(name, both[f"{kind}_ranks"], gnd)
    out.update({f"mAP_{s}_{kind}@{k}": res[f"mAP_{s}"] for s in "EMH"})
    lines.append(f">> {name} top-{k} {kind if kind == 'exact' else factory}: mAP E: "
                 f"{res['mAP_E']}, M: {res['mAP_M']}, H: {res['mAP_H']}")
  lines.append(f">> {name}: recall@{k} of {factory} against exact search: "
               f"{100 * both['recall_at_k']:.2f}")
  out["lines"] = lines
  return out


def results_json(query_paths: Sequence[str], db_paths: Sequence[str], scores: np.ndarray,
                 indices: np.ndarray) -> List[Dict[str, Any]]:
  """The JSON-able result list (see the module docstring); faiss' -1 (no result) dropped."""
  out = []
  for q, (s_row, i_row) in enumerate(zip(scores, indices)):
    results = [{"rank": r + 1, "image": db_paths[int(i)], "index": int(i), "score": float(s)}
               for r, (s, i) in enumerate(zip(s_row, i_row)) if i >= 0]
    out.append({"query": query_paths[q], "results": results})
  return out


def _tile(image, caption: str, colour, thumb: int, border: int) -> Image.Image:
  """A thumbnail in a coloured frame with `caption` on a white strip below it."""
  strip = 16
  cell = Image.new("RGB", (thumb + 2 * border, thumb + 2 * border + strip), (255, 255, 255))
  cell.paste(pictures.framed_thumbnail(image, colour, thumb, border), (0, 0))
  ImageDraw.Draw(cell).text((border, thumb + 2 * border + 2), caption, fill=(0, 0, 0))
  return cell


def results_picture(query_image, results: Sequence[Dict[str, Any]], *, thumb: int = 128,
                    border: int = 4, gap: int = 4) -> Image.Image:
  """One row: the query (blue frame, "query"), then each result ("#rank score").

  Tile c (0 = the query) starts at x = gap + c * (thumb + 2 border + gap), y = gap.
  """
  tiles = [_tile(query_image, "query", _QUERY_COLOUR, thumb, border)]
  for r in results:
    tiles.append(_tile(r["image"], f"#{r['rank']} {r['score']:.3f}", _RESULT_COLOUR, thumb,
                       border))
  w, h = tiles[0].size
  canvas = Image.new("RGB", (gap + len(tiles) * (w + gap), h + 2 * gap), (255, 255, 255))
  for c, t in enumerate(tiles):
    canvas.paste(t, (gap + c * (w + gap), gap))
  return canvas


def search_folder(model, variables, index_dir: str, query: str, out_dir: str, *, mesh,
                  k: int = 10, backend: str = "exact", factory: str = "HNSW32",
                  nprobe: int = 16, ef_search: int = 128, pictures_max: int = 20,
                  thumb: int = 128, stored: Optional[Dict[str, Any]] = None,
                  **extract_kwargs: Any) -> Dict[str, Any]:
  """Top-k of a query image (or every image of a folder / list) in a described folder.

  The queries are described as the index was (`extract_kwargs`: the
  `extract.extract_descriptors` arguments of the index's settings, which the caller reads
  from its config.json), searched, and written to `out_dir/results.json` and
  `out_dir/<n>_<query name>.png` (the first `pictures_max`).

  `stored`: `descriptor_store.load_descriptors(index_dir)` when the caller already has it.

  Returns:
    {"results": the JSON list, "json": its path, "pictures": the PNG paths}.
  """
  if stored is None:
    stored = descriptor_store.load_descriptors(index_dir)
  database, db_paths = stored["descriptors"], stored["images"]
  if not db_paths or len(db_paths) != database.shape[0]:
    raise ValueError(f"{index_dir} has no images.txt matching its descriptors: describe the "
                     "folder with --mode=describe")
  if storage.is_remote(query) or (os.path.isfile(query) and
                                   query.lower().endswith(describe_lib.IMAGE_EXTENSIONS)):
    queries = [query]
  else:
    queries = describe_lib.list_images(query)
  skips = image_io.SkipCounter()
  try:
    q = np.asarray(extract_lib.extract_descriptors(model, variables, queries, mesh=mesh,
                                                   skipped=skips, **extract_kwargs), np.float32)
  except image_io.NothingReadableError:
    q = np.zeros((len(queries), database.shape[1]), np.float32)
  readable = np.flatnonzero(np.any(q != 0, axis=1))
  reasons = dict(skips.entries)
  unreadable = [(queries[i], reasons.get(queries[i], "unreadable"))
                for i in np.setdiff1d(np.arange(len(queries)), readable)]
  if not len(readable):
    raise QueryError(f"search.query: none of the {len(queries)} query images could be read "
                     f"({', '.join(f'{p} ({r})' for p, r in unreadable[:3])}): give an image "
                     "file, a folder of images or a list file of image paths")
  if unreadable:
    logging.warning("search: %d query images could not be read and were skipped (listed in "
                    "%s): %s", len(unreadable), storage.join(out_dir, SKIPPED_FILE),
                    ", ".join(f"{p} ({r})" for p, r in unreadable[:5]))
  queries = [queries[i] for i in readable]
  scores, idx = top_k(q[readable], database, k, backend=backend, mesh=mesh,
                      index_dir=index_dir, factory=factory, nprobe=nprobe,
                      ef_search=ef_search)
  results = results_json(queries, db_paths, scores, idx)
  json_path = storage.join(out_dir, "results.json")
  written = []
  if sharding_lib.is_main_process():  # every process has the results; one writes them
    storage.write_text(json_path, json.dumps(results, indent=1))
    text = image_io.skipped_list_text(unreadable)
    if text:
      storage.write_text(storage.join(out_dir, SKIPPED_FILE), text)
    for n, entry in enumerate(results[:pictures_max]):
      name = os.path.splitext(os.path.basename(entry["query"]))[0]
      path = storage.join(out_dir, f"{n:04d}_{name}.png")
      with storage.open_file(path, "wb") as f:
        results_picture(entry["query"], entry["results"], thumb=thumb).save(f, "PNG")
      written.append(path)
  sharding_lib.sync("search_results", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  return {"results": results, "json": json_path, "pictures": written}
