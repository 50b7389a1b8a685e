"""The training loop: one compiled step, automatic exact resume, progress, checkpoints.

Runs `config.train.num_steps` steps (or `num_epochs` epochs of epoch-level tuples) on
`config.data`, evaluating on `config.eval` before training (optional) and at the end.
Re-running the same command in the same workdir resumes from the latest checkpoint with the
same batches: the grain iterator is checkpointed beside the train state, and an epoch's mined
tuples are kept in `<workdir>/tuples/` so that a run resumed mid-epoch trains on the tuples
the interrupted run mined.

Inputs (`config.train.mining`): `inputs.py`; the compiled step: `step.py`; the state and
its birth: `state.py`; the optimiser: `optim.py`.
"""
import json
import os
from typing import Any, Dict, List, Optional

from absl import logging
import jax
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import errors
from retrieval_jax import networks
from retrieval_jax import paths
from retrieval_jax import progress as progress_lib
from retrieval_jax import restore
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.data import datasets
from retrieval_jax.data import image_io
from retrieval_jax.data import integrity
from retrieval_jax.evaluation import pipeline
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.postprocess import clustering
from retrieval_jax.train import inputs as inputs_lib
from retrieval_jax.train import state as state_lib
from retrieval_jax.train import step as step_lib


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss (or the params) became NaN/Inf; the last good checkpoint is kept."""


def _progress_line(step, num_steps, metrics, images_per_s, eta_s):
  extra = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k != "loss")
  return (f"step {step}/{num_steps} loss={metrics['loss']:.4f} {extra} "
          f"{images_per_s:.1f} images/s ETA {eta_s / 60:.1f} min")


class MetricWriter:
  """Metrics to <workdir>/metrics.jsonl (and TensorBoard when tensorboardX is installed).

  Only process 0 writes; the others hold a writer that drops everything. In a bucket
  (gs://...), where objects cannot be appended to, the lines go to a rolling set of shards,
  `metrics.jsonl`, `metrics.jsonl.1`, `metrics.jsonl.2`, ... of at most `SHARD_LINES` lines
  each: a write rewrites only the last shard, so its cost does not grow with the run
  (`read_metrics` reads them back in order). TensorBoard files are not written there.
  """

  SHARD_LINES = 1000

  def __init__(self, workdir: str):
    self._f = self._tb = None
    self._remote_lines = None
    if not sharding_lib.is_main_process():
      return
    path = storage.join(workdir, "metrics.jsonl")
    if storage.is_remote(workdir):
      self._base = path
      shards = _metric_shards(workdir)
      self._shard = len(shards) - 1 if shards else 0
      self._remote_lines = (storage.read_text(shards[-1]).splitlines(keepends=True)
                            if shards else [])
      logging.info("metrics to %s (shards of %d lines; no TensorBoard files in a bucket)",
                   path, self.SHARD_LINES)
      return
    os.makedirs(workdir, exist_ok=True)
    self._f = open(path, "a")
    try:
      # Optional dependency: TensorBoard files only where tensorboardX is installed.
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: Dict[str, float]):
    line = json.dumps({"step": step, **metrics}) + "\n"
    if self._remote_lines is not None:
      if len(self._remote_lines) >= self.SHARD_LINES:
        self._shard, self._remote_lines = self._shard + 1, []
      self._remote_lines.append(line)
      name = self._base if self._shard == 0 else f"{self._base}.{self._shard}"
      storage.write_text(name, "".join(self._remote_lines))
      return
    if self._f is None:
      return
    self._f.write(line)
    self._f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self._f is not None:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


def _metric_shards(workdir: str) -> List[str]:
  """metrics.jsonl, metrics.jsonl.1, ... that exist, in order."""
  base = storage.join(workdir, "metrics.jsonl")
  shards = []
  while storage.exists(base if not shards else f"{base}.{len(shards)}"):
    shards.append(base if not shards else f"{base}.{len(shards)}")
  return shards


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """Every metrics line a run wrote (a local file, or a bucket's shards), in order."""
  return [json.loads(line) for path in _metric_shards(workdir)
          for line in storage.read_text(path).splitlines() if line.strip()]


def _eval(config, workdir, model, state, mesh, tag) -> Optional[Dict[str, Any]]:
  """The evaluation pipeline of --mode=evaluate on the current weights, less the stages
  named in `train.eval_skip` (named in the result's lines)."""
  return pipeline.evaluate_network(config, workdir, model, state.variables, mesh,
                                   step=int(state.step), tag=tag,
                                   skip=tuple(config.train.eval_skip))


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (resuming if a checkpoint exists); returns {"before": ..., "after": ...}.

  `config.train.stop_after = k` ends the run after step k with a checkpoint, as a preemption
  would (no final evaluation, "after" is None); the same command without it resumes.

  Raises:
    NonFiniteLossError: the loss or the params became NaN/Inf; the message names the step.
  """
  mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].platform)
  train_set = datasets.get_dataset(config.data.name, paths.data_root(config, workdir),
                                   config.data.split, config=config)
  train_set, skipped = _check_data(config, workdir, train_set)
  model = networks.build_network(config.model)
  networks.check_classes(config.model, int(np.max(train_set.labels, initial=-1)) + 1)
  inputs = inputs_lib.make_inputs(config, train_set, mesh, model, workdir)
  accumulate = int(config.optim.accumulate_steps)
  mgr = checkpointing.manager(workdir, keep=config.train.keep_checkpoints)
  latest = mgr.latest_step()
  variables = restore.init_variables(model, config.data.image_size, jax.random.key(config.seed),
                                     config.model.pretrained)
  if latest is None:
    variables = _initial_codebook(config, model, variables, train_set, mesh)
  model, tx, state = state_lib.create(
      config, mesh, num_classes=inputs.num_classes, steps_per_epoch=inputs.updates_per_epoch,
      total_updates=max(1, inputs.total_steps // accumulate), variables=variables)
  head = state_lib.make_head(config.loss, inputs.num_classes)
  logging.info("%d trainable params", state_lib.num_params(state.trainable))
  total = inputs.total_steps
  stop = min(total, config.train.stop_after) if config.train.stop_after else total

  results: Dict[str, Any] = {}
  if latest is not None:
    state, _ = checkpointing.restore(mgr, state_lib.abstract_state(state),
                                     inputs.resume_iterator(latest))
    logging.info("resuming from step %d", latest)
  elif config.train.eval_before:
    results["before"] = _eval(config, workdir, model, state, mesh, "before")
  start = int(state.step)

  step_fn = step_lib.compile_train_step(model, tx, config.loss, mesh, state, head=head,
                                        seed=config.seed)
  writer = MetricWriter(workdir)
  pending, progress = None, progress_lib.Progress(total, start=start)
  last_good = latest or 0
  _write_skipped(config, workdir, skipped)
  try:
    for step in range(start, stop):
      batch = sharding_lib.to_global(inputs.next_batch(step, state), mesh)
      state, metrics = step_fn(state, batch)
      # The previous step's metrics are fetched while this one runs: the host checks every
      # loss for NaN one step behind, and never waits on the step it just dispatched.
      if pending is not None:
        _report(*pending, config, writer, progress, last_good)
      progress.update(step + 1, images=inputs.images_per_step)
      pending = (step + 1, metrics)
      if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == stop:
        _check_finite(step + 1, metrics, last_good)
        checkpointing.save(mgr, step + 1, state, inputs.iterator)
        last_good = step + 1
      if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and step + 1 < total:
        _check_finite(step + 1, metrics, last_good)
        periodic = _eval(config, workdir, model, state, mesh, f"step{step + 1}")
        if periodic:
          writer.write(step + 1, {f"eval/{k}": float(v) for k, v in periodic.items()
                                  if isinstance(v, (int, float, np.floating))})
    if pending is not None:
      _report(*pending, config, writer, progress, last_good, force=True)
  finally:
    # A save in flight completes (or a kill leaves only its temporary folder behind).
    mgr.wait_until_finished()
    writer.close()
    _write_skipped(config, workdir, skipped)
  if stop < total:
    logging.info("stopped after step %d of %d (train.stop_after); run again to resume",
                 stop, total)
    results["after"] = None
    return results
  results["after"] = _eval(config, workdir, model, state, mesh, "after")
  _write_summary(workdir, results)
  return results


def _check_data(config, workdir: str, train_set):
  """Before any compute: training images that do not exist are dropped, with the landmarks
  they empty (`integrity.drop_unreadable_train`), and the test set must be complete
  (`test_set.load`, once per process, unless eval.allow_missing). Returns (train set, skipped
  (path, reason) list); undecodable files found while training are added by the pipeline."""
  balanced = config.train.mining == "in_batch" and config.data.sampler == "balanced"
  cleanup = integrity.drop_unreadable_train(
      train_set, check="exists", min_images=1 if config.data.sampler == "shuffle" else 2,
      min_landmarks=config.data.classes_per_batch if balanced else 1)
  test_set_lib.load(config, workdir)  # checked once; every evaluation uses it
  # A user folder's unreadable photos, left out by its loader (data/folder.py), too.
  return cleanup.train_set, list(train_set.skipped) + cleanup.skipped


def _write_skipped(config, workdir: str, skipped) -> None:
  """results/<data.name>_skipped.txt: training images left out, before and while training."""
  paths.write_skipped_list(workdir, config.data.name,
                           list(skipped) + image_io.GLOBAL_SKIPS.entries)


def _initial_codebook(config, model, variables, train_set, mesh):
  """`model.netvlad_init` (checked by config_checks): "" keeps the random centres, "kmeans"
  learns them from images."""
  if config.model.netvlad_init == "kmeans":
    return clustering.netvlad_kmeans_init(config, model, variables, train_set.images, mesh)
  return variables


def _check_finite(step: int, metrics, last_good: int) -> None:
  """Raises NonFiniteLossError if the loss of `step` or the params after it are not finite."""
  bad = {k: float(metrics[k]) for k in ("loss", "param_norm") if k in metrics}
  bad = {k: v for k, v in bad.items() if not np.isfinite(v)}
  if bad:
    what = " and ".join(f"{k} is {v}" for k, v in bad.items())
    if last_good:
      kept = (f"the last good checkpoint (step {last_good}) is kept; after the change, the "
              "same command resumes from it")
    else:
      kept = ("no checkpoint was written before it, so after the change the same command "
              "starts again from the initial weights")
    raise NonFiniteLossError(
        f"{what} at step {step}; stopping, {kept}. Try a lower optim.lr, "
        "optim.grad_clip=1.0, optim.warmup_steps, or model.dtype=float32.")


def _report(step, metrics, config, writer, progress: progress_lib.Progress, last_good,
            force=False):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    _check_finite(step, {"loss": loss}, last_good)
  if step % config.train.log_every and not force:
    return
  m = {k: float(v) for k, v in metrics.items()}
  # Reported one step behind dispatch, so `progress` stands exactly at `step` here.
  rate, eta = progress.rate(), progress.eta_s()
  logging.info(_progress_line(step, progress.total, m, rate, eta))
  writer.write(step, dict(m, images_per_s=rate))


def _write_summary(workdir: str, results: Dict[str, Any]) -> None:
  """results/train_summary.json; a resumed run keeps the first run's "before" numbers."""
  if not sharding_lib.is_main_process():
    return
  results = pipeline.with_saved_before(workdir, results)
  path = storage.join(paths.results_dir(workdir), "train_summary.json")
  keep = {k: {m: v for m, v in (r or {}).items() if isinstance(v, (int, float))}
          for k, r in results.items()}
  storage.write_text(path, json.dumps(keep, indent=1))
