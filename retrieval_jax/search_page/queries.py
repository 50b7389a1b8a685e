"""Uploaded query images: checked, described as the index was, searched, several at once.

`check_upload` looks at the bytes before anything is decoded: an empty body, a body over
`serve.max_bytes`, bytes PIL cannot identify, or a header announcing more pixels than the
decoder's bound (a decompression bomb: a 40000 x 40000 PNG is a few hundred bytes) are
refused with a `BadQuery` carrying the HTTP status and a one-line message.

`Searcher` holds the network and the index, loaded once. Its queries are described by the
same call `--mode=search` makes (`extract.extract_descriptors` with
`modes.search.query_settings`, i.e. the settings the index was described with), from files in a
temporary folder, so EXIF, crops and buckets follow the same input rule.

`QueryBatcher` runs the searcher on one worker thread (one user of the device): it takes
every query waiting when it becomes free, up to `max_batch`, and searches them together.
"""
import concurrent.futures
import io
import os
import queue
import tempfile
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from retrieval_jax import extract as extract_lib
from retrieval_jax import index_search
from retrieval_jax import knn as search_lib
from retrieval_jax.data import image_io
from retrieval_jax.search_page import collection as collection_lib

# Pixels a query header may announce: the decoder's own bound on what it decodes.
MAX_PIXELS = image_io.DEFAULT_MAX_PIXELS

Result = List[Dict[str, Any]]


