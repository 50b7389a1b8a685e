"""launch/tpu_pod.sh, launch/gpu_multinode.sh and launch/slurm_gpu.sbatch, with fake tools.

`gcloud`, `srun` and, on the "workers", `git` and `python3` are small scripts on PATH that
record their argv as JSON lines. The fake `gcloud ... ssh --command C` runs C with bash in a
scratch HOME, as a TPU worker's login shell would, so the tests see the argv that reaches
main.py after both shells; an argument with spaces and parentheses must arrive intact.
"""
import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
GPU = os.path.join(REPO, "launch", "gpu_multinode.sh")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
SCALES = "--config.extract.scales=(1, 0.7071, 0.5)"
ODD = "--config.eval.root=/data/my set (copy)"

RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""  # an absolute interpreter: the fake `python3` must not run itself

FAKE_GCLOUD = RECORDER + """
args = sys.argv[1:]
if "describe" in args:
  print(os.environ.get("FAKE_STATE", "READY"))
if "--command" in args:
  import subprocess
  env = dict(os.environ, HOME=os.environ["FAKE_HOME"],
             PATH=os.environ["FAKE_WORKER_BIN"] + ":" + os.environ["PATH"])
  sys.exit(subprocess.run(["bash", "-c", args[args.index("--command") + 1]], env=env).returncode)
"""

FAKE_GIT = RECORDER + """
if sys.argv[1:2] == ["clone"]:
  os.makedirs(os.path.join(sys.argv[-1], ".git"))
"""


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def fake(tmp_path):
  """PATH with fake gcloud / srun; fake git / python3 for the "workers"; the argv log."""
  bin_dir, worker_bin, home = tmp_path / "bin", tmp_path / "worker_bin", tmp_path / "home"
  for d in (bin_dir, worker_bin, home):
    d.mkdir()
  _write(bin_dir / "gcloud", FAKE_GCLOUD)
  _write(bin_dir / "srun", RECORDER)
  _write(worker_bin / "git", FAKE_GIT)
  _write(worker_bin / "python3", RECORDER)
  log = tmp_path / "argv.jsonl"
  env = {k: v for k, v in os.environ.items()
         if k not in ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "COORDINATOR", "DRY_RUN")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(home),
             FAKE_WORKER_BIN=str(worker_bin))

  class Fake:
    def __init__(self):
      self.env, self.home, self.worker_bin = env, home, worker_bin

    def calls(self):
      if not log.exists():
        return []
      return [json.loads(line) for line in log.read_text().splitlines()]

    def run(self, script, *args, cwd=None, **settings):
      e = dict(self.env, **{k: str(v) for k, v in settings.items()})
      return subprocess.run(["bash", script, *args], env=e, cwd=cwd or str(tmp_path),
                            capture_output=True, text=True, timeout=60)
  return Fake()


TPU_ENV = dict(TPU="my-pod", ZONE="us-central2-b", CONFIG="configs/demo.py",
               WORKDIR="gs://bucket/run one", REPO_URL="https://example.com/r.git")
MAIN_ARGV = ["python3", "main.py", "--config=configs/demo.py", "--workdir=gs://bucket/run one",
             "--mode=train", "--distributed=on", SCALES, ODD]


def _dry_lines(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _ssh(worker, command):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone", "us-central2-b",
          f"--worker={worker}", "--command", command]


def test_tpu_pod_dry_run_prints_the_exact_commands(fake):
  out = fake.run(TPU_POD, "run", SCALES, ODD, DRY_RUN=1, **TPU_ENV)
  assert out.returncode == 0, out.stderr
  lines = _dry_lines(out.stdout)
  assert [line[:6] for line in lines] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-pod"]] + [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]] * 2
  assert lines[0][6:] == ["--zone", "us-central2-b", "--format=value(state)"]
  setup, start = lines[1], lines[2]
  assert setup[:-1] == _ssh("all", "")[:-1] and start[:-1] == _ssh("all", "")[:-1]
  assert ("git clone -q https://example.com/r.git src" in setup[-1]
          and "pip install -q -e '.[tpu]'" in setup[-1])
  # The job line, as a worker's shell reads it: the same argv as typed here.
  job = start[-1].split("bash -c ", 1)[1].split(" > ~/retrieval_jax/run.log")[0]
  assert shlex.split(shlex.split(job)[0])[:len(MAIN_ARGV)] == MAIN_ARGV
  assert fake.calls() == []  # nothing ran


