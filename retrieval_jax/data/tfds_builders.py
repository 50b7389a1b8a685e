"""TFDS builders (manual download) for retrieval-SfM-120k and (Revisited) Oxford / Paris.

The builders read the files where `python -m retrieval_jax.data.download NAME --dir ROOT`
puts them (the reference's layout, see `datasets.py`); ROOT is TFDS's `manual_dir`:

  builder = tfds_builders.prepare("retrieval_sfm120k", manual_dir=ROOT, data_dir=TFDS_DIR)
  source = builder.as_data_source(split="train", decoders=tfds_builders.RAW_IMAGE)
  # or, prepared with file_format="tfrecord" (TFDS reads ArrayRecord only by index):
  ds = builder.as_dataset(split="train", decoders=tfds_builders.RAW_IMAGE)

`prepare` is `builder.download_and_prepare` with TFDS's GCS look-up off (these sets are not
on TFDS's servers, and the look-up needs network).

Pixels: the "image" feature holds each file's original bytes, untouched (no re-encoding).
TFDS's default decoder (`tf.io.decode_image`) ignores the EXIF orientation, which the
library applies; read with `decoders=RAW_IMAGE` and decode with `decode_image` to get
exactly the pixels of `image_io.load_rgb` on the original file (bounding boxes and
rotations included). Files that cannot be decoded are left out when preparing (logged and
counted), so the records never hold a file that breaks a reader; every example keeps its
`index` in the original list, so the reference's pair indices (`qidxs`, `pidxs`, kept in
the dataset's metadata) and the ground truth stay valid.

Training from the records (`data.backend=tfds`): `train_dataset(builder, "train", ...)`
is `grain_pipeline.train_dataset` with the images read from the prepared records instead
of the files (records are written as ArrayRecord, which grain reads by index), so it gives
the very batches of the grain backend (tests/test_tfdata.py): same batch plan, same seeded
crops, same pixels; a file left out when preparing counts as unreadable, as it does there.

TensorFlow and tensorflow-datasets are optional (the `tf` extra); this module needs both.
"""
import os
import tempfile
import threading
from typing import Any, Dict, Optional

from absl import logging
import grain
import numpy as np
import tensorflow as tf  # pylint: disable=unused-import  (tfds needs it; fail early)
import tensorflow_datasets as tfds

from retrieval_jax.data import datasets
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io

# Keeps the stored bytes as they are: pass as `as_dataset(..., decoders=RAW_IMAGE)`.
RAW_IMAGE = {"image": tfds.decode.SkipDecoding()}

_DOWNLOAD = "python -m retrieval_jax.data.download {name} --dir <manual_dir>"
# Verification decodes at a reduced libjpeg scale: it reads the whole stream (so a
# truncated file fails) several times faster than a full decode.
_VERIFY_SIZE = 256


def decode_image(data: bytes, bbx=None, rotate: int = 0, **kwargs) -> np.ndarray:
  """The stored bytes of an "image" feature -> RGB uint8 [H, W, 3], as `image_io.load_rgb`.

  Args:
    data: encoded image bytes (JPEG, PNG, ...).
    bbx: optional (x1, y1, x2, y2) crop in the stored pixel frame.
    rotate: extra clockwise rotation in degrees.
    **kwargs: other `image_io.load_rgb` arguments.

  Returns:
    [H, W, 3] uint8 array, bit-identical to `image_io.load_rgb` on the original file.
  """
  # image_io reads from a path; a short-lived file keeps its decoding rules in one place.
  with tempfile.NamedTemporaryFile(suffix=".img") as f:
    f.write(bytes(data))
    f.flush()
    return image_io.load_rgb(f.name, bbx, rotate=rotate, **kwargs)


def _readable(path: str, counter: image_io.SkipCounter) -> bool:
  return image_io.try_load(path, counter=counter, max_size=_VERIFY_SIZE) is not None


def _log_skips(name: str, counter: image_io.SkipCounter) -> None:
  if counter.total:
    logging.warning("%s: %d unreadable files left out of the TFDS records (%s)", name,
                    counter.total, counter.summary())


