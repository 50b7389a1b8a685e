"""Describe one's own photos: a folder (recursively) or a list file -> descriptors on disk.

`describe_images(model, variables, images, out_dir, mesh=..., **extract_kwargs)` writes

  out_dir/descriptors.npy  [N, D] float32, rows L2-normalised, one per described image
  out_dir/images.txt       the N image paths, row order
  out_dir/skipped.txt      images that could not be read (missing, truncated, not images)
  out_dir/config.json      what was computed (the `descriptor_store.load_descriptors` format)

so the folder is an index for `index_search` and a store for `descriptor_store.load_descriptors`.
`out_dir` may be a local folder or a bucket (gs://...): every file goes through `storage`.

Streaming and resumable, on one process or several: the images are described `chunk` at a
time by `extract.extract_descriptors` (on several processes each one decodes its share of
every batch and all get the batch's descriptors back). Each finished chunk is a shard of
the store: `out_dir/work/chunk_<c>.npy` (its rows) and then `chunk_<c>.json` (its manifest:
first row, row count, the rows that could not be read), both written by process 0 only, each
whole or not at all. A run that is killed (any process) and started again with the same
list and settings finds the manifests and describes only the missing chunks; a different
list or setting starts over. When every chunk is there, process 0 merges the shards one at
a time into descriptors.npy (host memory: one chunk, whatever N) and deletes `work/`; the
other processes wait for it at a barrier with a timeout.

Why shards written by process 0 rather than one shard per process: every process holds the
whole batch's descriptors after the all-gather of the extraction anyway, so one writer costs
no extra compute, the store keeps the input order by construction, a bucket (which cannot
be written in place or appended to) takes whole objects, and a restart with another
process count reads the same shards.
"""
import hashlib
import io
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import fsspec
import jax
from jax.experimental import multihost_utils
import numpy as np

from retrieval_jax import descriptor_store
from retrieval_jax import errors
from retrieval_jax import extract as extract_lib
from retrieval_jax import progress as progress_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.data import image_io

IMAGE_EXTENSIONS = image_io.IMAGE_EXTENSIONS
SKIPPED_FILE = "skipped.txt"
_WORK = "work"
_STATE = "state.json"


class NoImagesError(errors.UserError, ValueError):
  """`describe.images` holds no image (a one-line error, exit code 2)."""


def _list_remote(source: str) -> List[str]:
  """A bucket folder (listed once, recursively) or a list file in a bucket."""
  p = epath.Path(source)
  if p.is_dir():
    # One recursive prefix listing (fsspec's find), not one request per sub-folder.
    fs, root = fsspec.core.url_to_fs(source.rstrip("/"))
    names = [n for n in fs.find(root) if n.rsplit("/", 1)[-1].lower().endswith(
        IMAGE_EXTENSIONS) and not n.rsplit("/", 1)[-1].startswith(".")]
    return sorted(fs.unstrip_protocol(n) for n in names)
  if not p.exists():
    raise FileNotFoundError(f"describe.images: {source!r} is neither a folder nor a list "
                            "file of image paths")
  base = os.fspath(p.parent)
  lines = [ln.strip() for ln in p.read_text().splitlines()]
  return [ln if "://" in ln or os.path.isabs(ln) else storage.join(base, ln)
          for ln in lines if ln and not ln.startswith("#")]


