"""Your own photos as a dataset: one sub-folder (or one list label) per landmark.

  --config.data.name=folder --config.data.root=/photos      # /photos/<landmark>/.../*.jpg
  --config.data.name=folder --config.data.list=photos.tsv   # lines `path<TAB>label`

A landmark is the folder an image sits in, relative to the root, at any depth
(`paris/eiffel/a.jpg` and `paris/louvre/b.jpg` are two landmarks), or its label in the list
(relative paths there are relative to the list file's folder; blank lines and `#`
comments are skipped). Images are the files `--mode=describe` takes (`image_io.IMAGE_EXTENSIONS`).

* Files whose header PIL cannot read (or that are missing / empty) are left out and kept in
  `TrainSet.skipped`, so the training run lists them in `results/folder_skipped.txt`.
* A landmark with one readable image (and an image directly in the root, which belongs
  to no landmark) cannot give a positive pair or a query with an answer: it is used only
  as a distractor in the held-out database, and the log says which.
* The landmarks with two or more images are split, seeded by `config.seed`, into
  training landmarks and `data.heldout_fraction` held-out ones. 'train' gives the training
  landmarks (labels 0..L-1: the pairs and the in-batch mining come from them, no clusters
  needed); 'test' gives one query per held-out landmark (its first image by name) against
  the rest of the held-out images plus the distractors, scored by the same-label mAP the
  demo uses (`evaluation` 'labels').
* Fewer training landmarks than a batch takes (`data.classes_per_batch` for in-batch
  mining) fails at once with one line naming the count and that setting.
"""
import dataclasses
import functools
import os
from typing import Any, Dict, List, Sequence, Tuple

from absl import logging
import numpy as np

from retrieval_jax import errors
from retrieval_jax.data import datasets
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity

SPLITS = ("train", "test")  # the loader's splits, declared to datasets.register

NAME = "folder"
_SHOW = 5  # names quoted in a log line


class FolderDatasetError(errors.UserError, ValueError):
  """The folder or list cannot make a dataset; the message says which setting to change."""


@dataclasses.dataclass(frozen=True)
class Scan:
  """What a folder or list holds, before the split.

  Attributes:
    landmarks: names of the landmarks with >= 2 readable images, sorted.
    members: per landmark, its readable images, sorted.
    distractors: readable images of one-image landmarks (and of no landmark).
    skipped: (path, reason) of the files that cannot be read.
  """
  landmarks: Tuple[str, ...]
  members: Tuple[Tuple[str, ...], ...]
  distractors: Tuple[str, ...]
  skipped: Tuple[Tuple[str, str], ...]


def _walk(root: str) -> List[Tuple[str, str]]:
  """(image path, landmark) of every image under `root`; '' for images in the root."""
  out = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    landmark = os.path.relpath(folder, root).replace(os.sep, "/")
    for f in sorted(files):
      if f.lower().endswith(image_io.IMAGE_EXTENSIONS) and not f.startswith("."):
        out.append((os.path.join(folder, f), "" if landmark == "." else landmark))
  return out


def read_list(path: str) -> List[Tuple[str, str]]:
  """(image path, label) of a `path<TAB>label` file.

  Raises:
    FolderDatasetError: a line without a tab-separated label, naming the line.
  """
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n").rstrip("\r")
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      image, sep, label = line.rpartition("\t")
      if not sep or not image.strip() or not label.strip():
        raise FolderDatasetError(f"data.list={path} line {number}: expected "
                                 f"'path<TAB>label', got {line!r}")
      image = image.strip()
      out.append((image if os.path.isabs(image) else os.path.join(base, image),
                  label.strip()))
  return out


def _source(root: str, list_file: str) -> List[Tuple[str, str]]:
  if list_file:
    if not os.path.isfile(list_file):
      raise FolderDatasetError(f"data.list={list_file}: no such file (lines "
                               "'path<TAB>label', one per image)")
    entries = read_list(list_file)
    what = f"data.list={list_file}"
  else:
    if not os.path.isdir(root):
      raise FolderDatasetError(
          f"data.name='folder' reads a folder of photos, one sub-folder per landmark: "
          f"{root} is not a folder; set --config.data.root=<folder> or "
          "--config.data.list=<file of path<TAB>label lines>")
    entries = _walk(root)
    what = f"data.root={root}"
  if not entries:
    raise FolderDatasetError(f"{what} holds no image ({', '.join(image_io.IMAGE_EXTENSIONS)})")
  return entries


def _signature(entries: Sequence[Tuple[str, str]]) -> Tuple[Any, ...]:
  """The files' names, labels, sizes and times: a scan is redone when one changes."""
  out = []
  for path, label in entries:
    try:
      st = os.stat(path)
      out.append((path, label, st.st_size, st.st_mtime_ns))
    except OSError:
      out.append((path, label, -1, -1))
  return tuple(out)


def scan(root: str, list_file: str = "") -> Scan:
  """The landmarks, distractors and unreadable files of a folder or list (cached while
  the files stay the same)."""
  return _scan(_signature(_source(root, list_file)))


