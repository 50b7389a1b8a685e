"""The training loop: one compiled step, automatic exact resume, progress, checkpoints.

Runs `config.train.num_steps` steps of the in-step-mined loss on `config.data`, evaluating on
`config.eval` before training (optional) and at the end. Re-running the same command in the
same workdir resumes from the latest checkpoint with the same batches (the grain iterator is
checkpointed beside the train state).
"""
import json
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import jax
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import evaluate as evaluate_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import train_state as train_state_lib
from retrieval_jax import train_step as train_step_lib
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
import retrieval_jax.data.demo  # pylint: disable=unused-import  (registers "demo")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


def data_root(config, workdir: str, field: str = "root") -> str:
  return config.data.get(field) or os.path.join(workdir, "data")


def _progress(step, num_steps, metrics, images_per_s, eta_s):
  extra = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k != "loss")
  return (f"step {step}/{num_steps} loss={metrics['loss']:.4f} {extra} "
          f"{images_per_s:.1f} images/s ETA {eta_s / 60:.1f} min")


class MetricWriter:
  """Metrics to <workdir>/metrics.jsonl (and TensorBoard when tensorboardX is installed)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: Dict[str, float]):
    self._f.write(json.dumps({"step": step, **metrics}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    self._f.close()
    if self._tb is not None:
      self._tb.close()


def _eval(config, workdir, model, state, mesh, tag) -> Optional[Dict[str, Any]]:
  if not config.eval.dataset:
    return None
  test_set = datasets.get_dataset(config.eval.dataset,
                                  config.eval.root or data_root(config, workdir),
                                  config.eval.split)
  return evaluate_lib.evaluate(model, state.variables, test_set, mesh=mesh,
                               extract_config=config.extract, workdir=workdir, tag=tag,
                               pictures=config.eval.pictures)


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (resuming if a checkpoint exists); returns {"before": ..., "after": ...}."""
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].platform)
  train_set = datasets.get_dataset(config.data.name, data_root(config, workdir), "train")
  model, tx, state = train_state_lib.create(config, mesh)
  ds = grain_pipeline.train_dataset(
      train_set.images, train_set.labels, classes_per_batch=config.data.classes_per_batch,
      images_per_class=config.data.images_per_class, image_size=config.data.image_size,
      seed=config.seed, num_steps=config.train.num_steps,
      process_index=jax.process_index(), process_count=jax.process_count(),
      crop_scale=tuple(config.data.crop_scale))
  data_iter = grain_pipeline.train_iterator(ds, num_threads=config.data.num_threads)
  mgr = checkpointing.manager(workdir, keep=config.train.keep_checkpoints)
  results: Dict[str, Any] = {}
  if mgr.latest_step() is not None:
    state, start = checkpointing.restore(mgr, train_state_lib.abstract_state(state), data_iter)
    logging.info("resuming from step %d", start)
  elif config.train.eval_before:
    results["before"] = _eval(config, workdir, model, state, mesh, "before")
  start = int(state.step)

  step_fn = train_step_lib.compile_train_step(model, tx, config.loss, mesh, state)
  writer = MetricWriter(workdir)
  global_batch = config.data.classes_per_batch * config.data.images_per_class
  pending, t0, images_done = None, time.time(), 0
  last_good = start
  for step in range(start, config.train.num_steps):
    batch = sharding_lib.to_global(next(data_iter), mesh)
    state, metrics = step_fn(state, batch)
    # Fetch the previous step's metrics while this one runs (keeps the host off the device).
    if pending is not None:
      last_good = _report(*pending, config, writer, t0, images_done, start, last_good)
    images_done += global_batch
    pending = (step + 1, metrics)
    if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == config.train.num_steps:
      _check_finite(step + 1, metrics, last_good)
      checkpointing.save(mgr, step + 1, state, data_iter)
      last_good = step + 1
  if pending is not None:
    _report(*pending, config, writer, t0, images_done, start, last_good, force=True)
  mgr.wait_until_finished()
  writer.close()
  results["after"] = _eval(config, workdir, model, state, mesh, "after")
  _write_summary(workdir, results)
  return results


def _check_finite(step, metrics, last_good):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; the last good checkpoint (step {last_good}) is kept. "
        "Try a lower optim.lr, optim.grad_clip=1.0, or model.dtype=float32.")


def _report(step, metrics, config, writer, t0, images_done, start, last_good, force=False):
  if step % config.train.log_every and not force:
    return last_good
  m = {k: float(v) for k, v in metrics.items()}
  _check_finite(step, m, last_good)
  elapsed = time.time() - t0
  rate = images_done / max(elapsed, 1e-9)
  steps_per_s = (step - start) / max(elapsed, 1e-9)
  eta = (config.train.num_steps - step) / max(steps_per_s, 1e-9)
  logging.info(_progress(step, config.train.num_steps, m, rate, eta))
  writer.write(step, dict(m, images_per_s=rate))
  return last_good


def _write_summary(workdir: str, results: Dict[str, Any]) -> None:
  path = os.path.join(workdir, "results", "train_summary.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  keep = {k: {m: v for m, v in (r or {}).items() if isinstance(v, (int, float))}
          for k, r in results.items()}
  with open(path, "w") as f:
    json.dump(keep, f, indent=1)
