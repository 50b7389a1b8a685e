"""grain input pipelines: seeded training batches and bucketed evaluation batches.

Contract (shared with the tf.data backend, `tfdata_pipeline.py`): host-local numpy dicts
with static shapes,
  {"image": uint8 [b, S, S, 3], "label": int32 [b]} for training, plus
      "mask": bool [b, S, S] when `train_resize="long_side"` (whole image padded),
  {"image": uint8 [n, H, W, 3], "mask": bool [n, H, W], "index": int32 [n]} for evaluation,
where b is this process's share of the global batch B and (H, W) an evaluation bucket.
`sharding.to_global` turns them into global jax.Arrays.

Training batches are a pure function of (seed, step): element `step` of a `grain.MapDataset`
is built by `TrainBatchFn(step)`, which computes the whole global batch's index plan
(`BalancedBatchPlan` or `ShuffledBatchPlan`) and decodes only this process's rows
[process_index * b, (process_index + 1) * b). Row r of global batch `step` draws its crop and
flip from `np.random.default_rng([seed, step, r])`, so the pixels do not depend on the number
of processes, threads or the backend. The iterator's state is one integer (grain's
`next_index`), and a resumed run gets exactly the batches an uninterrupted run would have had.
"""
import dataclasses
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import grain
import numpy as np

from retrieval_jax.data import image_io
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.data import transforms

SAMPLERS = ("balanced", "shuffle")
TRAIN_RESIZES = ("crop", "long_side")


