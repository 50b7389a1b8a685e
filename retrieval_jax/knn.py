"""Exact nearest-neighbour search by inner product (cosine for L2-normalised descriptors).

`knn` computes `queries @ database.T` in query batches of one static shape (one compile)
and keeps the top k with `jax.lax.top_k`. With a mesh, the database rows are sharded over
the batch axis (`sharding.data_axis`), so a database larger than one device's memory still
works: every device scores the query batch against its shard, keeps its own top k, the
per-device lists are all-gathered and merged with a second top k. Rows padded to make the database divisible by
the device count score -inf and never appear while k <= n_db.

Ties are broken towards the lower database index, in the sharded path too (shards are
gathered in device order).
"""
import functools
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from retrieval_jax import sharding

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}



def _scores(q: jax.Array, db: jax.Array, dtype) -> jax.Array:
  """[b, D] x [n, D] -> [b, n] float32 scores, inputs cast to `dtype`.

  precision=HIGHEST: float32 inputs are multiplied in full float32 on TPU (not bf16 passes)
  and GPU (not TF32), so exact search ranks as on CPU; bfloat16 inputs are exact anyway.
  """
  return jnp.einsum('qd,nd->qn', q.astype(dtype), db.astype(dtype),
                    preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=('k', 'dtype'))
def _topk_single(q, db, *, k, dtype):
  return jax.lax.top_k(_scores(q, db, dtype), k)


@functools.lru_cache(maxsize=None)
def _sharded_topk_fn(mesh, k: int, n_valid: int, dtype):
  """Builds the jitted shard_map top-k for one mesh / k / database size."""
  axis = sharding.data_axis(mesh)
  def local(q, db_shard):
    # q: [b, D] replicated; db_shard: [n_local, D] rows of this device.
    n_local = db_shard.shape[0]
    offset = jax.lax.axis_index(axis) * n_local
    gidx = offset + jnp.arange(n_local, dtype=jnp.int32)
    s = _scores(q, db_shard, dtype)
    s = jnp.where(gidx[None, :] < n_valid, s, -jnp.inf)  # Padding rows never win.
    k_local = min(k, n_local)
    ls, li = jax.lax.top_k(s, k_local)
    li = jnp.take(gidx, li)
    # [b, n_dev * k_local], shards in device order, so ties still prefer low indices.
    # 'invarying' tells shard_map the gathered lists are equal on every device, which lets
    # the merged top k leave with a replicated out_spec P().
    gs = jax.lax.all_gather(ls, axis, axis=1, tiled=True, to='invarying')
    gi = jax.lax.all_gather(li, axis, axis=1, tiled=True, to='invarying')
    fs, pos = jax.lax.top_k(gs, k)
    return fs, jnp.take_along_axis(gi, pos, axis=1)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis, None)),
                     out_specs=(P(), P()))
  return jax.jit(fn)


def knn(
    queries: Union[np.ndarray, jax.Array],
    database: Union[np.ndarray, jax.Array],
    k: int,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    dtype: str = 'float32',
    query_batch: int = 1024,
) -> Tuple[np.ndarray, np.ndarray]:
  """Exact top-k database rows by inner product for every query.

  Args:
    queries: [Nq, D] query descriptors.
    database: [Nd, D] database descriptors.
    k: neighbours per query, 1 <= k <= Nd.
    mesh: optional mesh; the database rows are sharded over its batch axis
      (`sharding.data_axis`).
    dtype: 'float32' or 'bfloat16' for the matmul inputs (accumulation is float32).
    query_batch: queries per compiled call; the last batch is zero-padded to the same
      shape so nothing recompiles.

  Returns:
    (scores [Nq, k] float32, indices [Nq, k] int32), best first, as numpy arrays.
  """
  if dtype not in _DTYPES:
    raise ValueError(f'dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.')
  jdtype = _DTYPES[dtype]
  nq, d = queries.shape
  nd = database.shape[0]
  if database.shape[1] != d:
    raise ValueError(f'Dimension mismatch: queries {queries.shape}, database {database.shape}.')
  if not 1 <= k <= nd:
    raise ValueError(f'k={k} must be in [1, n_db={nd}].')
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

  if mesh is None:
    db = jnp.asarray(database)
    fn = functools.partial(_topk_single, k=k, dtype=jdtype)
  else:
    n_dev = sharding.data_parallelism(mesh)
    nd_pad = math.ceil(nd / n_dev) * n_dev
    db = np.asarray(database)
    if nd_pad != nd:
      db = np.concatenate([db, np.zeros((nd_pad - nd, d), db.dtype)], axis=0)
    db = jax.device_put(db, NamedSharding(mesh, P(sharding.data_axis(mesh), None)))
    sharded = _sharded_topk_fn(mesh, k, nd, jdtype)
    replicated = NamedSharding(mesh, P())
    fn = lambda q, db: sharded(jax.device_put(q, replicated), db)

  b = min(query_batch, nq)
  queries = np.asarray(queries)
  all_s, all_i = [], []
  for start in range(0, nq, b):
    chunk = queries[start:start + b]
    n = chunk.shape[0]
    if n < b:
      chunk = np.concatenate([chunk, np.zeros((b - n, d), chunk.dtype)], axis=0)
    s, i = fn(chunk, db)
    all_s.append(np.asarray(s)[:n])
    all_i.append(np.asarray(i)[:n])
  return np.concatenate(all_s, axis=0), np.concatenate(all_i, axis=0).astype(np.int32)


def rank_all(
    queries: Union[np.ndarray, jax.Array],
    database: Union[np.ndarray, jax.Array],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    dtype: str = 'float32',
    query_batch: int = 1024,
) -> np.ndarray:
  """Full rankings in the revisitop convention.

  Args:
    queries: [Nq, D] query descriptors.
    database: [Nd, D] database descriptors.
    mesh, dtype, query_batch: as in `knn`.

  Returns:
    ranks: [Nd, Nq] int64; column j lists all database indices by decreasing similarity to
    query j (what `np.argsort(-X @ Q.T, axis=0)` gives, ties towards lower indices).
  """
  _, idx = knn(queries, database, database.shape[0], mesh=mesh, dtype=dtype,
               query_batch=query_batch)
  return np.ascontiguousarray(idx.T.astype(np.int64))
