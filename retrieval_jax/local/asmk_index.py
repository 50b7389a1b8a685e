"""ASMK (Tolias et al., ICCV 2013; Detect-to-Retrieve's aggregation) over local descriptors.

A thin wrapper around the `asmk` package (jenicek/asmk, the HOW / FIRe authors' code):
codebook by k-means (faiss), inverted file of per-visual-word aggregated residuals,
binarised (`binary=True`), selective match kernel `sim^alpha` above a threshold. Defaults
are the package's published setting (`examples/params/_eccv20_how.yml`): 64k words,
binary, no idf, multiple assignment 1 (database) / 5 (queries), alpha 3, threshold 0.

Regional ASMK (Detect-to-Retrieve): when boxes are given for a database image, each box's
keypoints form an extra "region" entry of the inverted file, and an image scores the max of
its entries (whole image included). Boxes come from the user here; Detect-to-Retrieve as
the reference does it (detector boxes, R-ASMK* etc.) is `aggregation.py` + `boxes.py`,
`eval.rerank=d2r`.

The codebook is saved by us as a plain `.npz` of centroids (no pickle: the package's own
cache files are pickles), and the inverted file is rebuilt from the stored local features.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import numpy as np

try:  # Optional dependency (requirements-dev.txt): only ASMK needs it.
  from asmk import asmk_method  # pylint: disable=g-import-not-at-top
  from asmk import codebook as asmk_codebook  # pylint: disable=g-import-not-at-top
  from asmk import index as asmk_index_lib  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - exercised only where asmk is missing
  asmk_method = asmk_codebook = asmk_index_lib = None


def asmk_params(codebook_size: int = 65536, binary: bool = True, use_idf: bool = False,
                db_multiple_assignment: int = 1, query_multiple_assignment: int = 5,
                alpha: float = 3.0, similarity_threshold: float = 0.0) -> Dict[str, Any]:
  """The `asmk` package's parameter dict (its yml layout)."""
  return {
      "index": {"gpu_id": None},
      "train_codebook": {"codebook": {"size": int(codebook_size)}},
      "build_ivf": {"kernel": {"binary": bool(binary)}, "ivf": {"use_idf": bool(use_idf)},
                    "quantize": {"multiple_assignment": int(db_multiple_assignment)},
                    "aggregate": {}},
      "query_ivf": {"quantize": {"multiple_assignment": int(query_multiple_assignment)},
                    "aggregate": {}, "search": {"topk": None},
                    "similarity": {"similarity_threshold": float(similarity_threshold),
                                   "alpha": float(alpha)}},
  }


def _stack(records: Sequence[Mapping[str, np.ndarray]], ids: Sequence[int]
           ) -> Tuple[np.ndarray, np.ndarray]:
  """Descriptors of records, concatenated, with the entry id of every row."""
  desc = [np.asarray(r["descriptors"], np.float32) for r in records]
  imids = [np.full(len(d), i, np.int64) for d, i in zip(desc, ids)]
  if not desc or sum(len(d) for d in desc) == 0:
    raise ValueError("ASMK: no local descriptors at all (check the extraction's score "
                     "threshold)")
  return np.concatenate(desc), np.concatenate(imids)


