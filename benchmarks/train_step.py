"""Training-step throughput of a config on whatever devices JAX sees (synthetic batches).

  python benchmarks/train_step.py --config=configs/demo.py --steps=10 \
      --config.data.image_size=128

Prints compile time, steady-state seconds per step and images/s. The input pipeline is
measured separately (benchmarks/input_pipeline.py); here the batch is a fixed random array,
so the number is the compute ceiling of the step.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after compilation.")


def main(argv):
  del argv
  from retrieval_jax import sharding  # pylint: disable=import-outside-toplevel
  from retrieval_jax.train import state as train_state  # pylint: disable=import-outside-toplevel
  from retrieval_jax.train import step as train_step  # pylint: disable=import-outside-toplevel
  c = _CONFIG.value
  mesh = sharding.make_mesh(c.mesh.shape, c.mesh.axes)
  model, tx, state = train_state.create(c, mesh)
  step = train_step.compile_train_step(model, tx, c.loss, mesh, state)
  k, m, s = c.data.classes_per_batch, c.data.images_per_class, c.data.image_size
  rng = np.random.default_rng(0)
  batch = sharding.to_global({"image": rng.integers(0, 255, (k * m, s, s, 3), np.uint8),
                              "label": np.repeat(np.arange(k, dtype=np.int32), m)}, mesh)
  t = time.time()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.time() - t
  t, cpu = time.time(), time.process_time()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  per_step = (time.time() - t) / _STEPS.value
  cpu_per_step = (time.process_time() - cpu) / _STEPS.value
  print(f"devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
        f"backbone={c.model.backbone} image={s} batch={k * m} dtype={c.model.dtype}: "
        f"compile+first step {compile_s:.1f}s, {per_step:.3f}s/step, "
        f"{k * m / per_step:.1f} images/s, {k * m / cpu_per_step:.1f} images/CPU-s "
        f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  app.run(main)
