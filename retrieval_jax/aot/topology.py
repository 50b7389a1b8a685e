"""A TPU topology's devices on this CPU machine, and the run's mesh over them.

`jax.experimental.topologies.get_topology_desc` (libtpu) describes every chip of a TPU slice
(or of several slices joined over DCN) without opening one; `jit(...).lower(...).compile()`
then compiles for those devices. JAX_PLATFORMS stays "cpu" for everything else: the
topology is asked for explicitly.
"""
import functools
import os
from typing import Sequence

from retrieval_jax import sharding as sharding_lib

# Hosts of 2 x 2 chips: only the process tags of the devices depend on it, not the program.
_CHIPS_PER_HOST = (2, 2, 1)


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str, num_slices: int = 1) -> tuple:
  """The devices of `num_slices` slices of `topology` (e.g. "v5e:16x16"), slice by slice."""
  # Quietens libtpu's warnings about the TPU VM metadata this machine does not have.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
  # Compiling opens no TPU: other processes compiling at the same time (tests, a second
  # rehearsal) must not be refused by libtpu's one-process lock (/tmp/libtpu_lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=_CHIPS_PER_HOST, num_slices=int(num_slices))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"config.compile.topology={topology!r} (num_slices={num_slices}) cannot "
                     f"be described: {' '.join(str(e).split())[:300]}. Use "
                     "<generation>:<chips>, e.g. v5e:16x16, v4:8x8x8 (libtpu must be "
                     "installed)") from e
  return tuple(sorted(desc.devices, key=lambda d: d.id))


def make_mesh(devices: Sequence, shape: Sequence[int], axes: Sequence[str],
              num_slices: int = 1):
  """The run's mesh (`config.mesh`) over `devices`; with several slices and axes that do not
  start with `sharding.SLICE_AXIS`, a leading slice axis is added (the batch then splits
  over (slice, first axis), `sharding.data_axis`)."""
  shape, axes = list(shape), list(axes)
  if num_slices > 1 and (not axes or axes[0] != sharding_lib.SLICE_AXIS):
    shape, axes = [num_slices] + shape, [sharding_lib.SLICE_AXIS] + axes
  return sharding_lib.make_mesh(shape, axes, devices=devices)


def slice_of(mesh) -> list:
  """Per flat device of `mesh` (the compiled program's partition order), its slice index."""
  return [int(getattr(d, "slice_index", 0)) for d in mesh.devices.flat]