@functools.lru_cache(maxsize=4)
def _scan(signature: Tuple[Any, ...]) -> Scan:
  paths = [s[0] for s in signature]
  problems = integrity.find_problems(paths, "header")
  bad = {i for i, _ in problems}
  skipped = tuple((paths[i], reason) for i, reason in problems)
  groups: Dict[str, List[str]] = {}
  loose = []
  for i, (path, label, _, _) in enumerate(signature):
    if i in bad:
      continue
    if label == "":
      loose.append(path)
    else:
      groups.setdefault(label, []).append(path)
  singles = sorted(name for name, members in groups.items() if len(members) < 2)
  landmarks = tuple(sorted(name for name in groups if len(groups[name]) >= 2))
  distractors = tuple(sorted(loose + [groups[name][0] for name in singles]))
  if skipped:
    logging.warning("folder: %d unreadable files left out (listed in the training run's "
                    "results/folder_skipped.txt): %s", len(skipped),
                    ", ".join(f"{p} ({r})" for p, r in skipped[:_SHOW]))
  if singles:
    logging.warning("folder: %d landmarks have a single image and are used only as "
                    "distractors in the held-out database: %s%s", len(singles),
                    ", ".join(singles[:_SHOW]), " ..." if len(singles) > _SHOW else "")
  if loose:
    logging.warning("folder: %d images belong to no landmark (directly in the root): "
                    "distractors only", len(loose))
  return Scan(landmarks, tuple(tuple(sorted(groups[n])) for n in landmarks), distractors,
              skipped)


def split_landmarks(num_landmarks: int, heldout_fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the held-out landmarks: round(fraction * L) of them, at least one
  when the fraction is > 0 and two landmarks exist (one stays for training), seeded."""
  n = int(round(heldout_fraction * num_landmarks))
  if heldout_fraction > 0 and num_landmarks >= 2:
    n = min(max(n, 1), num_landmarks - 1)
  order = np.random.default_rng(seed).permutation(num_landmarks)
  return np.sort(order[:n])


def config_options(config) -> Dict[str, Any]:
  """The loader's keyword arguments from the experiment config."""
  balanced = (config.train.mining == "in_batch" and config.data.sampler == "balanced")
  return dict(list_file=config.data.list, heldout_fraction=float(config.data.heldout_fraction),
              seed=int(config.seed),
              min_train_landmarks=int(config.data.classes_per_batch) if balanced else 1)


@datasets.register(NAME, splits=SPLITS, config_options=config_options)
def load(root: str, split: str = "train", *, list_file: str = "",
         heldout_fraction: float = 0.3, seed: int = 0, min_train_landmarks: int = 1):
  """'train' -> TrainSet of the training landmarks; 'test' -> RetrievalSet of the held-out.

  Args:
    root: the photo folder (ignored when `list_file` is given).
    split: 'train' or 'test'.
    list_file: a `path<TAB>label` file instead of the folder.
    heldout_fraction: share of the landmarks held out for evaluation.
    seed: the split's seed.
    min_train_landmarks: training landmarks a batch needs ('train' only).
  """
  datasets.check_split(NAME, split, SPLITS)
  found = scan(root, list_file)
  held = set(split_landmarks(len(found.landmarks), heldout_fraction, seed).tolist())
  train_ids = [i for i in range(len(found.landmarks)) if i not in held]
  source = f"data.list={list_file}" if list_file else f"data.root={root}"
  if split == "train":
    if len(train_ids) < max(1, min_train_landmarks):
      raise FolderDatasetError(
          f"{source}: {len(train_ids)} training landmarks ({len(found.landmarks)} with two "
          f"or more images, {len(held)} held out by data.heldout_fraction="
          f"{heldout_fraction}), a batch takes data.classes_per_batch={min_train_landmarks}: "
          "add landmarks or lower --config.data.classes_per_batch")
    images = [p for i in train_ids for p in found.members[i]]
    labels = np.asarray([c for c, i in enumerate(train_ids) for _ in found.members[i]],
                        np.int32)
    logging.info("folder: %d training landmarks (%d images), %d held out", len(train_ids),
                 len(images), len(held))
    return datasets.TrainSet(NAME, images, labels, skipped=found.skipped)
  if not held:
    raise FolderDatasetError(
        f"{source}: no held-out landmark to evaluate ({len(found.landmarks)} with two or "
        f"more images, data.heldout_fraction={heldout_fraction}); raise "
        "--config.data.heldout_fraction or set --config.eval.dataset=''")
  queries, query_labels, db, db_labels = [], [], [], []
  for i in sorted(held):
    first, *rest = found.members[i]
    queries.append(first)
    query_labels.append(i)
    db.extend(rest)
    db_labels.extend([i] * len(rest))
  db.extend(found.distractors)
  db_labels.extend([-1] * len(found.distractors))
  return datasets.RetrievalSet(NAME, queries, db,
                               query_labels=np.asarray(query_labels, np.int32),
                               db_labels=np.asarray(db_labels, np.int32))