class BadQuery(Exception):
  """A query the server refuses; `status` is the HTTP status (4xx), the message says why."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def check_upload(body: bytes, max_bytes: int, max_pixels: int = MAX_PIXELS) -> str:
  """Returns the image format of `body` (e.g. "JPEG"), reading its header only.

  Raises:
    BadQuery: 400 empty, 413 too many bytes or pixels, 415 not an image.
  """
  if not body:
    raise BadQuery(400, "empty body: POST the image file's bytes as the request body")
  if len(body) > max_bytes:
    raise BadQuery(413, f"the upload is {len(body)} bytes, over serve.max_bytes={max_bytes}")
  try:
    with Image.open(io.BytesIO(body)) as im:  # parses the header, decodes nothing
      width, height, fmt = im.width, im.height, im.format
  except Image.DecompressionBombError as e:
    raise BadQuery(413, f"the image header announces too many pixels: {e}") from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise BadQuery(415, "the upload is not an image PIL can read (send JPEG, PNG, WebP, "
                        f"...): {type(e).__name__}") from None
  if width * height > max_pixels:
    raise BadQuery(413, f"the image is {width} x {height} pixels, over the {max_pixels} "
                        "pixels a query may have")
  return fmt or "image"


class Searcher:
  """The network, its extraction settings and the index; `search` answers a batch.

  Args:
    model, variables, mesh: the restored network.
    settings: `modes.search.query_settings(config, net, stored).extract_kwargs()` (long_side, batch_size, scales,
      multiscale_p, protocol).
    stored: `descriptor_store.load_descriptors(index_dir)`.
    index_dir: the index folder (the faiss index is saved there).
    backend, factory, nprobe: as `config.search` ("exact" or "faiss").
    max_batch: most queries searched together (their descriptor rows are padded to it, so
      the exact search compiles once per k).
  """

  def __init__(self, model, variables, mesh, settings: Dict[str, Any],
               stored: Dict[str, Any], index_dir: str, *, backend: str = "exact",
               factory: str = "HNSW32", nprobe: int = 16, max_batch: int = 8):
    if backend not in index_search.BACKENDS:
      raise ValueError(f"search.backend must be one of {index_search.BACKENDS}, got "
                       f"{backend!r}")
    self.collection = collection_lib.Collection(stored["images"])
    database = np.asarray(stored["descriptors"], np.float32)
    if database.shape[0] != len(self.collection):
      raise ValueError(f"{index_dir}: {database.shape[0]} descriptors for "
                       f"{len(self.collection)} images in images.txt; describe it again")
    self.model, self.variables, self.mesh = model, variables, mesh
    self.settings = dict(settings)
    self.backend = backend
    self.max_batch = int(max_batch)
    self.dim = int(database.shape[1])
    self._describe_fn = extract_lib.make_describe_fn(model, mesh)
    if backend == "exact":
      self._database = jax.device_put(database)  # on the device once, not per query
    else:
      self._database = index_search.build_or_load_faiss(index_dir, database, factory, nprobe)

  def __len__(self) -> int:
    return len(self.collection)

  def warm_up(self, k: int) -> None:
    """One search with a grey picture, so that the first user does not wait for compiles."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="PNG")
    self.search([buf.getvalue()], [k])

  def describe(self, images: Sequence[bytes]) -> np.ndarray:
    """[n, D] float32 descriptors of image files' bytes; a zero row where one cannot be
    decoded."""
    with tempfile.TemporaryDirectory(prefix="retrieval_jax_queries_") as folder:
      paths = []
      for i, body in enumerate(images):
        paths.append(os.path.join(folder, f"query_{i}"))
        with open(paths[-1], "wb") as f:
          f.write(body)
      try:
        return np.asarray(extract_lib.extract_descriptors(
            self.model, self.variables, paths, mesh=self.mesh, describe_fn=self._describe_fn,
            skipped=image_io.SkipCounter(), **self.settings), np.float32)
      except RuntimeError:  # not one of them could be decoded
        return np.zeros((len(paths), self.dim), np.float32)

  def _top_k(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    if self.backend == "faiss":
      s, i = self._database.search(np.ascontiguousarray(q, np.float32), k)
      return s, i
    rows = max(self.max_batch, len(q))
    padded = np.zeros((rows, q.shape[1]), np.float32)
    padded[:len(q)] = q
    s, i = search_lib.knn(padded, self._database, k, query_batch=rows)
    return s[:len(q)], i[:len(q)]

  def search(self, images: Sequence[bytes], ks: Sequence[int]) -> List[Union[Result,
                                                                             BadQuery]]:
    """For each image, its top `ks[i]` as [{"rank", "image", "score", "index", "name",
    "url"}] (`name` relative to the collection root, `url` its /images/ address or None
    where the file is not served), or the BadQuery (422) of an image that could not be
    decoded."""
    q = self.describe(images)
    readable = np.flatnonzero(np.any(q != 0, axis=1))
    out: List[Union[Result, BadQuery]] = [
        BadQuery(422, "the image could not be decoded (truncated or corrupt?)")] * len(images)
    if not len(readable):
      return out
    k = min(max(int(ks[i]) for i in readable), len(self))
    scores, idx = self._top_k(q[readable], k)
    entries = index_search.results_json([str(i) for i in readable],
                                         self.collection.listed, scores, idx)
    for i, entry in zip(readable, entries):
      results = entry["results"][:int(ks[i])]
      for r in results:
        r["name"] = self.collection.names[r["index"]]
        r["url"] = self.collection.url(r["index"])
      out[i] = results
    return out


class QueryBatcher:
  """Runs `searcher.search` on one worker thread over every query waiting, up to its
  `max_batch` at a time; `submit` returns a future of one query's results."""

  def __init__(self, searcher: Searcher):
    self.searcher = searcher
    self._queue: "queue.Queue[Optional[Tuple[bytes, int, concurrent.futures.Future]]]" = (
        queue.Queue())
    self.batches: List[int] = []  # sizes of the batches run, for the logs and the tests
    self._thread = threading.Thread(target=self._work, name="search_page_queries",
                                    daemon=True)
    self._thread.start()

  @property
  def waiting(self) -> int:
    """Queries submitted and not yet taken by the worker."""
    return self._queue.qsize()

  def submit(self, image: bytes, k: int) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((image, int(k), future))
    return future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()

  def _work(self) -> None:
    while True:
      item = self._queue.get()
      if item is None:
        return
      batch = [item]
      while len(batch) < self.searcher.max_batch:
        try:
          nxt = self._queue.get_nowait()
        except queue.Empty:
          break
        if nxt is None:
          self._queue.put(None)  # close after this batch
          break
        batch.append(nxt)
      self.batches.append(len(batch))
      try:
        answers = self.searcher.search([b[0] for b in batch], [b[1] for b in batch])
      except Exception as e:  # pylint: disable=broad-except  (reported to every waiter)
        logging.exception("serve: a batch of %d queries failed", len(batch))
        answers = [e] * len(batch)
      for (_, _, future), answer in zip(batch, answers):
        if isinstance(answer, Exception):
          future.set_exception(answer)
        else:
          future.set_result(answer)
