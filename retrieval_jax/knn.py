"""Exact nearest-neighbour search by inner product (cosine for L2-normalised descriptors).

`knn` computes `queries @ database.T` in query batches of one static shape (one compile)
and keeps the top k with `jax.lax.top_k`. The database is visited in blocks of at most
`db_block` rows (the last one padded to the same shape): each block goes to the devices
once, every query batch keeps its top k of the block, and the running lists are merged on
the host. So host and device memory hold one block and the [Nq, k] lists, whatever the
database size (a memory-mapped [N, D] database is read block by block). With a mesh, each
block's rows are sharded over the batch axis (`sharding.data_axis`): every device scores the
query batch against its shard, keeps its own top k, the per-device lists are all-gathered
and merged with a second top k. Rows padded to fill a block score -inf and never appear
while k <= n_db.

`rank_all` (full rankings, for the mAP) scores a few queries at a time against the blocks
and sorts each query's [N] scores on the host: memory is O(N) per query in flight, plus the
[N, Nq] int64 rankings the revisitop evaluation takes.

Ties are broken towards the lower database index, in the sharded and blocked paths too
(shards are gathered in device order, blocks merged in index order with a stable sort).
"""
import functools
import math
from typing import Iterator, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from retrieval_jax import sharding

DB_BLOCK = 1 << 16  # database rows per block ([query_batch, DB_BLOCK] float32 scores)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}



def _scores(q: jax.Array, db: jax.Array, dtype) -> jax.Array:
  """[b, D] x [n, D] -> [b, n] float32 scores, inputs cast to `dtype`.

  precision=HIGHEST: float32 inputs are multiplied in full float32 on TPU (not bf16 passes)
  and GPU (not TF32), so exact search ranks as on CPU; bfloat16 inputs are exact anyway.
  """
  return jnp.einsum('qd,nd->qn', q.astype(dtype), db.astype(dtype),
                    preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def _sharded_topk_fn(mesh, k: int, dtype):
  """Builds the jitted shard_map top-k for one mesh / k; `n_valid` rows of the block count."""
  axis = sharding.data_axis(mesh)
  def local(q, db_shard, n_valid):
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

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis, None), P()),
                     out_specs=(P(), P()))
  return jax.jit(fn)


@functools.partial(jax.jit, static_argnames=('k', 'dtype'))
def _topk_block(q, db, n_valid, *, k, dtype):
  s = _scores(q, db, dtype)
  s = jnp.where(jnp.arange(db.shape[0])[None, :] < n_valid, s, -jnp.inf)
  return jax.lax.top_k(s, k)


@functools.partial(jax.jit, static_argnames=('dtype',))
def _block_scores(q, db, *, dtype):
  return _scores(q, db, dtype)


def _blocks(database, block: int, mesh) -> Iterator[Tuple[int, int, jax.Array]]:
  """(start, valid rows, device block [block, D]) of the database, the last one padded."""
  nd, d = database.shape
  for start in range(0, nd, block):
    rows = np.asarray(database[start:start + block])
    n = rows.shape[0]
    if n < block:
      rows = np.concatenate([rows, np.zeros((block - n, d), rows.dtype)], axis=0)
    if mesh is None:
      yield start, n, jnp.asarray(rows)
    else:
      yield start, n, jax.device_put(
          rows, NamedSharding(mesh, P(sharding.data_axis(mesh), None)))


def _block_size(nd: int, db_block: int, mesh) -> int:
  """Rows per block: the whole database when it fits one block, a multiple of the devices."""
  n_dev = 1 if mesh is None else sharding.data_parallelism(mesh)
  return math.ceil(min(nd, max(1, db_block)) / n_dev) * n_dev


def _merge(best_s, best_i, s, i, k):
  """Top k of two [b, k] lists; the first holds lower indices, kept first on ties."""
  if best_s is None:
    return s, i
  cs, ci = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
  order = np.argsort(-cs, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)


