"""Whitening maths: learned (pairs) and PCA whitening, PFA feature selection (numpy).

Layout: here `X` is `[N, D]`, one descriptor per ROW (as everything else in this library).
cnnimageretrieval-pytorch's `cirtorch/utils/whiten.py`, which the learning functions
transcribe, stores descriptors as COLUMNS `[D, N]`; code ported from it must transpose.
The projection `P` keeps the reference's convention: `P @ (x - m)` whitens a column vector,
i.e. `(X - m) @ P.T` for our rows, and `P[:dim]` keeps the `dim` leading components.

The learning functions are numpy, float64 (they run once, offline, on the host).
`learn` / `apply` are what the pipeline calls (with the small-training-set subspace rule);
`whitening_params` turns a whitening into the params of the model's "whiten" Dense layer.
Storing whitenings beside checkpoints: `whitening_store.py`.

Small training sets (`learn`): when the pair differences (learned) or the images (PCA) span
fewer than D dimensions, the covariance is singular and its inverse square root would blow
up directions that carry no data. The whitening is then learned in the subspace they span
(numerical rank r < D), so P is [r, D]; with SfM-120k's ~90k pairs this never triggers.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from retrieval_jax.postprocess import clustering

KINDS = ("learned", "pca", "pfa")
# Eigenvalues below this fraction of the largest count as zero (float32 descriptors).
_RANK_TOL = 1e-9
# whitenapply's row normalisation adds this to the norm.
_APPLY_EPS = 1e-6


def _sorted_eigh(sym: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix.

  The reference calls `np.linalg.eig`; for a symmetric matrix `eigh` gives the same
  decomposition (up to the sign of each eigenvector, which whitening does not care about)
  with real output and better accuracy.
  """
  sym = (sym + sym.T) / 2.0
  eigval, eigvec = np.linalg.eigh(sym)
  order = eigval.argsort()[::-1]
  return eigval[order], eigvec[:, order]


def _cholesky(s: np.ndarray) -> np.ndarray:
  """Cholesky factor, adding 1e-10, 1e-9, ... to the diagonal until S is positive definite.

  As the reference's `cholesky()` (it prints each retry; we log it).
  """
  alpha = 0.0
  while True:
    try:
      return np.linalg.cholesky(s + alpha * np.eye(*s.shape))
    except np.linalg.LinAlgError:
      alpha = 1e-10 if alpha == 0 else alpha * 10
      logging.warning("cholesky: matrix is not positive definite, adding %.0e on the diagonal",
                      alpha)


