"""Local feature matching and geometric verification (DELF / DELG re-ranking's inner step).

Putative matches between a query's and a database image's L2-normalised descriptors:

* "distance" (DELG's): each query descriptor's nearest database descriptor when closer than
  `max_distance` (`image_reranking.MatchFeatures`: a `cKDTree` query with
  `distance_upper_bound`, which keeps distances strictly below it; DELG's
  `delg/perform_retrieval.py` uses 1.0 and no ratio test, Detect-to-Retrieve 0.9, DELF's
  `match_images.py` 0.8);
* "ratio": Lowe's ratio test, d1 < ratio * d2 for the two nearest database descriptors
  (`MatchFeatures(use_ratio_test=True)`: an option of the reference, off in DELG's
  retrieval);
* "mutual_nn": i <-> j nearest neighbours of each other (optionally closer than
  `max_distance`).

Verification fits a transform mapping database locations to query locations by RANSAC
through an established implementation: `skimage.measure.ransac` with `AffineTransform`
(the reference's: 3 samples, 1000 trials, residual threshold 20 px in DELG's retrieval,
10 px in Detect-to-Retrieve's) or `ProjectiveTransform`, or `pydegensac.findHomography`
(DEGENSAC, when installed). The score is the inlier count.

Locations are (y, x) pixels as stored; transforms are returned as 3x3 matrices in (x, y)
image coordinates (column, row), the convention of skimage and OpenCV.
"""
from typing import Dict, Optional, Tuple

import numpy as np

# Optional dependencies (requirements-dev.txt): scikit-image for RANSAC (DELF's choice),
# pydegensac for DEGENSAC homographies. Without them, verification raises an error naming
# the package; everything else of retrieval_jax works.
try:
  from skimage import measure  # pylint: disable=g-import-not-at-top
  from skimage import transform as sk_transform  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - exercised only where scikit-image is missing
  measure = sk_transform = None
try:
  import pydegensac  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - exercised only where pydegensac is missing
  pydegensac = None

MATCHERS = ("mutual_nn", "ratio", "distance")
MODELS = ("affine", "homography")
BACKENDS = ("skimage", "pydegensac")

# DELG's re-ranking defaults (delg/perform_retrieval.py, image_reranking.py).
RANSAC_RESIDUAL_THRESHOLD = 20.0
RANSAC_MAX_TRIALS = 1000
DESCRIPTOR_DISTANCE = 1.0


def putative_matches(query_desc: np.ndarray, db_desc: np.ndarray, *,
                     method: str = "mutual_nn", ratio: float = 0.9,
                     max_distance: Optional[float] = None) -> np.ndarray:
  """Pairs (query index, database index) of putative matches.

  Args:
    query_desc: [n, d] L2-normalised; db_desc: [m, d] L2-normalised.
    method: one of MATCHERS.
    ratio: Lowe's threshold for "ratio".
    max_distance: Euclidean distance bound, exclusive ("distance": required; "mutual_nn":
      optional).
  Returns:
    [k, 2] int64.
  """
  if method not in MATCHERS:
    raise ValueError(f"matching method must be one of {MATCHERS}, got {method!r}")
  n, m = len(query_desc), len(db_desc)
  if n == 0 or m == 0:
    return np.zeros((0, 2), np.int64)
  if query_desc.shape[1] != db_desc.shape[1]:
    raise ValueError(f"descriptor sizes differ: query {query_desc.shape[1]}, "
                     f"database {db_desc.shape[1]}")
  sim = np.asarray(query_desc, np.float32) @ np.asarray(db_desc, np.float32).T  # [n, m]
  # Squared distance of unit vectors: 2 - 2 cos.
  dist = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))
  q = np.arange(n)
  nn_q = np.argmax(sim, axis=1)
  if method == "ratio":
    if m < 2:
      return np.zeros((0, 2), np.int64)
    two = np.argpartition(dist, 1, axis=1)[:, :2]
    d2 = np.sort(np.take_along_axis(dist, two, axis=1), axis=1)
    keep = d2[:, 0] < ratio * d2[:, 1]
    return np.stack([q[keep], nn_q[keep]], axis=1).astype(np.int64)
  keep = np.ones(n, bool)
  if method == "mutual_nn":
    keep &= np.argmax(sim, axis=0)[nn_q] == q
  elif max_distance is None:
    raise ValueError("matching method 'distance' needs max_distance")
  if max_distance is not None:
    keep &= dist[q, nn_q] < max_distance
  return np.stack([q[keep], nn_q[keep]], axis=1).astype(np.int64)


def _xy(locations_yx: np.ndarray) -> np.ndarray:
  return np.asarray(locations_yx, np.float64)[:, ::-1]


