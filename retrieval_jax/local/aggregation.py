"""Detect-to-Retrieve's aggregated local-feature kernels: VLAD, ASMK, ASMK* and R-*.

Teichmann et al., "Detect-to-Retrieve: Efficient Regional Aggregation for Image Search",
CVPR 2019; the reference is tensorflow/models research/delf (`protos/aggregation_config.proto`,
`python/feature_aggregation_extractor.py`, `python/feature_aggregation_similarity.py`).

What the reference computes, and what this module does the same way:

* every feature goes to its `num_assignments` nearest visual words (squared L2);
* VLAD: per word, the sum of residuals `feature - word`, as one K*D vector, L2-normalised
  (`use_l2_normalization`, on for the plain kernels);
* R-VLAD: the sum over regions (the whole image first, then each detected box) of each
  region's L2-normalised VLAD, then L2-normalised if `use_l2_normalization` (off for the
  regional kernels: divided by the number of regions instead);
* ASMK / R-ASMK: the unnormalised VLAD / R-VLAD with every word's residual sum
  L2-normalised on its own; only the words with a non-zero sum are kept (sorted);
* ASMK* / R-ASMK*: ASMK's per-word residuals binarised (`> 0`) and bit-packed (uint8);
* similarity: VLAD a dot product; ASMK the sum over shared words of
  sigma(u . v) = sign * |u . v|^alpha above tau (ASMK*: u . v = 1 - 2 hamming / bits),
  divided by sqrt(n1 * n2) when `use_l2_normalization` (plain kernels), -1 when either
  side has no word.

An aggregated descriptor is held sparse (`Aggregated`: the sorted words and their rows),
since a 65536-word VLAD of DELF's 128-D features is 8M floats; `reference_layout` gives
the reference's 1-D arrays. `similarity_matrix` scores many images at once through an
inverted file, with the pairwise rule of `similarity`.
"""
import dataclasses
import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TYPES = ("vlad", "asmk", "asmk_star")
_NORM_SQUARED_TOLERANCE = 1e-12  # the reference's epsilon of tf.math.l2_normalize


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
  """`aggregation_config.proto`, with its defaults.

  `use_l2_normalization=None` takes the reference's advice: on for VLAD / ASMK / ASMK*,
  off for the regional kernels (R-VLAD divides by the number of regions instead; for
  ASMK it only decides the similarity's sqrt(n1 * n2) division).
  """
  aggregation_type: str = "asmk_star"
  codebook_size: int = 65536
  num_assignments: int = 1
  use_regional_aggregation: bool = False
  use_l2_normalization: Optional[bool] = None
  alpha: float = 3.0
  tau: float = 0.0
  feature_batch_size: int = 100

  def __post_init__(self):
    if self.aggregation_type not in TYPES:
      raise ValueError(f"aggregation_type={self.aggregation_type!r} is not one of {TYPES}")
    if int(self.codebook_size) < 1:
      raise ValueError(f"codebook_size={self.codebook_size} must be >= 1")
    if not 1 <= int(self.num_assignments) <= int(self.codebook_size):
      raise ValueError(f"num_assignments={self.num_assignments} must be in "
                       f"[1, codebook_size={self.codebook_size}]")

  @property
  def l2(self) -> bool:
    if self.use_l2_normalization is None:
      return not self.use_regional_aggregation
    return bool(self.use_l2_normalization)


@dataclasses.dataclass(frozen=True)
class Aggregated:
  """One image's aggregated descriptor, sparse.

  Attributes:
    kind: "vlad", "asmk" or "asmk_star".
    words: [w] sorted visual word ids.
    rows: [w, D] float32 (VLAD: the vector's rows at `words`; ASMK: the per-word
      normalised residuals) or [w, ceil(D / 8)] uint8 (ASMK*: packed signs).
    dim: D, the local features' size.
    codebook_size: K.
  """
  kind: str
  words: np.ndarray
  rows: np.ndarray
  dim: int
  codebook_size: int

  def reference_layout(self):
    """(aggregated_descriptors, feature_visual_words) as the reference's Extract returns
    them: VLAD a dense [K * D] vector and -1; ASMK / ASMK* the flattened rows and words."""
    if self.kind == "vlad":
      dense = np.zeros((self.codebook_size, self.dim), np.float32)
      dense[self.words] = self.rows
      return dense.reshape(-1), np.int32(-1)
    return self.rows.reshape(-1), self.words


# -- assignment -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest(features, codebook, k: int):
  """The k nearest words by squared L2 (full float32 precision), nearest first."""
  dot = jnp.matmul(features, codebook.T, precision=jax.lax.Precision.HIGHEST)
  d2 = (jnp.sum(features ** 2, 1)[:, None] - 2.0 * dot + jnp.sum(codebook ** 2, 1)[None])
  return jax.lax.top_k(-d2, k)[1]


