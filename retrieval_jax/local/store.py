"""Per-image local features on disk: streaming, resumable, chunked `.npz` files.

Layout of a store folder (next to the global descriptors, e.g. `<workdir>/local/<split>/`):

    meta.json              {"num_images", "chunk_size", "dim", "dtype", "image_list", "config"}
    chunk-00000.npz        images [0, chunk_size): "rows" [m], "offsets" [m + 1],
                           "locations" [T, 2] (y, x), "scales" [T], "scores" [T] float32,
                           "descriptors" [T, dim] (float32 or float16)
    chunk-00001.npz        ...

A chunk is written once, whole, under a temporary name and then renamed, so a killed run
leaves only complete chunks; re-running the same extraction skips the images of those
chunks (`LocalFeatureWriter.done`). Nothing larger than one chunk is ever held in memory,
and `LocalFeatureStore` reads chunks lazily (an LRU of a few). Files are plain `.npz` read
with `allow_pickle=False`. Paths go through `etils.epath`, so `gs://` works as for the
checkpoints.
"""
import collections
import io
import json
from typing import Any, Dict, Mapping, Optional, Sequence

from etils import epath
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.local import keypoints as kp_lib

META = "meta.json"
_CACHE_CHUNKS = 4


def _chunk_name(c: int) -> str:
  return f"chunk-{c:05d}.npz"


