"""Two processes x 4 CPU devices behave as one process x 8 devices (a pod, on this machine).

Each run is `python main.py` (tests/multiprocess_util.py starts, times and kills them), with
jax.distributed over 127.0.0.1 and gloo collectives; the config is the demo recipe on a tiny
ResNet-18 at 64 px (32 px would leave a 1 x 1 map, where GeM's p has no gradient) trained
with SGD (see multiprocess_util.get_config: Adam would amplify rounding noise in near-zero
gradients). Tolerances: 1e-5 relative on losses and 1e-5 on parameters (float32 reductions
are summed in another order across processes); resume is compared bit for bit.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from retrieval_jax import checkpointing
from retrieval_jax import distributed
from retrieval_jax.data import demo

import multiprocess_util as mp

STEPS = 6
TRAIN = ("--config.data.image_size=64", f"--config.train.num_steps={STEPS}",
         "--config.train.checkpoint_every=2")
TIMEOUT = 240  # per run: a cold compile cache on 2 busy cores


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  demo.build(root, seed=0)
  return root


def _train(workdir, demo_root, processes, devices, *extra, mining="in_batch"):
  args = mp.main_args(mining, workdir, f"--config.data.root={demo_root}", *TRAIN, *extra)
  return mp.run(args, processes, devices, os.path.join(workdir, "logs"), timeout=TIMEOUT)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _params(workdir, step=STEPS):
  return checkpointing.read_state(workdir, step)["params"]


def _assert_trees_close(a, b, atol):
  fa = jax.tree_util.tree_leaves_with_path(a)
  fb = jax.tree_util.tree_leaves(b)
  assert len(fa) == len(fb)
  for (path, x), y in zip(fa, fb):
    np.testing.assert_allclose(x, y, rtol=atol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
  """trained(mining, processes, devices) -> workdir of that finished run (made once)."""
  runs = {}

  def get(mining, processes, devices):
    key = (mining, processes, devices)
    if key not in runs:
      workdir = str(tmp_path_factory.mktemp(f"{mining}_{processes}x{devices}"))
      _train(workdir, demo_root, processes, devices, mining=mining)
      runs[key] = workdir
    return runs[key]
  return get


@pytest.fixture(scope="module")
def one_by_eight(trained):
  return trained("in_batch", 1, 8)


@pytest.fixture(scope="module")
def two_by_four(trained):
  return trained("in_batch", 2, 4)


def _assert_same_training(one, two):
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  _assert_trees_close(_params(two), _params(one), atol=1e-5)
  # ... and training moved them by far more than that tolerance.
  moved = [np.abs(a - b).max() for a, b in zip(
      jax.tree_util.tree_leaves(_params(one, 2)), jax.tree_util.tree_leaves(_params(one)))]
  assert max(moved) > 1e-3
  # Only process 0 writes the shared files: one line per step, not two.
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert len(f.readlines()) == STEPS


def test_two_processes_train_as_one(one_by_eight, two_by_four):
  """In-step mining: per-step losses and final params of 2 x 4 devices = 1 x 8."""
  _assert_same_training(one_by_eight, two_by_four)


@pytest.mark.slow
def test_two_processes_train_as_one_with_epoch_mining(trained):
  """Epoch-level mining: the pool is described by both hosts' devices, tuples written once.

  6 steps = epoch 0 and part of epoch 1, whose tuples are mined with the trained params.
  """
  one, two = trained("epoch", 1, 8), trained("epoch", 2, 4)
  _assert_same_training(one, two)
  for epoch in (0, 1):
    ref, got = (np.load(os.path.join(w, "tuples", f"epoch_{epoch:05d}.npz")) for w in (one, two))
    assert sorted(ref.files) == sorted(got.files)
    for k in ref.files:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"epoch {epoch} {k}")


def test_killed_two_process_run_resumes_to_the_same_params(demo_root, two_by_four,
                                                            tmp_path):
  """SIGKILL both processes after a checkpoint, run the command again: same final params."""
  workdir = str(tmp_path)
  args = mp.main_args("in_batch", workdir, f"--config.data.root={demo_root}", *TRAIN)
  procs = mp.start(args, 2, 4, os.path.join(workdir, "logs1"))
  ckpt = os.path.join(workdir, "checkpoints", "2")
  mp.wait_for(lambda: os.path.isdir(ckpt), procs, TIMEOUT, "checkpoint 2")
  for p in procs:
    os.killpg(p.popen.pid, signal.SIGKILL)
  assert [p.popen.wait() for p in procs] == [-signal.SIGKILL] * 2
  killed_at = checkpointing.manager(workdir).latest_step()
  assert killed_at is not None and killed_at < STEPS, "the run ended before the kill"
  _train(workdir, demo_root, 2, 4)
  with open(procs[0].log.replace("logs1", "logs")) as f:
    assert f"resuming from step {killed_at}" in f.read()
  _assert_trees_close(_params(workdir), _params(two_by_four), atol=0)


def test_two_process_extraction_writes_the_same_descriptors(demo_root, one_by_eight,
                                                             tmp_path):
  """2 x 4 extraction of the same checkpoint = 1 x 8: rows, order, values; written once."""
  out = {}
  for name, (n, d) in {"1x8": (1, 8), "2x4": (2, 4)}.items():
    workdir = str(tmp_path / name)
    shutil.copytree(os.path.join(one_by_eight, "checkpoints"),
                    os.path.join(workdir, "checkpoints"))
    args = mp.main_args("in_batch", workdir, "--mode=extract", "--config.data.image_size=64",
                        "--config.eval.dataset=demo", f"--config.eval.root={demo_root}")
    mp.run(args, n, d, os.path.join(workdir, "logs"), timeout=TIMEOUT)
    out[name] = workdir
  for part in ("query", "db"):
    folders = [os.path.join(out[k], "descriptors", f"demo_{part}") for k in ("1x8", "2x4")]
    ref, got = (np.load(os.path.join(f, "descriptors.npy")) for f in folders)
    names = [open(os.path.join(f, "images.txt")).read().split() for f in folders]
    assert names[0] == names[1] and len(names[0]) == ref.shape[0] > 0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_process_stops_the_other(demo_root, tmp_path, victim):
  """Killing one process (worker or coordinator) makes the other exit with an error, not hang.

  jax's coordination service notices the missing heartbeats (`--heartbeat_timeout`) and
  terminates the survivor, naming the cause; without it, the survivor would wait in its next
  collective forever.
  """
  workdir = str(tmp_path)
  args = mp.main_args("in_batch", workdir, f"--config.data.root={demo_root}", *TRAIN)
  procs = mp.start(args, 2, 4, os.path.join(workdir, "logs"), heartbeat_timeout=5)
  mp.wait_for(lambda: all(f"process {i} of 2" in p.tail(10**6) for i, p in enumerate(procs)),
              procs, TIMEOUT, "both processes joined")
  os.killpg(procs[victim].popen.pid, signal.SIGKILL)
  t0 = time.time()
  survivor = procs[1 - victim]
  codes = mp.wait(procs, timeout=90, check=False)
  assert codes[1 - victim] != 0
  assert time.time() - t0 < 90
  log = survivor.tail(100000)
  assert ("another task died" in log or "stopped sending heartbeats" in log
          or "unhealthy" in log.lower()), log[-3000:]


# ----------------------------------------------------------------------------------------------
# Which coordinator: flags, then the JAX_* variables; all three or none.


def test_coordinator_flags_win_over_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.9:99", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve(environ=env) == distributed.Coordinator("10.0.0.9:99", 4, 3)
  assert distributed.resolve("10.0.0.1:1234", 2, 1, environ=env) == distributed.Coordinator(
      "10.0.0.1:1234", 2, 1)
  assert not distributed.resolve(environ={}).explicit  # none: jax detects the cluster


@pytest.mark.parametrize("kwargs,env,message", [
    (dict(address="10.0.0.1:1234"), {}, "missing: --num_processes (or JAX_NUM_PROCESSES), "
     "--process_id (or JAX_PROCESS_ID)"),
    (dict(num_processes=2, process_id=0), {}, "--coordinator_address"),
    (dict(address="10.0.0.1", num_processes=2, process_id=0), {}, "must be host:port"),
    (dict(address="h:1", num_processes=2, process_id=2), {}, "process_id 2 must be in"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be an integer"),
])
def test_incomplete_coordinator_settings_fail_naming_them(kwargs, env, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.resolve(**kwargs, environ=env)


def test_main_reports_an_incomplete_coordinator_before_any_work(tmp_path):
  args = mp.main_args("in_batch", str(tmp_path / "w"), "--coordinator_address=127.0.0.1:1")
  out = subprocess.run(args, cwd=mp.REPO, env=mp.env(8), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "missing: --num_processes" in out.stderr
  assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------------------------
# Every mode on several processes (issue 18): describe, evaluate, the demo-set build.


def _photos(demo_root, folder, n=40):
  """A nested folder of `n` demo photos and one broken file."""
  images = sorted(os.listdir(os.path.join(demo_root, "demo-0", "images")))[:n]
  for i, name in enumerate(images):
    sub = os.path.join(folder, "ab"[i % 2])
    os.makedirs(sub, exist_ok=True)
    shutil.copy(os.path.join(demo_root, "demo-0", "images", name), os.path.join(sub, name))
  with open(os.path.join(folder, "a", "broken.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  return folder


def _with_checkpoints(trained_workdir, workdir):
  shutil.copytree(os.path.join(trained_workdir, "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  return workdir


def _describe_args(workdir, photos):
  return mp.main_args("in_batch", workdir, "--mode=describe", "--config.data.image_size=64",
                      f"--config.describe.images={photos}", "--config.describe.chunk=2")


def test_two_process_describe_resumes_after_a_kill_and_equals_one_process(
    demo_root, one_by_eight, tmp_path):
  """describe on 2 x 4 devices, both processes killed half-way and started again: the rows
  already written are not described again, and the store equals 1 x 8's."""
  photos = _photos(demo_root, str(tmp_path / "photos"))
  chunks = 21  # 41 files, 2 per chunk
  one = _with_checkpoints(one_by_eight, str(tmp_path / "1x8"))
  mp.run(_describe_args(one, photos), 1, 8, os.path.join(one, "logs"), timeout=TIMEOUT)
  two = _with_checkpoints(one_by_eight, str(tmp_path / "2x4"))
  work = os.path.join(two, "describe", "work")
  procs = mp.start(_describe_args(two, photos), 2, 4, os.path.join(two, "logs1"))
  mp.wait_for(lambda: os.path.exists(os.path.join(work, "chunk_000003.json")), procs,
              TIMEOUT, "chunk 3 written")
  for p in procs:
    os.killpg(p.popen.pid, signal.SIGKILL)
  for p in procs:
    p.popen.wait()
  assert not os.path.exists(os.path.join(two, "describe", "config.json")), "ended before kill"
  written = sorted(int(n[6:12]) for n in os.listdir(work) if n.endswith(".json")
                   and n.startswith("chunk_"))
  assert 4 <= len(written) < chunks
  procs = mp.run(_describe_args(two, photos), 2, 4, os.path.join(two, "logs2"),
                 timeout=TIMEOUT)
  log = procs[0].tail(10**7)
  assert f"resuming, {len(written)} of {chunks} chunks" in log
  again = sorted(int(c) for c in re.findall(r"describe: chunk (\d+) written", log))
  assert again == sorted(set(range(chunks)) - set(written))  # nothing described twice
  ref, got = (os.path.join(w, "describe") for w in (one, two))
  for name in ("images.txt", "skipped.txt"):
    with open(os.path.join(ref, name)) as f, open(os.path.join(got, name)) as g:
      assert f.read() == g.read(), name
  with open(os.path.join(got, "skipped.txt")) as f:
    assert f.read().splitlines() == [os.path.join(photos, "a", "broken.jpg")]
  a, b = (np.load(os.path.join(d, "descriptors.npy")) for d in (ref, got))
  assert a.shape == (40, b.shape[1])
  np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
  assert not os.path.exists(work)


