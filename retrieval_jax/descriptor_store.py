"""Extracted descriptors on disk: `<folder>/{descriptors.npy, images.txt, config.json}`.

`DescriptorWriter` preallocates `descriptors.npy` `[N, D]` with `np.lib.format.open_memmap`
and extraction writes every batch straight into it (multi-scale sums accumulate there too),
so a collection of millions of images never needs its descriptors in host memory.
`load_descriptors` memory-maps a finished folder back; `apply_to_folder` streams a row-wise
function (e.g. whitening) from one folder into another. A folder in a bucket (gs://...,
which cannot be memory-mapped) is filled in a local temporary folder and uploaded by
`close()`; reading one downloads it first.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from retrieval_jax import storage

# Rows handled at once by the host-side passes over a (possibly memory-mapped) [N, D] array.
CHUNK = 1 << 15

DESCRIPTORS_FILE = "descriptors.npy"
IMAGES_FILE = "images.txt"
CONFIG_FILE = "config.json"


class DescriptorWriter:
  """Descriptors `[N, D]` float32 written batch by batch into `<folder>/descriptors.npy`.

  The file is a regular `.npy` preallocated with `np.lib.format.open_memmap` (zero-filled,
  so unwritten rows, e.g. unreadable images, read as zeros), created on the first `write`
  once D is known. `close()` flushes and writes `images.txt` (one path per row) and
  `config.json`; `load_descriptors` treats a folder without `config.json` as incomplete.
  """

  def __init__(self, folder: str, num_rows: int, image_list: Optional[Sequence[str]] = None,
               config_json: str = "{}", dim: Optional[int] = None):
    self.folder = folder
    self.num_rows = int(num_rows)
    self.image_list = None if image_list is None else list(image_list)
    if self.image_list is not None and len(self.image_list) != self.num_rows:
      raise ValueError(f"{len(self.image_list)} image names for {num_rows} rows")
    self.config_json = config_json
    self.array: Optional[np.memmap] = None
    # A previous, complete extraction is invalid from now on.
    for name in (CONFIG_FILE, IMAGES_FILE):
      if storage.exists(storage.join(folder, name)):
        storage.remove(storage.join(folder, name))
    self.remote = folder if storage.is_remote(folder) else None
    if self.remote:
      self.folder = tempfile.mkdtemp(prefix="retrieval_jax_descriptors_")
    os.makedirs(self.folder, exist_ok=True)
    if dim is not None:
      self.allocate(dim)

  @property
  def path(self) -> str:
    return os.path.join(self.folder, DESCRIPTORS_FILE)

  def allocate(self, dim: int) -> np.memmap:
    """The `[N, dim]` memmap (created on first call)."""
    if self.array is None:
      self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                             shape=(self.num_rows, int(dim)))
    elif self.array.shape[1] != dim:
      raise ValueError(f"descriptor dimension {dim} != {self.array.shape[1]} already written")
    return self.array

  def write(self, rows: np.ndarray, values: np.ndarray) -> None:
    """values [n, D] into rows [n] (any order)."""
    self.allocate(values.shape[1])[np.asarray(rows)] = values

  def close(self) -> np.memmap:
    """Flushes and writes the image list and config; returns the array (read-only)."""
    if self.array is None:
      raise RuntimeError(f"nothing was written to {self.folder}")
    self.array.flush()
    if self.image_list is not None:
      with open(os.path.join(self.folder, IMAGES_FILE), "w") as f:
        f.write("".join(f"{p}\n" for p in self.image_list))
    with open(os.path.join(self.folder, CONFIG_FILE), "w") as f:
      f.write(self.config_json)
    shape = self.array.shape
    del self.array
    self.array = None
    out = np.load(self.path, mmap_mode="r") if shape[0] else np.zeros(shape, np.float32)
    if self.remote:
      # config.json last: a reader never sees it before the descriptors are complete.
      storage.upload_folder(self.folder, self.remote, last=CONFIG_FILE)
      shutil.rmtree(self.folder, ignore_errors=True)  # the open memmap stays readable
    return out


def save_descriptors(path: str, descriptors: np.ndarray, image_list: Sequence[str],
                     config_json: str) -> None:
  """descriptors.npy (memory-mappable) + images.txt + config.json in folder `path`."""
  writer = DescriptorWriter(path, len(descriptors), image_list, config_json,
                            dim=descriptors.shape[1])
  for start in range(0, len(descriptors), CHUNK):
    rows = np.arange(start, min(start + CHUNK, len(descriptors)))
    writer.write(rows, np.asarray(descriptors[rows], np.float32))
  writer.close()


def load_descriptors(path: str, mmap: bool = True) -> Dict[str, Any]:
  """{"descriptors": [N, D] (memory-mapped by default), "images": [N] str, "config": dict}."""
  if storage.is_remote(path):
    if not storage.exists(storage.join(path, CONFIG_FILE)):
      raise FileNotFoundError(f"{path} holds no complete extraction (no {CONFIG_FILE}); "
                              "was it interrupted? Extract again.")
    local = tempfile.mkdtemp(prefix="retrieval_jax_descriptors_")
    storage.download_folder(path, local)
    out = load_descriptors(local, mmap)
    shutil.rmtree(local, ignore_errors=True)  # memory-mapped files stay readable
    return out
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} holds no complete extraction (no {CONFIG_FILE}); "
                            "was it interrupted? Extract again.")
  images = []
  if os.path.exists(os.path.join(path, IMAGES_FILE)):
    with open(os.path.join(path, IMAGES_FILE)) as f:
      images = f.read().splitlines()
  with open(cfg_path) as f:
    config = json.load(f)
  return {"descriptors": np.load(os.path.join(path, DESCRIPTORS_FILE),
                                 mmap_mode="r" if mmap else None),
          "images": images, "config": config}



def iter_chunks(array: np.ndarray, chunk: int = CHUNK) -> Iterator[Tuple[int, np.ndarray]]:
  """(start, rows) of a possibly memory-mapped [N, D] array, `chunk` rows at a time."""
  for start in range(0, array.shape[0], chunk):
    yield start, np.asarray(array[start:start + chunk])


def apply_to_folder(src: str, dst: str, fn, config_json: Optional[str] = None) -> np.ndarray:
  """Streams a row-wise function (e.g. whitening) over a stored extraction into `dst`.

  Args:
    src: folder written by `DescriptorWriter` / `save_descriptors`.
    dst: output folder (same images.txt).
    fn: [n, D] -> [n, D'] float array, applied chunk by chunk.
    config_json: recorded in dst (default: src's).
  Returns:
    The new [N, D'] array, memory-mapped.
  """
  stored = load_descriptors(src)
  x = stored["descriptors"]
  writer = DescriptorWriter(dst, x.shape[0], stored["images"] or None,
                            config_json or json.dumps(stored["config"]))
  for start, rows in iter_chunks(x):
    writer.write(np.arange(start, start + len(rows)), np.asarray(fn(rows), np.float32))
  return writer.close()