def test_tpu_pod_start_runs_detached_with_the_exact_argv(fake):
  out = fake.run(TPU_POD, "start", SCALES, ODD, **TPU_ENV)
  assert out.returncode == 0, out.stderr
  calls = fake.calls()
  assert calls[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert ["git", "clone", "-q", "https://example.com/r.git", "src"] in calls
  assert ["python3", "-m", "pip", "install", "-q", "-e", ".[tpu]"] in calls
  run_dir = fake.home / "retrieval_jax"
  deadline = time.time() + 20
  while not (run_dir / "run.exit").exists() and time.time() < deadline:
    time.sleep(0.1)
  assert (run_dir / "run.exit").read_text().strip() == "0"  # the detached job finished
  assert fake.calls()[-1] == MAIN_ARGV
  assert (run_dir / "run.pid").read_text().strip().isdigit()
  assert (run_dir / "run.log").exists()


def test_tpu_pod_logs_and_stop(fake):
  out = fake.run(TPU_POD, "logs", "3", DRY_RUN=1, **TPU_ENV)
  assert _dry_lines(out.stdout) == [_ssh(3, "tail -n 200 -F ~/retrieval_jax/run.log")]
  (fake.home / "retrieval_jax").mkdir()
  sleeper = subprocess.Popen(["setsid", "sleep", "60"])
  (fake.home / "retrieval_jax" / "run.pid").write_text(f"{sleeper.pid}\n")
  out = fake.run(TPU_POD, "stop", **TPU_ENV)
  assert out.returncode == 0, out.stderr
  assert sleeper.wait(timeout=10) == -15  # the job's process group got SIGTERM
  assert (fake.home / "retrieval_jax" / "run.exit").read_text().strip() == "stopped"


def test_tpu_pod_restarts_a_preempted_vm(fake):
  """A preempted VM is recreated (when its type is known) before the job starts again."""
  out = fake.run(TPU_POD, "run", MAX_RESTARTS=0, POLL_S=0, FAKE_STATE="PREEMPTED",
                 ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base", **TPU_ENV)
  calls = [c for c in fake.calls() if c[0] == "gcloud"]
  verbs = [c[4] for c in calls]
  assert verbs[:4] == ["describe", "delete", "create", "ssh"]
  assert calls[2][5:] == ["my-pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                          "--version", "tpu-ubuntu2204-base"]
  assert out.returncode == 2 and "gave up after 0 restarts" in out.stderr


@pytest.mark.parametrize("unset,message", [
    ("TPU", "set TPU"), ("ZONE", "set ZONE"), ("CONFIG", "set CONFIG"),
    ("WORKDIR", "set WORKDIR"), ("REPO_URL", "no git remote 'origin': set REPO_URL")])
def test_tpu_pod_checks_its_inputs(fake, tmp_path, unset, message):
  env = {k: v for k, v in TPU_ENV.items() if k != unset}
  repo = tmp_path / "checkout"  # a copy without a remote
  (repo / "launch").mkdir(parents=True)
  (repo / "configs").mkdir()
  (repo / "configs" / "demo.py").write_text("")
  (repo / "launch" / "tpu_pod.sh").write_text(open(TPU_POD).read())
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  out = fake.run(str(repo / "launch" / "tpu_pod.sh"), "run", DRY_RUN=1, **env)
  assert out.returncode == 2 and message in out.stderr, out.stderr


def test_tpu_pod_rejects_a_missing_config(fake):
  out = fake.run(TPU_POD, "run", DRY_RUN=1, **dict(TPU_ENV, CONFIG="configs/nope.py"))
  assert out.returncode == 2 and "configs/nope.py is not a file" in out.stderr


def test_tpu_pod_rejects_an_unknown_subcommand(fake):
  out = fake.run(TPU_POD, "launch", **TPU_ENV)
  assert out.returncode == 2 and "unknown subcommand 'launch'" in out.stderr


GPU_MAIN = ["main.py", "--config=configs/demo.py", "--workdir=/shared/run x", "--mode=train",
            "--heartbeat_timeout=100"]


def test_gpu_slurm_runs_one_process_per_gpu(fake):
  env = dict(CONFIG="configs/demo.py", WORKDIR="/shared/run x", SLURM_JOB_ID="7",
             SLURM_GPUS_ON_NODE="8")
  out = fake.run(GPU, SCALES, ODD, **env)
  assert out.returncode == 0, out.stderr
  expected = ["srun", "--ntasks-per-node=8", "--gpus-per-node=8", "--kill-on-bad-exit=1",
              "python3", *GPU_MAIN, "--distributed=on", SCALES, ODD]
  assert fake.calls() == [expected]
  dry = fake.run(GPU, SCALES, ODD, DRY_RUN=1, **env)
  assert _dry_lines(dry.stdout) == [expected] and len(fake.calls()) == 1


def test_gpu_explicit_coordinator_passes_the_flags_main_reads(fake):
  env = dict(CONFIG="configs/demo.py", WORKDIR="/shared/run x", COORDINATOR="10.0.0.1:1234",
             NUM_PROCESSES=2, PROCESS_ID=1, PYTHON=str(fake.worker_bin / "python3"))
  out = fake.run(GPU, SCALES, ODD, **env)
  assert out.returncode == 0, out.stderr
  assert fake.calls() == [["python3", *GPU_MAIN, "--coordinator_address=10.0.0.1:1234",
                           "--num_processes=2", "--process_id=1", SCALES, ODD]]
  # The flags are main.py's own (a typo would be rejected by absl before any work).
  text = open(os.path.join(REPO, "main.py")).read()
  for flag in ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout"):
    assert f'"{flag}"' in text


@pytest.mark.parametrize("settings,message", [
    (dict(), "not inside a SLURM allocation"),
    (dict(COORDINATOR="10.0.0.1"), "must be host:port"),
    (dict(COORDINATOR="10.0.0.1:1234", PROCESS_ID=0), "set NUM_PROCESSES"),
    (dict(COORDINATOR="10.0.0.1:1234", NUM_PROCESSES=2, PROCESS_ID=2), "set PROCESS_ID"),
    (dict(SLURM_JOB_ID=7), "set GPUS_PER_NODE"),
    (dict(CONFIG="configs/nope.py"), "configs/nope.py: no such file"),
])
def test_gpu_checks_its_inputs(fake, settings, message):
  env = dict(dict(CONFIG="configs/demo.py", WORKDIR="/w"), **settings)
  out = fake.run(GPU, **env)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert fake.calls() == []


def test_sbatch_example_asks_one_task_per_gpu(fake, tmp_path):
  text = open(SBATCH).read()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  out = fake.run(SBATCH, ODD, SLURM_JOB_ID="9", SLURM_SUBMIT_DIR=REPO,
                 WORKDIR="/shared/run x", CONFIG="configs/demo.py")
  assert out.returncode == 0, out.stderr
  (call,) = fake.calls()
  assert call[:4] == ["srun", "--ntasks-per-node=8", "--gpus-per-node=8",
                      "--kill-on-bad-exit=1"] and call[-2:] == ["--distributed=on", ODD]