class AsmkIndex:
  """Codebook + inverted file over a database's local features.

  Usage: `index = AsmkIndex(params); index.train_codebook(sample)` (or `load_codebook`),
  `index.build(db_records)`, `ranks, scores = index.search(query_records)`.
  """

  def __init__(self, params: Optional[Dict[str, Any]] = None):
    if asmk_method is None:
      raise ImportError("ASMK needs the `asmk` package (jenicek/asmk): pip install asmk "
                        "(it needs faiss-cpu)")
    self.params = params or asmk_params()
    self._method = asmk_method.ASMKMethod.initialize_untrained(self.params)
    self._entry_image: Optional[np.ndarray] = None
    self._n_db = 0

  # -- codebook -------------------------------------------------------------------------------

  def train_codebook(self, descriptors: np.ndarray) -> None:
    """k-means codebook from [N, d] training descriptors (N >= codebook size)."""
    size = self.params["train_codebook"]["codebook"]["size"]
    if len(descriptors) < size:
      raise ValueError(f"ASMK codebook of {size} words needs at least as many training "
                       f"descriptors, got {len(descriptors)}")
    self._method = self._method.train_codebook(np.ascontiguousarray(descriptors, np.float32))

  def save_codebook(self, path: str) -> None:
    """Writes the centroids [K, d] as `.npz` (no pickle)."""
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(path).open("wb") as f:
      np.savez(f, centroids=self._method.codebook.centroids)

  def load_codebook(self, path: str) -> None:
    """Reads centroids written by `save_codebook`."""
    with epath.Path(path).open("rb") as f:
      centroids = np.load(f, allow_pickle=False)["centroids"]
    size = self.params["train_codebook"]["codebook"]["size"]
    if len(centroids) != size:
      raise ValueError(f"{path} holds {len(centroids)} words, the config asks for {size}")
    cdb = asmk_codebook.Codebook(asmk_index_lib.initialize_index(None), size=size)
    cdb.index(np.ascontiguousarray(centroids, np.float32))
    self._method = asmk_method.ASMKMethod(self.params, {}, codebook=cdb)

  # -- inverted file --------------------------------------------------------------------------

  def build(self, records: Sequence[Mapping[str, np.ndarray]],
            boxes: Optional[Sequence[Optional[np.ndarray]]] = None) -> None:
    """Indexes the database images' descriptors (and regions, for regional ASMK).

    Args:
      records: per database image {"descriptors" [n, d], "locations" [n, 2] (y, x)}.
      boxes: optional per image [r, 4] (ymin, xmin, ymax, xmax) boxes in the locations'
        pixels; each adds an entry scored separately (the image keeps the max).
    """
    if self._method.codebook is None:
      raise ValueError("ASMK: train_codebook or load_codebook first")
    entries: List[Mapping[str, np.ndarray]] = []
    owner: List[int] = []
    for i, rec in enumerate(records):
      entries.append(rec)
      owner.append(i)
      for box in (boxes[i] if boxes is not None and boxes[i] is not None else ()):
        loc = np.asarray(rec["locations"])
        inside = ((loc[:, 0] >= box[0]) & (loc[:, 0] <= box[2]) & (loc[:, 1] >= box[1])
                  & (loc[:, 1] <= box[3]))
        entries.append({"descriptors": np.asarray(rec["descriptors"])[inside]})
        owner.append(i)
    desc, imids = _stack(entries, range(len(entries)))
    if self.params["build_ivf"]["kernel"]["binary"] and desc.shape[1] % 32:
      # asmk packs the bits into 32-bit words and normalises Hamming distances by the packed
      # length: other sizes would shrink every similarity.
      raise ValueError(f"binary ASMK needs a descriptor size that is a multiple of 32, got "
                       f"{desc.shape[1]} (DELG's is 128)")
    self._method = asmk_method.ASMKMethod(self.params, {}, codebook=self._method.codebook)
    self._method = self._method.build_ivf(desc, imids)
    self._entry_image = np.asarray(owner, np.int64)
    self._n_db = len(records)

  def search(self, records: Sequence[Mapping[str, np.ndarray]]
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Ranks the database for every query.

    Args:
      records: per query {"descriptors" [n, d]}.
    Returns:
      (ranks [n_db, n_queries] as `evaluation.compute_map`, scores [n_queries, n_db]);
      ties (e.g. a query without descriptors) keep database order.
    """
    if self._entry_image is None:
      raise ValueError("ASMK: build the inverted file first")
    scores = np.zeros((len(records), self._n_db), np.float64)
    nonempty = [j for j, r in enumerate(records) if len(r["descriptors"])]
    if nonempty:
      desc, qids = _stack([records[j] for j in nonempty], nonempty)
      _, qimids, ranks, entry_scores = self._method.query_ivf(desc, qids)
      for j, r, s in zip(qimids, ranks, entry_scores):
        per_entry = np.full(len(self._entry_image), -np.inf)
        per_entry[r] = s
        img = np.full(self._n_db, -np.inf)
        np.maximum.at(img, self._entry_image, per_entry)
        scores[int(j)] = np.where(np.isfinite(img), img, 0.0)
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    return ranks, scores
