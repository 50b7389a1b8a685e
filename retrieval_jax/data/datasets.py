"""Dataset registry: each name maps to a loader returning a `TrainSet` or a `RetrievalSet`.

Loaders only read metadata (lists of image paths, labels, ground truth); pixels are decoded
later by the input pipelines through `image_io.load_rgb`.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

_REGISTRY: Dict[str, Callable[..., Any]] = {}


@dataclasses.dataclass
class TrainSet:
  """Images with landmark (class / 3D-model cluster) labels.

  Attributes:
    name: dataset name.
    images: N image paths.
    labels: [N] int landmark ids (for SfM-120k: the 3D-model cluster of each image).
    qidxs, pidxs: optional query / positive image indices of the reference's training pairs.
  """
  name: str
  images: Sequence[str]
  labels: np.ndarray
  qidxs: Optional[np.ndarray] = None
  pidxs: Optional[np.ndarray] = None


@dataclasses.dataclass
class RetrievalSet:
  """A query set and a database with ground truth.

  Attributes:
    name: dataset name; also picks the evaluator by default.
    query_images / db_images: image paths.
    query_bbx: optional per-query (x1, y1, x2, y2) crop boxes (Revisited Oxford/Paris).
    gnd: optional per-query ground-truth dicts (revisitop format: 'easy', 'hard', 'junk' or
      'ok', 'junk'), indices into db_images.
    query_labels / db_labels: optional int labels (generic same-label protocol).
  """
  name: str
  query_images: Sequence[str]
  db_images: Sequence[str]
  query_bbx: Optional[List[Any]] = None
  gnd: Optional[List[Dict[str, Any]]] = None
  query_labels: Optional[np.ndarray] = None
  db_labels: Optional[np.ndarray] = None


def register(name: str):
  """Decorator adding a loader `fn(root: str, split: str, **kwargs)` to the registry."""
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


def get_dataset(name: str, root: str, split: str = "train", **kwargs):
  """Loads dataset `name` from folder `root` (`split`: 'train', 'val', 'test', ...)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[name](root, split, **kwargs)


def names() -> List[str]:
  return sorted(_REGISTRY)
