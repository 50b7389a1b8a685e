"""Detected boxes of an image collection (`--mode=detect`) and the regions they make.

Layout of a box folder, `<workdir>/boxes/<set>_<part>/` (part "query" or "db"):

    boxes.npz   "offsets" [N + 1] (image i's boxes are rows offsets[i]:offsets[i + 1]),
                "boxes" [T, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1] of the image,
                "scores" [T] float32, "classes" [T] int64, "sizes" [N, 2] (height, width)
                of the image as the detector saw it (loaded, EXIF as the local features)
    meta.json   {"num_images", "image_list", "model", "score_threshold"}

Every detected box is stored, as the reference's `.boxes` files hold them (`box_io.py`:
[top, left, bottom, right] normalised); the score threshold picks boxes when they are used
(`select`: score >= threshold, as `boxes_and_features_extraction.py` does).

A region is the whole image (first) plus each selected box. The reference extracts each
box's local features anew from the image cropped to the box (`crop_box`: PIL's box from
floor / ceil of the normalised corners); `features_in_box` is the cheaper alternative that
keeps the whole image's keypoints inside the box.
"""
import dataclasses
import io
import json
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from retrieval_jax import storage

FILE = "boxes.npz"
META = "meta.json"


def folder(workdir: str, set_name: str, part: str) -> str:
  """`<workdir>/boxes/<set>_<part>/`."""
  return storage.join(workdir, "boxes", f"{set_name}_{part}")


@dataclasses.dataclass(frozen=True)
class BoxSet:
  """Per image detections: `boxes(i)`, `scores(i)`, `classes(i)`, `size(i)`."""
  offsets: np.ndarray
  all_boxes: np.ndarray
  all_scores: np.ndarray
  all_classes: np.ndarray
  sizes: np.ndarray
  image_list: Tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def _rows(self, i: int) -> slice:
    if not 0 <= i < len(self):
      raise IndexError(f"image index {i} outside [0, {len(self)})")
    return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

  def boxes(self, i: int) -> np.ndarray:
    return self.all_boxes[self._rows(i)]

  def scores(self, i: int) -> np.ndarray:
    return self.all_scores[self._rows(i)]

  def classes(self, i: int) -> np.ndarray:
    return self.all_classes[self._rows(i)]

  def size(self, i: int) -> Tuple[int, int]:
    return int(self.sizes[i, 0]), int(self.sizes[i, 1])


def write(path: str, boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray],
          classes: Sequence[np.ndarray], sizes: Sequence[Tuple[int, int]], *,
          image_list: Sequence[str] = (), model: str = "", score_threshold: float = 0.0
          ) -> None:
  """Writes one box folder (see the module docstring)."""
  n = len(boxes)
  if not len(scores) == len(classes) == len(sizes) == n:
    raise ValueError(f"boxes of {n} images, scores of {len(scores)}, classes of "
                     f"{len(classes)}, sizes of {len(sizes)}")
  b = [np.asarray(x, np.float32).reshape(-1, 4) for x in boxes]
  s = [np.asarray(x, np.float32).reshape(-1) for x in scores]
  c = [np.asarray(x, np.int64).reshape(-1) for x in classes]
  for i, (bi, si, ci) in enumerate(zip(b, s, c)):
    if not len(bi) == len(si) == len(ci):
      raise ValueError(f"image {i}: {len(bi)} boxes, {len(si)} scores, {len(ci)} classes")
  counts = np.array([len(x) for x in b], np.int64)
  buf = io.BytesIO()
  np.savez(buf, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
           boxes=np.concatenate(b or [np.zeros((0, 4), np.float32)]),
           scores=np.concatenate(s or [np.zeros(0, np.float32)]),
           classes=np.concatenate(c or [np.zeros(0, np.int64)]),
           sizes=np.asarray(sizes, np.int64).reshape(n, 2))
  storage.makedirs(path)
  storage.write_bytes(storage.join(path, FILE), buf.getvalue())
  storage.write_text(storage.join(path, META), json.dumps(
      {"num_images": n, "image_list": [str(x) for x in image_list], "model": str(model),
       "score_threshold": float(score_threshold)}))


def read(path: str, num_images: Optional[int] = None) -> BoxSet:
  """The box folder at `path`; `num_images`: the count its collection must have."""
  file = storage.join(path, FILE)
  if not storage.exists(file):
    raise FileNotFoundError(f"no detected boxes in {path} ({FILE} missing): run "
                            "--mode=detect with --config.detect.model=<detector SavedModel>")
  z = storage.load_npz(file)
  out = BoxSet(z["offsets"], z["boxes"], z["scores"], z["classes"], z["sizes"],
               tuple(json.loads(storage.read_text(storage.join(path, META)))
                     .get("image_list", ())))
  if num_images is not None and len(out) != num_images:
    raise ValueError(f"{path} holds boxes of {len(out)} images, the collection has "
                     f"{num_images}: re-run --mode=detect")
  return out


def select(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
  """The boxes with score >= threshold, in detection order (the reference's rule)."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return boxes[np.asarray(scores).reshape(-1) >= threshold]


def crop_box(box: Sequence[float], height: int, width: int) -> Tuple[int, int, int, int]:
  """(x1, y1, x2, y2) pixels of a normalised (ymin, xmin, ymax, xmax) box: floor of the
  top-left, ceil of the bottom-right (the reference's PIL crop)."""
  return (int(math.floor(box[1] * width)), int(math.floor(box[0] * height)),
          int(math.ceil(box[3] * width)), int(math.ceil(box[2] * height)))


def features_in_box(locations: np.ndarray, box: Sequence[float], height: int, width: int
                    ) -> np.ndarray:
  """Mask of keypoints (y, x in the image's pixels) inside a normalised box."""
  loc = np.asarray(locations, np.float64).reshape(-1, 2)
  return ((loc[:, 0] >= box[0] * height) & (loc[:, 0] <= box[2] * height)
          & (loc[:, 1] >= box[1] * width) & (loc[:, 1] <= box[3] * width))


def regions(descriptors: np.ndarray, box_descriptors: Sequence[np.ndarray]
            ) -> Tuple[np.ndarray, list]:
  """(features, num_features_per_region) of the whole image followed by its boxes."""
  parts = [np.asarray(descriptors, np.float32)]
  parts += [np.asarray(d, np.float32).reshape(-1, parts[0].shape[1]) for d in box_descriptors]
  return np.concatenate(parts), [len(p) for p in parts]
