"""glibc malloc settings that keep freed host memory in the process (Linux, CPU extraction).

XLA's CPU executables allocate and free buffers of tens of MB per call (activations of a
1024 px batch). With glibc's defaults every one of them is an mmap of its own (above
M_MMAP_THRESHOLD) or is trimmed back to the kernel when freed (M_TRIM_THRESHOLD), so the
next call faults every page in again: millions of minor page faults, and on a 2-core machine
a third of the process's CPU time in the kernel (issue 22.3: 50 s of system CPU in 100 s of
`--mode=extract`). Keeping freed memory in the heap for reuse removes them:

  M_TRIM_THRESHOLD = 2**31 - 1  never give the top of the heap back
  M_TOP_PAD = 1 GiB             grow the heap in large steps
  M_MMAP_MAX = 0                large blocks come from the heap, not an mmap each
  M_ARENA_MAX = 1               one arena: threads reuse the same freed blocks (without it
                                each thread's arena grows and trims on its own)

The cost is that the process's resident size stays at its peak. It must run before JAX
(or anything that starts threads) allocates; `main.py` calls it first thing.
RETRIEVAL_JAX_SYSTEM_MALLOC=1 leaves glibc's defaults alone.
"""
import ctypes
import ctypes.util
import os
import sys
from typing import Dict

from absl import logging

OPT_OUT_ENV = "RETRIEVAL_JAX_SYSTEM_MALLOC"

# mallopt parameter numbers of glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS: Dict[str, tuple] = {
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    "M_TOP_PAD": (M_TOP_PAD, 1 << 30),
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
}

_APPLIED: Dict[str, int] = {}


def keep_freed_memory() -> Dict[str, int]:
  """Applies `SETTINGS` with mallopt; returns what was set ({} where nothing was).

  A no-op (with a debug log) off Linux/glibc or when RETRIEVAL_JAX_SYSTEM_MALLOC=1; calling
  it again does nothing more.
  """
  if _APPLIED:
    return dict(_APPLIED)
  if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    logging.debug("%s=%s: glibc's default malloc settings kept", OPT_OUT_ENV,
                  os.environ[OPT_OUT_ENV])
    return {}
  if not sys.platform.startswith("linux"):
    logging.debug("host_memory: not Linux (%s), malloc settings unchanged", sys.platform)
    return {}
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    logging.debug("host_memory: no glibc mallopt, malloc settings unchanged")
    return {}
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for name, (param, value) in SETTINGS.items():
    if mallopt(param, value) == 1:
      _APPLIED[name] = value
    else:
      logging.debug("host_memory: mallopt(%s, %d) refused", name, value)
  logging.debug("host_memory: %s", describe())
  return dict(_APPLIED)


def describe() -> str:
  """One line for the log: what `keep_freed_memory` set, or that it set nothing."""
  if not _APPLIED:
    return "glibc's default malloc settings"
  return (f"freed host memory kept for reuse ({', '.join(f'{k}={v}' for k, v in _APPLIED.items())}"
          f"; {OPT_OUT_ENV}=1 to turn off)")
