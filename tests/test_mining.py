"""Mining vs loop-based references: in-step (8 fake devices), Vaccaro Algorithm 1, epoch-level.

The multi-device tests need `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before
jax is imported (tests/conftest.py does it).
"""
import ml_collections
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from retrieval_jax import losses
from retrieval_jax.mining import collectives
from retrieval_jax.mining import epoch
from retrieval_jax.mining import in_batch
from retrieval_jax.mining import vaccaro
from retrieval_jax.train import step

EPS = 1e-6
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _mesh(axis_type=AxisType.Explicit):
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def _shard(mesh, *arrays):
  return [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in arrays]


def in_batch_mined_indices(descriptors, labels, *, mesh, num_negatives):
  """The selection `in_batch_mined_loss` makes, run the way the loss runs it (sharded).

  Returns global-index arrays sharded along "data": `neg_idx` [B, k] (most similar first),
  `neg_valid` [B, k], `hardest_pos` [B], `has_pos` [B].
  """

  def body(desc, lab, *, axis_name):
    desc = desc.astype(jnp.float32)
    sel = in_batch.select_in_batch(desc, lab, collectives.gather(desc, axis_name),
                                   collectives.gather(lab, axis_name),
                                   collectives.global_offset(desc.shape[0], axis_name),
                                   num_negatives)
    del sel["pos_mask"]
    return sel

  specs = {k: P("data") for k in ("neg_idx", "neg_valid", "hardest_pos", "has_pos")}
  return collectives.run_sharded(body, mesh, "data" if mesh is not None else None,
                                 (descriptors, labels), out_specs=specs)


# ----------------------------------------------------------------------------------------------
# In-step mining.

B, D, LOCAL = 32, 16, 4  # 8 devices x 4 rows
# For each anchor on device 0 (rows 0..3), a near-duplicate with another label on devices
# 1, 3, 5, 7: its hardest negative lives on another device.
PLANTED = {0: 5, 1: 13, 2: 21, 3: 29}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D))
  labels = (np.arange(B) % 8).astype(np.int32)  # each class spread over 4 devices
  labels[31] = 99  # an anchor without positives
  for a, j in PLANTED.items():
    x[j] = x[a] / np.linalg.norm(x[a]) + 0.15 * rng.normal(size=D)
  return _unit(x), labels


def _reference_selection(x, labels, k):
  """Loop transcription of the mining: (negatives per anchor, positives per anchor)."""
  x = x.astype(np.float64)
  sim = x @ x.T
  negs, poss, hardest = [], [], []
  for i in range(len(x)):
    cand = [j for j in range(len(x)) if labels[j] != labels[i]]
    cand.sort(key=lambda j: -sim[i, j])
    negs.append(cand[:k])
    pos = [j for j in range(len(x)) if j != i and labels[j] == labels[i]]
    poss.append(pos)
    hardest.append([min(pos, key=lambda j: sim[i, j])] if pos else [])
  return negs, poss, hardest


def _reference_loss_np(x, labels, *, loss_name, margin, num_negatives, positives,
                       reduction):
  """float64 numpy loss and metrics from the loop selection."""
  x = x.astype(np.float64)
  negs, alls, hardest = _reference_selection(x, labels, num_negatives)
  poss = alls if positives == "all" else hardest
  total, pos_d, neg_d, active, active_den = 0.0, [], [], 0, 0
  for i in range(len(x)):
    for n in negs[i]:
      neg_d.append(np.sqrt(np.sum((x[i] - x[n] + (EPS if loss_name == "contrastive" else 0))**2)))
    if loss_name == "contrastive":
      for p in poss[i]:
        total += 0.5 * np.sum((x[i] - x[p] + EPS)**2)
        pos_d.append(np.sqrt(np.sum((x[i] - x[p] + EPS)**2)))
      for n in negs[i]:
        d = np.sqrt(np.sum((x[i] - x[n] + EPS)**2))
        total += 0.5 * max(0.0, margin - d)**2
        active += d < margin
        active_den += 1
    else:
      for p in poss[i]:
        pos_d.append(np.linalg.norm(x[i] - x[p]))
        for n in negs[i]:
          h = np.sum((x[i] - x[p])**2) - np.sum((x[i] - x[n])**2) + margin
          total += max(0.0, h)
          active += h > 0
          active_den += 1
  if reduction == "mean":
    total /= len(x)
  metrics = {"mean_pos_dist": np.mean(pos_d), "mean_neg_dist": np.mean(neg_d),
             "active_fraction": active / active_den}
  return total, metrics


