"""Training inputs: what feeds step `s`, and which iterator a checkpoint holds.

`config.train.mining` picks one of `INPUTS`:
  "in_batch": class-balanced K x M batches (or shuffled ones, `data.sampler`), hard examples
    mined inside the step (pair losses, Vaccaro triplets) or none (ArcFace / CosFace);
  "epoch": the reference's tuples (q, p, n_1..n_N), negatives re-mined every epoch from a
    random pool described by the current network (through `extract.described_rows`).

Every input kind is built as `cls(config, train_set, mesh, model, workdir)` and has
`num_classes`, `total_steps`, `updates_per_epoch`, `images_per_step`, `iterator`,
`resume_iterator(step)` and `next_batch(step, state)`.
"""
import os
import time
from typing import Dict, Tuple

from absl import logging
import jax
import numpy as np

from retrieval_jax import extract
from retrieval_jax import losses
from retrieval_jax import paths
from retrieval_jax import registry
from retrieval_jax import sharding as sharding_lib
from retrieval_jax import storage
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import tuples as tuples_lib
from retrieval_jax.mining import epoch as epoch_mining
from retrieval_jax.mining import pairs as pairs_lib

INPUTS: registry.Registry = registry.Registry("train.mining mode")


def _classification_labels(train_set) -> np.ndarray:
  """Contiguous class ids in [0, C) for a margin head (-1 stays -1: never drawn)."""
  labels = np.asarray(train_set.labels)
  if train_set.label_ids is not None:
    return labels.astype(np.int32)
  out = np.full(labels.shape, -1, np.int32)
  valid = labels >= 0
  out[valid] = np.unique(labels[valid], return_inverse=True)[1].reshape(-1)
  return out


@INPUTS.register("in_batch")
class BatchInputs:
  """One checkpointable iterator of K x M (or shuffled) batches for the whole run."""

  def __init__(self, config, train_set, mesh, model, workdir: str):
    del mesh, model
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
    elif c.backend == "tfds":
      # The TFDS records (prepared once from the reference layout), read by index through
      # grain: the grain backend's batches, and a checkpointable iterator. TensorFlow is
      # optional (the `tf` extra), loaded only for this backend.
      from retrieval_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
      builder = tfds_builders.prepare_training_set(
          c.name, paths.data_root(config, workdir),
          c.tfds_dir or os.path.join(workdir, "tfds"))
      ds = tfds_builders.train_dataset(builder, c.split, labels=labels, **kw)
      self.iterator = grain_pipeline.train_iterator(ds, num_threads=c.num_threads)
    else:
      raise ValueError(f"data.backend must be 'grain', 'tfdata' or 'tfds', got {c.backend!r}")

  def resume_iterator(self, step: int):
    """The iterator a checkpoint of `step` restores into (None: nothing to restore)."""
    del step
    return self.iterator

  def next_batch(self, step: int, state) -> Dict[str, np.ndarray]:
    del state
    if self.iterator is not None:
      return next(self.iterator)
    if self._tf_iter is None:
      # Imported here: TensorFlow is an optional dependency, loaded only for this backend.
      from retrieval_jax.data import tfdata_pipeline  # pylint: disable=import-outside-toplevel
      images, labels, kw = self._tf_args
      ds = tfdata_pipeline.train_dataset(images, labels, start_step=step, **kw)
      self._tf_iter = ds.as_numpy_iterator()
    return next(self._tf_iter)


@INPUTS.register("epoch")
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
    self.qpool, self.ppool = pairs_lib.training_pairs(self.clusters, train_set.qidxs,
                                                      train_set.pidxs, pairing="all")
    self.tuples_per_step = int(c.tuples_per_batch)
    self.steps_per_epoch = tuples_lib.steps_per_epoch(c.query_size, len(self.qpool),
                                                      self.tuples_per_step)
    self.num_classes = 0
    epochs = int(config.train.num_epochs)
    self.total_steps = epochs * self.steps_per_epoch if epochs else int(config.train.num_steps)
    accumulate = int(config.optim.accumulate_steps)
    self.updates_per_epoch = max(1, self.steps_per_epoch // accumulate)
    self.images_per_step = self.tuples_per_step * (2 + int(config.loss.num_negatives))
    self.folder = os.path.join(workdir, "tuples")
    self.epoch, self.iterator = None, None
    self._describe = extract.make_describe_fn(model, mesh)

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

  def describe(self, variables, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Descriptors [len(indices), D] of `images[indices]`, as training sees them, and which
    rows were read ([len(indices)] bool; an unreadable image keeps a zero row)."""
    out, read = None, np.zeros((len(indices),), bool)
    for rows, d in extract.described_training_rows(
        self._describe, variables, self.images, indices, mesh=self.mesh,
        image_size=self.config.data.image_size,
        batch_size=int(self.config.extract.batch_size),
        num_threads=self.config.data.num_threads):
      if out is None:
        out = np.zeros((len(indices), d.shape[1]), np.float32)
      out[rows] = d
      read[rows] = True
    if out is None:
      raise image_io.NothingReadableError(
          f"epoch mining: none of the {len(indices)} images to describe could be read "
          f"(e.g. {self.images[indices[0]]})")
    return out, read

  def mine(self, epoch: int, variables):
    """(qidxs, pidxs, nidxs) of `epoch`: cirtorch's `create_epoch_tuples`.

    An image that cannot be read is dropped as training drops it: never a negative (it
    leaves the pool), and a query's tuple with one is voided when loaded (weight 0).
    """
    c, seed = self.config.data, self.config.seed
    t0 = time.time()
    pick = tuples_lib.epoch_queries(len(self.qpool), c.query_size, seed, epoch)
    qidxs, pidxs = self.qpool[pick], self.ppool[pick]
    pool = tuples_lib.negative_pool(len(self.images), c.pool_size, seed, epoch)
    qvecs, q_read = self.describe(variables, qidxs)
    poolvecs, pool_read = self.describe(variables, pool)
    unreadable = sorted({self.images[i] for i in np.concatenate(
        [qidxs[~q_read], pool[~pool_read]]).tolist()})
    if unreadable:
      logging.warning("epoch %d: %d images could not be read and are dropped from mining "
                      "(first: %s)", epoch, len(unreadable), ", ".join(unreadable[:5]))
      pool, poolvecs = pool[pool_read], poolvecs[pool_read]
    neg = epoch_mining.mine_epoch_negatives(qvecs, poolvecs, self.clusters[qidxs],
                                            self.clusters[pool],
                                            int(self.config.loss.num_negatives),
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
    if not storage.exists(path):
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
  """The inputs of `config.train.mining` (see `INPUTS`)."""
  return INPUTS.get(config.train.mining)(config, train_set, mesh, model, workdir)
