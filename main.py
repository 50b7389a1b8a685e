"""retrieval_jax entry point: flags in, one call out.

  python main.py --config=configs/demo.py --workdir=/tmp/demo                  # train
  python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=evaluate  # fresh process
  python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=extract \
      --config.extract.long_side=1024

Any config field can be overridden: --config.optim.lr=1e-6. Unknown keys fail with their name.
"""
# First, before any library allocates or starts a thread: glibc keeps freed memory for reuse
# (XLA's per-call host buffers otherwise cost millions of page faults; retrieval_jax/host_memory.py).
from retrieval_jax import host_memory  # pylint: disable=g-bad-import-order
host_memory.keep_freed_memory()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import logging as pylogging  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retrieval_jax import errors  # imports nothing else: JAX starts in main()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, data cache and results go.")
_MODE = flags.DEFINE_string(
    "mode", "train", "What to run: a mode of retrieval_jax/run.py's MODES (train, evaluate, "
    "extract, ...); an unknown name fails listing them.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "on"],
    "on: join a multi-process run (TPU pods, multi-node GPU; see launch/). The coordinator "
    "comes from the three flags below, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
    "JAX_PROCESS_ID, else jax detects the TPU pod, SLURM or MPI job.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies --distributed=on).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100,
    "Seconds after which a silent process counts as dead and the others exit with an error.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of user errors (a missing dataset, a bad config "
    "value, ...), which otherwise print one message and exit with code 2; also "
    "RETRIEVAL_JAX_VERBOSE=1.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl's flag parsing; a bad flag or config key prints one line naming it and exits 2.

  ml_collections reports an unknown `--config.<key>` as a bare AttributeError / KeyError of
  the last path part, so the message names the whole argument. RETRIEVAL_JAX_VERBOSE=1 or
  --verbose re-raises with the traceback.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if errors.verbose_requested("--verbose" in argv[1:]):
      raise
    detail = " ".join(str(e).split()) or type(e).__name__
    key = re.search(r"[A-Za-z_]\w*", detail)
    if isinstance(e, (AttributeError, KeyError)) and key:
      bad = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.lstrip("-").startswith(
          "config.") and key.group() in a.split("=")[0].split(".")]
      hint = re.search(r"Did you mean \W*(\w+)", detail)
      detail = (f"unknown config key {bad[0] if bad else key.group()!r}"
                f"{f' (did you mean {hint.group(1)!r}?)' if hint else ''}; the keys and "
                "their defaults are in configs/common.py")
    print(f"error: {detail}", file=sys.stderr)
    raise SystemExit(errors.EXIT_CODE) from None


class _QuietLibraryInfo(pylogging.Filter):
  """Drops orbax's INFO chatter so the progress lines stay readable; warnings still pass."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  logging.info("host memory: %s", host_memory.describe())
  # Before JAX starts its backends: one CPU device per core for the extraction modes.
  from retrieval_jax import cpu_devices  # pylint: disable=import-outside-toplevel
  cpu_devices.split_host(_MODE.value, _CONFIG.value.extract.get("cpu_devices", 0))
  # Imported here so that `--help` and config errors come before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  from retrieval_jax import run  # pylint: disable=import-outside-toplevel
  from retrieval_jax import distributed  # pylint: disable=import-outside-toplevel
  from retrieval_jax import storage  # pylint: disable=import-outside-toplevel
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value == "on" or any(v is not None for v in explicit):
    distributed.initialize(distributed.resolve(*explicit), _INIT_TIMEOUT.value,
                           _HEARTBEAT_TIMEOUT.value)
  # A local path becomes absolute, a URL (gs://bucket/run) stays one; an unwritable workdir
  # fails here, naming it, before anything is compiled.
  config, workdir = _CONFIG.value, storage.resolve(_WORKDIR.value)
  errors.report_user_errors(storage.check_writable, workdir, verbose=_VERBOSE.value)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, f"config_{_MODE.value}.json"),
                       config.to_json_best_effort(indent=1))
  logging.info("mode=%s workdir=%s\n%s", _MODE.value, workdir, config)
  result = errors.report_user_errors(run.run, _MODE.value, config, workdir,
                                     verbose=_VERBOSE.value)
  if result:
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
