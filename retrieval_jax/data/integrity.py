"""Is the dataset on disk complete? Check before any compute; drop what is missing only on request.

A benchmark evaluated on a partial copy gives a plausible, wrong mAP (2 of 5063 ROxford
images gave "mAP E: 0.95"). So every mode checks its images before extracting or training:

* `check_retrieval_set`: every query and database image must exist and be readable
  (its header identifies an image format), else `IncompleteDatasetError` naming the
  count, the first paths and the download command. With `allow_missing=True`
  (`config.eval.allow_missing`), missing database images are dropped (the ground truth
  is re-indexed) and missing queries removed from the mAP; `Completeness.summary()` goes
  into the result JSON.
* `drop_unreadable_train`: training images that cannot be read are removed; a landmark
  left with fewer than 2 images (no positive pair) is dropped with a warning and a count,
  with its training pairs; an error only if too few landmarks remain to form a batch.
* Every skipped file is listed in `results/<name>_skipped.txt`
  (`paths.write_skipped_list`).
"""
import concurrent.futures
import dataclasses
import io
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from retrieval_jax.data import datasets

CHECKS = ("exists", "header")
_HEADER_BYTES = 1 << 16
_SHOW = 5  # Paths quoted in an error message.


class IncompleteDatasetError(datasets.DatasetNotFoundError):
  """Benchmark images are missing or unreadable; the message says how to get them."""


def image_problem(path: str, check: str = "header") -> Optional[str]:
  """None if `path` looks like a readable image, else the reason ('missing', ...).

  Args:
    path: image file.
    check: "exists" (a non-empty file) or "header" (also opened by PIL, which reads the
      header only: cheap, but a truncated body is found later, when decoded).
  """
  if check not in CHECKS:
    raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
  remote = "://" in path
  try:
    if (epath.Path(path).stat().length if remote else os.path.getsize(path)) == 0:
      return "empty"
  except Exception:  # pylint: disable=broad-except (OSError locally, others from a bucket)
    return "missing"
  if check == "header":
    try:
      # An object in a bucket: its first 64 KB hold the header of every common format.
      source = path
      if remote:
        with epath.Path(path).open("rb") as f:
          source = io.BytesIO(f.read(_HEADER_BYTES))
      with Image.open(source) as im:
        if im.size[0] < 1 or im.size[1] < 1:
          return "unidentified"
    except UnidentifiedImageError:
      return "unidentified"
    except Image.DecompressionBombError:
      return "too_large"
    except Exception:  # pylint: disable=broad-except
      # Any decoder's error (PIL raises OSError, SyntaxError, ValueError, struct.error,
      # EOFError, ... depending on the format) means "this file is unreadable": listed,
      # never a crash.
      return "unreadable"
  return None


def find_problems(paths: Sequence[str], check: str = "header", num_threads: int = 8
                  ) -> List[Tuple[int, str]]:
  """(index, reason) of every path that `image_problem` rejects, in index order."""
  if not len(paths):
    return []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    reasons = list(pool.map(lambda p: image_problem(p, check), paths, chunksize=256))
  return [(i, r) for i, r in enumerate(reasons) if r is not None]


@dataclasses.dataclass
class Completeness:
  """What `check_retrieval_set` found.

  Attributes:
    dataset: the set to evaluate (without the missing images when they were dropped).
    missing_queries / missing_db: (path, reason) of the images left out.
    allow_missing: whether they were dropped (else an error was raised).
  """
  dataset: datasets.RetrievalSet
  missing_queries: List[Tuple[str, str]]
  missing_db: List[Tuple[str, str]]
  allow_missing: bool = False

  @property
  def entries(self) -> List[Tuple[str, str]]:
    return self.missing_queries + self.missing_db

  def summary(self) -> Dict[str, int]:
    """For the result JSON: how many images the number is computed without."""
    return {"missing_queries": len(self.missing_queries),
            "missing_db_images": len(self.missing_db)}


def drop_images(rset: datasets.RetrievalSet, query_idx: Sequence[int] = (),
                db_idx: Sequence[int] = ()) -> datasets.RetrievalSet:
  """The set without some queries and database images; ground truth re-indexed.

  A dropped database image disappears from every query's lists (it can be neither found
  nor missed); a dropped query is removed with its box, ground truth and label.
  """
  nq, ndb = len(rset.query_images), len(rset.db_images)
  keep_q = np.setdiff1d(np.arange(nq), np.asarray(query_idx, np.int64))
  keep_db = np.setdiff1d(np.arange(ndb), np.asarray(db_idx, np.int64))
  new_pos = np.full((ndb,), -1, np.int64)
  new_pos[keep_db] = np.arange(len(keep_db))
  gnd = None
  if rset.gnd is not None:
    gnd = []
    for i in keep_q:
      g = dict(rset.gnd[i])
      for key, value in g.items():
        if key == "bbx" or value is None:
          continue
        old = datasets.as_index_array(value)
        mapped = new_pos[old]
        g[key] = mapped[mapped >= 0]
      gnd.append(g)

  def pick(seq, idx):
    return None if seq is None else [seq[i] for i in idx]

  return dataclasses.replace(
      rset,
      query_images=pick(rset.query_images, keep_q),
      db_images=pick(rset.db_images, keep_db),
      query_bbx=pick(rset.query_bbx, keep_q),
      gnd=gnd,
      query_labels=None if rset.query_labels is None else np.asarray(rset.query_labels)[keep_q],
      db_labels=None if rset.db_labels is None else np.asarray(rset.db_labels)[keep_db])


