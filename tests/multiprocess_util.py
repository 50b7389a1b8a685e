"""Runs main.py as several cooperating processes on this machine, as on a pod.

Each process is `python main.py ... --coordinator_address=127.0.0.1:<free port>
--num_processes=N --process_id=i` with `--xla_force_host_platform_device_count=<devices>`
fake CPU devices; cross-process collectives go over gloo. The processes share the persistent
XLA compile cache that tests/conftest.py sets up. Every wait has a time-out, and on any failure
or time-out all children are killed (their whole process groups) before the error is raised
with the tail of each log.

Also a config file for main.py: `--config=tests/multiprocess_util.py:in_batch` (or `:epoch`)
is the demo recipe on a tiny ResNet-18 (width 8, 32 px), like tests/test_train.py's.
"""
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.abspath(__file__)


def get_config(arg: str = "in_batch"):
  """The tiny config for main.py; `arg` = "in_batch" or "epoch" (the mining mode)."""
  from configs import demo  # pylint: disable=import-outside-toplevel (loaded by path)
  c = demo.get_config()
  with c.unlocked():
    c.data.image_size = 32
    c.data.classes_per_batch = 4
    c.data.images_per_class = 2
    c.data.num_threads = 1
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"bn_mode": "frozen_stats", "width": 8,
                               "stage_sizes": (1, 1, 1, 1)}
    c.model.pretrained = ""
    c.optim.freeze = ""
    # SGD with a small step, not Adam: Adam divides by sqrt(v), which turns float32 rounding
    # differences in (near-)zero gradients into full-size updates, and a large step lets a
    # rounding-level difference flip a hinge at its margin; either way two equal runs summed
    # in another order drift apart by ~1e-5..1e-3 in a few weights. Measured with this
    # setting, 2 x 4 vs 1 x 8 after 6 epoch-mining steps: 1.8e-7 at most.
    c.optim.name = "sgd"
    c.optim.lr = 0.01
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.eval_before = False
    c.eval.dataset = ""
    c.eval.pictures = 0
    c.extract.long_side = 48
    c.extract.batch_size = 8
    if arg == "epoch":
      c.train.mining = "epoch"
      c.data.query_size = 16
      c.data.pool_size = 40
      c.data.tuples_per_batch = 4
      c.loss.num_negatives = 2
    elif arg != "in_batch":
      raise ValueError(f"config argument must be in_batch or epoch, got {arg!r}")
  return c


def env(devices: int) -> Dict[str, str]:
  """This environment with `devices` fake CPU devices per process (other XLA flags kept)."""
  e = dict(os.environ)
  flags = [f for f in e.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONUNBUFFERED"] = "1"
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(var, None)
  return e


@dataclasses.dataclass
class Proc:
  popen: subprocess.Popen
  log: str

  def tail(self, n: int = 3000) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()[-n:]


def main_args(config_arg: str, workdir: str, *extra: str) -> List[str]:
  return [sys.executable, os.path.join(REPO, "main.py"), f"--config={CONFIG}:{config_arg}",
          f"--workdir={workdir}", *extra]


def start(args: Sequence[str], num_processes: int, devices: int, log_dir: str,
          heartbeat_timeout: int = 100, extra_env: Optional[Dict[str, str]] = None,
          cwd: str = REPO) -> List[Proc]:
  """Starts `args` as process 0..N-1 of one run (N = 1: a plain single-process run)."""
  os.makedirs(log_dir, exist_ok=True)
  e = env(devices)
  e.update(extra_env or {})
  coord = []
  if num_processes > 1:
    coord = [f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}",
             f"--num_processes={num_processes}", f"--heartbeat_timeout={heartbeat_timeout}",
             "--initialization_timeout=120"]
  procs = []
  for i in range(num_processes):
    log = os.path.join(log_dir, f"process_{i}.log")
    pid_flag = [f"--process_id={i}"] if num_processes > 1 else []
    with open(log, "w") as f:
      procs.append(Proc(subprocess.Popen(
          list(args) + coord + pid_flag, cwd=cwd, env=e, stdout=f, stderr=subprocess.STDOUT,
          start_new_session=True), log))
  return procs


def kill(procs: Sequence[Proc]) -> None:
  for p in procs:
    if p.popen.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.popen.pid, signal.SIGKILL)
  for p in procs:
    p.popen.wait()


def wait(procs: Sequence[Proc], timeout: float, check: bool = True) -> List[int]:
  """Return codes of all processes; kills all and raises on time-out or (check) failure."""
  deadline = time.time() + timeout
  try:
    while any(p.popen.poll() is None for p in procs):
      if time.time() > deadline:
        raise TimeoutError(f"processes still running after {timeout:.0f}s")
      if check and any(p.popen.returncode not in (None, 0) for p in procs):
        raise RuntimeError("a process failed")
      time.sleep(0.2)
    codes = [p.popen.returncode for p in procs]
    if check and any(codes):
      raise RuntimeError(f"return codes {codes}")
    return codes
  except (TimeoutError, RuntimeError) as e:
    kill(procs)
    logs = "\n".join(f"--- process {i} (rc {p.popen.returncode}) {p.log}:\n{p.tail()}"
                     for i, p in enumerate(procs))
    raise type(e)(f"{e}\n{logs}") from None


def run(args: Sequence[str], num_processes: int, devices: int, log_dir: str,
        timeout: float = 120, **kw) -> List[Proc]:
  """start + wait; raises with the logs unless every process exits 0 in time."""
  procs = start(args, num_processes, devices, log_dir, **kw)
  wait(procs, timeout)
  return procs


def wait_for(predicate, procs: Sequence[Proc], timeout: float, what: str) -> None:
  """Polls `predicate()` until true; kills the processes and raises if they end first."""
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline or all(p.popen.poll() is not None for p in procs):
      kill(procs)
      logs = "\n".join(f"--- process {i}:\n{p.tail()}" for i, p in enumerate(procs))
      raise TimeoutError(f"never saw {what} within {timeout:.0f}s\n{logs}")
    time.sleep(0.2)