def test_two_process_evaluation_gives_the_same_map_and_whitening(demo_root, one_by_eight,
                                                                 tmp_path):
  """evaluate with learned whitening on 2 x 4 = 1 x 8: mAPs, and the whitening written once."""
  results = {}
  for name, (n, d) in {"1x8": (1, 8), "2x4": (2, 4)}.items():
    workdir = _with_checkpoints(one_by_eight, str(tmp_path / name))
    args = mp.main_args("in_batch", workdir, "--mode=evaluate", "--config.data.image_size=64",
                        "--config.eval.dataset=demo", f"--config.eval.root={demo_root}",
                        f"--config.data.root={demo_root}", "--config.eval.whitening=learned",
                        "--config.eval.whitening_pca_dim=16")
    mp.run(args, n, d, os.path.join(workdir, "logs"), timeout=TIMEOUT)
    with open(os.path.join(workdir, "results", f"evaluate_step{STEPS}.json")) as f:
      results[name] = (json.load(f), np.load(os.path.join(workdir, "whitening", "lw.npz")))
  (ref, ref_w), (got, got_w) = results["1x8"], results["2x4"]
  assert got["mAP"] == pytest.approx(ref["mAP"], abs=0.01)
  assert got["mAP_learned"] == pytest.approx(ref["mAP_learned"], abs=0.01)
  np.testing.assert_allclose(got_w["m"], ref_w["m"], atol=1e-5)
  # P is defined up to the sign of each component: compare |P| and the whitened geometry.
  np.testing.assert_allclose(np.abs(got_w["P"]), np.abs(ref_w["P"]), atol=1e-3)