def learn_whitening(x: np.ndarray, qidxs: Sequence[int], pidxs: Sequence[int]
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Radenović et al.'s supervised whitening from matching pairs (`whitenlearn`, "Lw").

  m is the mean of the query descriptors; the intra-class covariance of the pair
  differences `S = df df^T / n` is whitened by `inv(chol(S))`; then the projected data's
  scatter is rotated to its principal axes (descending variance): `P = V^T inv(chol(S))`.

  Args:
    x: [N, D] descriptors, one per row (the reference's X.T).
    qidxs, pidxs: [n] row indices of the matching pairs (query i matches positive i).
  Returns:
    m [D] float64 and P [D, D] float64 (apply as `P @ (x - m)`, see `apply_whitening`).
  """
  xt = np.asarray(x, np.float64).T  # [D, N], the reference's layout
  qidxs, pidxs = np.asarray(qidxs), np.asarray(pidxs)
  m = xt[:, qidxs].mean(axis=1, keepdims=True)
  df = xt[:, qidxs] - xt[:, pidxs]
  s = df @ df.T / df.shape[1]
  p = np.linalg.inv(_cholesky(s))
  df = p @ (xt - m)
  _, eigvec = _sorted_eigh(df @ df.T)
  return m[:, 0], eigvec.T @ p


def learn_pca_whitening(x: np.ndarray, eps: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """PCA whitening without labels (`pcawhitenlearn`): `P = diag(1/sqrt(eigval)) V^T`.

  Args:
    x: [N, D] descriptors, one per row.
    eps: added to the eigenvalues (0 as the reference; needs N > D, else some eigenvalues
      are 0 and the projection infinite).
  Returns:
    m [D] float64 and P [D, D] float64, components by descending variance.
  """
  xt = np.asarray(x, np.float64).T
  n = xt.shape[1]
  m = xt.mean(axis=1, keepdims=True)
  xc = xt - m
  cov = xc @ xc.T
  cov = (cov + cov.T) / (2 * n)
  eigval, eigvec = _sorted_eigh(cov)
  p = np.diag(1.0 / np.sqrt(eigval + eps)) @ eigvec.T
  return m[:, 0], p


def apply_whitening(x, m, p, dim: Optional[int] = None, *, xp=np, normalize: bool = True):
  """`whitenapply`: `P[:dim] (x - m)` for each row, then L2 normalisation (`/ (norm + 1e-6)`).

  Written once for the extraction (numpy, float64) and the exported function (`xp=jnp`,
  float32 in the graph; the caller sets the matmul precision).

  Args:
    x: [N, D] descriptors, one per row.
    m: [D]; p: [D', D] from `learn_whitening` / `learn_pca_whitening`.
    dim: number of leading components to keep (None or 0: all, as the reference's `not dim`).
    xp: numpy or jax.numpy.
    normalize: L2-normalise the rows (the reference always does).
  Returns:
    [N, dim] (float64 with numpy), rows L2-normalised.
  """
  if not dim:
    dim = p.shape[0]
  if xp is np:
    x, m, p = np.asarray(x, np.float64), np.asarray(m, np.float64), np.asarray(p)
  y = (x - m) @ p[:dim].T
  if not normalize:
    return y
  return y / (xp.linalg.norm(y, axis=-1, keepdims=True) + _APPLY_EPS)


def select_features_pfa(x: np.ndarray, num_features: int, q: Optional[int] = None, seed: int = 0,
                        standardize: bool = False, iters: int = 100) -> np.ndarray:
  """Principal Feature Analysis (Lu et al., 2007), the selection of Seddati et al.

  Covariance of the features, its eigenvectors by descending eigenvalue, `A_q` [D, q] the
  first q of them; row i of `A_q` describes feature i. k-means groups the rows into
  `num_features` clusters, and each cluster contributes the feature whose row is nearest to
  its centre: redundant (correlated) features share a cluster and only one is kept.

  Args:
    x: [N, D] descriptors, one per row.
    num_features: p, how many features to keep (<= D).
    q: retained principal components; Lu et al. choose it from the variability to keep and
      ask q <= p; default p (Seddati et al. do not give theirs).
    seed: k-means seed.
    standardize: use the correlation matrix (features scaled to unit variance), which Lu et
      al. recommend when the features' scales differ.
    iters: k-means iterations.
  Returns:
    int64 [num_features] selected feature indices, sorted ascending.
  """
  x = np.asarray(x, np.float64)
  d = x.shape[1]
  if not 0 < num_features <= d:
    raise ValueError(f"select_features_pfa: num_features={num_features} for {d} features")
  q = min(num_features if q is None else q, d)
  xc = x - x.mean(axis=0)
  if standardize:
    xc = xc / np.maximum(xc.std(axis=0), 1e-12)
  cov = xc.T @ xc / max(x.shape[0] - 1, 1)
  _, eigvec = _sorted_eigh(cov)
  rows = eigvec[:, :q]  # [D, q]: A_q, one row per feature
  centers, labels = clustering.kmeans(rows, num_features, seed=seed, iters=iters)
  chosen = []
  for j in range(num_features):
    members = np.flatnonzero(labels == j)
    if members.size == 0:
      continue
    dist = np.linalg.norm(rows[members] - centers[j], axis=1)
    chosen.append(int(members[np.argmin(dist)]))
  if len(chosen) < num_features:
    # Degenerate data (identical rows) can leave clusters empty: fill with unused features.
    rest = [i for i in range(d) if i not in set(chosen)]
    chosen += rest[:num_features - len(chosen)]
  return np.sort(np.asarray(chosen, np.int64))


def whitening_params(m: np.ndarray, p: np.ndarray, dim: Optional[int] = None
                     ) -> Dict[str, np.ndarray]:
  """`Whiten` (or `nn.Dense`) params equal to a learned whitening, before normalisation.

  `x @ kernel + bias == P[:dim] (x - m)` with `kernel = P[:dim].T`, `bias = -P[:dim] m`.

  Returns:
    {"kernel": [D, dim] float32, "bias": [dim] float32}.
  """
  if not dim:
    dim = p.shape[0]
  proj = np.asarray(p, np.float64)[:dim]
  return {"kernel": proj.T.astype(np.float32),
          "bias": (-(proj @ np.asarray(m, np.float64))).astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# What the pipeline learns and applies (small training sets: in the subspace the data span).


def _subspace(cov: np.ndarray) -> np.ndarray:
  """[D, r] orthonormal basis of the range of a PSD matrix (eigenvalues > tol * max)."""
  eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
  order = eigval.argsort()[::-1]
  eigval, eigvec = eigval[order], eigvec[:, order]
  r = int(np.sum(eigval > _RANK_TOL * max(eigval[0], 1e-300)))
  return eigvec[:, :max(r, 1)]


def learn(x: np.ndarray, kind: str, qidxs: Optional[Sequence[int]] = None,
          pidxs: Optional[Sequence[int]] = None, pca_dim: int = 0, num_features: int = 0
          ) -> Tuple[np.ndarray, np.ndarray]:
  """m [D] and P [r, D] (r <= D, see the module docstring) from descriptors x [N, D].

  Args:
    x: [N, D] descriptors, one per row.
    kind: "learned" (needs qidxs / pidxs, row indices of matching pairs), "pca", or "pfa"
      (Seddati et al.'s PFA feature selection, `select_features_pfa`, as a projection:
      m = 0 and P the selected rows of the identity, so applying it keeps those features
      and L2-normalises them).
    pca_dim: "learned" only: learn it on the `pca_dim` leading principal components of x
      (a regulariser for small training sets; 0: on everything the pairs span).
    num_features: "pfa" only: how many features to keep (> 0).
  Returns:
    (m, P) float64, to apply as `P[:dim] (x - m)`; rows of P by decreasing importance.
  """
  x = np.asarray(x, np.float64)
  if kind == "learned":
    q, p = np.asarray(qidxs), np.asarray(pidxs)
    if pca_dim and pca_dim < x.shape[1]:
      xc = x - x.mean(axis=0)
      eigval, eigvec = np.linalg.eigh(xc.T @ xc)
      basis = eigvec[:, np.argsort(eigval)[::-1][:pca_dim]]
      logging.info("learned whitening on the %d leading principal components", pca_dim)
    else:
      df = x[q] - x[p]
      basis = _subspace(df.T @ df / len(df))  # [D, r]
      if basis.shape[1] == x.shape[1]:
        return learn_whitening(x, q, p)
      logging.info("learned whitening: the %d pairs span %d of %d dimensions; learning it "
                   "there", len(q), basis.shape[1], x.shape[1])
    # Learned on the projected rows y = x B (m_y = B^T m, the projected query mean):
    # P_y (y - m_y) = P_y B^T (x - m), so P = P_y B^T with m the query mean itself.
    _, p_y = learn_whitening(x @ basis, q, p)
    return x[q].mean(axis=0), p_y @ basis.T
  if kind == "pca":
    xc = x - x.mean(axis=0)
    basis = _subspace(xc.T @ xc / len(x))
    r = basis.shape[1]
    if r < x.shape[1]:
      logging.info("PCA whitening: %d images span %d of %d dimensions; keeping those", len(x),
                   r, x.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
      m, proj = learn_pca_whitening(x)
    return m, proj[:r]
  if kind == "pfa":
    if not 0 < num_features <= x.shape[1]:
      raise ValueError(f"PFA feature selection keeps eval.whitening_dim features: set it in "
                       f"(0, {x.shape[1]}], got {num_features}")
    chosen = select_features_pfa(x, num_features)
    return np.zeros(x.shape[1]), np.eye(x.shape[1])[chosen]
  raise ValueError(f"whitening kind must be one of {KINDS}, got {kind!r}")


def apply(x: np.ndarray, w: Dict[str, Any], dim: int = 0) -> np.ndarray:
  """Whitened descriptors [N, min(dim, r)] float32, rows L2-normalised."""
  m, proj = np.asarray(w["m"]), np.asarray(w["P"])
  if dim and dim > proj.shape[0]:
    logging.warning("whitening_dim %d > the %d learned components; keeping %d", dim,
                    proj.shape[0], proj.shape[0])
  return apply_whitening(x, m, proj, dim or None).astype(np.float32)