def _reference_loss_jax(x, labels, *, loss_name, margin, num_negatives, positives,
                        reduction):
  """Plain single-device jax loss on the fixed reference selection (for gradients)."""
  negs, alls, hardest = _reference_selection(np.asarray(x), labels, num_negatives)
  poss = alls if positives == "all" else hardest
  if loss_name == "contrastive":
    ai = [i for i in range(B) for _ in poss[i]] + [i for i in range(B) for _ in negs[i]]
    oi = [p for i in range(B) for p in poss[i]] + [n for i in range(B) for n in negs[i]]
    y = np.array([1.0] * sum(map(len, poss)) + [0.0] * sum(map(len, negs)), np.float32)

    def fn(x):
      d2 = jnp.sum((x[np.array(ai)] - x[np.array(oi)] + EPS)**2, axis=1)
      d = jnp.sqrt(d2)
      per_pair = 0.5 * y * d2 + 0.5 * (1 - y) * jnp.maximum(margin - d, 0.0)**2
      return jnp.sum(per_pair) / (B if reduction == "mean" else 1)
  else:
    trip = np.array([(i, p, n) for i in range(B) for p in poss[i] for n in negs[i]])

    def fn(x):
      a, p, n = x[trip[:, 0]], x[trip[:, 1]], x[trip[:, 2]]
      h = jnp.sum((a - p)**2, 1) - jnp.sum((a - n)**2, 1) + margin
      return jnp.sum(jnp.maximum(h, 0.0)) / (B if reduction == "mean" else 1)
  return fn


CASES = [("contrastive", "all", "sum", 1.2), ("contrastive", "hardest", "mean", 1.2),
         ("triplet", "all", "sum", 0.1), ("triplet", "hardest", "sum", 0.5)]


@needs_8_devices
def test_hardest_negatives_of_device0_live_on_other_devices():
  mesh = _mesh()
  x, labels = _batch()
  sel = in_batch_mined_indices(*_shard(mesh, x, labels), mesh=mesh, num_negatives=3)
  neg_idx = np.asarray(sel["neg_idx"])
  ref_negs, _, ref_hardest = _reference_selection(x, labels, 3)
  np.testing.assert_array_equal(neg_idx, np.array(ref_negs))
  for a, j in PLANTED.items():
    assert neg_idx[a, 0] == j
    assert neg_idx[a, 0] // LOCAL != 0  # chosen across a device boundary
  np.testing.assert_array_equal(np.asarray(sel["hardest_pos"])[:31],
                                [h[0] for h in ref_hardest[:31]])
  assert not bool(np.asarray(sel["has_pos"])[31])
  assert np.asarray(sel["neg_valid"]).all()


@needs_8_devices
@pytest.mark.parametrize("loss_name,positives,reduction,margin", CASES)
def test_mined_loss_and_grad_on_8_devices_match_reference(loss_name, positives, reduction,
                                                          margin):
  mesh = _mesh()
  x, labels = _batch()
  xs, ls = _shard(mesh, x, labels)
  kw = dict(loss_name=loss_name, margin=margin, num_negatives=3, positives=positives,
            reduction=reduction)

  loss_fn = jax.jit(lambda d, l: in_batch.in_batch_mined_loss(d, l, mesh=mesh, **kw))
  loss, metrics = loss_fn(xs, ls)
  ref_loss, ref_metrics = _reference_loss_np(x, labels, **kw)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(metrics["frac_anchors_with_positives"]), 31 / 32)

  grad = jax.jit(jax.grad(lambda d: in_batch.in_batch_mined_loss(d, ls, mesh=mesh, **kw)[0]))(xs)
  assert grad.sharding.spec[0] == "data"  # gradients stay with the rows' owners
  ref_grad = jax.grad(_reference_loss_jax(x, labels, **kw))(jnp.asarray(x))
  # The planted negatives (devices 1, 3, 5, 7) receive gradient from device 0's anchors,
  # through the transpose of all_gather.
  if loss_name == "contrastive":
    assert np.abs(np.asarray(ref_grad)[list(PLANTED.values())]).min() > 0
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=2e-6)

  # No mesh: same numbers.
  loss0, metrics0 = in_batch.in_batch_mined_loss(jnp.asarray(x), jnp.asarray(labels), mesh=None,
                                               **kw)
  np.testing.assert_allclose(float(loss0), float(loss), rtol=1e-6)
  for name in metrics:
    np.testing.assert_allclose(float(metrics0[name]), float(metrics[name]), rtol=1e-6)


