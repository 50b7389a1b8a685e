"""The training loop: one compiled step, automatic exact resume, progress, checkpoints.

Runs `config.train.num_steps` steps (or `num_epochs` epochs of epoch-level tuples) on
`config.data`, evaluating on `config.eval` before training (optional) and at the end.
Re-running the same command in the same workdir resumes from the latest checkpoint with the
same batches: the grain iterator is checkpointed beside the train state, and an epoch's mined
tuples are kept in `<workdir>/tuples/` so that a run resumed mid-epoch trains on the tuples
the interrupted run mined.

Inputs (`config.train.mining`):
  "in_batch": class-balanced K x M batches (or shuffled ones, `data.sampler`), hard examples
    mined inside the step (pair losses, Vaccaro triplets) or none (ArcFace / CosFace);
  "epoch": the reference's tuples (q, p, n_1..n_N), negatives re-mined every epoch from a
    random pool described by the current network.
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
from retrieval_jax import extract as extract_lib
from retrieval_jax import losses
from retrieval_jax import mining
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import train_state as train_state_lib
from retrieval_jax import train_step as train_step_lib
from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import tuples as tuples_lib
from retrieval_jax.models import retrieval_net

MINING_MODES = ("in_batch", "epoch")


class NonFiniteLossError(FloatingPointError):
  """The loss (or the params) became NaN/Inf; the last good checkpoint is kept."""


def data_root(config, workdir: str, field: str = "root") -> str:
  return config.data.get(field) or os.path.join(workdir, "data")


def _progress(step, num_steps, metrics, images_per_s, eta_s):
  extra = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k != "loss")
  return (f"step {step}/{num_steps} loss={metrics['loss']:.4f} {extra} "
          f"{images_per_s:.1f} images/s ETA {eta_s / 60:.1f} min")


class MetricWriter:
  """Metrics to <workdir>/metrics.jsonl (and TensorBoard when tensorboardX is installed).

  Only process 0 writes; the others hold a writer that drops everything.
  """

  def __init__(self, workdir: str):
    self._f = self._tb = None
    if not sharding_lib.is_main_process():
      return
    os.makedirs(workdir, exist_ok=True)
    self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: Dict[str, float]):
    if self._f is None:
      return
    self._f.write(json.dumps({"step": step, **metrics}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self._f is not None:
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


# ----------------------------------------------------------------------------------------------
# Inputs: what feeds step `s`, and which iterator a checkpoint holds.


def _classification_labels(train_set) -> np.ndarray:
  """Contiguous class ids in [0, C) for a margin head (-1 stays -1: never drawn)."""
  labels = np.asarray(train_set.labels)
  if train_set.label_ids is not None:
    return labels.astype(np.int32)
  out = np.full(labels.shape, -1, np.int32)
  valid = labels >= 0
  out[valid] = np.unique(labels[valid], return_inverse=True)[1].reshape(-1)
  return out


class BatchInputs:
  """One checkpointable iterator of K x M (or shuffled) batches for the whole run."""

  def __init__(self, config, train_set, mesh):
    c = config.data
    family = losses.get_loss(config.loss.name).family
    labels = (_classification_labels(train_set) if family == "margin_softmax"
              else np.asarray(train_set.labels))
    self.num_classes = int(labels.max()) + 1 if family == "margin_softmax" else 0
    self.total_steps = int(config.train.num_steps)
    self.updates_per_epoch = None  # config.optim.steps_per_epoch
    kw = dict(classes_per_batch=c.classes_per_batch, images_per_class=c.images_per_class,
              image_size=c.image_size, seed=config.seed, num_steps=self.total_steps,
              process_index=jax.process_index(), process_count=jax.process_count(),
              crop_scale=tuple(c.crop_scale), sampler=c.sampler, batch_size=c.batch_size,
              train_resize=c.train_resize)
    self.images_per_step = (c.batch_size if c.sampler == "shuffle" and c.batch_size
                            else c.classes_per_batch * c.images_per_class)
    if c.backend == "grain":
      ds = grain_pipeline.train_dataset(train_set.images, labels, **kw)
      self.iterator = grain_pipeline.train_iterator(ds, num_threads=c.num_threads)
    elif c.backend == "tfdata":
      # tf.data cannot checkpoint its numpy stages; batches are a pure function of the step,
      # so a resumed run restarts the dataset at the restored step instead.
      self._tf_args = (train_set.images, labels, kw)
      self.iterator, self._tf_iter = None, None
    else:
      raise ValueError(f"data.backend must be 'grain' or 'tfdata', got {c.backend!r}")

  def resume_iterator(self, step: int):
    """The iterator a checkpoint of `step` restores into (None: nothing to restore)."""
    del step
    return self.iterator

  def next_batch(self, step: int, state) -> Dict[str, np.ndarray]:
    del state
    if self.iterator is not None:
      return next(self.iterator)
    if self._tf_iter is None:
      from retrieval_jax.data import tfdata_pipeline  # pylint: disable=import-outside-toplevel
      images, labels, kw = self._tf_args
      ds = tfdata_pipeline.train_dataset(images, labels, start_step=step, **kw)
      self._tf_iter = ds.as_numpy_iterator()
    return next(self._tf_iter)


class EpochTupleInputs:
  """The reference's epochs: mine tuples with the current network, then train on them.

  Step s belongs to epoch `s // steps_per_epoch`. At the first step of an epoch the queries
  and the negative pool are drawn (seeded by (seed, epoch)), described with the current
  params, the hardest negatives mined, and the tuples written to `<workdir>/tuples/`; the
  epoch's grain iterator is what a mid-epoch checkpoint holds.
  """

  def __init__(self, config, train_set, mesh, model, workdir: str):
    c = config.data
    if losses.get_loss(config.loss.name).family != "pair":
      raise ValueError(f"train.mining='epoch' trains the reference's tuple losses "
                       f"(contrastive, triplet), not {config.loss.name!r}")
    self.config, self.mesh, self.model = config, mesh, model
    self.images = list(train_set.images)
    self.clusters = np.asarray(train_set.labels)
    self.qpool, self.ppool = tuples_lib.training_pairs(self.clusters, train_set.qidxs,
                                                       train_set.pidxs)
    self.tuples_per_step = int(c.tuples_per_batch)
    self.steps_per_epoch = tuples_lib.steps_per_epoch(c.query_size, len(self.qpool),
                                                      self.tuples_per_step)
    self.num_classes = 0
    epochs = int(config.train.num_epochs)
    self.total_steps = epochs * self.steps_per_epoch if epochs else int(config.train.num_steps)
    accumulate = int(config.optim.get("accumulate_steps", 1))
    self.updates_per_epoch = max(1, self.steps_per_epoch // accumulate)
    self.images_per_step = self.tuples_per_step * (2 + int(config.loss.num_negatives))
    self.folder = os.path.join(workdir, "tuples")
    self.epoch, self.iterator = None, None
    self._describe = extract_lib.make_describe_fn(model, mesh)

  def _path(self, epoch: int) -> str:
    return os.path.join(self.folder, f"epoch_{epoch:05d}.npz")

  def _start_epoch(self, epoch: int, tuples) -> None:
    qidxs, pidxs, nidxs = tuples
    c = self.config.data
    ds = tuples_lib.tuple_dataset(
        self.images, qidxs, pidxs, nidxs, tuples_per_step=self.tuples_per_step,
        image_size=c.image_size, seed=self.config.seed, epoch=epoch,
        pad_multiple=sharding_lib.data_parallelism(self.mesh),
        process_index=jax.process_index(), process_count=jax.process_count())
    self.epoch = epoch
    self.iterator = grain_pipeline.train_iterator(ds, num_threads=c.num_threads)

  def describe(self, variables, indices: np.ndarray) -> np.ndarray:
    """Descriptors [len(indices), D] of `images[indices]`, as training sees them."""
    n = sharding_lib.data_parallelism(self.mesh)
    batch_size = -(-int(self.config.extract.batch_size) // n) * n
    ds = tuples_lib.describe_dataset(self.images, indices, image_size=self.config.data.image_size,
                                     batch_size=batch_size)
    out = None
    for batch in grain_pipeline.train_iterator(ds, num_threads=self.config.data.num_threads):
      # Every process holds the same whole batch: place it explicitly (a raw numpy argument
      # to a sharded jit is refused on multi-host runs).
      placed = [jax.device_put(batch[k], sharding_lib.batch_sharding(self.mesh))
                for k in ("image", "mask")]
      d = np.asarray(self._describe(variables, *placed))
      if out is None:
        out = np.zeros((len(indices), d.shape[1]), np.float32)
      keep = batch["index"] >= 0
      out[batch["index"][keep]] = d[keep]
    return out

  def mine(self, epoch: int, variables):
    """(qidxs, pidxs, nidxs) of `epoch`: cirtorch's `create_epoch_tuples`."""
    c, seed = self.config.data, self.config.seed
    t0 = time.time()
    pick = tuples_lib.epoch_queries(len(self.qpool), c.query_size, seed, epoch)
    qidxs, pidxs = self.qpool[pick], self.ppool[pick]
    pool = tuples_lib.negative_pool(len(self.images), c.pool_size, seed, epoch)
    qvecs = self.describe(variables, qidxs)
    poolvecs = self.describe(variables, pool)
    neg = mining.mine_epoch_negatives(qvecs, poolvecs, self.clusters[qidxs],
                                      self.clusters[pool], int(self.config.loss.num_negatives),
                                      use_jax=jax.default_backend() != "cpu")
    nidxs = tuples_lib.negatives_to_images(neg, pool)
    d_neg = np.linalg.norm(qvecs[:, None] - poolvecs[neg] + 1e-6, axis=-1).mean()
    logging.info("epoch %d: %d tuples mined from a pool of %d in %.1fs; mean negative "
                 "distance %.3f", epoch, len(qidxs), len(pool), time.time() - t0, d_neg)
    return qidxs, pidxs, nidxs

  def resume_iterator(self, step: int):
    """The epoch's iterator for a mid-epoch checkpoint (tuples read back); else None."""
    epoch, within = divmod(step, self.steps_per_epoch)
    if within == 0:
      return None  # Next epoch: mined after the restore, with the restored params.
    path = self._path(epoch)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"resuming step {step} (epoch {epoch}) needs its tuples {path}, written when the "
          "epoch was mined. Delete the checkpoints after the epoch's start to re-mine it "
          "from there.")
    self._start_epoch(epoch, tuples_lib.load_tuples(path))
    return self.iterator

  def next_batch(self, step: int, state) -> Dict[str, np.ndarray]:
    epoch = step // self.steps_per_epoch
    if epoch != self.epoch:
      tuples = self.mine(epoch, state.variables)
      if jax.process_index() == 0:
        tuples_lib.save_tuples(self._path(epoch), *tuples)
      self._start_epoch(epoch, tuples)
    return next(self.iterator)


