"""Joining a multi-process run: which coordinator, how many processes, which one is this.

`main.py` calls `initialize` before anything touches a device. The coordinator comes from
flags, else from the standard environment variables `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; with none of them jax detects the cluster itself (TPU
metadata, SLURM with one task per GPU, Open MPI). CPU processes exchange collectives over
gloo. A process whose peer died exits (jax's coordination service stops it with "another task
died") once the peer misses its heartbeats for `heartbeat_timeout_s`, instead of hanging in a
collective forever.
"""
import dataclasses
import os
from typing import Mapping, Optional

from absl import logging
import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Coordinator:
  """An explicit coordinator; None fields are left to jax's cluster detection."""
  address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def _int(value, name: str) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve(address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None,
            environ: Optional[Mapping[str, str]] = None) -> Coordinator:
  """Flags first, then the JAX_* environment variables; all three or none.

  Raises:
    ValueError: only some of the three are given (naming the missing ones), or they do not
      fit together (process_id outside [0, num_processes)).
  """
  env = os.environ if environ is None else environ
  c = Coordinator(address or env.get("JAX_COORDINATOR_ADDRESS") or None,
                  num_processes if num_processes is not None else
                  _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES"),
                  process_id if process_id is not None else
                  _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID"))
  if not c.explicit:
    return c
  missing = [f"--{flag} (or {var})" for flag, var, v in zip(
      ("coordinator_address", "num_processes", "process_id"), ENV_VARS,
      dataclasses.astuple(c)) if v is None]
  if missing:
    raise ValueError(f"an explicit coordinator needs all three settings; missing: "
                     f"{', '.join(missing)}. Give none of them to let jax detect a TPU pod, "
                     "SLURM or MPI job.")
  if ":" not in c.address:
    raise ValueError(f"coordinator address {c.address!r} must be host:port, "
                     "e.g. 10.0.0.1:1234 (process 0's host)")
  if not 0 <= c.process_id < c.num_processes:
    raise ValueError(f"process_id {c.process_id} must be in [0, num_processes="
                     f"{c.num_processes})")
  return c


def initialize(coordinator: Coordinator, initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
  """jax.distributed.initialize with gloo on CPU; call before any device is touched.

  Args:
    coordinator: from `resolve`; not explicit = jax's auto-detection.
    initialization_timeout_s: how long to wait for all processes to join.
    heartbeat_timeout_s: a process silent this long counts as dead, and the others exit.
  """
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process collectives between CPU devices (tests, CPU clusters); no effect on
    # TPU / GPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator.address, num_processes=coordinator.num_processes,
      process_id=coordinator.process_id, initialization_timeout=initialization_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("process %d of %d (coordinator %s): %d local devices of %d",
               jax.process_index(), jax.process_count(),
               coordinator.address or "auto-detected", jax.local_device_count(),
               jax.device_count())
