"""Pairwise scores of mining and exact search ask for full float32 precision.

On TPU a default-precision float32 matmul runs in bfloat16 passes, on Ampere+ GPUs in TF32:
near-tied similarities can then swap, and another negative gets mined than on CPU. The
scores must be computed with `precision=HIGHEST`; on CPU this changes no number, so the
tests read the precision argument of every `dot_general` in the traced programs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax import knn
from retrieval_jax import sharding
from retrieval_jax.mining import epoch
from retrieval_jax.mining import in_batch
from retrieval_jax.mining import vaccaro

HIGHEST = jax.lax.Precision.HIGHEST


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # ClosedJaxpr
    yield value.jaxpr
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _sub_jaxprs(v)


def dot_precisions(jaxpr):
  """The `precision` of every dot_general in `jaxpr` and its sub-programs (jit, shard_map)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        out += dot_precisions(sub)
  return out


def _assert_all_highest(fn, *args):
  precisions = dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)
  assert precisions, "no matmul traced"
  for p in precisions:
    assert p is not None and tuple(p) == (HIGHEST, HIGHEST), precisions


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(16, 8)).astype(np.float32)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  return jnp.asarray(d), jnp.asarray(np.repeat(np.arange(4), 4).astype(np.int32))


@pytest.mark.parametrize("loss_name", ["contrastive", "triplet"])
def test_in_step_mining_scores_use_highest_precision(batch, loss_name):
  mesh = sharding.make_mesh()
  _assert_all_highest(lambda d, l: in_batch.in_batch_mined_loss(
      d, l, mesh=mesh, loss_name=loss_name, num_negatives=2)[0], *batch)


def test_vaccaro_mining_scores_use_highest_precision(batch):
  mesh = sharding.make_mesh()
  _assert_all_highest(lambda d, l: vaccaro.vaccaro_triplet_loss(
      d, l, mesh=mesh, t=2, rng=jax.random.key(0))[0], *batch)


def test_epoch_mining_scores_use_highest_precision(batch):
  q, _ = batch
  _assert_all_highest(epoch._jit_scores, q[:4], q)  # pylint: disable=protected-access


def test_exact_search_scores_use_highest_precision(batch):
  q, _ = batch
  mesh = sharding.make_mesh()
  _assert_all_highest(lambda a, b: knn._topk_block(  # pylint: disable=protected-access
      a, b, b.shape[0], k=3, dtype=jnp.float32), q[:4], q)
  sharded = knn._sharded_topk_fn(mesh, 3, jnp.float32)  # pylint: disable=protected-access
  _assert_all_highest(lambda a, b: sharded(a, b, jnp.int32(16)), q[:4], q)
