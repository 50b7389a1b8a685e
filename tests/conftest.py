"""Test setup, before JAX is imported anywhere (also inherited by main.py subprocesses).

* 8 fake CPU devices, so sharded code runs as on a pod slice.
* A persistent XLA compile cache: compiling dominates these tests on CPU, and repeated shapes
  reuse their executables across tests, main.py subprocesses, pytest-xdist workers and runs
  (same HLO, same binary: bitwise results are unaffected). XLA compiles at LLVM level 0.
* The terminal summary reports how many executables were built, how many came from that
  cache and the seconds spent (all workers together), so a change that breaks sharing
  (a new shape, a fresh closure per call) shows in CI's output.
* In CI (`CI=true`) a skipped test or module is a failure: tests skip locally when an optional
  package or ../shared/data is missing, but a green CI must mean that every test ran.
"""
import collections
import json
import os
import tempfile

# LLVM optimisation level 0: the tests' programs are tiny and compiled once each, so
# compiling, not running, is their cost; at level 0 the suite needs ~25% less CPU time
# (tests/test_train.py 98 -> 71 CPU-s, test_ukbench_real + test_mobilenet_v2 52 -> 41;
# BENCHMARKS.md). Results stay IEEE float32 (no fast-math), the bitwise tests compare runs
# made with the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "retrieval_jax_test_xla_cache"))
# Every executable goes to the cache, however quick its compile: the many small ones are
# what xdist workers and main.py subprocesses would otherwise all compile again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from jax import monitoring  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Backend compiles (from scratch or from the persistent cache) and their seconds; cache hits.
_COMPILE = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_STATS = collections.Counter()


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event in (_HIT, _REQUEST):
    _STATS[event] += 1


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
  del kwargs
  if event == _COMPILE:
    _STATS["executables"] += 1
    _STATS["compile_s"] += duration_secs


monitoring.register_event_listener(_on_event)
monitoring.register_event_duration_secs_listener(_on_duration)


class _WorkerStats:
  """pytest-xdist: each worker's counts travel to the controller's summary."""

  def __init__(self):
    self.workers = []

  def pytest_testnodedown(self, node, error):
    del error
    stats = getattr(node, "workeroutput", {}).get("xla_compile_stats")
    if stats:
      self.workers.append(json.loads(stats))


def _skips_fail() -> bool:
  return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _fail_if_skipped(report) -> None:
  """Turns a skip (not an xfail) into a failure that says what was missing."""
  if not (_skips_fail() and report.skipped and not hasattr(report, "wasxfail")):
    return
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  report.outcome = "failed"
  report.longrepr = (f"skipped in CI (CI=true), where every test must run: {reason}. "
                     "Install the test requirements (launch/setup_env.sh) and ../shared/data.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del item, call
  outcome = yield
  _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  del collector
  outcome = yield
  _fail_if_skipped(outcome.get_result())  # a module-level importorskip


def pytest_configure(config):
  if config.pluginmanager.hasplugin("xdist"):
    config.pluginmanager.register(_WorkerStats(), "retrieval_jax_worker_stats")


def pytest_sessionfinish(session):
  if hasattr(session.config, "workeroutput"):  # an xdist worker
    session.config.workeroutput["xla_compile_stats"] = json.dumps(dict(_STATS))


def pytest_terminal_summary(terminalreporter, config):
  plugin = config.pluginmanager.get_plugin("retrieval_jax_worker_stats")
  total = collections.Counter(_STATS)
  for worker in (plugin.workers if plugin else []):
    total.update(worker)
  if not total["executables"]:
    return
  terminalreporter.write_line(
      f"XLA executables built in the test processes: {total['executables']} "
      f"({total['compile_s']:.0f} s), {total[_HIT]} of {total[_REQUEST]} cacheable ones "
      f"loaded from the persistent cache {os.environ['JAX_COMPILATION_CACHE_DIR']} "
      "(main.py subprocesses not counted)")
