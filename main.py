"""retrieval_jax entry point: flags in, one call out.

  python main.py --config=configs/demo.py --workdir=/tmp/demo                  # train
  python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=evaluate  # fresh process
  python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=extract \
      --config.extract.long_side=1024

Any config field can be overridden: --config.optim.lr=1e-6. Unknown keys fail with their name.
"""
import json
import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, data cache and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "extract", "evaluate"], "What to run.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "on"],
    "on: jax.distributed.initialize() (TPU pods, multi-node GPU; see launch/).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraryInfo(pylogging.Filter):
  """Drops orbax's INFO chatter so the progress lines stay readable; warnings still pass."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  # Imported here so that `--help` and config errors come before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  from retrieval_jax import cli  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value == "on":
    # Reads the coordinator from TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS /
    # JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    jax.distributed.initialize()
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"config_{_MODE.value}.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  logging.info("mode=%s workdir=%s\n%s", _MODE.value, workdir, config)
  result = cli.run(_MODE.value, config, workdir)
  if result:
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
