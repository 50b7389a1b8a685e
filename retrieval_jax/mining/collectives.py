"""Running a per-device mining body over the mesh's data axis (or directly, without a mesh).

The in-step mining functions (`in_batch.py`, `vaccaro.py`) write their body for one
device's rows; `run_sharded` runs it under `jax.shard_map` over `sharding.data_axis(mesh)`,
and `gather` / `psum` / `global_offset` are its collectives (identities with no axis).
"""
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from retrieval_jax import sharding

AxisName = Union[str, Tuple[str, ...]]


class MiningAxes(NamedTuple):
  """Where a mining body's rows live (`batch`: the sums reduce over it) and which of those
  devices form one mining pool (`pool`: the all-gather spans it; one slice's devices when
  `loss.mining_scope="slice"`)."""
  batch: AxisName
  pool: AxisName


def _pool(axis_name):
  return axis_name.pool if isinstance(axis_name, MiningAxes) else axis_name


def _batch(axis_name):
  return axis_name.batch if isinstance(axis_name, MiningAxes) else axis_name


def mining_axes(mesh: Optional[Mesh], scope: str = "global") -> Optional[MiningAxes]:
  """The axes of in-step mining on `mesh` for `scope` ("global": the whole global batch is
  the pool; "slice": each slice's rows, on a mesh whose first axis is `sharding.SLICE_AXIS`;
  "chip": each device's own rows, no all-gather at all)."""
  if mesh is None:
    return None
  batch = sharding.data_axis(mesh)
  if scope == "global":
    return MiningAxes(batch, batch)
  if scope == "chip":
    return MiningAxes(batch, ())
  if scope != "slice":
    raise ValueError(f"loss.mining_scope must be 'global', 'slice' or 'chip', got {scope!r}")
  if isinstance(batch, str):
    raise ValueError(f"loss.mining_scope='slice' needs a multislice mesh (mesh.axes starting "
                     f"with {sharding.SLICE_AXIS!r}); this mesh has axes {mesh.axis_names}")
  return MiningAxes(batch, batch[1] if len(batch) == 2 else batch[1:])


def gather(x: jnp.ndarray, axis_name) -> jnp.ndarray:
  """[b, ...] local rows -> [B, ...] rows of the mining pool (identity without an axis)."""
  if axis_name is None or _pool(axis_name) == ():
    return x
  return jax.lax.all_gather(x, _pool(axis_name), axis=0, tiled=True)


def psum(tree: Any, axis_name) -> Any:
  """Sum over every device of the batch (all pools)."""
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, _batch(axis_name))


def global_offset(b: int, axis_name) -> jnp.ndarray:
  """Row index, in the gathered pool, of this device's first local row."""
  if axis_name is None or _pool(axis_name) == ():
    return jnp.zeros((), jnp.int32)
  return (jax.lax.axis_index(_pool(axis_name)) * b).astype(jnp.int32)


def run_sharded(body: Callable[..., Any], mesh: Optional[Mesh], data_axis,
                 args: Tuple[jnp.ndarray, ...], out_specs: Any,
                 replicated: Tuple[jnp.ndarray, ...] = ()) -> Any:
  """Calls `body(*local_args, *replicated, axis_name=...)` under `jax.shard_map`.

  Every element of `args` is split along its first axis over `data_axis` (None: the mesh's,
  `sharding.data_axis`; a `MiningAxes`: its `batch`, the body gathering over its `pool`);
  `replicated` ones
  are given whole to every device. Without a mesh, `body` is called directly.
  """
  if mesh is None:
    return body(*args, *replicated, axis_name=None)
  data_axis = data_axis or sharding.data_axis(mesh)
  split = _batch(data_axis)
  names = (split,) if isinstance(split, str) else tuple(split)
  if any(a not in mesh.axis_names for a in names):
    raise ValueError(f"mesh axes {mesh.axis_names} have no data axis {split!r}")
  n = sharding.axis_size(mesh, split)
  for a in args:
    if a.shape[0] % n:
      raise ValueError(f"global batch {a.shape[0]} is not divisible by the {n} devices of "
                       f"mesh axis {split!r}")
  specs = tuple(P(split) for _ in args) + tuple(P() for _ in replicated)

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