def list_images(source: str) -> List[str]:
  """Image paths of a folder (recursive, common extensions, sorted) or of a list file.

  A list file holds one path per line (blank lines and '#' comments ignored); relative
  paths are taken relative to the list file's folder. A `gs://` folder or list file is read
  through epath (the folder listed once); its images are then read as bytes, one by one.

  Raises:
    FileNotFoundError: `source` does not exist.
    NoImagesError: it holds no image.
  """
  if storage.is_remote(source):
    out = _list_remote(source)
  elif os.path.isdir(source):
    out = []
    for root, dirs, files in os.walk(source):
      dirs.sort()
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
          out.append(os.path.join(root, f))
  elif os.path.isfile(source):
    base = os.path.dirname(os.path.abspath(source))
    try:
      with open(source) as f:
        lines = [ln.strip() for ln in f]
    except UnicodeDecodeError as e:
      raise NoImagesError(f"{source!r} is neither an image (extensions "
                          f"{', '.join(IMAGE_EXTENSIONS)}) nor a list file of image "
                          "paths") from e
    out = [ln if os.path.isabs(ln) else os.path.join(base, ln)
           for ln in lines if ln and not ln.startswith("#")]
  else:
    raise FileNotFoundError(f"describe.images: {source!r} is neither a folder nor a list "
                            "file of image paths")
  if not out:
    raise NoImagesError(f"describe.images: no image found in {source!r} (extensions "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  return out



def _fingerprint(paths: Sequence[str], settings: Dict[str, Any]) -> str:
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for p in paths:
    h.update(p.encode() + b"\n")
  return h.hexdigest()


def _shard(work: str, c: int, ext: str) -> str:
  return storage.join(work, f"chunk_{c:06d}.{ext}")


def _written_chunks(work: str, fingerprint: str, num_chunks: int) -> List[int]:
  """Process 0: the chunks whose manifest a previous run with this fingerprint wrote."""
  state_path = storage.join(work, _STATE)
  if storage.exists(state_path):
    state = json.loads(storage.read_text(state_path))
    if state.get("fingerprint") == fingerprint:
      names = set(storage.listdir(work))
      return [c for c in range(num_chunks) if f"chunk_{c:06d}.json" in names]
    logging.warning("describe: %s holds an unfinished run with other images or settings; "
                    "starting over", work)
    epath.Path(work).rmtree()
  return []


def _save_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array, np.float32))
  storage.write_bytes(path, buf.getvalue())


