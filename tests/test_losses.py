"""Losses vs independent numpy formulas and torch transcriptions of cirtorch's losses."""
import math

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from retrieval_jax import losses


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Transcriptions of cnnimageretrieval-pytorch `cirtorch/layers/functional.py` (x is D x N,
# tuples packed as columns [q, p, n_1, ..., n_k], label -1 for q, 1 for p, 0 for negatives).


def torch_cirtorch_contrastive(x, label, margin=0.7, eps=1e-6):
  dim = x.size(0)
  nq = int(torch.sum(label == -1))
  size = x.size(1) // nq
  x1 = x[:, ::size].permute(1, 0).repeat(1, size - 1).view((size - 1) * nq, dim).permute(1, 0)
  keep = [i for i in range(len(label)) if label[i] != -1]
  x2 = x[:, keep]
  lbl = label[label != -1]
  dist = torch.pow(x1 - x2 + eps, 2).sum(dim=0).sqrt()
  y = 0.5 * lbl * torch.pow(dist, 2) + 0.5 * (1 - lbl) * torch.pow(
      torch.clamp(margin - dist, min=0), 2)
  return torch.sum(y)


def torch_cirtorch_triplet(x, label, margin=0.1):
  dim = x.size(0)
  nq = int(torch.sum(label == -1))
  size = x.size(1) // nq
  xa = x[:, label == -1].permute(1, 0).repeat(1, size - 2).view((size - 2) * nq, dim)
  xp = x[:, label == 1].permute(1, 0).repeat(1, size - 2).view((size - 2) * nq, dim)
  xn = x[:, label == 0]
  dist_pos = torch.sum(torch.pow(xa.permute(1, 0) - xp.permute(1, 0), 2), dim=0)
  dist_neg = torch.sum(torch.pow(xa.permute(1, 0) - xn, 2), dim=0)
  return torch.sum(torch.clamp(dist_pos - dist_neg + margin, min=0))


@pytest.mark.parametrize("seed,num_neg,margin", [(0, 5, 0.7), (1, 1, 0.85), (2, 9, 1.4)])
def test_contrastive_tuple_loss_matches_cirtorch(seed, num_neg, margin):
  rng = np.random.default_rng(seed)
  tup = _unit(rng.normal(size=(num_neg + 2, 32)))
  tup[2] = _unit(tup[0] + 0.03 * rng.normal(size=32))  # one negative inside the margin
  x = torch.tensor(tup.T.copy(), dtype=torch.float64, requires_grad=True)
  label = torch.tensor([-1.0, 1.0] + [0.0] * num_neg, dtype=torch.float64)
  ref = torch_cirtorch_contrastive(x, label, margin)
  ref.backward()

  def fn(t):
    return losses.contrastive_tuple_loss(t[0], t[1], t[2:], margin)

  value, grad = jax.value_and_grad(fn)(jnp.asarray(tup))
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy().T, rtol=1e-4, atol=1e-6)
  assert ref.item() > 0.5 * float(np.sum((tup[0] - tup[1] + 1e-6)**2))  # negatives count


@pytest.mark.parametrize("seed,num_neg", [(0, 5), (3, 2)])
def test_triplet_tuple_loss_matches_cirtorch(seed, num_neg):
  rng = np.random.default_rng(seed)
  tup = _unit(rng.normal(size=(num_neg + 2, 16)))
  x = torch.tensor(tup.T.copy(), dtype=torch.float64, requires_grad=True)
  label = torch.tensor([-1.0, 1.0] + [0.0] * num_neg, dtype=torch.float64)
  ref = torch_cirtorch_triplet(x, label, 0.3)
  ref.backward()
  value, grad = jax.value_and_grad(
      lambda t: losses.triplet_tuple_loss(t[0], t[1], t[2:], 0.3))(jnp.asarray(tup))
  assert ref.item() > 0
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy().T, rtol=1e-4, atol=1e-6)


def test_contrastive_loss_per_pair_numpy():
  rng = np.random.default_rng(4)
  a, o = _unit(rng.normal(size=(40, 8))), _unit(rng.normal(size=(40, 8)))
  o[:10] = _unit(a[:10] + 0.2 * rng.normal(size=(10, 8)))
  y = rng.random(40) < 0.5
  w = rng.random(40).astype(np.float32)
  d = np.sqrt(np.sum((a.astype(np.float64) - o + 1e-6)**2, axis=1))
  expected = np.where(y, 0.5 * d**2, 0.5 * np.maximum(0.8 - d, 0)**2)
  got = losses.contrastive_loss(a, o, y, margin=0.8)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
  assert (expected[~y] > 0).any() and (expected[~y] == 0).any()
  got_w = losses.contrastive_loss(a, o, y, margin=0.8, weights=w)
  np.testing.assert_allclose(np.asarray(got_w), expected * w, rtol=1e-5, atol=1e-7)
  # Identical descriptors: eps keeps the gradient finite.
  g = jax.grad(lambda t: losses.contrastive_loss(t, t, jnp.array([False]), 0.7).sum())(a[:1])
  assert np.isfinite(np.asarray(g)).all()