def ransac(src_xy: np.ndarray, dst_xy: np.ndarray, *, model: str = "affine",
           backend: str = "skimage", residual_threshold: float = RANSAC_RESIDUAL_THRESHOLD,
           max_trials: int = RANSAC_MAX_TRIALS, stop_probability: float = 1.0, seed: int = 0
           ) -> Tuple[Optional[np.ndarray], np.ndarray]:
  """RANSAC fit of `dst ~ T(src)`: (3x3 matrix or None, inlier mask [k]).

  Args:
    src_xy, dst_xy: [k, 2] matched points, (x, y).
    model: "affine" (3 samples) or "homography" (4 samples).
    backend: "skimage" (`skimage.measure.ransac`) or "pydegensac" (homography only).
    residual_threshold: inlier distance in pixels.
    max_trials: RANSAC iterations.
    stop_probability: skimage stops once a better model is this unlikely (1.0: never, as
      the reference; e.g. 0.999 saves most trials on clear matches); DEGENSAC's confidence.
    seed: RNG seed (both backends: the re-ranked figures repeat).
  """
  if model not in MODELS:
    raise ValueError(f"RANSAC model must be one of {MODELS}, got {model!r}")
  if backend not in BACKENDS:
    raise ValueError(f"RANSAC backend must be one of {BACKENDS}, got {backend!r}")
  k = len(src_xy)
  min_samples = 3 if model == "affine" else 4
  if k <= min_samples:  # the reference returns 0 inliers at <= 3 putative matches
    return None, np.zeros(k, bool)
  if backend == "pydegensac":
    if model != "homography":
      raise ValueError("pydegensac fits homographies (and fundamental matrices) only; use "
                       "backend='skimage' for the affine model")
    if pydegensac is None:
      raise ImportError("backend='pydegensac' needs `pip install pydegensac`; "
                        "backend='skimage' needs nothing more")
    try:
      h, mask = pydegensac.findHomography(np.ascontiguousarray(src_xy, np.float64),
                                          np.ascontiguousarray(dst_xy, np.float64),
                                          float(residual_threshold),
                                          min(float(stop_probability), 0.9999),
                                          int(max_trials), seed=int(seed))
    except np.linalg.LinAlgError:
      # pydegensac inverts its best homography; a singular one (a degenerate sample that
      # won) raised here and stopped a whole evaluation. It verifies nothing.
      return None, np.zeros(k, bool)
    mask = np.asarray(mask, bool).reshape(-1)
    return (None if h is None or not mask.any() else np.asarray(h, np.float64)), mask
  if measure is None:
    raise ImportError("RANSAC with backend='skimage' needs `pip install scikit-image`")
  model_class = (sk_transform.AffineTransform if model == "affine"
                 else sk_transform.ProjectiveTransform)
  # Degenerate (collinear) samples make skimage divide by zero; it rejects those models.
  with np.errstate(divide="ignore", invalid="ignore"):
    fitted, inliers = measure.ransac((np.asarray(src_xy, np.float64),
                                      np.asarray(dst_xy, np.float64)),
                                     model_class, min_samples=min_samples,
                                     residual_threshold=residual_threshold,
                                     max_trials=max_trials,
                                     stop_probability=stop_probability, rng=seed)
  if fitted is None or inliers is None:
    return None, np.zeros(k, bool)
  return np.asarray(fitted.params, np.float64), np.asarray(inliers, bool)


def verify_pair(query: Dict[str, np.ndarray], db: Dict[str, np.ndarray], *,
                matcher: str = "mutual_nn", ratio: float = 0.9,
                max_distance: Optional[float] = None, model: str = "affine",
                backend: str = "skimage",
                residual_threshold: float = RANSAC_RESIDUAL_THRESHOLD,
                max_trials: int = RANSAC_MAX_TRIALS, stop_probability: float = 1.0,
                seed: int = 0, min_matches: int = 0) -> Dict[str, object]:
  """Matches two images' local features and verifies them geometrically.

  Args:
    query, db: records {"locations" [n, 2] (y, x), "descriptors" [n, d]} (store.py).
    matcher, ratio, max_distance: see `putative_matches`.
    model, backend, residual_threshold, max_trials, stop_probability, seed: see `ransac`.
    min_matches: skip RANSAC (0 inliers) below this many putative matches; a caller that
      only asks whether `inliers >= t` passes t (inliers <= matches: same answer, faster).
  Returns:
    {"inliers": int, "matches": [k, 2] putative (query, db) indices, "inlier_mask": [k],
     "transform": 3x3 (x, y) matrix mapping database to query points, or None}.
  """
  matches = putative_matches(query["descriptors"], db["descriptors"], method=matcher,
                             ratio=ratio, max_distance=max_distance)
  if len(matches) == 0 or len(matches) < min_matches:
    return {"inliers": 0, "matches": matches, "inlier_mask": np.zeros(len(matches), bool),
            "transform": None}
  src = _xy(db["locations"][matches[:, 1]])
  dst = _xy(query["locations"][matches[:, 0]])
  t, mask = ransac(src, dst, model=model, backend=backend,
                   residual_threshold=residual_threshold, max_trials=max_trials,
                   stop_probability=stop_probability, seed=seed)
  return {"inliers": int(mask.sum()), "matches": matches, "inlier_mask": mask,
          "transform": t}
