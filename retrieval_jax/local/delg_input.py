"""DELG's input rule for local features: how an image file becomes the pyramid's levels.

The global descriptors keep cirtorch's protocol (`data/protocol.py`); the local features
follow DELG's extraction (tensorflow/models `research/delf`):

* loading (`delg/extract_features.py`, `utils.RgbLoader`): PIL, RGB, no EXIF orientation
  (as the benchmarks' boxes assume; user folders follow `extract.exif_transpose`); a query
  is cropped by its rounded box and its size bound scaled by `crop_long / full_long`;
* the size bound (`examples/extractor.py: ResizeImage`): an image whose longer side exceeds
  `long_side` (DELG: `max_image_size` 1024) is resized by PIL's BILINEAR to
  `round(size * long_side / longer side)`, a smaller one is left as it is; the factors
  actually applied (new size / old size, per axis) are `scale_factors`;
* the pyramid (`export_model_utils.ExtractLocalFeatures`): every level is
  `tf.image.resize(float image, round(size * scale))`, bilinear with half-pixel centres and
  no antialiasing, computed here by `bilinear_resize_like_tf` (normalising the pixels is
  per-channel affine, so resizing 0..255 values first gives the same network input);
* keypoints are box centres divided by the level's scale, then by `scale_factors`
  (`locations / scale_factors`): (y, x) pixels of the image as loaded (of the crop, for a
  query).
"""
import concurrent.futures
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from retrieval_jax.data import image_io
from retrieval_jax.data import transforms


def resize_to_max_side(image: np.ndarray, max_side: float) -> Tuple[np.ndarray, np.ndarray]:
  """`ResizeImage` without a minimum size: (uint8 image, (y, x) factors applied)."""
  h, w = image.shape[:2]
  largest = max(h, w)
  if max_side < 0 or largest <= max_side:
    return image, np.ones(2)
  s = max_side / largest
  # At least 1 px: a 6000 x 2 image would round to 0 rows, which PIL cannot make.
  nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
  out = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.BILINEAR))
  return out, np.array([nh / h, nw / w])


def load_image(path: str, long_side: int, bbox=None, exif_transpose: bool = False,
               skipped: Optional[image_io.SkipCounter] = None
               ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(resized uint8 [h, w, 3], scale_factors [2]) of one image (crop), or None if unreadable."""
  loaded = image_io.try_load(path, bbox, counter=skipped, exif_transpose=exif_transpose,
                             with_full_size=True)
  if loaded is None:
    return None
  image, full_size = loaded
  factor = max(image.shape[:2]) / max(full_size) if bbox is not None else 1.0
  return resize_to_max_side(image, long_side * factor)


def _axis(in_size: int, out_size: int):
  """Source indices and weights of TF's half-pixel bilinear resize along one axis."""
  x = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  floor = np.floor(x)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(x), in_size - 1).astype(np.int64)
  return lower, upper, (x - floor).astype(np.float32)


def bilinear_resize_like_tf(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """`tf.image.resize(image, (height, width))` (bilinear, antialias=False): float32."""
  image = np.asarray(image, np.float32)
  ly, uy, fy = _axis(image.shape[0], height)
  lx, ux, fx = _axis(image.shape[1], width)
  fx = fx[None, :, None]

  def rows(idx):
    r = image[idx]
    return r[:, lx] + (r[:, ux] - r[:, lx]) * fx
  top, bottom = rows(ly), rows(uy)
  return top + (bottom - top) * fy[:, None, None]


def level_size(height: int, width: int, scale: float) -> Tuple[int, int]:
  """`tf.round(float32 size * scale)` (half to even), at least 1."""
  size = np.round(np.float32([height, width]) * np.float32(scale))
  return max(1, int(size[0])), max(1, int(size[1]))


def padded_level_shape(height: int, width: int, scale: float) -> Tuple[int, int]:
  """(H', W') of `pyramid_level`'s batch for a [.., height, width] batch: room for every
  row's level."""
  if scale == 1.0:
    return height, width
  out_h, out_w = level_size(height, width, scale)
  return (max(out_h, int(np.ceil(height * scale))), max(out_w, int(np.ceil(width * scale))))


def level_dtype(scale: float):
  """`pyramid_level`'s image dtype: the uint8 batch itself at scale 1, float32 resized."""
  return np.uint8 if scale == 1.0 else np.float32


def pyramid_level(images: np.ndarray, masks: np.ndarray, scale: float
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """Every row's valid region resized to `level_size` like TF, re-padded (float32 0..255).

  Args:
    images: uint8 [B, H, W, 3]; masks: bool [B, H, W] (bottom/right padding).
    scale: the pyramid scale.
  Returns:
    (float32 [B, H', W', 3], bool [B, H', W']) with H', W' the largest level of the batch.
  """
  b, h, w = masks.shape
  if scale == 1.0:
    return images, masks
  out_h, out_w = padded_level_shape(h, w, scale)
  out = np.zeros((b, out_h, out_w, 3), np.float32)
  out_mask = np.zeros((b, out_h, out_w), bool)
  for r in range(b):
    vh, vw = int(masks[r, :, 0].sum()), int(masks[r, 0, :].sum())
    if vh == 0 or vw == 0:
      continue
    nh, nw = level_size(vh, vw, scale)
    out[r, :nh, :nw] = bilinear_resize_like_tf(images[r, :vh, :vw], nh, nw)
    out_mask[r, :nh, :nw] = True
  return out, out_mask


def batches(paths: Sequence[str], *, long_side: int, batch_size: int, bboxes=None,
            exif_transpose: bool = False, num_threads: int = 2,
            skipped: Optional[image_io.SkipCounter] = None
            ) -> Iterator[Dict[str, np.ndarray]]:
  """Padded, masked batches of `load_image`'d images grouped by size bucket.

  Yields:
    {"image": uint8 [n, H, W, 3], "mask": bool [n, H, W], "index": int32 [n] (-1: empty
     row), "scale_factors": float64 [n, 2]}; unreadable images are left out (logged and
    counted by `image_io`).
  """
  buckets = transforms.square_buckets(long_side)
  pending: Dict[int, List] = {i: [] for i in range(len(buckets))}

  def flush(k):
    rows, (bh, bw) = pending[k], buckets[k]
    out = {"image": np.zeros((batch_size, bh, bw, 3), np.uint8),
           "mask": np.zeros((batch_size, bh, bw), bool),
           "index": np.full((batch_size,), -1, np.int32),
           "scale_factors": np.ones((batch_size, 2))}
    for r, (i, img, factors) in enumerate(rows):
      out["image"][r, :img.shape[0], :img.shape[1]] = img
      out["mask"][r, :img.shape[0], :img.shape[1]] = True
      out["index"][r], out["scale_factors"][r] = i, factors
    pending[k] = []
    return out

  def load(i):
    bbox = None if bboxes is None else bboxes[i]
    return i, load_image(paths[i], long_side, bbox, exif_transpose, skipped)

  chunk = 4 * max(1, int(batch_size))  # images decoded ahead, bounded
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as pool:
    for start in range(0, len(paths), chunk):
      for i, got in pool.map(load, range(start, min(len(paths), start + chunk))):
        if got is None:
          continue
        img, factors = got
        k = transforms.pick_bucket(img.shape[0], img.shape[1], buckets)
        pending[k].append((i, img, factors))
        if len(pending[k]) == batch_size:
          yield flush(k)
  for k in range(len(buckets)):
    if pending[k]:
      yield flush(k)