class RetrievalSfm120k(tfds.core.GeneratorBasedBuilder):
  """retrieval-SfM-120k training images with their 3D-model cluster (landmark) labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Original file bytes; cluster labels; reference pairs.",
                   "1.1.0": "Metadata holds every listed image's label (training backend)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir is the data root holding train/retrieval-SfM-120k/"
      "{retrieval-SfM-120k.pkl, ims/}; get it with " +
      _DOWNLOAD.format(name="retrieval-sfm-120k"))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=("retrieval-SfM-120k (Radenovic et al.): images of 3D reconstructions; "
                     "label = 3D-model cluster. Metadata holds the reference's query / "
                     "positive pairs (qidxs, pidxs) of each split, as indices, and the "
                     "labels of all listed images (readable or not)."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "image_id": tfds.features.Text(),
            "label": tf.int64,
            "index": tf.int64,
        }),
        metadata=tfds.core.MetadataDict(),
        supervised_keys=("image", "label"),
        homepage="http://cmp.felk.cvut.cz/cnnimageretrieval/",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    out = {}
    for split in ("train", "val"):
      tset = datasets.get_dataset("retrieval-sfm-120k", root, split)
      self.info.metadata[split] = {"qidxs": tset.qidxs.tolist(),
                                   "pidxs": tset.pidxs.tolist(),
                                   "labels": [int(x) for x in tset.labels]}
      out[split] = self._generate_examples(tset)
    return out

  def _generate_examples(self, tset: datasets.TrainSet):
    counter = image_io.SkipCounter()
    for i, (path, label) in enumerate(zip(tset.images, tset.labels)):
      if _readable(path, counter):
        yield i, {"image": path, "image_id": os.path.basename(path), "label": int(label),
                  "index": i}
    _log_skips(self.name, counter)


class RevisitedConfig(tfds.core.BuilderConfig):
  """One of the Oxford / Paris test sets (the `datasets` registry name)."""


class RevisitedOxfordParis(tfds.core.GeneratorBasedBuilder):
  """(Revisited) Oxford5k / Paris6k: 'query' and 'db' splits with the ground truth.

  Query images are stored whole, with their bounding box (stored pixel frame) as the
  "bbx" feature; crop with `decode_image(data, bbx=...)` as the protocol asks. Each query
  carries its ground-truth lists ('easy', 'hard', 'junk' for the Revisited sets; 'ok',
  'junk' for the old ones; empty where absent) as indices into the 'db' split's `index`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original file bytes; bounding boxes; revisitop ground truth."}
  BUILDER_CONFIGS = [RevisitedConfig(name=n, description=f"{n} (revisitop layout)")
                     for n in ("roxford5k", "rparis6k", "oxford5k", "paris6k")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir is the data root holding test/<name>/{gnd_<name>.pkl, jpg/}; get it with " +
      _DOWNLOAD.format(name="<name>"))

  def _info(self) -> tfds.core.DatasetInfo:
    index_list = tfds.features.Tensor(shape=(None,), dtype=tf.int64)
    return self.dataset_info_from_configs(
        description="Oxford / Paris buildings, revisited protocol (Radenovic et al. 2018).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "name": tfds.features.Text(),
            "index": tf.int64,
            "bbx": tfds.features.Tensor(shape=(4,), dtype=tf.float32),
            "easy": index_list, "hard": index_list, "junk": index_list, "ok": index_list,
        }),
        homepage="http://cmp.felk.cvut.cz/revisitop/",
    )

  def _split_generators(self, dl_manager):
    rset = datasets.get_dataset(self.builder_config.name, os.fspath(dl_manager.manual_dir),
                                "test")
    return {"query": self._generate_examples(rset, query=True),
            "db": self._generate_examples(rset, query=False)}

  def _generate_examples(self, rset: datasets.RetrievalSet, query: bool):
    counter = image_io.SkipCounter()
    paths = rset.query_images if query else rset.db_images
    empty = np.zeros((0,), np.int64)
    for i, path in enumerate(paths):
      if not _readable(path, counter):
        continue
      gnd: Dict[str, Any] = rset.gnd[i] if query and rset.gnd else {}
      bbx: Optional[Any] = rset.query_bbx[i] if query and rset.query_bbx else None
      yield i, {
          "image": path,
          "name": os.path.splitext(os.path.basename(path))[0],
          "index": i,
          "bbx": np.asarray(bbx if bbx is not None else (-1, -1, -1, -1), np.float32),
          **{k: np.asarray(gnd.get(k, empty), np.int64) for k in ("easy", "hard", "junk",
                                                                  "ok")},
      }
    _log_skips(f"{self.name}/{self.builder_config.name}", counter)


def prepare(name: str, manual_dir: str, data_dir: Optional[str] = None,
            file_format: str = "array_record") -> tfds.core.DatasetBuilder:
  """Builds (once) TFDS records of `name` from the files under `manual_dir`.

  Args:
    name: "retrieval_sfm120k" or "revisited_oxford_paris/<roxford5k|rparis6k|oxford5k|
      paris6k>".
    manual_dir: the data root of `retrieval_jax.data.download`.
    data_dir: where TFDS writes its records (default TFDS's, ~/tensorflow_datasets).
    file_format: "array_record" (random access: `train_dataset` needs it) or "tfrecord".

  Returns:
    The prepared builder (`builder.as_dataset(split=..., decoders=RAW_IMAGE)`).
  """
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


