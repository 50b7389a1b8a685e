"""Dataset registry: each name maps to a loader returning a `TrainSet` or a `RetrievalSet`.

Loaders only read metadata (lists of image paths, labels, ground truth); pixels are decoded
later by the input pipelines through `image_io.load_rgb`.

Every loader reads the files exactly where the reference code puts them, under one data
root `root` (the `--dir` of `python -m retrieval_jax.data.download NAME --dir root`):

  root/train/retrieval-SfM-120k/{retrieval-SfM-120k.pkl, retrieval-SfM-120k-whiten.pkl, ims/}
  root/train/retrieval-SfM-30k/{retrieval-SfM-30k-whiten.pkl, ims -> ../retrieval-SfM-120k/ims}
  root/test/{roxford5k,rparis6k,oxford5k,paris6k}/{gnd_<name>.pkl, jpg/}
  root/test/revisitop1m/{revisitop1m.txt, jpg/}
  root/test/holidays/jpg/                 root/test/ukbench/full/ (or jpg/, or the folder)
  root/gldv2/{train.csv, train_clean.csv, index.csv, retrieval_solution_v2.1.csv,
              train/, index/, test/}

A missing file raises `DatasetNotFoundError` (a FileNotFoundError) naming the file and the
download command.

Ground-truth `.pkl` files are read with a restricted unpickler that accepts only plain
containers, numbers, strings and numpy arrays, so a tampered file cannot run code; still,
take them from the official sources only.
"""
import collections
import dataclasses
import io
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from retrieval_jax import errors
from retrieval_jax import registry
from retrieval_jax import storage

DOWNLOAD_MODULE = "retrieval_jax.data.download"


@dataclasses.dataclass
class TrainSet:
  """Images with landmark (class / 3D-model cluster) labels.

  Attributes:
    name: dataset name.
    images: N image paths.
    labels: [N] int landmark ids (for SfM-120k: the 3D-model cluster of each image, -1
      where the file has none; for GLDv2: contiguous class indices in [0, num_classes)).
    qidxs, pidxs: optional [P] query / positive image indices of the reference's
      training (or whitening) pairs.
    label_ids: optional [num_classes] original id of each contiguous label (GLDv2's
      landmark_id), where `labels` were remapped.
    skipped: (path, reason) of source files the loader left out (a user folder's
      unreadable photos), listed with the training run's other skipped files.
  """
  name: str
  images: Sequence[str]
  labels: np.ndarray
  qidxs: Optional[np.ndarray] = None
  pidxs: Optional[np.ndarray] = None
  label_ids: Optional[np.ndarray] = None
  skipped: Sequence[Tuple[str, str]] = ()

  @property
  def num_classes(self) -> int:
    if self.label_ids is not None:
      return int(len(self.label_ids))
    valid = self.labels[self.labels >= 0]
    return int(len(np.unique(valid)))


@dataclasses.dataclass
class RetrievalSet:
  """A query set and a database with ground truth.

  Attributes:
    name: dataset name; also picks the evaluator by default.
    query_images / db_images: image paths.
    query_bbx: optional per-query (x1, y1, x2, y2) crop boxes (Revisited Oxford/Paris),
      in the stored pixel frame of the full image (see `image_io.load_rgb`).
    gnd: optional per-query ground-truth dicts (revisitop format: 'easy', 'hard', 'junk'
      or 'ok', 'junk'), int index arrays into db_images. Images listed under 'junk' are
      removed from the ranking before AP (Holidays puts the query itself there).
    query_labels / db_labels: optional int labels (generic same-label protocol).
    rotations: optional {image path: clockwise degrees} to pass to
      `load_rgb(..., rotate=)` (Holidays orientation fixes).
  """
  name: str
  query_images: Sequence[str]
  db_images: Sequence[str]
  query_bbx: Optional[List[Any]] = None
  gnd: Optional[List[Dict[str, Any]]] = None
  query_labels: Optional[np.ndarray] = None
  db_labels: Optional[np.ndarray] = None
  rotations: Optional[Dict[str, int]] = None


