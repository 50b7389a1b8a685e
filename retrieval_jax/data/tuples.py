"""Epoch-level training tuples (the reference's `TuplesDataset`), host side.

Epoch-level tuples follow cnnimageretrieval-pytorch's `TuplesDataset.create_epoch_tuples`:
every epoch draws `qsize` (query, positive) pairs from the training pairs and a pool of
`poolsize` random images, describes both with the current network, and gives each query its
N hardest negatives from the pool (at most one per cluster, never the query's cluster,
`mining.mine_epoch_negatives`). The epoch then trains on the tuples (q, p, n_1..n_N) in a
shuffled order. This module holds the host side (numpy, grain, no JAX): which images, in
which order, decoded how; describing and mining run in the trainer.

Images are treated as the reference does: the whole image, its long side resized to
`image_size` (never enlarged), no crop. For static shapes each image is padded at the
bottom/right into an `image_size` square with a validity mask, which the model honours (the
descriptor of a padded image equals the unpadded one's).

Output contract (host-local numpy, this process's rows of the global batch):
  tuples:   {"image": uint8 [t, 2 + N, S, S, 3], "mask": bool [t, 2 + N, S, S],
             "weight": float32 [t]}   (weight 0: a padding tuple or an unreadable image)
  describe: {"image": uint8 [n, S, S, 3], "mask": bool [n, S, S], "index": int32 [n]}
            (index -1: padding row)

Every element is a pure function of (seed, epoch, step), so resuming mid-epoch with grain's
iterator state (one integer) gives exactly the batches of an uninterrupted run.
"""
from typing import Dict, Sequence, Tuple

from absl import logging
import grain
import numpy as np

from retrieval_jax import storage
from retrieval_jax.data import image_io
from retrieval_jax.data import transforms

_READ_ERRORS = (image_io.ImageDecodeError, FileNotFoundError, OSError)


def epoch_queries(num_pairs: int, qsize: int, seed: int, epoch: int) -> np.ndarray:
  """Indices into the pair pool of this epoch's `min(qsize, num_pairs)` queries."""
  rng = np.random.default_rng([seed, epoch, 0])
  return rng.permutation(num_pairs)[:min(qsize, num_pairs)]


def negative_pool(num_images: int, poolsize: int, seed: int, epoch: int) -> np.ndarray:
  """Image indices of this epoch's `min(poolsize, num_images)` negative-pool images."""
  rng = np.random.default_rng([seed, epoch, 1])
  return rng.permutation(num_images)[:min(poolsize, num_images)]


def steps_per_epoch(qsize: int, num_pairs: int, tuples_per_step: int) -> int:
  """Train steps per epoch (the reference's DataLoader drops the last partial batch)."""
  n = min(qsize, num_pairs) // tuples_per_step
  if n < 1:
    raise ValueError(f"{min(qsize, num_pairs)} queries per epoch make no batch of "
                     f"{tuples_per_step} tuples: raise data.query_size or lower "
                     "data.tuples_per_batch")
  return n


def negatives_to_images(neg_in_pool: np.ndarray, pool: np.ndarray) -> np.ndarray:
  """[Q, N] pool positions (from `mining.mine_epoch_negatives`) -> image indices.

  Raises if a query got fewer than N negatives (the pool holds too few other clusters).
  """
  if (neg_in_pool < 0).any():
    bad = int((neg_in_pool < 0).any(axis=1).sum())
    raise ValueError(f"{bad} queries found fewer than {neg_in_pool.shape[1]} negatives of "
                     "distinct clusters in the pool: raise data.pool_size or lower "
                     "loss.num_negatives")
  return pool[neg_in_pool]


def save_tuples(path: str, qidxs: np.ndarray, pidxs: np.ndarray, nidxs: np.ndarray) -> None:
  """Writes an epoch's tuples atomically (a resumed run mid-epoch reads them back)."""
  storage.save_npz(path, qidxs=qidxs, pidxs=pidxs, nidxs=nidxs)  # local folder or bucket