# ----------------------------------------------------------------------------------------------
# Training from the records (data.backend=tfds).


class RecordImages:
  """Pixels of a prepared split by original list index (random access, ArrayRecord).

  TFDS stores examples in a hashed order; the index -> record position map is built once
  by reading the split's "index" feature, and saved beside the records.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    self.name = f"{builder.name}/{split}"
    try:
      self.source = builder.as_data_source(split, decoders=RAW_IMAGE)
    except (NotImplementedError, ValueError) as e:
      raise ValueError(f"{self.name}: random access needs ArrayRecord files; prepare the "
                       "builder with tfds_builders.prepare(..., file_format='array_record')"
                       ) from e
    cache = os.path.join(builder.data_dir, f"{split}-index-positions.npy")
    if os.path.exists(cache):
      index_of = np.load(cache)
    else:
      index_of = np.asarray([int(self.source[k]["index"]) for k in range(len(self.source))],
                            np.int64)
      np.save(cache, index_of)
    self.positions = {int(i): k for k, i in enumerate(index_of)}
    self._lock = threading.Lock()

  def load(self, index: int, counter: image_io.SkipCounter) -> Optional[np.ndarray]:
    """RGB uint8 [H, W, 3] of list entry `index`, or None (counted) when it has no record."""
    k = self.positions.get(int(index))
    if k is None:
      counter.add("missing", f"{self.name}#{index}", "left out when the records were prepared")
      return None
    with self._lock:  # one reader handle, several decoding threads
      data = self.source[k]["image"]
    return decode_image(data)


class _RecordTrainBatchFn(grain_pipeline.TrainBatchFn):
  """`grain_pipeline.TrainBatchFn` whose images come from `RecordImages`."""

  def __init__(self, records: RecordImages, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._records = records

  def _load(self, j: int) -> Optional[np.ndarray]:
    if j in self._bad:
      return None
    image = self._records.load(j, self.skipped)
    if image is None:
      with self._lock:
        self._bad.add(j)
    return image


def train_dataset(builder: tfds.core.DatasetBuilder, split: str = "train", *,
                  image_size: int, seed: int, num_steps: int,
                  labels: Optional[np.ndarray] = None, **kwargs):
  """`grain_pipeline.train_dataset` reading the prepared records of `builder` / `split`.

  Args:
    builder: a `prepare`d retrieval_sfm120k builder (ArrayRecord files).
    split: "train" or "val".
    image_size, seed, num_steps, **kwargs: as `grain_pipeline.train_dataset`.
    labels: [N] labels of the listed images to use instead of the stored ones (e.g. the
      contiguous class ids of a margin loss); default the builder's metadata.
  Returns:
    A `grain.MapDataset` whose element `step` equals the grain backend's on the files.
  """
  meta = builder.info.metadata.get(split) or {}
  if "labels" not in meta:
    raise ValueError(f"{builder.name} {builder.info.version} has no per-image labels in its "
                     "metadata: prepare it again with this version (delete its data_dir)")
  stored = np.asarray(meta["labels"], np.int64)
  if labels is None:
    labels = stored
  elif len(labels) != len(stored):
    raise ValueError(f"{len(labels)} labels for the {len(stored)} images of {builder.name}/"
                     f"{split}: the records were prepared from another list; prepare again")
  names = [f"{builder.name}/{split}#{i}" for i in range(len(labels))]
  records = RecordImages(builder, split)
  plan_fn = grain_pipeline.make_train_batch_fn(names, labels, image_size=image_size,
                                               seed=seed, num_steps=num_steps, **kwargs)
  keep = ("process_index", "process_count", "crop_scale", "flip", "train_resize", "skipped")
  fn = _RecordTrainBatchFn(records, names, labels, plan_fn.plan, image_size=image_size,
                           seed=seed,
                           any_replacement=kwargs.get("sampler", "balanced") == "shuffle",
                           **{k: v for k, v in kwargs.items() if k in keep})
  return grain.MapDataset.range(num_steps).map(fn)


# `datasets` registry names with a TFDS builder for training.
TRAIN_BUILDERS = {"retrieval-sfm-120k": "retrieval_sfm120k"}


def prepare_training_set(dataset: str, root: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared (once) training builder of a `datasets` name (`config.data.name`).

  Raises:
    ValueError: no TFDS builder for that dataset (use data.backend="grain" or "tfdata").
  """
  if dataset not in TRAIN_BUILDERS:
    raise ValueError(f"data.backend='tfds' has a builder for {sorted(TRAIN_BUILDERS)}, not "
                     f"{dataset!r}: use data.backend='grain' (or 'tfdata')")
  return prepare(TRAIN_BUILDERS[dataset], manual_dir=root, data_dir=data_dir)