class DatasetNotFoundError(errors.UserError, FileNotFoundError):
  """A dataset file or folder is missing; the message says how to download it."""


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """A registered dataset: its loader and the facts other modules need about it.

  Attributes:
    load: `fn(root: str, split: str, **kwargs)` -> `TrainSet` or `RetrievalSet`.
    default_split: split used when `get_dataset` is called without one.
    exif_transpose: whether the set's reference code applies the EXIF orientation
      (`extract.exif_transpose="auto"`, data/protocol.py): False for the benchmarks read by
      cirtorch, revisitop and DELF's scripts (their boxes are in the stored frame).
    download: the name `python -m retrieval_jax.data.download` fetches it under ("": none).
    config_options: fn(experiment config) -> loader keyword arguments, for a loader that
      takes settings from the config (the folder dataset's held-out fraction, list file).
    splits: the splits its loader accepts, where it says (the demo's); () = not declared.
      `eval.split` and `eval.extra_splits` are checked against it before any compute.
  """
  load: Callable[..., Any]
  default_split: str = "train"
  exif_transpose: bool = True
  download: str = ""
  config_options: Optional[Callable[[Any], Dict[str, Any]]] = None
  splits: Tuple[str, ...] = ()


DATASETS: registry.Registry[DatasetEntry] = registry.Registry("dataset")


def register(name: str, default_split: str = "train", *, exif_transpose: bool = True,
             download: str = "",
             config_options: Optional[Callable[[Any], Dict[str, Any]]] = None,
             splits: Sequence[str] = ()):
  """Decorator adding a loader `fn(root: str, split: str, **kwargs)` to `DATASETS`.

  Args:
    name: registry name (registering it again replaces the entry).
    default_split, exif_transpose, download, config_options, splits: see `DatasetEntry`.
  """
  def wrap(fn):
    DATASETS.register(name, DatasetEntry(fn, default_split, exif_transpose, download,
                                         config_options, tuple(splits)),
                      replace=True)
    return fn
  return wrap


def get_dataset(name: str, root: str, split: Optional[str] = None, config: Any = None,
                **kwargs):
  """Loads dataset `name` from folder `root`.

  Args:
    name: a registered name, see `names()`.
    root: data root (the `--dir` given to the download command).
    split: 'train', 'val', 'whiten', 'test', ...; None: the dataset's default ('train'
      for training sets, 'test' for retrieval benchmarks).
    config: the experiment config, for loaders registered with `config_options`.
    **kwargs: loader options (documented on each loader); they win over the config's.

  Returns:
    A `TrainSet` or a `RetrievalSet`.
  """
  _import_builtin_loaders()
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS.names()}")
  entry = DATASETS.get(name)
  if config is not None and entry.config_options is not None:
    kwargs = {**entry.config_options(config), **kwargs}
  return entry.load(os.fspath(root), entry.default_split if split is None else split,
                    **kwargs)


def names() -> List[str]:
  _import_builtin_loaders()
  return DATASETS.names()


def exif_transpose(name: str) -> bool:
  """The EXIF rule of dataset `name` (`DatasetEntry.exif_transpose`); True for any other
  name (a user's folder, "")."""
  _import_builtin_loaders()
  return DATASETS.get(name).exif_transpose if name in DATASETS else True


def splits(name: str) -> Tuple[str, ...]:
  """The splits dataset `name` declares (`DatasetEntry.splits`); () when it declares none
  or is not registered."""
  _import_builtin_loaders()
  return DATASETS.get(name).splits if name in DATASETS else ()


def download_names() -> List[str]:
  """The names the download command knows, from the registered datasets."""
  _import_builtin_loaders()
  return sorted({entry.download for _, entry in DATASETS.items() if entry.download})


_BUILTIN_LOADERS = ("demo", "sfm120k", "revisited", "holidays", "ukbench", "gldv2", "folder")


def _import_builtin_loaders() -> None:
  """Imports the modules that register the built-in datasets (on first use, not at import)."""
  import importlib  # pylint: disable=import-outside-toplevel
  for module in _BUILTIN_LOADERS:
    importlib.import_module(f"retrieval_jax.data.{module}")