def load_tuples(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  f = storage.load_npz(path)
  return f["qidxs"], f["pidxs"], f["nidxs"]


def _load(path: str, size: int) -> Tuple[np.ndarray, np.ndarray]:
  return transforms.resize_pad_square(image_io.load_rgb(path), size)


def padded_size(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def tuple_dataset(images: Sequence[str], qidxs: np.ndarray, pidxs: np.ndarray,
                  nidxs: np.ndarray, *, tuples_per_step: int, image_size: int, seed: int,
                  epoch: int, pad_multiple: int = 1, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """A MapDataset whose element `s` is this process's rows of step `s` of the epoch.

  The epoch's tuples are visited in a random order fixed by (seed, epoch) (the reference's
  `shuffle=True`); the last partial batch is dropped. Each global batch of `tuples_per_step`
  tuples is padded to a multiple of `pad_multiple` (the data-parallel size, times the
  process count) by repeating its last tuple with weight 0, so the reference's batch of 5
  tuples runs on any number of devices with the same gradient.

  Args:
    images: N image paths.
    qidxs, pidxs: [Q] query / positive image indices of the epoch.
    nidxs: [Q, N] negative image indices.
    tuples_per_step: real tuples per global batch.
    image_size: S, the long side (and the padded square's side).
    seed, epoch: fix the order.
    pad_multiple: the padded global batch is a multiple of this.
    process_index, process_count: which rows this process loads.
  """
  images = list(images)
  q = len(qidxs)
  num_steps = steps_per_epoch(q, q, tuples_per_step)
  order = np.random.default_rng([seed, epoch, 2]).permutation(q)
  global_rows = padded_size(tuples_per_step, int(np.lcm(pad_multiple, process_count)))
  local = global_rows // process_count
  members = np.concatenate([np.asarray(qidxs)[:, None], np.asarray(pidxs)[:, None],
                            np.asarray(nidxs)], axis=1)  # [Q, 2 + N]
  k = members.shape[1]

  def make_batch(step: int) -> Dict[str, np.ndarray]:
    rows = order[step * tuples_per_step:(step + 1) * tuples_per_step]
    weight = np.ones(global_rows, np.float32)
    weight[len(rows):] = 0.0
    rows = np.concatenate([rows, np.full(global_rows - len(rows), rows[-1])])
    mine = slice(process_index * local, (process_index + 1) * local)
    rows, weight = rows[mine], weight[mine]
    image = np.zeros((local, k, image_size, image_size, 3), np.uint8)
    mask = np.zeros((local, k, image_size, image_size), bool)
    for r, t in enumerate(rows):
      for j, i in enumerate(members[t]):
        try:
          image[r, j], mask[r, j] = _load(images[i], image_size)
        except _READ_ERRORS as e:
          # An unreadable image voids its tuple (weight 0); the mask stays valid so that the
          # zero image still gives a finite descriptor.
          logging.warning("tuple of query %d dropped: %s", members[t][0], e)
          weight[r] = 0.0
          mask[r, j] = True
    return {"image": image, "mask": mask, "weight": weight}

  return grain.MapDataset.range(num_steps).map(make_batch)


def describe_dataset(images: Sequence[str], indices: np.ndarray, *, image_size: int,
                     batch_size: int) -> grain.MapDataset:
  """Batches of `images[indices]` resized and padded as for training, for describing.

  Element `b` holds positions [b * batch_size, (b + 1) * batch_size) of `indices`; the last
  batch is padded with index -1 rows (zero images with a full mask). Unreadable images get
  index -1 too (logged); their descriptor stays zero.
  """
  images = list(images)
  indices = np.asarray(indices)
  num_batches = -(-len(indices) // batch_size)

  def make_batch(b: int) -> Dict[str, np.ndarray]:
    pos = np.arange(b * batch_size, min((b + 1) * batch_size, len(indices)))
    image = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    mask = np.ones((batch_size, image_size, image_size), bool)
    index = np.full((batch_size,), -1, np.int32)
    for r, p in enumerate(pos):
      try:
        image[r], mask[r] = _load(images[indices[p]], image_size)
        index[r] = p
      except _READ_ERRORS as e:
        logging.warning("cannot describe %s: %s", images[indices[p]], e)
    return {"image": image, "mask": mask, "index": index}

  return grain.MapDataset.range(num_batches).map(make_batch)