class LocalFeatureWriter:
  """Collects per-image records and writes each chunk when all its images are in.

  Args:
    folder: store folder (created).
    num_images: N.
    dim: descriptor size.
    chunk_size: images per file.
    dtype: "float32" or "float16" for the descriptors.
    image_list: optional N names recorded in meta.json.
    config: optional JSON-able extraction settings, recorded and checked on resume.
  Raises:
    ValueError: the folder holds a store with other settings (use a fresh folder).
  """

  def __init__(self, folder: str, num_images: int, dim: int, *, chunk_size: int = 256,
               dtype: str = "float32", image_list: Optional[Sequence[str]] = None,
               config: Optional[Mapping[str, Any]] = None):
    if dtype not in ("float32", "float16"):
      raise ValueError(f"local feature dtype must be float32 or float16, got {dtype!r}")
    self.folder = epath.Path(folder)
    # On several processes every one extracts (collectively), process 0 alone writes.
    self._main = sharding.is_main_process()
    self.meta = {"num_images": int(num_images), "chunk_size": int(chunk_size),
                 "dim": int(dim), "dtype": dtype,
                 "image_list": list(image_list) if image_list is not None else None,
                 "config": dict(config or {})}
    meta_path = self.folder / META
    # Process 0 checks and writes meta.json (a failure there stops every process).
    if self._main and meta_path.exists():
      old, new = json.loads(meta_path.read_text()), json.loads(json.dumps(self.meta))
      if old != new:
        diff = sorted(k for k in new if old.get(k) != new[k])
        raise ValueError(f"{self.folder} holds local features with other settings ({diff}); "
                         "use a fresh folder or delete it to re-extract")
    elif self._main:
      self.folder.mkdir(parents=True, exist_ok=True)
      meta_path.write_text(json.dumps(self.meta))
    self.num_chunks = -(-int(num_images) // int(chunk_size)) if num_images else 0
    written = ([c for c in range(self.num_chunks) if (self.folder / _chunk_name(c)).exists()]
               if self._main else [])
    # Process 0's view: every process skips the same chunks.
    self._written = set(sharding.agreed_indices(written, self.num_chunks))
    self._pending: Dict[int, Dict[int, Dict[str, np.ndarray]]] = collections.defaultdict(dict)

  def done(self, index: int) -> bool:
    """True when image `index` is in a chunk already on disk."""
    return index // self.meta["chunk_size"] in self._written

  def _chunk_rows(self, c: int) -> range:
    cs = self.meta["chunk_size"]
    return range(c * cs, min((c + 1) * cs, self.meta["num_images"]))

  def add(self, index: int, record: Mapping[str, np.ndarray]) -> None:
    """Adds image `index`'s record; writes its chunk once complete."""
    if not 0 <= index < self.meta["num_images"]:
      raise IndexError(f"image index {index} outside [0, {self.meta['num_images']})")
    c = index // self.meta["chunk_size"]
    if c in self._written:
      return
    if record["descriptors"].shape[1:] != (self.meta["dim"],) and len(record["descriptors"]):
      raise ValueError(f"descriptor size {record['descriptors'].shape[1:]} != store dim "
                       f"{self.meta['dim']}")
    self._pending[c][int(index)] = record
    if len(self._pending[c]) == len(self._chunk_rows(c)):
      self._write(c)

  def _write(self, c: int) -> None:
    pending = self._pending.pop(c, {})
    rows = np.asarray(sorted(pending), np.int64)
    dim = self.meta["dim"]
    # An empty record first, so a chunk without any image still concatenates.
    recs = [kp_lib.empty_record(dim)] + [pending[int(r)] for r in rows]
    counts = np.asarray([len(r["scores"]) for r in recs[1:]], np.int64)

    def cat(key, shape, dtype):
      return np.concatenate([np.asarray(r[key]).reshape(shape) for r in recs]).astype(dtype)

    arrays = {
        "rows": rows, "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "locations": cat("locations", (-1, 2), np.float32),
        "scales": cat("scales", (-1,), np.float32),
        "scores": cat("scores", (-1,), np.float32),
        "descriptors": cat("descriptors", (-1, dim), self.meta["dtype"])}
    self._written.add(c)
    if not self._main:
      return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = self.folder / (_chunk_name(c) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(self.folder / _chunk_name(c))

  def close(self) -> "LocalFeatureStore":
    """Writes the incomplete chunks (missing images: no keypoints) and opens the store."""
    for c in range(self.num_chunks):
      if c not in self._written:
        self._write(c)
    sharding.sync("local_store_written", timeout_s=sharding.WRITE_TIMEOUT_S)
    return LocalFeatureStore(str(self.folder))


class LocalFeatureStore:
  """Read access: `store[i]` -> {"locations", "scales", "scores", "descriptors" (float32)}."""

  def __init__(self, folder: str):
    self.folder = epath.Path(folder)
    meta_path = self.folder / META
    if not meta_path.exists():
      raise FileNotFoundError(f"no local features in {self.folder} ({META} missing): run "
                              "local-feature extraction first")
    self.meta = json.loads(meta_path.read_text())
    self._cache: "collections.OrderedDict[int, Dict[str, np.ndarray]]" = (
        collections.OrderedDict())

  def __len__(self) -> int:
    return self.meta["num_images"]

  @property
  def dim(self) -> int:
    return self.meta["dim"]

  def _chunk(self, c: int) -> Dict[str, np.ndarray]:
    if c in self._cache:
      self._cache.move_to_end(c)
      return self._cache[c]
    path = self.folder / _chunk_name(c)
    if not path.exists():
      raise FileNotFoundError(f"{path} missing: the extraction into {self.folder} did not "
                              "finish; re-run it to resume")
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
      chunk = {k: z[k] for k in z.files}
    self._cache[c] = chunk
    if len(self._cache) > _CACHE_CHUNKS:
      self._cache.popitem(last=False)
    return chunk

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"image index {index} outside [0, {len(self)})")
    chunk = self._chunk(index // self.meta["chunk_size"])
    pos = int(np.searchsorted(chunk["rows"], index))
    if pos >= len(chunk["rows"]) or chunk["rows"][pos] != index:
      return kp_lib.empty_record(self.dim)
    a, b = chunk["offsets"][pos], chunk["offsets"][pos + 1]
    return {"locations": chunk["locations"][a:b], "scales": chunk["scales"][a:b],
            "scores": chunk["scores"][a:b],
            "descriptors": chunk["descriptors"][a:b].astype(np.float32)}
