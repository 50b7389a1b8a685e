"""tf.data backend with the grain pipeline's output contract.

Same dict keys, dtypes and static shapes as `grain_pipeline` (see its module docstring), and
the same pixels for the same (seed, step, row): the training batches come from the very
`grain_pipeline.TrainBatchFn` (decode with PIL through `image_io`, crops and flips from the
per-(seed, step, row) numpy RNG), run inside `tf.numpy_function`; tf.data only schedules
the steps in parallel and prefetches. Evaluation images go through
`grain_pipeline.load_eval_image` and are batched per bucket with `group_by_window`.

TensorFlow is optional (it is not in requirements.txt): importing this module without it
works, calling its functions raises ImportError with the install command.

Resume: a training batch is a pure function of its step, so a resumed run passes
`start_step=<restored step>` instead of checkpointing the tf.data iterator (whose
`tf.numpy_function` stages tf.data cannot serialise).
"""
from typing import Dict, Iterator, Optional, Sequence

from absl import logging
import numpy as np

from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import transforms

try:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - exercised only where TF is absent.
  tf = None


def _require_tf():
  if tf is None:
    raise ImportError("the tf.data backend needs TensorFlow: pip install tensorflow-cpu "
                      "(or use data.backend='grain')")


def train_dataset(images: Sequence[str], labels: np.ndarray, *, image_size: int, seed: int,
                  num_steps: int, start_step: int = 0, num_parallel_calls: Optional[int] = None,
                  prefetch: int = 2, **kwargs) -> "tf.data.Dataset":
  """tf.data twin of `grain_pipeline.train_dataset`: element k is global batch start_step + k.

  Args:
    images: N image paths.
    labels: [N] int labels.
    image_size: S, side of the square training images.
    seed: data seed.
    num_steps: total number of steps; the dataset yields steps [start_step, num_steps).
    start_step: first step (resume).
    num_parallel_calls: batches decoded concurrently (default tf.data.AUTOTUNE); the
      output order is kept (deterministic).
    prefetch: batches prepared ahead.
    **kwargs: the other arguments of `grain_pipeline.train_dataset` (sampler,
      classes_per_batch, images_per_class, batch_size, process_index, process_count,
      crop_scale, flip, train_resize, skipped).

  Returns:
    A `tf.data.Dataset` of dicts {"image": uint8 [b, S, S, 3], "label": int32 [b]
    (, "mask": bool [b, S, S])}, equal to the grain dataset's elements.
  """
  _require_tf()
  fn = grain_pipeline.make_train_batch_fn(images, labels, image_size=image_size, seed=seed,
                                          num_steps=num_steps, **kwargs)
  spec = fn.element_spec()
  keys = sorted(spec)

  def make(step):
    batch = fn(int(step))
    return [batch[k] for k in keys]

  def to_dict(step):
    # stateful=False: the batch is a pure function of the step, so tf.data may run
    # several steps at once.
    values = tf.numpy_function(make, [step], [tf.as_dtype(spec[k][1]) for k in keys],
                               stateful=False)
    return {k: tf.ensure_shape(v, spec[k][0]) for k, v in zip(keys, values)}

  ds = tf.data.Dataset.range(start_step, num_steps)
  ds = ds.map(to_dict, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
              deterministic=True)
  return ds.prefetch(prefetch)


def train_iterator(ds: "tf.data.Dataset") -> Iterator[Dict[str, np.ndarray]]:
  """Host-local numpy batches, as `grain_pipeline.train_iterator` gives them."""
  _require_tf()
  return ds.as_numpy_iterator()


def eval_dataset(paths: Sequence[str], *, long_side: int, batch_size: int,
                 bboxes: Optional[Sequence] = None, buckets=None,
                 rotations: Optional[Sequence[int]] = None,
                 skipped: Optional[image_io.SkipCounter] = None, jpeg_draft: bool = False,
                 num_parallel_calls: Optional[int] = None) -> "tf.data.Dataset":
  """tf.data twin of `grain_pipeline.eval_batches`, as a dataset.

  Args: as `grain_pipeline.eval_batches`; `num_parallel_calls` images are decoded at once
    (default tf.data.AUTOTUNE).

  Returns:
    A `tf.data.Dataset` of {"image": uint8 [n, H, W, 3], "mask": bool [n, H, W],
    "index": int32 [n]}, n = batch_size, grouped by bucket (H, W); the last batch of each
    bucket is padded with index -1 rows. Unreadable images are counted in `skipped` and
    left out.
  """
  _require_tf()
  buckets = tuple(buckets or transforms.square_buckets(long_side))
  counter = image_io.GLOBAL_SKIPS if skipped is None else skipped

  def load(i):
    i = int(i)
    out = grain_pipeline.load_eval_image(
        paths[i], long_side=long_side, buckets=buckets,
        bbox=None if bboxes is None else bboxes[i],
        rotate=0 if rotations is None else int(rotations[i]),
        jpeg_draft=jpeg_draft, skipped=counter)
    if out is None:
      return (np.int32(-1), np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), bool),
              np.int64(0))
    image, b = out
    image, mask = transforms.pad_to(image, buckets[b])
    return np.int32(i), image, mask, np.int64(b)

  def to_dict(i):
    index, image, mask, bucket = tf.numpy_function(
        load, [i], [tf.int32, tf.uint8, tf.bool, tf.int64], stateful=False)
    return {"index": tf.ensure_shape(index, []),
            "image": tf.ensure_shape(image, [None, None, 3]),
            "mask": tf.ensure_shape(mask, [None, None]),
            "bucket": tf.ensure_shape(bucket, [])}

  def pad_batch(batch):
    missing = batch_size - tf.shape(batch["index"])[0]
    return {"image": tf.pad(batch["image"], [[0, missing], [0, 0], [0, 0], [0, 0]]),
            "mask": tf.pad(batch["mask"], [[0, missing], [0, 0], [0, 0]]),
            "index": tf.pad(batch["index"], [[0, missing]], constant_values=-1)}

  ds = tf.data.Dataset.range(len(paths))
  ds = ds.map(to_dict, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.filter(lambda x: x["index"] >= 0)
  ds = ds.group_by_window(key_func=lambda x: x["bucket"],
                          reduce_func=lambda _, window: window.batch(batch_size),
                          window_size=batch_size)
  return ds.map(pad_batch).prefetch(2)


def eval_batches(paths: Sequence[str], *, long_side: int, batch_size: int,
                 bboxes: Optional[Sequence] = None, buckets=None, num_threads: int = 2,
                 rotations: Optional[Sequence[int]] = None,
                 skipped: Optional[image_io.SkipCounter] = None,
                 jpeg_draft: bool = False) -> Iterator[Dict[str, np.ndarray]]:
  """Same signature and batches as `grain_pipeline.eval_batches` (batch order may differ)."""
  counter = image_io.GLOBAL_SKIPS if skipped is None else skipped
  before = counter.total
  ds = eval_dataset(paths, long_side=long_side, batch_size=batch_size, bboxes=bboxes,
                    buckets=buckets, rotations=rotations, skipped=counter,
                    jpeg_draft=jpeg_draft, num_parallel_calls=num_threads)
  yield from ds.as_numpy_iterator()
  n_skipped = counter.total - before
  if n_skipped:
    logging.warning("eval_batches (tf.data): %d of %d images could not be read and were "
                    "left out (all skips so far: %s)", n_skipped, len(paths),
                    counter.summary())