@needs_8_devices
def test_auto_axis_mesh_and_one_device_mesh_agree():
  x, labels = _batch(1)
  kw = dict(loss_name="contrastive", margin=0.9, num_negatives=4)
  ref, _ = _reference_loss_np(x, labels, positives="all", reduction="sum", **kw)
  mesh = _mesh(AxisType.Auto)
  loss, _ = jax.jit(lambda d, l: in_batch.in_batch_mined_loss(d, l, mesh=mesh, **kw))(
      *_shard(mesh, x, labels))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  loss1, _ = jax.jit(lambda d, l: in_batch.in_batch_mined_loss(d, l, mesh=mesh1, **kw))(
      x, labels)
  np.testing.assert_allclose(float(loss1), ref, rtol=1e-5)


@needs_8_devices
def test_batch_axis_named_by_the_config():
  """A mesh whose batch axis is not called "data" (config.mesh.axes) mines the same loss."""
  x, labels = _batch(1)
  kw = dict(loss_name="contrastive", margin=0.9, num_negatives=4)
  ref, _ = _reference_loss_np(x, labels, positives="all", reduction="sum", **kw)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  placed = [jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, labels)]
  loss, _ = jax.jit(lambda d, l: in_batch.in_batch_mined_loss(d, l, mesh=mesh, **kw))(*placed)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_fewer_negatives_than_requested_are_skipped():
  rng = np.random.default_rng(3)
  x = _unit(rng.normal(size=(8, 6)))
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int32)  # class 0 anchors: 2 negatives only
  loss, metrics = in_batch.in_batch_mined_loss(x, labels, mesh=None, margin=2.5, num_negatives=4)
  sel = in_batch_mined_indices(x, labels, mesh=None, num_negatives=4)
  np.testing.assert_array_equal(np.asarray(sel["neg_valid"]).sum(1), [2] * 6 + [4] * 2)
  ref_loss, ref_metrics = _reference_loss_np(x, labels, loss_name="contrastive", margin=2.5,
                                             num_negatives=4, positives="all", reduction="sum")
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["active_fraction"]), 1.0)


def test_bad_arguments_raise():
  x, labels = _batch()
  with pytest.raises(ValueError, match="loss_name"):
    in_batch.in_batch_mined_loss(x, labels, mesh=None, loss_name="arcface")
  with pytest.raises(ValueError, match="num_negatives"):
    in_batch.in_batch_mined_loss(x, labels, mesh=None, num_negatives=B + 1)
  with pytest.raises(ValueError, match="positives"):
    in_batch.in_batch_mined_loss(x, labels, mesh=None, positives="random")


def test_loss_family_dispatch():
  """The train step's one family dispatch reaches the mined losses with config.loss's fields."""
  x, labels = _batch()
  direct, _ = in_batch.in_batch_mined_loss(x, labels, mesh=None, loss_name="triplet", margin=0.1)
  loss_config = ml_collections.ConfigDict(dict(name="triplet", margin=0.1, num_negatives=5,
                                               positives="all", reduction="sum"))
  via, _ = step.FAMILY_LOSSES.get(losses.get_loss("triplet").family)(
      x, labels, loss_config=loss_config, mesh=None, head=None, head_params=None, rng=None)
  np.testing.assert_allclose(float(via), float(direct))
  assert set(step.FAMILY_LOSSES) == set(losses.FAMILIES)
  with pytest.raises(ValueError, match="loss family"):
    step.FAMILY_LOSSES.get("npair")


# ----------------------------------------------------------------------------------------------
# Vaccaro et al., Algorithm 1.


def _vaccaro_reference(x, labels, *, t, coins, mode, one_per_class=True):
  """Direct transcription of Algorithm 1 (1-based j, the query first in its k-NN list).

  Returns {query: (positive, negative, case)}.
  """
  x = x.astype(np.float64)
  n_img = len(x)
  out = {}
  for i in range(n_img):
    dist = np.sum((x - x[i])**2, axis=1)
    dist[i] = -np.inf  # the query is its own first neighbour
    indices = np.argsort(dist, kind="stable")
    coin = {"mixed": coins[i], "semi-hard": True, "hard": False}[mode]
    p = n = None
    for j in range(1, n_img + 1):
      label_j = labels[indices[j - 1]]
      if label_j != labels[i] and n is None:
        n = j
        if j > 2 and coin:
          p = j - 1
          # Line 16's `break` would skip line 21; the text says this is a semi-hard triplet.
          out[i] = (indices[p - 1], indices[n - 1], "A")
          break
      elif label_j == labels[i] and n is not None:
        p = j
      if p is not None and n is not None and p - n < t:
        if mode != "semi-hard":
          out[i] = (indices[p - 1], indices[n - 1], "B")
        break
  if one_per_class:  # line 28: the first triplet of each class
    seen, kept = set(), {}
    for i in sorted(out):
      if labels[i] not in seen:
        seen.add(labels[i])
        kept[i] = out[i]
    out = kept
  return out


