"""The test set of `config.eval`: loaded and checked once per process.

Every image of a benchmark must be there before any compute (`data/integrity.py`); the
check (headers, counts) reads every file's header, a million reads on +1M, so a process
does it once: `load` keeps the checked set, and training's periodic evaluations, the
whitening and the evaluation all use that one object.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from retrieval_jax import paths
from retrieval_jax.data import datasets
from retrieval_jax.data import integrity


@dataclasses.dataclass(frozen=True)
class TestSet:
  """A retrieval set after the completeness check.

  Attributes:
    dataset: the set (without the missing images where `allow_missing` dropped them).
    completeness: what the check found (`integrity.Completeness`).
    root: its data root (for the download command in errors).
    split: the split of `eval.dataset` it is.
  """
  dataset: datasets.RetrievalSet
  completeness: integrity.Completeness
  root: str = ""
  split: str = "test"

  @property
  def prefix(self) -> str:
    """Names its folders in a workdir (`<prefix>_query`, `<prefix>_db`): the set's name, and
    the split when it is not the test split, so that a threshold chosen on 'val' does not
    meet the test set's local features or boxes."""
    if self.split in ("", "test"):
      return self.dataset.name
    return f"{self.dataset.name}-{self.split}"


def check(dataset: datasets.RetrievalSet, *, root: str = "",
          allow_missing: bool = False, split: str = "test") -> TestSet:
  """`dataset` checked now (every image's header); raises `IncompleteDatasetError` for
  missing images unless `allow_missing`."""
  completeness = integrity.check_retrieval_set(dataset, root=root,
                                               allow_missing=allow_missing)
  return TestSet(completeness.dataset, completeness, root, split)


_LOADED: Dict[Tuple[Any, ...], TestSet] = {}


def load(config, workdir: str, split: Optional[str] = None, *,
         extra: bool = True) -> Optional[TestSet]:
  """The checked test set of `config.eval` (None when `eval.dataset` is empty), loaded and
  checked on the first call of this process only (with those of `eval.extra_splits`).

  Args:
    config, workdir: the experiment.
    split: another split of `eval.dataset` than `eval.split` (one of `eval.extra_splits`).
    extra: False where the extra splits are not scored (extract, detect): they are then
      neither checked nor loaded.

  Raises:
    ValueError: `eval.split` or an `eval.extra_splits` entry is not a split the dataset
      declares (`datasets.DatasetEntry.splits`).
  """
  if not config.eval.dataset:
    return None
  declared = datasets.splits(config.eval.dataset)
  wanted = [("eval.split", config.eval.split)] + [
      ("eval.extra_splits", s) for s in (extra_splits(config) if extra else ())]
  for field, name in wanted:
    if declared and name not in declared:
      advice = (" (--config.eval.extra_splits='()' scores eval.split alone)"
                if field == "eval.extra_splits" else "")
      raise ValueError(f"config.{field}: {config.eval.dataset!r} has no split {name!r}; "
                       f"its splits: {list(declared)}{advice}")
  root = paths.eval_root(config, workdir)
  if split is None and extra:  # The extra splits are checked up front, before any compute.
    for name in extra_splits(config):
      load(config, workdir, name)
  split = config.eval.split if split is None else split
  key = (config.eval.dataset, root, split, bool(config.eval.allow_missing))
  if key not in _LOADED:
    dataset = datasets.get_dataset(config.eval.dataset, root, split, config=config)
    _LOADED[key] = check(dataset, root=root, allow_missing=config.eval.allow_missing,
                         split=split)
  return _LOADED[key]


def extra_splits(config) -> Tuple[str, ...]:
  """`eval.extra_splits`: splits evaluated beside `eval.split` (the demo's real views); a
  comma-separated string from the command line is accepted."""
  value = config.eval.get("extra_splits", ()) or ()
  if isinstance(value, str):
    value = [v for v in value.split(",")]
  return tuple(str(v).strip() for v in value if str(v).strip())


def ground_truth(dataset: datasets.RetrievalSet) -> Any:
  """What the dataset's evaluator expects (see retrieval_jax/evaluation/__init__.py)."""
  if dataset.gnd is not None:
    return {"gnd": dataset.gnd}
  if dataset.query_labels is not None:
    return {"query_labels": dataset.query_labels, "db_labels": dataset.db_labels}
  return None


def evaluator_name(dataset: datasets.RetrievalSet) -> str:
  return "labels" if dataset.gnd is None and dataset.query_labels is not None else dataset.name


def is_revisited(dataset: datasets.RetrievalSet) -> bool:
  """Revisited ground truth (Easy / Hard / junk per query)."""
  return bool(dataset.gnd) and "easy" in dataset.gnd[0]


def picture_gnd(dataset: datasets.RetrievalSet, n: int) -> List[Dict[str, np.ndarray]]:
  """Per query 'ok' / 'junk' database indices for the border colours of the first n queries.

  Revisited sets use the Medium setup (ok = easy + hard, junk = junk); the others their
  'ok' / 'junk' lists, or same-label images.
  """
  out = []
  for i in range(n):
    if dataset.gnd is not None:
      g = dataset.gnd[i]
      if "easy" in g:
        ok = np.concatenate([np.asarray(g["easy"], np.int64), np.asarray(g["hard"], np.int64)])
      else:
        ok = np.asarray(g.get("ok", []), np.int64)
      out.append({"ok": ok, "junk": np.asarray(g.get("junk", []), np.int64)})
    else:
      out.append({"ok": np.flatnonzero(np.asarray(dataset.db_labels)
                                       == dataset.query_labels[i]),
                  "junk": np.zeros((0,), np.int64)})
  return out
