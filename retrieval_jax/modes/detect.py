"""--mode=detect: a landmark detector's boxes for the test set (Detect-to-Retrieve).

Runs a detector TF SavedModel (`detect.model`, a folder; e.g. the reference's Faster R-CNN
or MobileNet-SSD trained on Google Landmark Boxes) through TensorFlow on every query and
database image of `eval.dataset`, and writes all its boxes to
`<workdir>/boxes/<set>_<part>/` (`local/boxes.py`; `detect.score_threshold` is recorded
there and picks the boxes where they are used, e.g. by `eval.rerank=d2r`).

The detector gets one uint8 RGB image [1, H, W, 3] as loaded for the local features (same
EXIF rule: `extract.exif_transpose`), as `examples/detector.py` feeds it. Two kinds of
SavedModel are understood: one with a `serving_default` signature returning
`detection_boxes` / `detection_scores` / `detection_classes` (and optionally
`num_detections`, which trims the padded outputs), and the reference's TF1 exports, read
by tensor name (`input_images:0` -> `detection_boxes:0`, ... , as `detector.py` prunes).
"""
from typing import Callable, Tuple

from absl import logging
import numpy as np

from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import image_io
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.evaluation import test_set as test_set_lib
from retrieval_jax.local import boxes as boxes_lib

Detector = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]


def make_detector(model_dir: str) -> Detector:
  """image uint8 [H, W, 3] -> (boxes [n, 4] (ymin, xmin, ymax, xmax) in [0, 1], scores [n],
  classes [n]) of the SavedModel in `model_dir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for gpu in tf.config.list_physical_devices("GPU"):  # leave the accelerator to JAX too
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
      pass
  try:
    model = tf.saved_model.load(model_dir)
  except (OSError, ValueError) as e:
    raise ValueError(f"detect.model={model_dir!r} is not a TF SavedModel: {e}") from e
  signature = getattr(model, "signatures", {}).get("serving_default")
  if signature is not None:
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
      raise ValueError(f"detect.model's serving_default takes {sorted(inputs)}; a detector "
                       "takes one image batch")
    (name, spec), = inputs.items()

    def call(image):
      out = signature(**{name: tf.constant(image[None], spec.dtype)})
      missing = {"detection_boxes", "detection_scores", "detection_classes"} - set(out)
      if missing:
        raise ValueError(f"detect.model's serving_default returns {sorted(out)}, not "
                         f"{sorted(missing)}")
      n = int(np.asarray(out["num_detections"]).reshape(-1)[0]) if "num_detections" in out \
          else None
      return tuple(np.asarray(out[k])[0][:n] for k in
                   ("detection_boxes", "detection_scores", "detection_classes"))
  else:
    pruned = model.prune(feeds=["input_images:0"],
                         fetches=["detection_boxes:0", "detection_scores:0",
                                  "detection_classes:0"])

    def call(image):
      return tuple(np.asarray(x)[0] for x in pruned(tf.convert_to_tensor(image[None])))

  def detector(image: np.ndarray):
    b, s, c = call(np.ascontiguousarray(image, np.uint8))
    return (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32).reshape(-1),
            np.asarray(c).astype(np.int64).reshape(-1))
  return detector


def detect_images(detector: Detector, paths, out_folder: str, *, exif_transpose: bool,
                  model: str = "", score_threshold: float = 0.0) -> boxes_lib.BoxSet:
  """Every image of `paths` through `detector`, all boxes to `out_folder`; an unreadable
  image gets no boxes (and size 0 x 0)."""
  boxes, scores, classes, sizes = [], [], [], []
  skipped = image_io.SkipCounter()
  for i, path in enumerate(paths):
    image = image_io.try_load(path, counter=skipped, exif_transpose=exif_transpose)
    if image is None:
      b, s, c, size = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), (0, 0)
    else:
      (b, s, c), size = detector(image), image.shape[:2]
    boxes.append(b)
    scores.append(s)
    classes.append(c)
    sizes.append(size)
    if i and i % 100 == 0:
      logging.info("detect: %d / %d images", i, len(paths))
  boxes_lib.write(out_folder, boxes, scores, classes, sizes, image_list=list(paths),
                  model=model, score_threshold=score_threshold)
  return boxes_lib.read(out_folder)


def detect(config, workdir: str):
  """Boxes of the test set's queries and database; summary {part: {path, images, boxes,
  selected}} (selected: boxes at or above `detect.score_threshold`)."""
  test = test_set_lib.load(config, workdir, extra=False)
  if test is None:
    raise ValueError("--mode=detect detects boxes in the test set of eval.dataset: set "
                     "--config.eval.dataset=<name>")
  dataset = test.dataset
  if not sharding_lib.is_main_process():  # the detector is not collective: process 0 runs it
    sharding_lib.sync("detect_done", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
    return {}
  detector = make_detector(str(config.detect.model))
  exif = protocol_lib.from_switches(config.extract, dataset.name).exif_transpose
  threshold = float(config.detect.score_threshold)
  out = {}
  for part, images in (("query", dataset.query_images), ("db", dataset.db_images)):
    folder = boxes_lib.folder(workdir, test.prefix, part)
    got = detect_images(detector, images, folder, exif_transpose=exif,
                        model=str(config.detect.model), score_threshold=threshold)
    out[part] = {"path": folder, "images": len(got), "boxes": int(len(got.all_scores)),
                 "selected": int((got.all_scores >= threshold).sum())}
  sharding_lib.sync("detect_done", timeout_s=sharding_lib.WRITE_TIMEOUT_S)
  return out