def test_triplet_loss_numpy():
  rng = np.random.default_rng(5)
  a, p, n = (_unit(rng.normal(size=(50, 8))) for _ in range(3))
  a64, p64, n64 = (v.astype(np.float64) for v in (a, p, n))
  expected = np.maximum(((a64 - p64)**2).sum(1) - ((a64 - n64)**2).sum(1) + 0.1, 0)
  got = losses.triplet_loss(a, p, n, margin=0.1)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  assert (expected == 0).any() and (expected > 0).any()


# ----------------------------------------------------------------------------------------------
# ArcFace / CosFace.


def _numpy_margin_logits(x, w, labels, kind, s, m):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  cos = np.clip(x.astype(np.float64) @ w, -1, 1)
  out = cos.copy()
  for i, c in enumerate(labels):
    theta = math.acos(cos[i, c])
    if kind == "cosface":
      out[i, c] = cos[i, c] - m
    elif theta + m <= math.pi:  # insightface: cos(theta + m) while theta + m stays below pi
      out[i, c] = math.cos(theta + m)
    else:  # ... else the linear fallback cos - sin(pi - m) * m
      out[i, c] = cos[i, c] - math.sin(math.pi - m) * m
  return s * out


@pytest.mark.parametrize("kind,scale,margin", [("arcface", 30.0, 0.5), ("arcface", 45.25, 0.1),
                                               ("cosface", 30.0, 0.35)])
def test_margin_head_logits_numpy(kind, scale, margin):
  rng = np.random.default_rng(6)
  num_classes, dim = 7, 12
  x = rng.normal(size=(10, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, 10).astype(np.int32)
  head = losses.MarginHead(num_classes, scale=scale, margin=margin, kind=kind)
  params = head.init(jax.random.key(0), x, labels)
  w = np.asarray(params["params"]["kernel"])
  assert w.shape == (dim, num_classes)
  # Rows 0 and 1 point away from their class weight: theta + m > pi takes the fallback.
  x[0] = -w[:, labels[0]] * 3.0
  x[1] = -w[:, labels[1]] + 0.05 * rng.normal(size=dim)
  got = head.apply(params, x, labels)
  expected = _numpy_margin_logits(x, w, labels, kind, scale, margin)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
  # Without labels: plain scaled cosines.
  plain = head.apply(params, x)
  np.testing.assert_allclose(np.asarray(plain), _numpy_margin_logits(x, w, labels[:0], kind,
                                                                     scale, margin),
                             rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(got)[np.arange(10), labels] < np.asarray(plain)[np.arange(10),
                                                                             labels])
  grads = jax.grad(lambda p: losses.margin_softmax_loss(head.apply(p, x, labels), labels))(
      params)
  assert np.isfinite(np.asarray(grads["params"]["kernel"])).all()


def test_margin_softmax_loss_numpy():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(6, 9)).astype(np.float32) * 5
  labels = rng.integers(0, 9, 6)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
  expected = np.mean(lse - logits[np.arange(6), labels])
  np.testing.assert_allclose(float(losses.margin_softmax_loss(logits, labels)), expected,
                             rtol=1e-5)


def test_margin_head_default_margins_and_bad_kind():
  x = jnp.ones((2, 4))
  labels = jnp.array([0, 1])
  head = losses.MarginHead(3, kind="cosface")
  params = head.init(jax.random.key(1), x, labels)
  diff = head.apply(params, x) - head.apply(params, x, labels)
  np.testing.assert_allclose(np.asarray(diff)[[0, 1], [0, 1]], 30.0 * 0.35, rtol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    losses.MarginHead(3, kind="sphereface").init(jax.random.key(1), x, labels)


# ----------------------------------------------------------------------------------------------
# Registry.


def test_registry():
  assert set(losses.LOSSES) == {"contrastive", "triplet", "vaccaro_triplet", "arcface",
                                "cosface"}
  assert losses.get_loss("contrastive").fn is losses.contrastive_loss
  assert losses.get_loss("contrastive").default_margin == 0.7
  assert losses.get_loss("vaccaro_triplet").family == "vaccaro"
  assert losses.get_loss("cosface").head_kind == "cosface"
  assert losses.get_loss("arcface").fn is losses.margin_softmax_loss
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("npair")