# ----------------------------------------------------------------------------------------
# Helpers shared by the loaders.


def download_command(download_name: str, root: str) -> str:
  return f"python -m {DOWNLOAD_MODULE} {download_name} --dir {root}"


def require(path: str, dataset: str, root: str, download_name: Optional[str] = None,
            what: str = "file") -> str:
  """Returns `path` if it exists, else raises DatasetNotFoundError with the fix."""
  if (storage.exists(path) if storage.is_remote(path) else os.path.exists(path)):
    return path
  raise DatasetNotFoundError(
      f"{dataset}: missing {what} {path}\n"
      f"  Download it with: {download_command(download_name or dataset, root)}")


def check_split(dataset: str, split: str, allowed: Sequence[str]) -> None:
  if split not in allowed:
    raise ValueError(f"{dataset}: unknown split {split!r}; expected one of {list(allowed)}")


def _latin1_encode(text: str = "", encoding: str = "latin1") -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only."""
  if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1",
                                                                          "iso88591"):
    raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r}) in a "
                                 "ground-truth file")
  return text.encode("latin1")


def _plain_bytes(*args) -> bytes:
  """`bytes()` as protocol-2 pickles use it (empty bytes); never `bytes(huge_int)`."""
  if not args:
    return b""
  if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
    return bytes(args[0])
  raise pickle.UnpicklingError("refusing bytes(...) with arguments in a ground-truth file")


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
  """numpy's pickle reconstructors under both module names (numpy 1: numpy.core, 2: _core)."""
  # pylint: disable=protected-access,no-member
  core = getattr(np, "_core", None) or np.core
  out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  for mod in ("numpy.core", "numpy._core"):
    out[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
    out[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
    out[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
  # pylint: enable=protected-access,no-member
  # Scalar type classes (a pickled dtype class, e.g. `np.float64`).
  for name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
               "uint64", "float16", "float32", "float64", "complex64", "complex128",
               "str_", "bytes_"):
    out[("numpy", name)] = getattr(np, name)
  return out


# Exactly these (module, name) pairs may be looked up, each mapped to its object here: no
# import, no attribute walk, no dotted name. Plain containers and numbers, numpy arrays,
# dtypes and scalars (the official pkl files of cirtorch / revisitop), and the two helpers
# that protocol-2 pickles use for bytes.
_SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__")
       for t in (set, frozenset, list, dict, tuple, int, float, complex, str, bool, slice)},
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "unicode"): str, ("__builtin__", "long"): int,
    ("builtins", "bytes"): _plain_bytes, ("__builtin__", "bytes"): _plain_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_globals(),
}


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the (module, name) pairs of `_SAFE_GLOBALS`."""

  def find_class(self, module, name):
    try:
      return _SAFE_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise pickle.UnpicklingError(
          f"refusing to unpickle {module}.{name}: ground-truth files hold only plain "
          "containers, numbers, strings and numpy arrays; take them from the official "
          "download") from None


def safe_load_pickle(path: str) -> Any:
  """Reads a ground-truth / db pickle without executing code from it.

  Raises:
    pickle.UnpicklingError: the file asks for anything outside `_SAFE_GLOBALS`.
  """
  with storage.open_file(path, "rb") as f:  # a local file or an object in a bucket
    return safe_load_pickle_bytes(f.read())


def safe_load_pickle_bytes(data: bytes) -> Any:
  """`safe_load_pickle` of pickle bytes."""
  try:
    return _SafeUnpickler(io.BytesIO(data)).load()
  except UnicodeDecodeError:
    # Python 2 pickles with numpy arrays need latin1 to rebuild the raw buffers.
    return _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


def as_index_array(values: Any) -> np.ndarray:
  """Ground-truth index list (list, array, scalar or None) -> 1-D int64 array."""
  if values is None:
    return np.zeros((0,), np.int64)
  return np.asarray(values, dtype=np.int64).reshape(-1)