def knn(
    queries: Union[np.ndarray, jax.Array],
    database: Union[np.ndarray, jax.Array],
    k: int,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    dtype: str = 'float32',
    query_batch: int = 1024,
    db_block: int = DB_BLOCK,
) -> Tuple[np.ndarray, np.ndarray]:
  """Exact top-k database rows by inner product for every query.

  Args:
    queries: [Nq, D] query descriptors (may be memory-mapped).
    database: [Nd, D] database descriptors (may be memory-mapped).
    k: neighbours per query, 1 <= k <= Nd.
    mesh: optional mesh; the database rows are sharded over its batch axis
      (`sharding.data_axis`).
    dtype: 'float32' or 'bfloat16' for the matmul inputs (accumulation is float32).
    query_batch: queries per compiled call; the last batch is zero-padded to the same
      shape so nothing recompiles.
    db_block: database rows on the devices at once (see the module docstring).

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
  block = _block_size(nd, db_block, mesh)
  kb = min(k, block)
  if mesh is None:
    fn = lambda q, db, n: _topk_block(q, db, n, k=kb, dtype=jdtype)
  else:
    sharded = _sharded_topk_fn(mesh, kb, jdtype)
    replicated = NamedSharding(mesh, P())
    fn = lambda q, db, n: sharded(jax.device_put(q, replicated), db,
                                  jax.device_put(np.int32(n), replicated))
  b = min(query_batch, nq)
  out_s = np.zeros((nq, k), np.float32)
  out_i = np.zeros((nq, k), np.int32)
  if block >= nd:  # one block: no merging
    (_, n, db), = list(_blocks(database, block, mesh))
    for start, chunk in _query_batches(queries, b):
      s, i = fn(chunk, db, n)
      out_s[start:start + b] = np.asarray(s)[:len(out_s[start:start + b])]
      out_i[start:start + b] = np.asarray(i)[:len(out_i[start:start + b])]
    return out_s, out_i
  best = [(None, None)] * math.ceil(nq / b)
  for offset, n, db in _blocks(database, block, mesh):
    for j, (start, chunk) in enumerate(_query_batches(queries, b)):
      s, i = fn(chunk, db, n)
      s, i = np.asarray(s), np.asarray(i).astype(np.int32) + offset
      best[j] = _merge(*best[j], s, i, k)
  for j, (s, i) in enumerate(best):
    rows = out_s[j * b:(j + 1) * b].shape[0]
    out_s[j * b:j * b + rows], out_i[j * b:j * b + rows] = s[:rows], i[:rows]
  return out_s, out_i


def _query_batches(queries, b: int) -> Iterator[Tuple[int, np.ndarray]]:
  """(start, [b, D] zero-padded batch) of the queries."""
  nq, d = queries.shape
  for start in range(0, nq, b):
    chunk = np.asarray(queries[start:start + b])
    if chunk.shape[0] < b:
      chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0], d), chunk.dtype)], 0)
    yield start, chunk


def rank_all(
    queries: Union[np.ndarray, jax.Array],
    database: Union[np.ndarray, jax.Array],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    dtype: str = 'float32',
    query_batch: int = 1024,
    db_block: int = DB_BLOCK,
    max_scores: int = 1 << 26,
) -> np.ndarray:
  """Full rankings in the revisitop convention.

  Args:
    queries: [Nq, D] query descriptors.
    database: [Nd, D] database descriptors (may be memory-mapped).
    mesh, dtype, query_batch, db_block: as in `knn`.
    max_scores: bound on the [queries in flight, Nd] float32 scores held on the host.

  Returns:
    ranks: [Nd, Nq] int64; column j lists all database indices by decreasing similarity to
    query j (what `np.argsort(-X @ Q.T, axis=0)` gives, ties towards lower indices).
  """
  if dtype not in _DTYPES:
    raise ValueError(f'dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.')
  jdtype = _DTYPES[dtype]
  nq, d = queries.shape
  nd = database.shape[0]
  if database.shape[1] != d:
    raise ValueError(f'Dimension mismatch: queries {queries.shape}, database {database.shape}.')
  ranks = np.empty((nd, nq), np.int64)
  if nq == 0 or nd == 0:
    return ranks
  block = _block_size(nd, db_block, mesh)
  b = max(1, min(query_batch, nq, max_scores // max(nd, 1)))
  replicated = None if mesh is None else NamedSharding(mesh, P())
  score = jax.jit(functools.partial(_scores, dtype=jdtype), out_shardings=replicated)
  for start in range(0, nq, b):
    chunk = np.asarray(queries[start:start + b])
    n = chunk.shape[0]
    if n < b:
      chunk = np.concatenate([chunk, np.zeros((b - n, d), chunk.dtype)], 0)
    if mesh is not None:
      chunk = jax.device_put(chunk, replicated)
    s = np.empty((b, nd), np.float32)
    for offset, valid, db in _blocks(database, block, mesh):
      s[:, offset:offset + valid] = np.asarray(score(chunk, db))[:, :valid]
    # A stable sort of -s: ties keep the lower database index first.
    ranks[:, start:start + n] = np.argsort(-s[:n], axis=1, kind='stable').T
  return ranks