@dataclasses.dataclass(frozen=True)
class BalancedBatchPlan:
  """K landmarks x M images per global batch, so every anchor has positives in the batch.

  Images with a negative label (SfM-120k images outside any 3D-model cluster) are never
  drawn: they are not the positives of one another.
  """
  labels: np.ndarray  # [N] landmark id per image.
  classes_per_batch: int
  images_per_class: int
  seed: int

  @property
  def global_batch(self) -> int:
    return self.classes_per_batch * self.images_per_class

  def __post_init__(self):
    classes, inverse = np.unique(np.asarray(self.labels), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
    members = [order[starts[c]:starts[c + 1]] for c in range(len(classes))]
    eligible = np.asarray([c for c in range(len(classes))
                           if len(members[c]) >= 2 and classes[c] >= 0], np.int64)
    if len(eligible) < self.classes_per_batch:
      raise ValueError(f"need {self.classes_per_batch} landmarks with >= 2 images per batch, "
                       f"the training set has {len(eligible)}: lower data.classes_per_batch")
    # Computed once: per-step work is then O(B), not O(N * classes) (SfM-120k: 91k images).
    object.__setattr__(self, "_members", members)
    object.__setattr__(self, "_eligible", eligible)

  def indices(self, step: int) -> np.ndarray:
    """Image indices [K * M] of global batch `step`, grouped by landmark (deterministic)."""
    rng = np.random.default_rng([self.seed, step])
    chosen = rng.choice(self._eligible, self.classes_per_batch, replace=False)
    out = []
    for c in chosen:
      m = self._members[c]
      replace = len(m) < self.images_per_class  # Small landmarks repeat images.
      out.append(rng.choice(m, self.images_per_class, replace=replace))
    return np.concatenate(out)


class ShuffledBatchPlan:
  """Plain shuffled batches for classification losses: every image once per epoch.

  The image order is grain's `MapDataset.range(n).seed(seed).shuffle().repeat()`, which
  draws a new permutation for every epoch; global batch `step` holds positions
  [step * B, (step + 1) * B) of that endless order, so a batch may straddle two epochs
  (no image is dropped at an epoch's end). Images with a negative label are left out.
  """

  def __init__(self, labels: np.ndarray, global_batch: int, seed: int, num_steps: int):
    labels = np.asarray(labels)
    self._candidates = np.flatnonzero(labels >= 0)
    if len(self._candidates) < len(labels):
      logging.info("shuffle sampler: %d images without a label (< 0) left out",
                   len(labels) - len(self._candidates))
    n = len(self._candidates)
    if n < global_batch:
      raise ValueError(f"the training set has {n} labelled images, fewer than one global "
                       f"batch ({global_batch})")
    self.global_batch = int(global_batch)
    num_epochs = max(1, -(-num_steps * global_batch // n))
    self._order = grain.MapDataset.range(n).seed(seed).shuffle().repeat(num_epochs)

  def indices(self, step: int) -> np.ndarray:
    """Image indices [B] of global batch `step` (deterministic)."""
    start = step * self.global_batch
    pos = [self._order[p] for p in range(start, start + self.global_batch)]
    return self._candidates[np.asarray(pos, np.int64)]


class TrainBatchFn:
  """step -> this process's rows of global training batch `step`; shared by both backends.

  Images that fail to decode are logged and counted once in `skipped` (each file) and
  remembered; a row whose image is bad takes the next readable image of the same landmark,
  so the batch keeps its shape and, for the balanced sampler, its positives. A landmark
  none of whose images decodes is dropped with a warning and a count (`dropped_labels`):
  its rows take a seeded readable image of another landmark, with that image's label (a
  function of the seed, the step, the row and the files only, so every process and a
  resumed run agree). Training stops only when too few landmarks remain for a batch.
  """

  def __init__(self, images: Sequence[str], labels: np.ndarray, plan, *, image_size: int,
               seed: int, process_index: int = 0, process_count: int = 1,
               crop_scale: Tuple[float, float] = (0.5, 1.0), flip: bool = True,
               train_resize: str = "crop", skipped: Optional[image_io.SkipCounter] = None,
               any_replacement: bool = False):
    if train_resize not in TRAIN_RESIZES:
      raise ValueError(f"train_resize must be one of {TRAIN_RESIZES}, got {train_resize!r}")
    global_batch = plan.global_batch
    if global_batch % process_count:
      raise ValueError(
          f"global batch {global_batch} (data.classes_per_batch x data.images_per_class, or "
          f"data.batch_size) is not divisible by the {process_count} processes: change it")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.plan = plan
    self.images = list(images)
    self.labels = np.asarray(labels, np.int32)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.local_batch = global_batch // process_count
    self.crop_scale = tuple(crop_scale)
    self.flip = flip
    self.train_resize = train_resize
    self.skipped = image_io.GLOBAL_SKIPS if skipped is None else skipped
    self._any_replacement = any_replacement
    # Images sorted by label (ascending index within a label), to find replacements.
    self._by_label = np.argsort(self.labels, kind="stable")
    self._sorted_labels = self.labels[self._by_label]
    self._bad = set()
    self._lock = threading.Lock()
    self.dropped_labels = set()
    # Landmarks a batch needs (balanced: K distinct ones; shuffle: any one).
    self._needed = getattr(plan, "classes_per_batch", 1)
    self._num_labels = len(np.unique(self.labels[self.labels >= 0]))

  def element_spec(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of one local batch."""
    b, s = self.local_batch, self.image_size
    spec = {"image": ((b, s, s, 3), np.dtype(np.uint8)), "label": ((b,), np.dtype(np.int32))}
    if self.train_resize == "long_side":
      spec["mask"] = ((b, s, s), np.dtype(bool))
    return spec

  def global_rows(self, step: int) -> np.ndarray:
    """Image indices [b] of this process's rows of global batch `step`."""
    lo = self.process_index * self.local_batch
    return self.plan.indices(int(step))[lo:lo + self.local_batch]

  def _same_label(self, i: int) -> np.ndarray:
    return self._same_label_of(self.labels[i])

  def _load(self, j: int) -> Optional[np.ndarray]:
    if j in self._bad:
      return None
    image = image_io.try_load(self.images[j], counter=self.skipped)
    if image is None:
      with self._lock:
        self._bad.add(j)
    return image

  def _candidates(self, i: int, step: int, row: int):
    yield i
    for j in self._same_label(i):
      if j != i:
        yield int(j)
    if self._any_replacement:
      rng = np.random.default_rng([self.seed, step, row, 1])
      for j in rng.integers(0, len(self.images), 16):
        if self.labels[j] >= 0:
          yield int(j)

  def _drop_label(self, label: int) -> None:
    with self._lock:
      new = label not in self.dropped_labels
      self.dropped_labels.add(label)
      n = len(self.dropped_labels)
    if new:
      logging.warning("Landmark %d dropped: none of its %d images could be decoded (%d "
                      "landmarks dropped so far; %s)", label, len(self._same_label_of(label)),
                      n, self.skipped.summary())
    if self._num_labels - n < self._needed:
      raise RuntimeError(
          f"only {self._num_labels - n} of {self._num_labels} landmarks have a readable "
          f"image, a batch needs {self._needed}; {n} were dropped because none of their "
          f"images decodes ({self.skipped.summary()}). Download the training set again.")

  def _same_label_of(self, label: int) -> np.ndarray:
    lo = np.searchsorted(self._sorted_labels, label, side="left")
    hi = np.searchsorted(self._sorted_labels, label, side="right")
    return self._by_label[lo:hi]

  def _other_landmark(self, label: int, step: int, row: int):
    """A seeded readable image of another landmark: (index, pixels)."""
    rng = np.random.default_rng([self.seed, step, row, 2])
    for j in rng.integers(0, len(self.images), 256):
      j = int(j)
      if self.labels[j] >= 0 and self.labels[j] != label:
        image = self._load(j)
        if image is not None:
          return j, image
    raise RuntimeError(f"no readable image found to replace landmark {label} "
                       f"({self.skipped.summary()}); download the training set again")

  def _example(self, image: np.ndarray, rng: np.random.Generator):
    size = self.image_size
    if self.train_resize == "crop":
      image = transforms.random_resized_crop(image, size, rng, scale=self.crop_scale)
      return (transforms.random_flip(image, rng) if self.flip else image), None
    if self.flip:
      image = transforms.random_flip(image, rng)
    # Flip before padding, so the valid region stays at the top-left.
    return transforms.resize_pad_square(image, size, upscale=False)

  def __call__(self, step: int) -> Dict[str, np.ndarray]:
    step = int(step)
    b, s = self.local_batch, self.image_size
    idx = self.global_rows(step)
    out = np.empty((b, s, s, 3), np.uint8)
    label = np.empty((b,), np.int32)
    mask = np.empty((b, s, s), bool) if self.train_resize == "long_side" else None
    for r, i in enumerate(idx):
      row = self.process_index * b + r
      for j in self._candidates(int(i), step, row):
        image = self._load(j)
        if image is not None:
          break
      else:
        self._drop_label(int(self.labels[i]))
        j, image = self._other_landmark(int(self.labels[i]), step, row)
      rng = np.random.default_rng([self.seed, step, row])
      out[r], m = self._example(image, rng)
      label[r] = self.labels[j]
      if mask is not None:
        mask[r] = m
    batch = {"image": out, "label": label}
    if mask is not None:
      batch["mask"] = mask
    return batch


def make_train_batch_fn(images: Sequence[str], labels: np.ndarray, *, image_size: int,
                        seed: int, num_steps: int, classes_per_batch: int = 0,
                        images_per_class: int = 0, batch_size: int = 0,
                        sampler: str = "balanced", process_index: int = 0,
                        process_count: int = 1, crop_scale=(0.5, 1.0), flip: bool = True,
                        train_resize: str = "crop",
                        skipped: Optional[image_io.SkipCounter] = None) -> TrainBatchFn:
  """The per-step batch function behind `train_dataset` (and `tfdata_pipeline`).

  Args: as `train_dataset`.

  Returns:
    A `TrainBatchFn`.
  """
  labels = np.asarray(labels)
  if sampler == "balanced":
    plan = BalancedBatchPlan(labels, classes_per_batch, images_per_class, seed)
  elif sampler == "shuffle":
    global_batch = batch_size or classes_per_batch * images_per_class
    if global_batch <= 0:
      raise ValueError("the shuffle sampler needs batch_size (or classes_per_batch * "
                       "images_per_class) > 0")
    plan = ShuffledBatchPlan(labels, global_batch, seed, num_steps)
  else:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  return TrainBatchFn(images, labels, plan, image_size=image_size, seed=seed,
                      process_index=process_index, process_count=process_count,
                      crop_scale=crop_scale, flip=flip, train_resize=train_resize,
                      skipped=skipped, any_replacement=sampler == "shuffle")


def train_dataset(images: Sequence[str], labels: np.ndarray, *, classes_per_batch: int = 0,
                  images_per_class: int = 0, image_size: int, seed: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1,
                  crop_scale=(0.5, 1.0), flip: bool = True, sampler: str = "balanced",
                  batch_size: int = 0, train_resize: str = "crop",
                  skipped: Optional[image_io.SkipCounter] = None) -> grain.MapDataset:
  """A MapDataset whose element `step` is this process's rows of global batch `step`.

  Args:
    images: N image paths.
    labels: [N] int landmark / class ids (negative: unlabelled, never drawn).
    classes_per_batch: K landmarks per global batch (balanced sampler).
    images_per_class: M images per landmark (balanced sampler); B = K * M.
    image_size: S, side of the square training images.
    seed: data seed; same seed, same batches.
    num_steps: length of the dataset (global batches).
    process_index: this process (`jax.process_index()`).
    process_count: number of processes; B must be divisible by it.
    crop_scale: area range of the random resized crop (train_resize="crop").
    flip: random left-right flips.
    sampler: "balanced" (K landmarks x M images, for in-batch mining) or "shuffle" (every
      labelled image once per epoch in a seeded order, for classification losses).
    batch_size: global batch B of the shuffle sampler (default K * M).
    train_resize: "crop" (random resized crop to S x S) or "long_side" (the reference's
      whole image, long side resized to S, never enlarged, padded at the bottom/right into
      S x S; adds "mask" [b, S, S] bool to the batch).
    skipped: counter of undecodable files (default `image_io.GLOBAL_SKIPS`).

  Returns:
    A `grain.MapDataset` of length `num_steps`; element `step` is a dict {"image": uint8
    [b, S, S, 3], "label": int32 [b] (, "mask": bool [b, S, S])}, b = B / process_count.
  """
  fn = make_train_batch_fn(
      images, labels, image_size=image_size, seed=seed, num_steps=num_steps,
      classes_per_batch=classes_per_batch, images_per_class=images_per_class,
      batch_size=batch_size, sampler=sampler, process_index=process_index,
      process_count=process_count, crop_scale=crop_scale, flip=flip,
      train_resize=train_resize, skipped=skipped)
  return grain.MapDataset.range(num_steps).map(fn)


def train_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator with threaded prefetch.

  Its state (`get_state()`, or `grain.checkpoint.CheckpointSave` in orbax) is the next
  step; `set_state` / `CheckpointRestore` resumes exactly there.
  """
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def load_eval_image(path: str, *, long_side: int, buckets: Sequence[Tuple[int, int]],
                    bbox=None, rotate: int = 0, jpeg_draft: bool = False,
                    skipped: Optional[image_io.SkipCounter] = None,
                    protocol: protocol_lib.EvalProtocol = protocol_lib.REFERENCE
                    ) -> Optional[Tuple[np.ndarray, int]]:
  """Decodes one evaluation image, resizes it and picks its bucket; None if unreadable.

  The padding happens when the batch is assembled (`transforms.pad_to` semantics: zeros at
  the bottom/right), so the prefetch buffer holds unpadded images and each pixel is copied
  once.

  Args:
    path: image file.
    long_side: the evaluation size (bound on the longer side).
    buckets: (H, W) bucket shapes.
    bbox: optional crop box (see `image_io.load_rgb`).
    rotate: extra clockwise rotation in degrees.
    jpeg_draft: let libjpeg decode at a reduced scale that keeps the long side >=
      `long_side` (about 2x faster at 362 px for 1024 px JPEGs; not bit-identical).
    skipped: where a failure is counted (default `image_io.GLOBAL_SKIPS`).
    protocol: the input rule (`protocol.REFERENCE`, cirtorch's, by default): how a query
      crop is scaled, enlarging, filter, EXIF.

  Returns:
    (resized [h, w, 3] uint8, bucket index) or None.
  """
  loaded = image_io.try_load(path, bbox, counter=skipped, rotate=rotate,
                             max_size=long_side if jpeg_draft else None,
                             exif_transpose=protocol.exif_transpose, with_full_size=True)
  if loaded is None:
    return None
  image, full_size = loaded
  image = protocol.resize(image, long_side, full_size if bbox is not None else None)
  return image, transforms.pick_bucket(image.shape[0], image.shape[1], buckets)


def eval_batches(paths: Sequence[str], *, long_side: int, batch_size: int,
                 bboxes: Optional[Sequence] = None,
                 buckets=None, num_threads: int = 2,
                 rotations: Optional[Sequence[int]] = None,
                 skipped: Optional[image_io.SkipCounter] = None,
                 jpeg_draft: bool = False,
                 protocol: protocol_lib.EvalProtocol = protocol_lib.REFERENCE
                 ) -> Iterator[Dict[str, np.ndarray]]:
  """Yields padded, masked batches grouped by size bucket; every readable image exactly once.

  Each image is resized by `protocol` (by default the reference's: long side bounded by
  `long_side`, never enlarged, query crops scaled with their whole image's factor, PIL
  LANCZOS), padded at the bottom/right into the smallest bucket that holds it, and batched
  with images of the same bucket; so a batch holds exactly the pixels that
  `load_eval_image` gives one image.
  Each bucket's last batch is padded to `batch_size` with empty rows (index -1, zero
  pixels, mask False), so every batch of a bucket has one static shape. Unreadable images
  (missing, truncated, undecodable) are logged, counted in `skipped` and left out (their
  index never appears), so that extraction never stops on one bad file.

  Args:
    paths: N image paths.
    long_side: resize target of the longer side.
    batch_size: n, rows per batch.
    bboxes: optional per-image crop boxes (None entries allowed).
    buckets: (H, W) bucket shapes (default `transforms.square_buckets(long_side)`).
    num_threads: decoding threads.
    rotations: optional per-image extra clockwise rotation in degrees
      (`RetrievalSet.rotations`, looked up per path by the caller).
    skipped: counter of unreadable images (default `image_io.GLOBAL_SKIPS`); the number
      skipped by this call is also logged at the end.
    jpeg_draft: faster reduced-scale JPEG decoding (see `load_eval_image`).
    protocol: the input rule (see `load_eval_image`).

  Yields:
    {"image": uint8 [n, H, W, 3], "mask": bool [n, H, W], "index": int32 [n]}.
  """
  buckets = tuple(buckets or transforms.square_buckets(long_side))
  counter = image_io.GLOBAL_SKIPS if skipped is None else skipped

  def load(i: int):
    # Returns the index with the pixels: grain drops None elements from its iterators, so
    # a skipped file must not shift the positions of the ones after it.
    return i, load_eval_image(paths[i], long_side=long_side, buckets=buckets,
                              bbox=None if bboxes is None else bboxes[i],
                              rotate=0 if rotations is None else int(rotations[i]),
                              jpeg_draft=jpeg_draft, skipped=counter, protocol=protocol)

  loaded = grain.MapDataset.range(len(paths)).map(load)
  pending: Dict[int, List] = {b: [] for b in range(len(buckets))}

  def flush(b):
    rows = pending[b]
    h, w = buckets[b]
    image = np.zeros((batch_size, h, w, 3), np.uint8)
    mask = np.zeros((batch_size, h, w), bool)
    index = np.full((batch_size,), -1, np.int32)
    for r, (i, img) in enumerate(rows):
      ih, iw = img.shape[:2]
      image[r, :ih, :iw] = img
      mask[r, :ih, :iw] = True
      index[r] = i
    pending[b] = []
    return {"image": image, "mask": mask, "index": index}

  n_skipped = 0
  if len(paths):
    it = iter(loaded.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=2 * batch_size)))
    for i, item in it:
      if item is None:
        n_skipped += 1
        continue
      img, b = item
      pending[b].append((i, img))
      if len(pending[b]) == batch_size:
        yield flush(b)
  for b in range(len(buckets)):
    if pending[b]:
      yield flush(b)
  if n_skipped:
    logging.warning("eval_batches: %d of %d images could not be read and were left out "
                    "(all skips so far: %s)", n_skipped, len(paths), counter.summary())