def assign(features: np.ndarray, codebook: np.ndarray, num_assignments: int = 1,
           batch_size: int = 100) -> np.ndarray:
  """[N, num_assignments] nearest visual words of each feature (the reference's batched
  nearest-word search; `batch_size <= 0`: one batch)."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n == 0:
    return np.zeros((0, num_assignments), np.int64)
  batch = n if batch_size <= 0 else int(batch_size)
  # Pad every batch to one size so that the program compiles once.
  pad = (-n) % batch
  padded = np.concatenate([features, np.zeros((pad, features.shape[1]), np.float32)])
  cb = jnp.asarray(codebook, jnp.float32)
  out = [np.asarray(_nearest(jnp.asarray(padded[i:i + batch]), cb, int(num_assignments)))
         for i in range(0, n + pad, batch)]
  return np.concatenate(out)[:n].astype(np.int64)


# -- aggregation ------------------------------------------------------------------------------


def _l2(x: np.ndarray) -> np.ndarray:
  """tf.math.l2_normalize with the reference's epsilon, over the whole array."""
  return x / np.sqrt(max(float(np.sum(np.square(x, dtype=np.float64))),
                         _NORM_SQUARED_TOLERANCE))


def _residual_sums(features: np.ndarray, codebook: np.ndarray, config: AggregationConfig):
  """(sorted words, [w, D] residual sums): the unnormalised VLAD, sparse."""
  features = np.asarray(features, np.float32)
  if len(features) == 0:
    return np.zeros(0, np.int64), np.zeros((0, codebook.shape[1]), np.float32)
  words = assign(features, codebook, config.num_assignments, config.feature_batch_size)
  residuals = features[:, None, :] - codebook[words]  # [N, m, D]
  uniq, inverse = np.unique(words.reshape(-1), return_inverse=True)
  sums = np.zeros((len(uniq), codebook.shape[1]), np.float64)
  np.add.at(sums, inverse.reshape(-1), residuals.reshape(-1, codebook.shape[1]))
  return uniq, sums


def _regional_sums(features, counts, codebook, config):
  """Unnormalised R-VLAD, sparse: the sum of the regions' L2-normalised VLADs, then
  L2-normalised (`config.l2`, VLAD only) or divided by the number of regions."""
  counts = [int(c) for c in counts]
  acc = {}
  start = 0
  for c in counts:
    words, sums = _residual_sums(features[start:start + c], codebook, config)
    start += c
    sums = _l2(sums)  # each region's VLAD with _ComputeVlad's default normalisation
    for w, row in zip(words, sums):
      acc[w] = acc[w] + row if w in acc else row
  words = np.array(sorted(acc), np.int64)
  sums = (np.stack([acc[w] for w in words]) if len(words)
          else np.zeros((0, codebook.shape[1]), np.float64))
  if config.aggregation_type == "vlad" and config.l2:
    return words, _l2(sums)
  return words, sums / max(len(counts), 1)


def aggregate(features: np.ndarray, codebook: np.ndarray, config: AggregationConfig,
              num_features_per_region: Optional[Sequence[int]] = None) -> Aggregated:
  """One image's aggregated descriptor (`ExtractAggregatedRepresentation.Extract`).

  Args:
    features: [N, D] local descriptors (for the regional kernels: the regions' features
      one after the other, the whole image's first).
    codebook: [K, D] visual words.
    config: the kernel.
    num_features_per_region: regional kernels only: the regions' feature counts, summing
      to N.
  """
  features = np.asarray(features, np.float32).reshape(-1, np.shape(codebook)[1])
  codebook = np.asarray(codebook, np.float32)
  k, d = codebook.shape
  if k != config.codebook_size:
    raise ValueError(f"the codebook has {k} words, the aggregation config asks for "
                     f"{config.codebook_size}")
  if config.use_regional_aggregation:
    if num_features_per_region is None:
      raise ValueError("regional aggregation needs num_features_per_region")
    if len(num_features_per_region) and sum(num_features_per_region) != len(features):
      raise ValueError(f"num_features_per_region sums to {sum(num_features_per_region)}, "
                       f"there are {len(features)} features")
    words, sums = _regional_sums(features, num_features_per_region, codebook, config)
  else:
    words, sums = _residual_sums(features, codebook, config)
    if config.aggregation_type == "vlad" and config.l2:
      sums = _l2(sums)
  if config.aggregation_type == "vlad":
    return Aggregated("vlad", words, sums.astype(np.float32), d, k)
  norms = np.linalg.norm(sums, axis=1)
  keep = norms > np.sqrt(_NORM_SQUARED_TOLERANCE)
  rows = sums[keep] / np.sqrt(np.maximum(norms[keep] ** 2, _NORM_SQUARED_TOLERANCE))[:, None]
  if config.aggregation_type == "asmk_star":
    rows = np.packbits(rows > 0, axis=1)
  else:
    rows = rows.astype(np.float32)
  return Aggregated(config.aggregation_type, words[keep], rows, d, k)


# -- similarity -------------------------------------------------------------------------------

_POPCOUNT = np.array([bin(n).count("1") for n in range(256)], np.int64)