def _first(items: Sequence[Tuple[str, str]]) -> str:
  shown = [f"{p} ({r})" for p, r in items[:_SHOW]]
  more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
  return ", ".join(shown) + more


def check_retrieval_set(rset: datasets.RetrievalSet, *, root: str = "",
                        download_name: Optional[str] = None, allow_missing: bool = False,
                        check: str = "header", num_threads: int = 8) -> Completeness:
  """Checks that every image of a benchmark is there, before any descriptor is computed.

  Args:
    rset: the loaded set.
    root: its data root, for the download command in the message.
    download_name: name for `python -m retrieval_jax.data.download` (default rset.name
      without a "+1m" suffix).
    allow_missing: drop missing database images and remove missing queries instead of
      raising (`config.eval.allow_missing`).
    check: "header" (default) or "exists" (see `image_problem`).
    num_threads: parallel file checks.

  Returns:
    A `Completeness` whose `dataset` is the set to evaluate.

  Raises:
    IncompleteDatasetError: images are missing or unreadable and `allow_missing` is False.
  """
  bad_q = find_problems(rset.query_images, check, num_threads)
  bad_db = find_problems(rset.db_images, check, num_threads)
  mq = [(rset.query_images[i], r) for i, r in bad_q]
  mdb = [(rset.db_images[i], r) for i, r in bad_db]
  if not mq and not mdb:
    return Completeness(rset, [], [], allow_missing)
  nq, ndb = len(rset.query_images), len(rset.db_images)
  total = len(set(p for p, _ in mq + mdb))
  what = (f"{rset.name}: {total} images are missing or unreadable "
          f"({len(mq)} of {nq} queries, {len(mdb)} of {ndb} database images)")
  if not allow_missing:
    name = download_name or rset.name.split("+")[0]
    raise IncompleteDatasetError(
        f"{what}: {_first(mq + mdb)}.\n"
        f"  Download the dataset with: {datasets.download_command(name, root or '<data root>')}\n"
        "  or evaluate without them with --config.eval.allow_missing=True (missing database "
        "images dropped, missing queries removed from the mAP; recorded in the result).")
  logging.warning("%s; eval.allow_missing=True: they are left out of the evaluation "
                  "(first: %s)", what, _first(mq + mdb))
  reduced = drop_images(rset, [i for i, _ in bad_q], [i for i, _ in bad_db])
  if not reduced.query_images:
    raise IncompleteDatasetError(f"{what}: no query is left to evaluate.")
  return Completeness(reduced, mq, mdb, True)


def after_extraction(completeness: Completeness, failed_queries: Sequence[Tuple[str, str]],
                     failed_db: Sequence[Tuple[str, str]], *, root: str = ""
                     ) -> Tuple[Completeness, List[int], List[int]]:
  """Images whose decoding failed during extraction (a truncated body passes the header check).

  Args:
    completeness: what `check_retrieval_set` returned (its `dataset` was extracted).
    failed_queries / failed_db: (path, reason) skipped while extracting the queries / the
      database (`SkipCounter.entries` of each pass).
    root: data root, for the download command.

  Returns:
    (updated Completeness, query rows, database rows to delete from the descriptors).

  Raises:
    IncompleteDatasetError: there are failures and `completeness.allow_missing` is False.
  """
  rset = completeness.dataset
  bad_q_paths = {p for p, _ in failed_queries}
  bad_db_paths = {p for p, _ in failed_db}
  bad_q = [i for i, p in enumerate(rset.query_images) if p in bad_q_paths]
  bad_db = [i for i, p in enumerate(rset.db_images) if p in bad_db_paths]
  if not bad_q and not bad_db:
    return completeness, [], []
  fq = [(rset.query_images[i], dict(failed_queries)[rset.query_images[i]]) for i in bad_q]
  fdb = [(rset.db_images[i], dict(failed_db)[rset.db_images[i]]) for i in bad_db]
  what = (f"{rset.name}: {len(bad_q) + len(bad_db)} images could not be decoded "
          f"({len(bad_q)} of {len(rset.query_images)} queries, {len(bad_db)} of "
          f"{len(rset.db_images)} database images)")
  if not completeness.allow_missing:
    name = rset.name.split("+")[0]
    raise IncompleteDatasetError(
        f"{what}: {_first(fq + fdb)}.\n"
        f"  Download the dataset again with: "
        f"{datasets.download_command(name, root or '<data root>')}\n"
        "  or evaluate without them with --config.eval.allow_missing=True.")
  logging.warning("%s; eval.allow_missing=True: left out (first: %s)", what, _first(fq + fdb))
  reduced = drop_images(rset, bad_q, bad_db)
  if not reduced.query_images:
    raise IncompleteDatasetError(f"{what}: no query is left to evaluate.")
  return (Completeness(reduced, completeness.missing_queries + fq,
                       completeness.missing_db + fdb, True), bad_q, bad_db)


