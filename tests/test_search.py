"""Tests for retrieval_jax.search: exact k-NN, sharded over fake CPU devices.

The suite's conftest sets `--xla_force_host_platform_device_count=8` before jax is
imported; the sharded tests skip where fewer than 2 devices exist.
"""
import jax
import numpy as np
import pytest

from retrieval_jax import knn


def _data(seed, nq, nd, d):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(nq, d)).astype(np.float32)
  db = rng.normal(size=(nd, d)).astype(np.float32)
  return q, db


def _brute_force(q, db, k):
  sim = q.astype(np.float64) @ db.T.astype(np.float64)
  idx = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(sim, idx, axis=1), idx


def _mesh(n, axes=('data',), shape=None):
  if jax.device_count() < n:
    pytest.skip(f'needs {n} devices, has {jax.device_count()}')
  shape = shape or (n,)
  return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Explicit,) * len(axes),
                       devices=jax.devices()[:n])


def test_knn_matches_brute_force_with_ragged_batches():
  q, db = _data(0, 25, 57, 12)
  s, i = knn.knn(q, db, 6, query_batch=10)  # Batches 10, 10, 5 (padded to 10).
  ref_s, ref_i = _brute_force(q, db, 6)
  assert s.shape == (25, 6) and i.shape == (25, 6) and i.dtype == np.int32
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)


def test_knn_compiles_once_for_all_batches():
  q, db = _data(1, 25, 40, 13)  # A dimension no other test uses: a fresh cache entry.
  before = knn._topk_block._cache_size()
  knn.knn(q, db, 3, query_batch=10)
  knn.knn(q[:7], db, 3, query_batch=10)  # Fewer queries than a batch: batch = 7.
  assert knn._topk_block._cache_size() - before == 2


@pytest.mark.parametrize('n_dev,nd,k', [(8, 101, 7), (8, 21, 10), (2, 9, 9), (8, 64, 1)])
def test_sharded_knn_matches_brute_force(n_dev, nd, k):
  # nd=21 on 8 devices: 3 rows per shard (3 padded), k=10 > rows per shard.
  mesh = _mesh(n_dev)
  q, db = _data(2, 19, nd, 16)
  s, i = knn.knn(q, db, k, mesh=mesh, query_batch=8)
  ref_s, ref_i = _brute_force(q, db, k)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
  assert np.all(i < nd)  # Padding rows never returned.


def test_sharded_knn_on_2d_mesh():
  mesh = _mesh(8, axes=('data', 'model'), shape=(4, 2))
  q, db = _data(3, 11, 30, 8)
  _, i = knn.knn(q, db, 5, mesh=mesh)
  np.testing.assert_array_equal(i, _brute_force(q, db, 5)[1])


def test_sharded_knn_on_a_mesh_whose_batch_axis_has_another_name():
  """config.mesh.axes names the batch axis; search shards over it, whatever its name."""
  mesh = _mesh(8, axes=('batch',), shape=(8,))
  q, db = _data(4, 5, 27, 8)
  _, i = knn.knn(q, db, 4, mesh=mesh)
  np.testing.assert_array_equal(i, _brute_force(q, db, 4)[1])


def test_ties_prefer_lower_index_also_when_sharded():
  db = np.zeros((16, 4), np.float32)
  db[:, 0] = 1.  # All rows identical: every shard ties with every other.
  q = np.array([[1., 0., 0., 0.]], np.float32)
  _, i = knn.knn(q, db, 5)
  np.testing.assert_array_equal(i[0], [0, 1, 2, 3, 4])
  if jax.device_count() >= 8:
    _, i = knn.knn(q, db, 5, mesh=_mesh(8))
    np.testing.assert_array_equal(i[0], [0, 1, 2, 3, 4])


def test_bfloat16_close_to_float32():
  rng = np.random.default_rng(4)
  db = rng.normal(size=(50, 64)).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q = db[:10] + .05 * rng.normal(size=(10, 64)).astype(np.float32)
  s, i = knn.knn(q, db, 3, dtype='bfloat16')
  s32, _ = knn.knn(q, db, 3)
  np.testing.assert_array_equal(i[:, 0], np.arange(10))  # Well separated: same top-1.
  np.testing.assert_allclose(s[:, 0], s32[:, 0], atol=3e-2)
  assert s.dtype == np.float32


def test_rank_all_revisitop_convention():
  q, db = _data(5, 4, 23, 6)
  ranks = knn.rank_all(q, db)
  assert ranks.shape == (23, 4)
  ref = np.argsort(-(db.astype(np.float64) @ q.T.astype(np.float64)), axis=0, kind='stable')
  np.testing.assert_array_equal(ranks, ref)
  if jax.device_count() >= 8:
    np.testing.assert_array_equal(knn.rank_all(q, db, mesh=_mesh(8)), ref)


def test_knn_rejects_bad_arguments():
  q, db = _data(6, 3, 5, 4)
  with pytest.raises(ValueError):
    knn.knn(q, db, 6)
  with pytest.raises(ValueError):
    knn.knn(q, db, 0)
  with pytest.raises(ValueError):
    knn.knn(q, db, 2, dtype='float16')
  with pytest.raises(ValueError):
    knn.knn(q[:, :3], db, 2)


@pytest.mark.parametrize('devices', [0, 8])
def test_blocked_database_gives_the_unblocked_top_k_and_ranks(devices):
  """A database visited in blocks (the last one padded) = brute force, ties to lower index."""
  q, db = _data(7, 9, 61, 8)
  db[40] = db[3]  # Equal rows in different blocks: the lower index ranks first.
  db[58] = db[3]
  mesh = _mesh(devices) if devices else None
  s, i = knn.knn(q, db, 12, mesh=mesh, query_batch=4, db_block=16)
  ref_s, ref_i = _brute_force(q, db, 12)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
  ranks = knn.rank_all(q, db, mesh=mesh, query_batch=4, db_block=16, max_scores=150)
  ref = np.argsort(-(db.astype(np.float64) @ q.T.astype(np.float64)), axis=0, kind='stable')
  np.testing.assert_array_equal(ranks, ref)