def _sigma(x: np.ndarray, config: AggregationConfig) -> np.ndarray:
  """ASMK's selectivity: sign(x) |x|^alpha above tau, 0 elsewhere."""
  out = np.zeros_like(x, np.float64)
  above = x > config.tau
  out[above] = np.sign(x[above]) * np.power(np.abs(x[above]), config.alpha)
  return out


def _word_similarities(a_rows, b_rows, kind: str, dim: int) -> np.ndarray:
  """Per shared word: the rows' dot product (ASMK*: 1 - 2 hamming / bits, as the
  reference counts bits: min(D, 8) per packed byte)."""
  if kind == "asmk_star":
    h = _POPCOUNT[np.bitwise_xor(a_rows, b_rows)].sum(1)
    return 1.0 - 2.0 * h / (min(dim, 8) * a_rows.shape[1])
  return np.sum(a_rows.astype(np.float64) * b_rows, axis=1)


def similarity(a: Aggregated, b: Aggregated, config: AggregationConfig) -> float:
  """`SimilarityAggregatedRepresentation.ComputeSimilarity` of two images."""
  if config.aggregation_type == "vlad":
    _, ia, ib = np.intersect1d(a.words, b.words, assume_unique=True, return_indices=True)
    return float(_word_similarities(a.rows[ia], b.rows[ib], "vlad", a.dim).sum())
  if not len(a.words) or not len(b.words):
    return -1.0
  _, ia, ib = np.intersect1d(a.words, b.words, assume_unique=True, return_indices=True)
  total = float(_sigma(_word_similarities(a.rows[ia], b.rows[ib], a.kind, a.dim),
                       config).sum())
  if config.l2:
    total /= np.sqrt(len(a.words) * len(b.words))
  return total


def similarity_matrix(queries: Sequence[Aggregated], database: Sequence[Aggregated],
                      config: AggregationConfig) -> np.ndarray:
  """[Q, N] `similarity` of every query with every database image, via an inverted file
  (per query, only the database rows of its words are touched)."""
  n = len(database)
  scores = np.zeros((len(queries), n), np.float64)
  if n == 0:
    return scores
  counts = np.array([len(x.words) for x in database], np.int64)
  owner = np.repeat(np.arange(n), counts)
  words = np.concatenate([x.words for x in database]) if counts.sum() else np.zeros(0, int)
  width = database[0].rows.shape[1] if database[0].rows.ndim == 2 else 0
  rows = (np.concatenate([x.rows.reshape(-1, width) for x in database]) if counts.sum()
          else np.zeros((0, width), database[0].rows.dtype))
  order = np.argsort(words, kind="stable")
  words, owner, rows = words[order], owner[order], rows[order]
  asmk = config.aggregation_type != "vlad"
  for j, q in enumerate(queries):
    lo = np.searchsorted(words, q.words, "left")
    hi = np.searchsorted(words, q.words, "right")
    lengths = hi - lo
    q_index = np.repeat(np.arange(len(q.words)), lengths)
    db_index = (np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
                + np.arange(int(lengths.sum())))
    sims = _word_similarities(q.rows[q_index], rows[db_index], q.kind, q.dim)
    if asmk:
      sims = _sigma(sims, config)
    np.add.at(scores[j], owner[db_index], sims)
    if asmk:
      if config.l2:
        scores[j] /= np.sqrt(np.maximum(len(q.words) * counts, 1))
      scores[j][counts == 0] = -1.0
      if not len(q.words):
        scores[j] = -1.0
  return scores


# -- codebook ---------------------------------------------------------------------------------


def kmeans(features: np.ndarray, codebook_size: int, iterations: int = 50, seed: int = 0,
           batch_size: int = 4096) -> np.ndarray:
  """[K, D] codebook by Lloyd's k-means (the reference's `cluster_delf_features.py`: TF's
  full-batch KMeans from random data points, 50 iterations); an empty cluster keeps its
  centre."""
  features = np.asarray(features, np.float32)
  if len(features) < codebook_size:
    raise ValueError(f"a codebook of {codebook_size} words needs at least as many "
                     f"features, got {len(features)}")
  rng = np.random.default_rng(seed)
  centres = features[np.sort(rng.choice(len(features), codebook_size, replace=False))]
  for _ in range(int(iterations)):
    nearest = assign(features, centres, 1, batch_size)[:, 0]
    sums = np.zeros(centres.shape, np.float64)
    np.add.at(sums, nearest, features)
    count = np.bincount(nearest, minlength=codebook_size)
    filled = count > 0
    centres = centres.copy()
    centres[filled] = (sums[filled] / count[filled, None]).astype(np.float32)
  return centres


def aggregate_all(records: Sequence[np.ndarray], codebook: np.ndarray,
                  config: AggregationConfig,
                  regions: Optional[Sequence[Sequence[int]]] = None) -> List[Aggregated]:
  """`aggregate` of many images (`regions[i]`: image i's region feature counts)."""
  return [aggregate(f, codebook, config, None if regions is None else regions[i])
          for i, f in enumerate(records)]