@dataclasses.dataclass
class TrainCleanup:
  """What `drop_unreadable_train` removed: (path, reason) per image, dropped landmarks."""
  train_set: datasets.TrainSet
  skipped: List[Tuple[str, str]]
  dropped_landmarks: List[int]


def drop_unreadable_train(train_set: datasets.TrainSet, *, min_landmarks: int = 1,
                          min_images: int = 2, check: str = "header", num_threads: int = 8,
                          problems: Optional[Sequence[Tuple[int, str]]] = None
                          ) -> TrainCleanup:
  """A training set without its unreadable images and the landmarks they empty.

  Args:
    train_set: the loaded training set.
    min_landmarks: landmarks (>= `min_images` readable images each) needed to form a
      batch (`data.classes_per_batch` for the balanced sampler).
    min_images: readable images a landmark needs to stay: 2 for pair / in-batch mining
      (a positive), 1 for classification losses (the shuffle sampler).
    check: see `image_problem`.
    num_threads: parallel file checks.
    problems: (index, reason) found already (skips the file checks).

  Returns:
    A `TrainCleanup`; its set keeps the image order of the readable images, labels
    unchanged (-1 for images of a dropped landmark), and only the pairs whose two images
    remain (indices re-numbered).

  Raises:
    ValueError: fewer than `min_landmarks` landmarks remain.
  """
  if problems is None:
    problems = find_problems(train_set.images, check, num_threads)
  labels = np.asarray(train_set.labels)
  n = len(train_set.images)
  bad = np.zeros((n,), bool)
  bad[[i for i, _ in problems]] = True
  skipped = [(train_set.images[i], r) for i, r in problems]
  valid = labels >= 0
  before = set(np.unique(labels[valid]).tolist())
  counts = {}
  for c in labels[valid & ~bad]:
    counts[int(c)] = counts.get(int(c), 0) + 1
  dropped = sorted(c for c in before if counts.get(c, 0) < min_images)
  emptied = sorted(c for c in dropped if counts.get(c, 0) == 0)
  if dropped:
    logging.warning(
        "%s: %d of %d landmarks dropped, fewer than %d of their images are readable "
        "(%d with none: %s%s); %d unreadable images skipped",
        train_set.name, len(dropped), len(before), min_images, len(emptied), emptied[:_SHOW],
        " ..." if len(emptied) > _SHOW else "", int(bad.sum()))
  remaining = len(before) - len(dropped)
  if before and remaining < min_landmarks:
    raise ValueError(
        f"{train_set.name}: only {remaining} landmarks have {min_images} or more readable "
        f"images, a "
        f"batch needs {min_landmarks}; {int(bad.sum())} images are unreadable (first: "
        f"{_first(skipped)}). Download the dataset again, or lower data.classes_per_batch.")
  keep = np.flatnonzero(~bad)
  new_pos = np.full((n,), -1, np.int64)
  new_pos[keep] = np.arange(len(keep))
  new_labels = labels[keep].copy()
  new_labels[np.isin(new_labels, dropped)] = -1
  qidxs = pidxs = None
  if train_set.qidxs is not None and train_set.pidxs is not None:
    q = new_pos[np.asarray(train_set.qidxs, np.int64)]
    p = new_pos[np.asarray(train_set.pidxs, np.int64)]
    ok = (q >= 0) & (p >= 0)
    if (~ok).any():
      logging.warning("%s: %d of %d training pairs dropped with their unreadable images",
                      train_set.name, int((~ok).sum()), len(ok))
    qidxs, pidxs = q[ok], p[ok]
  cleaned = dataclasses.replace(train_set, images=[train_set.images[i] for i in keep],
                                labels=new_labels, qidxs=qidxs, pidxs=pidxs)
  return TrainCleanup(cleaned, skipped, dropped)