_BUILD = """
import sys
from absl import logging
from retrieval_jax import distributed
logging.set_verbosity(logging.INFO)
flags = dict(a.lstrip("-").split("=", 1) for a in sys.argv[2:])
distributed.initialize(distributed.resolve(flags["coordinator_address"],
                                           int(flags["num_processes"]),
                                           int(flags["process_id"])), 120, 30)
from retrieval_jax.data import demo
print("built", demo.build(sys.argv[1], seed=0), flush=True)
"""


def test_two_processes_build_the_demo_set_once(demo_root, tmp_path):
  """Two processes on an empty folder: process 0 builds, process 1 waits, both get the set."""
  root = str(tmp_path / "empty")
  procs = mp.run([sys.executable, "-c", _BUILD, root], 2, 1, str(tmp_path / "logs"),
                 timeout=TIMEOUT)
  logs = [p.tail(10**6) for p in procs]
  assert all(f"built {root}/demo-0" in log for log in logs)
  assert "Building the demo set" in logs[0] and "Building the demo set" not in logs[1]
  assert demo.fingerprint(os.path.join(root, "demo-0")) == demo.fingerprint(
      os.path.join(demo_root, "demo-0"))
  assert not [n for n in os.listdir(os.path.join(root, "demo-0")) if n.endswith(".tmp")]
