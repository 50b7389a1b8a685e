"""retrieval-SfM-120k / retrieval-SfM-30k (Radenovic et al.), read as cirtorch lays them out.

Files (cirtorch `download_train`, `TuplesDataset`, `test.py`):

  root/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl   db['train'|'val'] with 'cids',
      'cluster', 'qidxs', 'pidxs'
  root/train/retrieval-SfM-120k/retrieval-SfM-120k-whiten.pkl   whitening pairs
  root/train/retrieval-SfM-30k/retrieval-SfM-30k-whiten.pkl     whitening pairs
  root/train/<name>/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>   images (the 30k
      `ims` is a symlink to the 120k one)

The whitening pickles are read as the reference's test.py reads them: 'cids', 'qidxs',
'pidxs' at the top level; a file that nests them under 'val' is accepted too.
"""
import os
from typing import Any, Dict

import numpy as np

from retrieval_jax.data import datasets

SPLITS = ("train", "val", "whiten")  # the loader's splits, declared to datasets.register

_DIRNAME = {"retrieval-sfm-120k": "retrieval-SfM-120k",
            "retrieval-sfm-30k": "retrieval-SfM-30k"}


def cid2filename(cid: str, prefix: str) -> str:
  """Image path of a SfM image id, as the reference's `cid2filename`."""
  return os.path.join(prefix, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def _to_trainset(name: str, db: Dict[str, Any], ims_root: str) -> datasets.TrainSet:
  cids = list(db["cids"])
  images = [cid2filename(c, ims_root) for c in cids]
  if "cluster" in db and db["cluster"] is not None:
    labels = np.asarray(db["cluster"], dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
      raise ValueError(f"{name}: {len(labels)} cluster ids for {len(images)} images")
  else:
    labels = np.full((len(images),), -1, np.int64)  # whitening files carry no clusters
  qidxs = np.asarray(db["qidxs"], dtype=np.int64).reshape(-1)
  pidxs = np.asarray(db["pidxs"], dtype=np.int64).reshape(-1)
  if len(qidxs) != len(pidxs):
    raise ValueError(f"{name}: {len(qidxs)} qidxs but {len(pidxs)} pidxs")
  for arr, what in ((qidxs, "qidxs"), (pidxs, "pidxs")):
    if len(arr) and (arr.min() < 0 or arr.max() >= len(images)):
      raise ValueError(f"{name}: {what} out of range [0, {len(images)})")
  return datasets.TrainSet(name=name, images=images, labels=labels, qidxs=qidxs,
                           pidxs=pidxs)


def _load(name: str, root: str, split: str, check_images: bool = True
          ) -> datasets.TrainSet:
  datasets.check_split(name, split, SPLITS)
  dirname = _DIRNAME[name]
  db_root = os.path.join(root, "train", dirname)
  ims_root = os.path.join(db_root, "ims")
  if split == "whiten":
    db_fn = os.path.join(db_root, f"{dirname}-whiten.pkl")
    datasets.require(db_fn, name, root, "retrieval-sfm-120k")
    db = datasets.safe_load_pickle(db_fn)
    if "cids" not in db and "val" in db:
      db = db["val"]
  else:
    db_fn = os.path.join(db_root, f"{dirname}.pkl")
    if name == "retrieval-sfm-30k" and not os.path.exists(db_fn):
      # The reference ships only the whitening pairs for SfM-30k.
      raise datasets.DatasetNotFoundError(
          f"{name}: missing file {db_fn}; the reference distributes only "
          f"{dirname}-whiten.pkl for this dataset (use split='whiten'), or train on "
          "'retrieval-sfm-120k'.")
    datasets.require(db_fn, name, root, "retrieval-sfm-120k")
    db = datasets.safe_load_pickle(db_fn)[split]
  if check_images:
    datasets.require(ims_root, name, root, "retrieval-sfm-120k", what="image folder")
  return _to_trainset(name, db, ims_root)


@datasets.register("retrieval-sfm-120k", default_split="train", splits=SPLITS,
                   exif_transpose=False,
                   download="retrieval-sfm-120k")
def load_sfm120k(root: str, split: str = "train", check_images: bool = True
                 ) -> datasets.TrainSet:
  """retrieval-SfM-120k: split 'train' / 'val' (tuples) or 'whiten' (whitening pairs).

  Args:
    root: data root.
    split: 'train', 'val' or 'whiten'.
    check_images: require the `ims/` folder to exist.

  Returns:
    TrainSet(images, labels=cluster, qidxs, pidxs).
  """
  return _load("retrieval-sfm-120k", root, split, check_images)


@datasets.register("retrieval-sfm-30k", default_split="whiten", splits=SPLITS,
                   exif_transpose=False,
                   download="retrieval-sfm-30k")
def load_sfm30k(root: str, split: str = "whiten", check_images: bool = True
                ) -> datasets.TrainSet:
  """retrieval-SfM-30k: the reference's whitening pairs (split 'whiten').

  Returns:
    TrainSet(images, labels=-1 unless the file has clusters, qidxs, pidxs).
  """
  return _load("retrieval-sfm-30k", root, split, check_images)
