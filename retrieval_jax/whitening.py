"""Descriptor post-processing: learned (pairs) and PCA whitening, PFA feature selection.

Layout: here `X` is `[N, D]`, one descriptor per ROW (as everything else in this library).
cnnimageretrieval-pytorch's `cirtorch/utils/whiten.py`, which the learning functions
transcribe, stores descriptors as COLUMNS `[D, N]`; code ported from it must transpose.
The projection `P` keeps the reference's convention: `P @ (x - m)` whitens a column vector,
i.e. `(X - m) @ P.T` for our rows, and `P[:dim]` keeps the `dim` leading components.

The learning functions are numpy, float64 (they run once, offline, on the host). The `Whiten`
Flax head applies a learned whitening inside the network; `whitening_params` converts.
"""
import logging
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models.pooling import kmeans

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


def apply_whitening(x: np.ndarray, m: np.ndarray, p: np.ndarray, dim: Optional[int] = None
                    ) -> np.ndarray:
  """`whitenapply`: `P[:dim] (x - m)` for each row, then L2 normalisation (`/ (norm + 1e-6)`).

  Args:
    x: [N, D] descriptors, one per row.
    m: [D]; p: [D', D] from `learn_whitening` / `learn_pca_whitening`.
    dim: number of leading components to keep (None or 0: all, as the reference's `not dim`).
  Returns:
    [N, dim] float64, rows L2-normalised.
  """
  if not dim:
    dim = p.shape[0]
  y = (np.asarray(x, np.float64) - np.asarray(m, np.float64)) @ np.asarray(p)[:dim].T
  return y / (np.linalg.norm(y, axis=1, keepdims=True) + _APPLY_EPS)


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
  centers, labels = kmeans(rows, num_features, seed=seed, iters=iters)
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


class Whiten(nn.Module):
  """A linear whitening head: [B, D] -> [B, features] (no normalisation; the model adds it).

  Params "kernel" [D, features] and "bias" [features] (as `nn.Dense`), so that
  `whitening_params(m, P, features)` initialises it to a learned whitening.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.asarray(x, jnp.float32)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    # Full float32: on TPU the default matmul precision would round the projection to bf16.
    y = jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y
