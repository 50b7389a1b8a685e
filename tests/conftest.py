"""Test setup, before JAX is imported anywhere (also inherited by main.py subprocesses).

* 8 fake CPU devices, so sharded code runs as on a pod slice.
* A persistent XLA compile cache: compiling dominates these tests on CPU, and repeated shapes
  reuse their executables across tests and runs (same HLO, same binary: bitwise results are
  unaffected).
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "retrieval_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
