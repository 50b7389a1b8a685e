"""Matching (query, positive) image pairs of a training set: the one place they are formed.

Two consumers want different pairings of a labelled set without its own pairs:
  "all"    every ordered pair (i, j), i != j, of images with one label: the query pool of
           epoch-level tuple mining (`train/inputs.py`);
  "cycle"  within each label, a cycle through its images (each image is the query of one
           pair and the positive of another; a two-image label gives one pair), so the query
           mean is the mean of all labelled images: post-hoc learned whitening
           (`postprocess/whitening_store.py`).
A set that ships pairs (SfM-120k's `qidxs` / `pidxs`) uses its own in both cases. Labels < 0
mean "no cluster" and form no pair.
"""
from typing import Optional, Tuple

import numpy as np

PAIRINGS = ("all", "cycle")


def training_pairs(labels: np.ndarray, qidxs: Optional[np.ndarray] = None,
                   pidxs: Optional[np.ndarray] = None, *, pairing: str = "all",
                   max_pairs: int = 0, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(qidxs [P] int64, pidxs [P] int64) of matching images.

  Args:
    labels: [N] int cluster / landmark id per image.
    qidxs, pidxs: the set's own [P] query / positive indices, if it has them (used as is).
    pairing: "all" or "cycle" (see the module docstring).
    max_pairs: keep a seeded random subset of this many pairs (0: all).
    seed: subsampling seed.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
  if qidxs is not None and pidxs is not None and len(qidxs):
    q, p = np.asarray(qidxs, np.int64), np.asarray(pidxs, np.int64)
  else:
    labels = np.asarray(labels)
    q_list, p_list = [], []
    for c in np.unique(labels[labels >= 0]):
      members = np.flatnonzero(labels == c)
      if len(members) < 2:
        continue
      if pairing == "all":
        a, b = np.meshgrid(members, members, indexing="ij")
        keep = a != b
        q_list.append(a[keep])
        p_list.append(b[keep])
      elif len(members) == 2:
        q_list.append(members[:1])
        p_list.append(members[1:])
      else:
        q_list.append(members)
        p_list.append(np.roll(members, -1))
    if not q_list:
      raise ValueError("no (query, positive) pairs: the set has no qidxs/pidxs and no label "
                       "has two images")
    q = np.concatenate(q_list).astype(np.int64)
    p = np.concatenate(p_list).astype(np.int64)
  if max_pairs and len(q) > max_pairs:
    keep = np.sort(np.random.default_rng(seed).choice(len(q), max_pairs, replace=False))
    q, p = q[keep], p[keep]
  return q, p
