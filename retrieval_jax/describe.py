"""Describe one's own photos: a folder (recursively) or a list file -> descriptors on disk.

`describe_images(model, variables, images, out_dir, mesh=..., **extract_kwargs)` writes

  out_dir/descriptors.npy  [N, D] float32, rows L2-normalised, one per described image
  out_dir/images.txt       the N image paths, row order
  out_dir/skipped.txt      images that could not be read (missing, truncated, not images)
  out_dir/config.json      what was computed (the `descriptor_store.load_descriptors` format)

so the folder is an index for `folder_search` and a store for `descriptor_store.load_descriptors`.

Streaming and resumable: the images are described `chunk` at a time by
`extract.extract_descriptors` into `out_dir/work/partial.npy` (memory-mapped, one row per
listed image); after each chunk the array is flushed and the chunk's number appended to
`out_dir/work/done.txt`. A run that is killed and started again with the same list and
settings skips the chunks already written (a different list or setting starts over).
When every chunk is done, the rows of readable images are copied into descriptors.npy
and `work/` is deleted. Progress (images/s, ETA) is logged after every chunk.
"""
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from retrieval_jax import descriptor_store
from retrieval_jax import extract as extract_lib
from retrieval_jax import progress as progress_lib
from retrieval_jax.data import image_io

IMAGE_EXTENSIONS = image_io.IMAGE_EXTENSIONS
SKIPPED_FILE = "skipped.txt"
_WORK = "work"
_PARTIAL = "partial.npy"
_DONE = "done.txt"
_STATE = "state.json"