def make_inputs(config, train_set, mesh, model, workdir: str):
  mode = config.train.get("mining", "in_batch")
  if mode == "in_batch":
    return BatchInputs(config, train_set, mesh)
  if mode == "epoch":
    return EpochTupleInputs(config, train_set, mesh, model, workdir)
  raise ValueError(f"train.mining must be one of {MINING_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# The loop.


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
  train_set = datasets.get_dataset(config.data.name, data_root(config, workdir),
                                   config.data.get("split", "train"))
  model, _ = retrieval_net.from_config(config.model)
  inputs = make_inputs(config, train_set, mesh, model, workdir)
  accumulate = int(config.optim.get("accumulate_steps", 1))
  model, tx, state = train_state_lib.create(
      config, mesh, num_classes=inputs.num_classes, steps_per_epoch=inputs.updates_per_epoch,
      total_updates=max(1, inputs.total_steps // accumulate))
  head = train_state_lib.make_head(config.loss, inputs.num_classes)
  logging.info("%d trainable params", train_state_lib.num_params(state.trainable))
  total = inputs.total_steps
  stop = min(total, config.train.stop_after) if config.train.get("stop_after", 0) else total

  mgr = checkpointing.manager(workdir, keep=config.train.keep_checkpoints)
  results: Dict[str, Any] = {}
  latest = mgr.latest_step()
  if latest is not None:
    state, _ = checkpointing.restore(mgr, train_state_lib.abstract_state(state),
                                     inputs.resume_iterator(latest))
    logging.info("resuming from step %d", latest)
  elif config.train.eval_before:
    results["before"] = _eval(config, workdir, model, state, mesh, "before")
  start = int(state.step)

  step_fn = train_step_lib.compile_train_step(model, tx, config.loss, mesh, state, head=head,
                                              seed=config.seed)
  writer = MetricWriter(workdir)
  pending, t0, images_done = None, time.time(), 0
  last_good = latest or 0
  try:
    for step in range(start, stop):
      batch = sharding_lib.to_global(inputs.next_batch(step, state), mesh)
      state, metrics = step_fn(state, batch)
      # The previous step's metrics are fetched while this one runs: the host checks every
      # loss for NaN one step behind, and never waits on the step it just dispatched.
      if pending is not None:
        _report(*pending, config, writer, t0, images_done, start, total, last_good)
      images_done += inputs.images_per_step
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
      _report(*pending, config, writer, t0, images_done, start, total, last_good, force=True)
  finally:
    # A save in flight completes (or a kill leaves only its temporary folder behind).
    mgr.wait_until_finished()
    writer.close()
  if stop < total:
    logging.info("stopped after step %d of %d (train.stop_after); run again to resume",
                 stop, total)
    results["after"] = None
    return results
  results["after"] = _eval(config, workdir, model, state, mesh, "after")
  _write_summary(workdir, results)
  return results


def _check_finite(step: int, metrics, last_good: int) -> None:
  """Raises NonFiniteLossError if the loss of `step` or the params after it are not finite."""
  bad = {k: float(metrics[k]) for k in ("loss", "param_norm") if k in metrics}
  bad = {k: v for k, v in bad.items() if not np.isfinite(v)}
  if bad:
    what = " and ".join(f"{k} is {v}" for k, v in bad.items())
    kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good
            else "no checkpoint was written")
    raise NonFiniteLossError(
        f"{what} at step {step}; stopping, {kept}. Try a lower optim.lr, "
        "optim.grad_clip=1.0, optim.warmup_steps, or model.dtype=float32; then run the same "
        "command to resume from that checkpoint.")


def _report(step, metrics, config, writer, t0, images_done, start, total, last_good,
            force=False):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    _check_finite(step, {"loss": loss}, last_good)
  if step % config.train.log_every and not force:
    return
  m = {k: float(v) for k, v in metrics.items()}
  elapsed = time.time() - t0
  rate = images_done / max(elapsed, 1e-9)
  steps_per_s = (step - start) / max(elapsed, 1e-9)
  eta = (total - step) / max(steps_per_s, 1e-9)
  logging.info(_progress(step, total, m, rate, eta))
  writer.write(step, dict(m, images_per_s=rate))


def _write_summary(workdir: str, results: Dict[str, Any]) -> None:
  """results/train_summary.json; a resumed run keeps the first run's "before" numbers."""
  if not sharding_lib.is_main_process():
    return
  results = evaluate_lib.with_saved_before(workdir, results)
  path = os.path.join(workdir, "results", "train_summary.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  keep = {k: {m: v for m, v in (r or {}).items() if isinstance(v, (int, float))}
          for k, r in results.items()}
  with open(path, "w") as f:
    json.dump(keep, f, indent=1)
