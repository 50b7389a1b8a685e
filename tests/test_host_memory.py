"""host_memory.keep_freed_memory: freed large buffers are reused instead of faulted in again.

Each case runs in a fresh interpreter (mallopt must come before the allocations it governs)
that mallocs, writes and frees a 32 MB buffer 40 times (as XLA's CPU runtime does per call) and reports its minor page faults
(getrusage). With glibc's defaults every buffer is a fresh mmap (or trimmed heap) and every
page faults again; kept, the pages of the first buffer serve the other 39.
"""
import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = r"""
import ctypes, json, resource, sys
from retrieval_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else {}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
  p = libc.malloc(32 << 20)
  ctypes.memset(p, i, 32 << 20)  # touch every page, as XLA's kernels write their outputs
  libc.free(p)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "describe": host_memory.describe()}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc mallopt is Linux-only")


def _run(mode, **env):
  environ = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             **env}
  if not env:
    environ.pop("RETRIEVAL_JAX_SYSTEM_MALLOC", None)
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=environ, check=True,
                       capture_output=True, text=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_cuts_page_faults():
  default, kept = _run("default"), _run("keep")
  assert default["applied"] == {}
  assert set(kept["applied"]) == {"M_TRIM_THRESHOLD", "M_TOP_PAD", "M_MMAP_MAX", "M_ARENA_MAX"}
  assert "kept for reuse" in kept["describe"]
  pages = (32 << 20) // 4096
  # Defaults: (nearly) every page of every buffer faults; kept: about one buffer's worth.
  assert default["faults"] > 20 * pages, default
  assert kept["faults"] < 4 * pages, kept


def test_opt_out_env_keeps_glibc_defaults():
  out = _run("keep", RETRIEVAL_JAX_SYSTEM_MALLOC="1")
  assert out["applied"] == {}
  assert out["describe"] == "glibc's default malloc settings"
  pages = (32 << 20) // 4096
  assert out["faults"] > 20 * pages, out