def list_images(source: str) -> List[str]:
  """Image paths of a folder (recursive, common extensions, sorted) or of a list file.

  A list file holds one path per line (blank lines and '#' comments ignored); relative
  paths are taken relative to the list file's folder.

  Raises:
    FileNotFoundError: `source` does not exist.
    ValueError: it holds no image.
  """
  if os.path.isdir(source):
    out = []
    for root, dirs, files in os.walk(source):
      dirs.sort()
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
          out.append(os.path.join(root, f))
  elif os.path.isfile(source):
    base = os.path.dirname(os.path.abspath(source))
    with open(source) as f:
      lines = [ln.strip() for ln in f]
    out = [ln if os.path.isabs(ln) else os.path.join(base, ln)
           for ln in lines if ln and not ln.startswith("#")]
  else:
    raise FileNotFoundError(f"describe.images: {source!r} is neither a folder nor a list "
                            "file of image paths")
  if not out:
    raise ValueError(f"describe.images: no image found in {source!r} (extensions "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  return out


def _fingerprint(paths: Sequence[str], settings: Dict[str, Any]) -> str:
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for p in paths:
    h.update(p.encode() + b"\n")
  return h.hexdigest()


def describe_images(model, variables, images, out_dir: str, *, mesh, long_side: int,
                    scales: Sequence[float] = (1.0,), multiscale_p: Optional[float] = None,
                    batch_size: int = 8, chunk: int = 1024, early_fusion: bool = False,
                    config_json: str = "{}", describe_fn=None, num_threads: int = 2,
                    protocol: Optional[Any] = None,
                    extract_fn: Callable[..., np.ndarray] = extract_lib.extract_descriptors,
                    on_chunk: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
  """Describes every image of `images` into `out_dir` (see the module docstring).

  Args:
    model, variables: the network (a RetrievalNet) and its variables.
    images: a folder, a list file, or a sequence of paths.
    out_dir: output folder.
    mesh: device mesh (batches are sharded over its "data" axis).
    long_side, scales, multiscale_p, batch_size, early_fusion: as
      `extract.extract_descriptors`.
    chunk: images per resumable unit.
    config_json: recorded in config.json.
    describe_fn: a compiled `extract.make_describe_fn` to reuse.
    num_threads: decoding threads.
    protocol: the input rule (`data.protocol.EvalProtocol`; default the extraction's).
    extract_fn: the extraction function (tests count its calls).
    on_chunk: called with the chunk number after each chunk is safely written.
  Returns:
    {"descriptors": [N, D] memmap, "images": N paths, "skipped": paths, "resumed": number
    of chunks skipped because an earlier run wrote them}.
  """
  paths = list_images(images) if isinstance(images, str) else list(images)
  if not paths:
    raise ValueError("describe: no images given")
  settings = {"long_side": int(long_side), "scales": [float(s) for s in scales],
              "multiscale_p": multiscale_p, "early_fusion": bool(early_fusion),
              "chunk": int(chunk), "protocol": repr(protocol)}
  extra = {} if protocol is None else {"protocol": protocol}
  work = os.path.join(out_dir, _WORK)
  state_path = os.path.join(work, _STATE)
  fingerprint = _fingerprint(paths, settings)
  done = set()
  if os.path.exists(state_path):
    with open(state_path) as f:
      state = json.load(f)
    if state.get("fingerprint") == fingerprint and os.path.exists(
        os.path.join(work, _PARTIAL)):
      if os.path.exists(os.path.join(work, _DONE)):
        with open(os.path.join(work, _DONE)) as f:
          done = {int(x) for x in f.read().split()}
    else:
      logging.warning("describe: %s holds an unfinished run with other images or settings; "
                      "starting over", out_dir)
      shutil.rmtree(work)
  os.makedirs(work, exist_ok=True)
  with open(state_path, "w") as f:
    json.dump({"fingerprint": fingerprint, "settings": settings, "num_images": len(paths)}, f)
  if done:
    logging.info("describe: resuming, %d of %d chunks already written", len(done),
                 -(-len(paths) // chunk))
  partial = None
  if os.path.exists(os.path.join(work, _PARTIAL)) and done:
    partial = np.load(os.path.join(work, _PARTIAL), mmap_mode="r+")
  describe = describe_fn or extract_lib.make_describe_fn(model, mesh)
  chunks = range(0, len(paths), chunk)
  already = sum(len(paths[s:s + chunk]) for c, s in enumerate(chunks) if c in done)
  progress = progress_lib.Progress(len(paths), start=already, every_s=0.0)
  for c, start in enumerate(chunks):
    if c in done:
      continue
    part = paths[start:start + chunk]
    d = np.asarray(extract_fn(model, variables, part, mesh=mesh, long_side=long_side,
                              batch_size=batch_size, scales=scales,
                              multiscale_p=multiscale_p, early_fusion=early_fusion,
                              describe_fn=describe, num_threads=num_threads, **extra),
                   np.float32)
    if partial is None:
      partial = np.lib.format.open_memmap(os.path.join(work, _PARTIAL), mode="w+",
                                          dtype=np.float32, shape=(len(paths), d.shape[1]))
    partial[start:start + len(part)] = d
    partial.flush()
    with open(os.path.join(work, _DONE), "a") as f:
      f.write(f"{c}\n")
      f.flush()
      os.fsync(f.fileno())
    progress.update(progress.done + len(part), images=len(part))
    logging.info("describe: %d/%d images, %.1f images/s, ETA %.0fs", progress.done,
                 len(paths), progress.rate(), progress.eta_s())
    if on_chunk is not None:
      on_chunk(c)
  return _finish(out_dir, paths, partial, len(done), config_json)


def _finish(out_dir: str, paths: Sequence[str], partial: np.ndarray, resumed: int,
            config_json: str) -> Dict[str, Any]:
  """Copies the rows of readable images into descriptors.npy; writes the lists."""
  # Unreadable images get zero rows from the extraction (real descriptors have norm 1).
  good = np.flatnonzero(np.any(np.asarray(partial) != 0, axis=1))
  skipped = [paths[i] for i in np.setdiff1d(np.arange(len(paths)), good)]
  if not len(good):
    raise RuntimeError(f"describe: none of the {len(paths)} images could be read "
                       f"(e.g. {paths[0]})")
  kept = [paths[i] for i in good]
  writer = descriptor_store.DescriptorWriter(out_dir, len(good), kept, config_json,
                                        dim=partial.shape[1])
  for s in range(0, len(good), descriptor_store.CHUNK):
    rows = good[s:s + descriptor_store.CHUNK]
    writer.write(np.arange(s, s + len(rows)), np.asarray(partial[rows]))
  with open(os.path.join(out_dir, SKIPPED_FILE), "w") as f:
    f.write("".join(f"{p}\n" for p in skipped))
  out = writer.close()
  del partial
  shutil.rmtree(os.path.join(out_dir, _WORK))
  if skipped:
    logging.warning("describe: %d unreadable images skipped, listed in %s", len(skipped),
                    os.path.join(out_dir, SKIPPED_FILE))
  return {"descriptors": out, "images": kept, "skipped": skipped, "resumed": resumed}