def _vaccaro_batch(seed=0, n=48, dim=8, classes=6):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % classes).astype(np.int32)
  centres = rng.normal(size=(classes, dim))
  x = _unit(0.6 * centres[labels] + rng.normal(size=(n, dim)))
  coins = rng.random(n) < 0.5
  return x, labels, coins


def _as_dict(result):
  trip = np.asarray(result["triplets"])
  valid = np.asarray(result["valid"])
  semi = np.asarray(result["semi_hard"])
  return {int(q): (int(p), int(n), "A" if s else "B")
          for (q, p, n), v, s in zip(trip, valid, semi) if v}


@pytest.mark.parametrize("mode", ["mixed", "semi-hard", "hard"])
def test_vaccaro_triplets_match_algorithm1(mode):
  x, labels, coins = _vaccaro_batch()
  t = 4
  raw = _vaccaro_reference(x, labels, t=t, coins=coins, mode=mode, one_per_class=False)
  got_raw = vaccaro.vaccaro_triplets(x, labels, t=t, mode=mode, coins=coins, one_per_class=False)
  assert _as_dict(got_raw) == raw
  kept = _vaccaro_reference(x, labels, t=t, coins=coins, mode=mode)
  got = vaccaro.vaccaro_triplets(x, labels, t=t, mode=mode, coins=coins)
  assert _as_dict(got) == kept
  assert len({labels[q] for q in kept}) == len(kept)  # one per class
  # Semi-hard: positive ranked just before the negative; hard: the negative is closer.
  for q, (p, n, case) in raw.items():
    dp, dn = np.sum((x[q] - x[p])**2), np.sum((x[q] - x[n])**2)
    assert labels[p] == labels[q] != labels[n]
    assert (dp <= dn) if case == "A" else (dp > dn)
  if mode == "mixed":
    # The data exercise every branch: A, B, and discarded extremely hard triplets (C).
    cases = [c for _, _, c in raw.values()]
    assert "A" in cases and "B" in cases
    no_threshold = _vaccaro_reference(x, labels, t=len(x), coins=coins, mode=mode,
                                      one_per_class=False)
    assert len(raw) < len(no_threshold)  # t discarded some extremely hard triplets


def test_vaccaro_mixed_needs_rng_and_coins_follow_it():
  x, labels, _ = _vaccaro_batch(1)
  with pytest.raises(ValueError, match="rng"):
    vaccaro.vaccaro_triplets(x, labels, t=3)
  key = jax.random.key(7)
  coins = np.asarray(jax.random.bernoulli(key, 0.5, (len(x),)))
  a = vaccaro.vaccaro_triplets(x, labels, t=3, rng=key)
  assert _as_dict(a) == _vaccaro_reference(x, labels, t=3, coins=coins, mode="mixed")


