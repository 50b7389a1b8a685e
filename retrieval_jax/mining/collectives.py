"""Running a per-device mining body over the mesh's data axis (or directly, without a mesh).

The in-step mining functions (`in_batch.py`, `vaccaro.py`) write their body for one
device's rows; `run_sharded` runs it under `jax.shard_map` over `sharding.data_axis(mesh)`,
and `gather` / `psum` / `global_offset` are its collectives (identities with no axis).
"""
import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from retrieval_jax import sharding

def gather(x: jnp.ndarray, axis_name: Optional[str]) -> jnp.ndarray:
  """[b, ...] local rows -> [B, ...] global rows (identity without an axis)."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum(tree: Any, axis_name: Optional[str]) -> Any:
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def global_offset(b: int, axis_name: Optional[str]) -> jnp.ndarray:
  """Global row index of this device's first local row."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return (jax.lax.axis_index(axis_name) * b).astype(jnp.int32)


def run_sharded(body: Callable[..., Any], mesh: Optional[Mesh], data_axis: Optional[str],
                 args: Tuple[jnp.ndarray, ...], out_specs: Any,
                 replicated: Tuple[jnp.ndarray, ...] = ()) -> Any:
  """Calls `body(*local_args, *replicated, axis_name=...)` under `jax.shard_map`.

  Every element of `args` is split along its first axis over `data_axis` (None: the mesh's,
  `sharding.data_axis`); `replicated` ones
  are given whole to every device. Without a mesh, `body` is called directly.
  """
  if mesh is None:
    return body(*args, *replicated, axis_name=None)
  data_axis = data_axis or sharding.data_axis(mesh)
  if data_axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} have no data axis {data_axis!r}")
  n = mesh.shape[data_axis]
  for a in args:
    if a.shape[0] % n:
      raise ValueError(f"global batch {a.shape[0]} is not divisible by the {n} devices of "
                       f"mesh axis {data_axis!r}")
  specs = tuple(P(data_axis) for _ in args) + tuple(P() for _ in replicated)

  def place(a, spec):
    # shard_map refuses inputs whose sharding differs from in_specs on Explicit mesh axes:
    # place concrete inputs, and reshard traced ones whose type says otherwise (e.g. a batch
    # that entered `jit` unsharded). The train step's P(data_axis) batch passes unchanged.
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if not isinstance(a, jax.core.Tracer):
      return jax.device_put(a, sharding)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    current = getattr(jax.typeof(a), "sharding", None)
    if explicit and (current is None or current.spec != sharding.spec):
      return jax.reshard(a, sharding)
    return a

  placed = [place(a, s) for a, s in zip(args + tuple(replicated), specs)]
  fn = jax.shard_map(functools.partial(body, axis_name=data_axis), mesh=mesh, in_specs=specs,
                     out_specs=out_specs)
  return fn(*placed)


def safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  return num / jnp.maximum(den, 1.0)