def _load_npy(path: str) -> np.ndarray:
  with storage.open_file(path, "rb") as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def describe_images(model, variables, images, out_dir: str, *, mesh, long_side: int,
                    scales: Sequence[float] = (1.0,), multiscale_p: Optional[float] = None,
                    batch_size: int = 8, chunk: int = 1024, early_fusion: bool = False,
                    config_json: str = "{}", describe_fn=None, num_threads: int = 2,
                    protocol: Optional[Any] = None,
                    scale_gem: Optional[Tuple[bool, float]] = None,
                    extract_fn: Callable[..., np.ndarray] = extract_lib.extract_descriptors,
                    on_chunk: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
  """Describes every image of `images` into `out_dir` (see the module docstring).

  Every process of a multi-process run calls it with the same arguments.

  Args:
    model, variables: the network (a RetrievalNet) and its variables.
    images: a folder, a list file, or a sequence of paths.
    out_dir: output folder (local or gs://).
    mesh: device mesh (batches are sharded over its "data" axis).
    long_side, scales, multiscale_p, batch_size, early_fusion: as
      `extract.extract_descriptors`.
    chunk: images per resumable unit.
    config_json: recorded in config.json.
    describe_fn: a compiled `extract.make_describe_fn` to reuse.
    num_threads: decoding threads.
    protocol: the input rule (`data.protocol.EvalProtocol`; default the extraction's).
    scale_gem: SuperGlobal's scale-GeM (infinity, p), as `extract.extract_descriptors`.
    extract_fn: the extraction function (tests count its calls).
    on_chunk: called with the chunk number after each chunk is safely written.
  Returns:
    {"descriptors": [N, D] memmap, "images": N paths, "skipped": paths, "dim": D,
    "resumed": number of chunks an earlier run had written, "described": number of images
    described by this run}. On processes other than 0 (which write nothing), "descriptors"
    is None and "images" / "skipped" are lists of None of the right lengths.
  """
  paths = list_images(images) if isinstance(images, str) else list(images)
  if not paths:
    raise NoImagesError("describe: no images given")
  settings = {"long_side": int(long_side), "scales": [float(s) for s in scales],
              "multiscale_p": multiscale_p, "early_fusion": bool(early_fusion),
              "chunk": int(chunk), "protocol": repr(protocol)}
  extra = {} if protocol is None else {"protocol": protocol}
  if scale_gem is not None:  # Recorded only when set: older indexes keep resuming.
    settings["scale_gem"] = list(scale_gem)
    extra["scale_gem"] = tuple(scale_gem)
  main = sharding_lib.is_main_process()
  work = storage.join(out_dir, _WORK)
  fingerprint = _fingerprint(paths, settings)
  starts = list(range(0, len(paths), chunk))
  done = []
  if main:  # only process 0 touches the folder: no race on creating or cleaning it
    done = _written_chunks(work, fingerprint, len(starts))
    storage.write_bytes(storage.join(work, _STATE), json.dumps(
        {"fingerprint": fingerprint, "settings": settings, "num_images": len(paths)}).encode())
  sharding_lib.sync("describe_start", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  done = set(sharding_lib.agreed_indices(done, len(starts)))
  already = sum(len(paths[s:s + chunk]) for c, s in enumerate(starts) if c in done)
  if done:
    logging.info("describe: resuming, %d of %d chunks (%d images) already written", len(done),
                 len(starts), already)
  describe = describe_fn or extract_lib.make_describe_fn(model, mesh)
  progress = progress_lib.Progress(len(paths), start=already, every_s=0.0)
  for c, start in enumerate(starts):
    if c in done:
      continue
    part = paths[start:start + chunk]
    try:
      d = np.asarray(extract_fn(model, variables, part, mesh=mesh, long_side=long_side,
                                batch_size=batch_size, scales=scales,
                                multiscale_p=multiscale_p, early_fusion=early_fusion,
                                describe_fn=describe, num_threads=num_threads, **extra),
                     np.float32)
    except image_io.NothingReadableError:
      d = None  # not one image of this chunk could be read
    if main:
      # Unreadable images get zero rows from the extraction (real descriptors have norm 1).
      unreadable = (list(range(len(part))) if d is None
                    else np.flatnonzero(~np.any(d != 0, axis=1)).tolist())
      if d is not None:
        _save_npy(_shard(work, c, "npy"), d)
      storage.write_bytes(_shard(work, c, "json"), json.dumps(  # last: the chunk is complete
          {"start": start, "rows": len(part), "dim": None if d is None else d.shape[1],
           "unreadable": unreadable}).encode())
    progress.update(progress.done + len(part), images=len(part))
    logging.info("describe: chunk %d written; %d/%d images, %.1f images/s, ETA %.0fs", c,
                 progress.done, len(paths), progress.rate(), progress.eta_s())
    if on_chunk is not None:
      on_chunk(c)
  out = _finish(out_dir, paths, starts, config_json) if main else None
  sharding_lib.sync("describe_finish", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  counts = np.asarray([len(out["images"]), out["dim"]] if main else [0, 0], np.int64)
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.broadcast_one_to_all(counts))
  if out is None:
    out = {"descriptors": None, "images": [None] * int(counts[0]), "skipped": [None] * (
        len(paths) - int(counts[0])), "dim": int(counts[1])}
  out.update(resumed=len(done), described=len(paths) - already)
  return out


def _finish(out_dir: str, paths: Sequence[str], starts: Sequence[int],
            config_json: str) -> Dict[str, Any]:
  """Process 0: merges the shards, one at a time, into descriptors.npy; writes the lists."""
  work = storage.join(out_dir, _WORK)
  manifests = [json.loads(storage.read_text(_shard(work, c, "json")))
               for c in range(len(starts))]
  bad = {m["start"] + r for m in manifests for r in m["unreadable"]}
  skipped = [p for i, p in enumerate(paths) if i in bad]
  kept = [p for i, p in enumerate(paths) if i not in bad]
  if not kept:
    raise image_io.NothingReadableError(
        f"describe: none of the {len(paths)} images could be read (e.g. {paths[0]})")
  dim = next(m["dim"] for m in manifests if m["dim"])
  writer = descriptor_store.DescriptorWriter(out_dir, len(kept), kept, config_json, dim=dim)
  row = 0
  for c, m in enumerate(manifests):
    if len(m["unreadable"]) == m["rows"]:
      continue
    d = _load_npy(_shard(work, c, "npy"))
    good = np.setdiff1d(np.arange(m["rows"]), np.asarray(m["unreadable"], np.int64))
    writer.write(np.arange(row, row + len(good)), d[good])
    row += len(good)
  storage.write_text(storage.join(out_dir, SKIPPED_FILE), "".join(f"{p}\n" for p in skipped))
  descriptors = writer.close()
  epath.Path(work).rmtree()
  if skipped:
    logging.warning("describe: %d unreadable images skipped, listed in %s: %s", len(skipped),
                    storage.join(out_dir, SKIPPED_FILE), ", ".join(skipped[:5]))
  return {"descriptors": descriptors, "images": kept, "skipped": skipped,
          "dim": int(descriptors.shape[1])}
