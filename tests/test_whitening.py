"""Whitening and feature selection against direct numpy derivations of the formulas."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.postprocess import whitening

RNG = np.random.default_rng(0)


def canonical_rows(p):
  """Eigenvectors are defined up to sign: make each row's largest-magnitude entry positive."""
  p = np.asarray(p, np.float64)
  signs = np.sign(p[np.arange(p.shape[0]), np.argmax(np.abs(p), axis=1)])
  return p * signs[:, None]


def pairs_data(n_classes=40, per_class=3, d=6, nuisance=3.0):
  """Classes spread in all directions; within-class variation large along two directions."""
  centers = RNG.standard_normal((n_classes, d))
  scale = np.ones(d) * 0.1
  scale[:2] = nuisance
  x = np.concatenate([c + RNG.standard_normal((per_class, d)) * scale for c in centers])
  labels = np.repeat(np.arange(n_classes), per_class)
  qidxs = np.arange(0, len(x), per_class)
  pidxs = qidxs + 1
  return x, labels, qidxs, pidxs


def test_learn_whitening_vs_direct_derivation():
  x, _, qidxs, pidxs = pairs_data()
  m, p = whitening.learn_whitening(x, qidxs, pidxs)
  # Direct, in the reference's column layout X [D, N].
  xt = x.T
  m_ref = xt[:, qidxs].mean(axis=1)
  df = xt[:, qidxs] - xt[:, pidxs]
  s = df @ df.T / len(qidxs)
  l_inv = np.linalg.inv(np.linalg.cholesky(s))
  proj = l_inv @ (xt - m_ref[:, None])
  val, vec = np.linalg.eig(proj @ proj.T)
  order = np.argsort(val.real)[::-1]
  p_ref = vec.real[:, order].T @ l_inv
  np.testing.assert_allclose(m, m_ref, rtol=1e-12)
  np.testing.assert_allclose(canonical_rows(p), canonical_rows(p_ref), rtol=1e-8, atol=1e-10)
  # Whitened pair differences have identity covariance (the first step's purpose).
  wdf = p @ df
  np.testing.assert_allclose(wdf @ wdf.T / len(qidxs), np.eye(6), atol=1e-8)


def test_learned_whitening_brings_matching_pairs_closer():
  x, labels, qidxs, pidxs = pairs_data()
  m, p = whitening.learn_whitening(x, qidxs, pidxs)
  # Held-out pairs (each class's 1st and 3rd image) and random pairs.
  a, b = qidxs, qidxs + 2
  rnd_a = RNG.integers(0, len(x), 500)
  rnd_b = RNG.integers(0, len(x), 500)
  keep = labels[rnd_a] != labels[rnd_b]

  def ratio(y):
    pos = np.linalg.norm(y[a] - y[b], axis=1).mean()
    neg = np.linalg.norm(y[rnd_a[keep]] - y[rnd_b[keep]], axis=1).mean()
    return pos / neg

  before = ratio(x / np.linalg.norm(x, axis=1, keepdims=True))
  after = ratio(whitening.apply_whitening(x, m, p))
  assert after < 0.5 * before, (before, after)
  # PCA whitening (no labels) does not have that effect here.
  m_pca, p_pca = whitening.learn_pca_whitening(x)
  assert ratio(whitening.apply_whitening(x, m_pca, p_pca)) > after


def test_cholesky_regularises_singular_covariance():
  x = RNG.standard_normal((20, 8))
  m, p = whitening.learn_whitening(x, [0, 1, 2], [3, 4, 5])  # 3 pairs, rank-3 S in 8-D
  assert m.shape == (8,) and p.shape == (8, 8) and np.all(np.isfinite(p))


def test_pca_whitening_vs_direct_derivation():
  x = RNG.standard_normal((200, 5)) @ RNG.standard_normal((5, 5)) + 3.0
  m, p = whitening.learn_pca_whitening(x)
  xc = x - x.mean(axis=0)
  cov = xc.T @ xc / len(x)
  val, vec = np.linalg.eig(cov)
  order = np.argsort(val.real)[::-1]
  p_ref = np.diag(1 / np.sqrt(val.real[order])) @ vec.real[:, order].T
  np.testing.assert_allclose(m, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(canonical_rows(p), canonical_rows(p_ref), rtol=1e-8, atol=1e-10)
  y = (x - m) @ p.T
  np.testing.assert_allclose(y.T @ y / len(x), np.eye(5), atol=1e-8)
  # Components come by descending variance.
  assert np.all(np.diff(np.linalg.norm(np.linalg.inv(p), axis=0)) <= 1e-9)


def test_apply_whitening():
  x = RNG.standard_normal((30, 6))
  m, p = whitening.learn_pca_whitening(x)
  full = whitening.apply_whitening(x, m, p)
  np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-6)
  short = whitening.apply_whitening(x, m, p, dim=3)
  assert short.shape == (30, 3)
  y = (x - m) @ p[:3].T
  np.testing.assert_allclose(short, y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6),
                             rtol=1e-12)


def test_whitening_params_make_the_models_whiten_layer_a_learned_whitening():
  x, _, qidxs, pidxs = pairs_data()
  m, p = whitening.learn_whitening(x, qidxs, pidxs)
  params = whitening.whitening_params(m, p, 4)
  assert params["kernel"].shape == (6, 4) and params["bias"].shape == (4,)
  mod = nn.Dense(4)  # RetrievalNet's "whiten" layer
  shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), jnp.zeros((1, 6)))
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == {"kernel": (6, 4), "bias": (4,)}
  out = mod.apply({"params": params}, jnp.asarray(x, jnp.float32))
  ref = (x - m) @ p[:4].T
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  normed = out / (jnp.linalg.norm(out, axis=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(normed, whitening.apply_whitening(x, m, p, 4), atol=1e-5)


def test_pfa_picks_one_feature_per_redundant_group():
  n = 400
  latent = RNG.standard_normal((n, 4)) * np.array([3.0, 2.0, 1.5, 1.0])
  # Ten noisy copies of four latents (the first four features are not one per latent).
  groups = [0, 0, 1, 3, 0, 2, 1, 3, 3, 2]
  x = latent[:, groups] + 0.01 * RNG.standard_normal((n, len(groups)))
  picked = whitening.select_features_pfa(x, 4, seed=0)
  assert len(picked) == 4 and len(set(picked.tolist())) == 4
  assert sorted(groups[i] for i in picked) == [0, 1, 2, 3]


def test_pfa_standardized_handles_scaled_combinations():
  n = 400
  z = RNG.standard_normal((n, 3))
  # Each latent appears at two scales (one with a little noise), which only the correlation
  # matrix sees as redundant.
  groups = [0, 0, 1, 2, 1, 2]
  x = np.column_stack([z[:, 0], 5 * z[:, 0], -2 * z[:, 1] + 0.01 * RNG.standard_normal(n),
                       0.1 * z[:, 2], z[:, 1], z[:, 2]])
  picked = whitening.select_features_pfa(x, 3, standardize=True, seed=1)
  assert sorted(groups[i] for i in picked.tolist()) == [0, 1, 2]
  with pytest.raises(ValueError):
    whitening.select_features_pfa(x, 7)
