"""grain input pipelines: class-balanced training batches and bucketed evaluation batches.

Contract (shared with the tf.data backend): host-local numpy dicts with static shapes,
  {"image": uint8 [b, H, W, 3], "label": int32 [b]} for training,
  {"image": uint8 [n, H, W, 3], "mask": bool [n, H, W], "index": int32 [n]} for evaluation,
where b is this process's share of the global batch. `sharding.to_global` turns them into
global jax.Arrays.

Training batches are a pure function of (seed, step): element `step` of a `grain.MapDataset`
builds the whole global batch's index plan, and each process decodes only its own rows. So the
iterator's state is one integer (grain's `next_index`), and a resumed run gets exactly the
batches an uninterrupted run would have had.
"""
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence

from absl import logging
import grain
import numpy as np

from retrieval_jax.data import image_io
from retrieval_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class BalancedBatchPlan:
  """K landmarks x M images per global batch, so every anchor has positives in the batch."""
  labels: np.ndarray  # [N] landmark id per image.
  classes_per_batch: int
  images_per_class: int
  seed: int

  @property
  def global_batch(self) -> int:
    return self.classes_per_batch * self.images_per_class

  def __post_init__(self):
    counts = np.bincount(np.unique(self.labels, return_inverse=True)[1])
    usable = int((counts >= 2).sum())
    if usable < self.classes_per_batch:
      raise ValueError(f"need {self.classes_per_batch} landmarks with >= 2 images per batch, "
                       f"the training set has {usable}: lower data.classes_per_batch")

  def indices(self, step: int) -> np.ndarray:
    """Image indices [K * M] of global batch `step`, grouped by landmark (deterministic)."""
    rng = np.random.default_rng([self.seed, step])
    classes, inverse = np.unique(self.labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    eligible = [c for c in range(len(classes)) if len(members[c]) >= 2]
    chosen = rng.choice(eligible, self.classes_per_batch, replace=False)
    out = []
    for c in chosen:
      m = members[c]
      replace = len(m) < self.images_per_class  # Small landmarks repeat images.
      out.append(rng.choice(m, self.images_per_class, replace=replace))
    return np.concatenate(out)


def _train_example(path: str, rng: np.random.Generator, image_size: int,
                   crop_scale, flip: bool) -> Optional[np.ndarray]:
  image = image_io.load_rgb(path)
  image = transforms.random_resized_crop(image, image_size, rng, scale=crop_scale)
  return transforms.random_flip(image, rng) if flip else image


def train_dataset(images: Sequence[str], labels: np.ndarray, *, classes_per_batch: int,
                  images_per_class: int, image_size: int, seed: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1,
                  crop_scale=(0.5, 1.0), flip: bool = True) -> grain.MapDataset:
  """A MapDataset whose element `step` is this process's rows of global batch `step`.

  Images that fail to decode are replaced by another image of the same landmark (logged and
  counted), so the batch keeps its shape and its positives.
  """
  plan = BalancedBatchPlan(np.asarray(labels), classes_per_batch, images_per_class, seed)
  global_batch = plan.global_batch
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
  local = global_batch // process_count
  images = list(images)
  labels = np.asarray(labels, np.int32)
  same_label = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
  skipped = {"count": 0}

  def make_batch(step: int) -> Dict[str, np.ndarray]:
    idx = plan.indices(int(step))[process_index * local:(process_index + 1) * local]
    out = np.empty((local, image_size, image_size, 3), np.uint8)
    for row, i in enumerate(idx):
      rng = np.random.default_rng([seed, int(step), process_index * local + row])
      candidates = [i] + [j for j in same_label[int(labels[i])] if j != i]
      for j in candidates:
        try:
          out[row] = _train_example(images[j], rng, image_size, crop_scale, flip)
          break
        except (image_io.ImageDecodeError, FileNotFoundError, OSError) as e:
          skipped["count"] += 1
          logging.warning("skipping training image (%d skipped so far): %s",
                          skipped["count"], e)
      else:
        raise RuntimeError(f"no image of landmark {labels[i]} could be decoded")
    return {"image": out, "label": labels[idx]}

  return grain.MapDataset.range(num_steps).map(make_batch)


def train_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator (grain's state: the next step) with threaded prefetch."""
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def eval_batches(paths: Sequence[str], *, long_side: int, batch_size: int,
                 bboxes: Optional[Sequence] = None,
                 buckets=None, num_threads: int = 2) -> Iterator[Dict[str, np.ndarray]]:
  """Yields padded, masked batches grouped by size bucket; every image exactly once.

  Each bucket's last batch is padded to `batch_size` with empty rows (index -1), so every
  batch of a bucket has one static shape. Unreadable images are logged and left out (their
  index never appears), so that extraction never stops on one bad file.
  """
  buckets = tuple(buckets or transforms.square_buckets(long_side))

  def load(i: int):
    try:
      image = image_io.load_rgb(paths[i], None if bboxes is None else bboxes[i])
    except (image_io.ImageDecodeError, FileNotFoundError, OSError) as e:
      logging.warning("cannot read %s, its descriptor will be zero: %s", paths[i], e)
      return None
    return transforms.prepare_eval_image(image, long_side, buckets)

  loaded = grain.MapDataset.source(list(range(len(paths)))).map(load)
  pending: Dict[int, List] = {b: [] for b in range(len(buckets))}

  def flush(b):
    rows = pending[b]
    h, w = buckets[b]
    image = np.zeros((batch_size, h, w, 3), np.uint8)
    mask = np.zeros((batch_size, h, w), bool)
    index = np.full((batch_size,), -1, np.int32)
    for r, (i, img, m) in enumerate(rows):
      image[r], mask[r], index[r] = img, m, i
    pending[b] = []
    return {"image": image, "mask": mask, "index": index}

  it = iter(loaded.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=2 * batch_size)))
  for i, item in enumerate(it):
    if item is None:
      continue
    img, m, b = item
    pending[b].append((i, img, m))
    if len(pending[b]) == batch_size:
      yield flush(b)
  for b in range(len(buckets)):
    if pending[b]:
      yield flush(b)