@needs_8_devices
def test_vaccaro_loss_on_8_devices_matches_reference():
  x, labels, coins = _vaccaro_batch(2)  # 48 = 8 x 6
  t, margin = 5, 0.3
  kept = _vaccaro_reference(x, labels, t=t, coins=coins, mode="mixed")
  trip = np.array([(q, p, n) for q, (p, n, _) in sorted(kept.items())])
  assert len(np.unique(trip // 6, axis=0)) > 1 and (trip[:, 1] // 6 != trip[:, 0] // 6).any()

  def ref_fn(d):
    a, p, n = d[trip[:, 0]], d[trip[:, 1]], d[trip[:, 2]]
    h = jnp.sum((a - p)**2, 1) - jnp.sum((a - n)**2, 1) + margin
    return jnp.mean(jnp.maximum(h, 0.0))

  mesh = _mesh()
  xs, ls = _shard(mesh, x, labels)
  fn = lambda d: vaccaro.vaccaro_triplet_loss(d, ls, mesh=mesh, margin=margin, t=t,
                                             coins=coins)
  loss, metrics = jax.jit(fn)(xs)
  np.testing.assert_allclose(float(loss), float(ref_fn(jnp.asarray(x))), rtol=1e-5)
  assert int(metrics["num_triplets"]) == len(kept)
  np.testing.assert_allclose(float(metrics["semi_hard_fraction"]),
                             np.mean([c == "A" for _, _, c in kept.values()]))
  grad = jax.jit(jax.grad(lambda d: fn(d)[0]))(xs)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(ref_fn)(jnp.asarray(x))),
                             rtol=1e-5, atol=2e-6)
  loss0, _ = vaccaro.vaccaro_triplet_loss(x, labels, mesh=None, margin=margin, t=t, coins=coins)
  np.testing.assert_allclose(float(loss0), float(loss), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Epoch-level mining.


def _epoch_reference(qvecs, poolvecs, qclusters, pclusters, nnum):
  """Loop of cirtorch's create_epoch_tuples (ties: lower pool index first)."""
  scores = qvecs.astype(np.float64) @ poolvecs.astype(np.float64).T
  out = []
  for q in range(len(qvecs)):
    ranks = sorted(range(len(poolvecs)), key=lambda r: (-scores[q, r], r))
    clusters, nidxs, r = [qclusters[q]], [], 0
    while len(nidxs) < nnum and r < len(ranks):
      potential = ranks[r]
      if pclusters[potential] not in clusters:
        nidxs.append(potential)
        clusters.append(pclusters[potential])
      r += 1
    out.append(nidxs + [-1] * (nnum - len(nidxs)))
  return np.array(out)


def _epoch_data(seed=0, nq=20, npool=300, dim=12, nclusters=40):
  rng = np.random.default_rng(seed)
  pool_clusters = rng.integers(0, nclusters, npool)
  centres = rng.normal(size=(nclusters, dim))
  pool = _unit(centres[pool_clusters] + 0.7 * rng.normal(size=(npool, dim)))
  query_clusters = rng.integers(0, nclusters, nq)
  queries = _unit(centres[query_clusters] + 0.7 * rng.normal(size=(nq, dim)))
  return queries, pool, query_clusters, pool_clusters


@pytest.mark.parametrize("use_jax", [False, True])
def test_epoch_negatives_match_brute_force(use_jax):
  q, pool, qc, pc = _epoch_data()
  got = epoch.mine_epoch_negatives(q, pool, qc, pc, num_negatives=5, use_jax=use_jax,
                                    chunk_size=7)
  np.testing.assert_array_equal(got, _epoch_reference(q, pool, qc, pc, 5))
  scores = q @ pool.T
  for i, row in enumerate(got):
    assert qc[i] not in pc[row]  # never the query's cluster
    assert len(set(pc[row])) == len(row)  # at most one per cluster
    assert (np.diff(scores[i, row]) <= 0).all()  # hardest first
    # Nothing admissible skipped: every pool image more similar than the last negative is
    # either in the query's cluster or in the cluster of an earlier chosen negative.
    better = np.nonzero(scores[i] > scores[i, row[-1]])[0]
    assert all(pc[j] == qc[i] or j in row or pc[j] in pc[row] for j in better)


def test_epoch_negatives_many_and_bounded_search():
  q, pool, qc, pc = _epoch_data(1, nclusters=12)
  # 10 of the 11 other clusters: the candidate list must grow past its first size.
  got = epoch.mine_epoch_negatives(q, pool, qc, pc, num_negatives=10)
  np.testing.assert_array_equal(got, _epoch_reference(q, pool, qc, pc, 10))
  # More negatives than admissible clusters: padded with -1.
  got = epoch.mine_epoch_negatives(q, pool, qc, pc, num_negatives=13)
  np.testing.assert_array_equal(got, _epoch_reference(q, pool, qc, pc, 13))
  assert (got[:, 11:] == -1).all() and (got[:, :11] >= 0).all()
  # A bounded search looks only at the pool_topk most similar images.
  got = epoch.mine_epoch_negatives(q, pool, qc, pc, num_negatives=5, pool_topk=6)
  scores = q @ pool.T
  top6 = np.argsort(-scores, axis=1, kind="stable")[:, :6]
  for i, row in enumerate(got):
    assert set(row[row >= 0]) <= set(top6[i])
  expected = []
  for i in range(len(q)):
    sub = _epoch_reference(q[i:i + 1], pool[top6[i]], qc[i:i + 1], pc[top6[i]], 5)[0]
    expected.append([top6[i][j] if j >= 0 else -1 for j in sub])
  np.testing.assert_array_equal(got, expected)
