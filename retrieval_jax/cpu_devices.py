"""One XLA CPU device per core for the extraction modes, set before JAX starts its backend.

On a CPU host XLA runs one program at a time per device, and much of a convolutional trunk
(MobileNetV2's depthwise taps, its fused elementwise loops) runs on one thread of it: one
device used ~1.3 of 2 cores in `--mode=extract` at 1024 px (issue 22.3). With one device per
core the extraction batch is split over the devices (`extract.cpu_batch_size` gives each one
1024 px image), so every core describes its own image: 67.5 -> 51.5 s wall for 250 photos on
2 idle cores (BENCHMARKS.md). Only `--mode=extract` and `--mode=describe`, where each image is
described on its own; training keeps the devices the user gives it (its global batch must
divide by them). An `xla_force_host_platform_device_count` already in XLA_FLAGS wins (the
pod rehearsals on CPU set it), and so does `extract.cpu_devices` (1: one device).
"""
import os
import re
from typing import Optional

from absl import logging

MODES = ("extract", "describe")
_FLAG = "xla_force_host_platform_device_count"


def cores() -> int:
  """Cores this process may run on (its affinity mask, as a container or taskset gives it)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def split_host(mode: str, requested: int = 0) -> Optional[int]:
  """Sets XLA_FLAGS so that the CPU platform has `requested` devices (0: one per core) when
  `mode` describes images; returns that count, or None where it left XLA_FLAGS alone.

  Must run before JAX initialises its backends (the first `jax.devices()`); it does nothing
  on accelerator hosts besides giving their (unused) CPU platform more devices.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if mode not in MODES or re.search(rf"--{_FLAG}\b", flags):
    return None
  n = int(requested) or cores()
  if n <= 1:
    return None
  os.environ["XLA_FLAGS"] = f"{flags} --{_FLAG}={n}".strip()
  logging.info("--mode=%s: %d XLA CPU devices, each batch split over them "
               "(--config.extract.cpu_devices=1 for one)", mode, n)
  return n
