"""Google Landmarks Dataset v2 (Weyand et al. 2020), layout of the official release.

Files under root/gldv2/ (cvdfoundation/google-landmark):

  train.csv                     id,url,landmark_id
  train_clean.csv               landmark_id,images (space-separated train ids)
  index.csv                     id
  retrieval_solution_v2.1.csv   id,images,Usage (images: space-separated index ids,
                                'None' for Ignored rows)
  train/a/b/c/abc....jpg, index/a/b/c/..., test/a/b/c/...   (first three id characters)

Splits: 'train' and 'train_clean' give a `TrainSet` whose labels are contiguous class
indices (the original landmark ids are in `label_ids`, as a classification head needs
[0, num_classes)); 'test' gives a `RetrievalSet` of the retrieval challenge: queries are
the non-Ignored rows of the solution file, the database is index.csv, gnd[i]['ok'] the
relevant index images (parsed as the DELF `ReadSolution` does) and gnd[i]['usage'] is
'Public' or 'Private' (the two are reported separately, mAP@100).
"""
import csv
import os
from typing import Iterator, List, Sequence, Union

import numpy as np

from retrieval_jax.data import datasets

SPLITS = ("train", "train_clean", "test")  # the loader's splits, declared to datasets.register


class IdPathList(Sequence[str]):
  """Image paths computed on access from a compact array of 16-character ids.

  4.1M train paths as Python strings take ~0.5 GB; as fixed-width bytes ~66 MB.

  Attributes:
    ids: [N] bytes array of image ids (dtype 'S<len>').
    image_root: folder holding the a/b/c/<id>.jpg tree.
  """

  def __init__(self, ids: np.ndarray, image_root: str):
    self.ids = ids
    self.image_root = image_root

  def __len__(self) -> int:
    return len(self.ids)

  def _path(self, raw: Union[bytes, str]) -> str:
    i = raw.decode("ascii") if isinstance(raw, bytes) else raw
    return os.path.join(self.image_root, i[0], i[1], i[2], i + ".jpg")

  def __getitem__(self, idx):
    if isinstance(idx, slice):
      return [self._path(r) for r in self.ids[idx]]
    return self._path(self.ids[idx])

  def __iter__(self) -> Iterator[str]:
    return (self._path(r) for r in self.ids)


def image_path(image_root: str, image_id: str) -> str:
  """root/a/b/c/abc....jpg for an id, as the official extraction lays images out."""
  return os.path.join(image_root, image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def _rows(path: str) -> Iterator[List[str]]:
  with open(path, newline="") as f:
    reader = csv.reader(f)
    next(reader, None)  # header
    for row in reader:
      if row:
        yield row


def _header(path: str) -> List[str]:
  with open(path, newline="") as f:
    return next(csv.reader(f))


def _trainset(name: str, ids: List[str], raw_labels: List[int], image_root: str
              ) -> datasets.TrainSet:
  raw = np.asarray(raw_labels, np.int64)
  label_ids, labels = np.unique(raw, return_inverse=True)
  return datasets.TrainSet(name=name,
                           images=IdPathList(np.asarray(ids, dtype="S"), image_root),
                           labels=labels.astype(np.int64).reshape(-1),
                           label_ids=label_ids)


def _load_train(root: str, base: str, clean: bool) -> datasets.TrainSet:
  image_root = os.path.join(base, "train")
  ids, labels = [], []
  if clean:
    fname = datasets.require(os.path.join(base, "train_clean.csv"), "gldv2", root)
    for row in _rows(fname):
      lid = int(row[0])
      for image_id in row[1].split():
        ids.append(image_id)
        labels.append(lid)
  else:
    fname = datasets.require(os.path.join(base, "train.csv"), "gldv2", root)
    header = _header(fname)
    i_id, i_lab = header.index("id"), header.index("landmark_id")
    for row in _rows(fname):
      ids.append(row[i_id])
      labels.append(int(row[i_lab]))
  return _trainset("gldv2" if not clean else "gldv2-clean", ids, labels, image_root)


def read_retrieval_solution(path: str):
  """Reads retrieval_solution_v2.1.csv like DELF's `ReadSolution(path, 'retrieval')`.

  Returns:
    (public, private, ignored): dicts test id -> list of index ids, and the list of
    ignored test ids.
  """
  public, private, ignored = {}, {}, []
  for row in _rows(path):
    test_id, usage = row[0], row[2]
    if usage == "Ignored":
      ignored.append(test_id)
    elif usage in ("Public", "Private"):
      target = public if usage == "Public" else private
      target[test_id] = row[1].split(" ")
    else:
      raise ValueError(f"{path}: test image {test_id} has unknown Usage {usage!r}")
  return public, private, ignored


def _load_test(root: str, base: str, subset: str) -> datasets.RetrievalSet:
  if subset not in ("all", "public", "private"):
    raise ValueError(f"gldv2: subset must be 'all', 'public' or 'private', got {subset!r}")
  sol = datasets.require(os.path.join(base, "retrieval_solution_v2.1.csv"), "gldv2", root)
  index_csv = datasets.require(os.path.join(base, "index.csv"), "gldv2", root)
  index_ids = [row[0] for row in _rows(index_csv)]
  pos = {i: k for k, i in enumerate(index_ids)}
  public, private, _ = read_retrieval_solution(sol)
  queries = []
  if subset in ("all", "public"):
    queries += [(q, rel, "Public") for q, rel in public.items()]
  if subset in ("all", "private"):
    queries += [(q, rel, "Private") for q, rel in private.items()]
  gnd = []
  for q, rel, usage in queries:
    missing = [r for r in rel if r not in pos]
    if missing:
      raise ValueError(f"gldv2: solution lists index images absent from {index_csv}: "
                       f"{missing[:3]} (query {q})")
    gnd.append({"ok": np.asarray(sorted(pos[r] for r in rel), np.int64),
                "junk": np.zeros((0,), np.int64), "usage": usage})
  test_root = os.path.join(base, "test")
  return datasets.RetrievalSet(
      name="gldv2",
      query_images=[image_path(test_root, q) for q, _, _ in queries],
      db_images=IdPathList(np.asarray(index_ids, dtype="S"),
                           os.path.join(base, "index")),
      gnd=gnd)


@datasets.register("gldv2", default_split="train", splits=SPLITS,
                   exif_transpose=False, download="gldv2")
def load_gldv2(root: str, split: str = "train", subset: str = "all"):
  """GLDv2.

  Args:
    root: data root (files under root/gldv2/).
    split: 'train' (train.csv), 'train_clean' (train_clean.csv) or 'test' (retrieval).
    subset: for 'test': 'all', 'public' or 'private' queries.

  Returns:
    TrainSet for the train splits, RetrievalSet for 'test'.
  """
  datasets.check_split("gldv2", split, SPLITS)
  base = os.path.join(root, "gldv2")
  if split == "test":
    return _load_test(root, base, subset)
  return _load_train(root, base, clean=(split == "train_clean"))
