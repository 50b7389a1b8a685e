"""The device mesh and the host->device boundary.

One mesh from config (`config.mesh.shape`, `config.mesh.axes`); the batch is split over the
mesh's first axis, `data_axis(mesh)` (named by `config.mesh.axes[0]`, "data" by default):
every module that shards over the batch (extraction, training, mining, search) asks this
module for it. Input pipelines hand over host-local numpy, `to_global` turns it into global
jax.Arrays sharded along that axis. Params and optimiser state are replicated (retrieval
backbones fit one device).
"""
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax._src import distributed as jax_distributed  # the runtime client's barrier
from jax.experimental import multihost_utils
import numpy as np

# The default name of the batch axis (configs/common.py's `mesh.axes`); code asks
# `data_axis(mesh)`, which honours whatever the config names it.
DATA_AXIS = "data"
# A leading mesh axis of this name spans TPU slices (multislice, over DCN): the batch is split
# over it and the next axis together (`data_axis` gives both).
SLICE_AXIS = "slice"


def make_mesh(shape: Sequence[int] = (-1,), axes: Sequence[str] = (DATA_AXIS,),
              devices=None) -> Mesh:
  """A mesh over all (or the given) devices; one -1 in `shape` takes the remaining devices.

  Axes are Auto: jit propagates the batch sharding through the model, and only the mining
  all-gather is written per device (shard_map).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
  if shape.count(-1) > 1:
    raise ValueError("mesh.shape may hold at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes),
              axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def data_axis(mesh: Mesh):
  """The mesh axis the batch (and a sharded database) is split over: the first one; on a
  multislice mesh whose first axis is `SLICE_AXIS`, the pair (slice, next axis)."""
  names = mesh.axis_names
  if len(names) > 1 and names[0] == SLICE_AXIS:
    return (names[0], names[1])
  return names[0]


def axis_size(mesh: Mesh, axis) -> int:
  """Devices along `axis`: one mesh axis name or a tuple of them."""
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  return int(np.prod([mesh.shape[a] for a in axes]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(data_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> Any:
  """Host-local numpy arrays (this process's rows) -> global arrays split over the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(batch))


def data_parallelism(mesh: Mesh) -> int:
  return axis_size(mesh, data_axis(mesh))


def is_main_process() -> bool:
  """Only process 0 writes shared files (results, metrics, descriptors) on multi-host runs."""
  return jax.process_index() == 0


# How long the other processes wait for process 0 to write a shared file (a demo set, an
# index, a whitening) before giving up with an error naming what they waited for.
WRITE_TIMEOUT_S = 3600.0
_BARRIERS: Dict[str, int] = {}


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (a decision that starts collective work)."""
  if jax.process_count() <= 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def agreed_indices(indices, n: int) -> list:
  """Process 0's subset `indices` of range(n) (e.g. chunks already written), on every
  process: which work is skipped must be the same everywhere, since the work is collective."""
  if jax.process_count() <= 1:
    return sorted(int(i) for i in indices)
  mask = np.zeros((n,), np.int32)
  mask[list(indices)] = 1
  return [int(i) for i in np.flatnonzero(multihost_utils.broadcast_one_to_all(mask))]


class BarrierTimeoutError(RuntimeError):
  """A process waited longer than its timeout for the others at a barrier."""


def sync(name: str, timeout_s: Optional[float] = None) -> None:
  """All processes reach this point before any goes on (no-op on one process).

  With `timeout_s`, the wait is bounded: a process whose peers do not arrive in time raises
  `BarrierTimeoutError` naming the barrier (e.g. process 0 is still writing, or died).
  """
  if jax.process_count() <= 1:
    return
  client = getattr(jax_distributed.global_state, "client", None)
  if timeout_s is None or client is None:
    multihost_utils.sync_global_devices(name)
    return
  # Every process passes the same barriers in the same order: the count makes ids unique.
  _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
  barrier = f"retrieval_jax_{name}_{_BARRIERS[name]}"
  try:
    client.wait_at_barrier(barrier, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except (the runtime's error type varies)
    raise BarrierTimeoutError(
        f"process {jax.process_index()} waited {timeout_s:.0f}s at barrier {name!r} for the "
        f"other processes (process 0 writes the shared files; did it fail?): {e}") from e
