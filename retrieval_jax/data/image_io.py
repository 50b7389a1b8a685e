"""Robust image decoding: every file becomes RGB uint8 [H, W, 3] or a clear, counted error.

Decisions (they change pixels, so they are written down here once):

* **Truncated / corrupt files are errors.** PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`
  is left at its default (False), so a JPEG cut short raises `ImageDecodeError` with
  reason ``"truncated"`` instead of silently returning grey rows. Pipelines skip such
  files through `try_load`, which logs and counts them. (The revisitop1m example script
  sets the flag to True; a handful of its distractors are truncated, so a run of ours
  skips them where the reference kept their partial pixels.)
* **Colour:** CMYK / YCbCr / greyscale / 1-bit are converted to RGB by PIL; 16-bit
  greyscale ('I;16*', 'I') is rescaled to 8 bits with `round(v / 257)` (PIL's own
  conversion clips at 255); images with alpha (RGBA, LA, palette with transparency) are
  composited over `background` (white by default) rather than having the alpha dropped,
  which would expose whatever colour the transparent pixels happen to store.
* **Geometry:** `bbx` is given in the stored pixel frame (the frame in which the
  reference code and the Revisited Oxford/Paris annotations crop, since they never apply
  EXIF orientation). The crop happens first, then the EXIF orientation
  (`ImageOps.exif_transpose`, on by default), then an optional extra `rotate` (used for
  the Holidays images whose orientation is wrong without any EXIF tag).
* **Large images:** PIL's decompression-bomb limit is raised to `PIL_PIXEL_LIMIT` when
  this module is imported (the default of ~89 Mpx rejects real panoramas); our own
  `max_pixels` bounds memory instead. A JPEG larger than `max_pixels` is decoded at 1/2,
  1/4 or 1/8 scale inside libjpeg (`Image.draft`), so it never exists at full size in
  memory; other formats above `max_pixels` raise `ImageDecodeError("too_large")`.
  `max_size` asks for the same reduced JPEG decoding for speed: the result keeps its
  longer side >= `max_size`, so a later resize to `max_size` stays exact up to libjpeg's
  DCT scaling (not bit-identical to a full decode; leave it None for reference parity).
"""
import collections
import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that. 2**29 (537 Mpx, ~1.6 GB
# as RGB) lets real 20000 x 20000 scans open; `max_pixels` below bounds what we decode.
PIL_PIXEL_LIMIT = 1 << 29
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PIL_PIXEL_LIMIT:
  Image.MAX_IMAGE_PIXELS = PIL_PIXEL_LIMIT

# Default bound on decoded pixels (~400 MB as RGB uint8).
DEFAULT_MAX_PIXELS = 1 << 27

BBox = Sequence[float]


class ImageDecodeError(RuntimeError):
  """An image that cannot be decoded; pipelines log and skip it.

  Attributes:
    path: the file that failed.
    reason: a short category used for counting: 'truncated', 'unidentified',
      'too_large', 'bad_bbx' or 'decode_error'.
  """

  def __init__(self, path: str, reason: str = "decode_error", detail: str = ""):
    self.path = str(path)
    self.reason = reason
    msg = f"cannot decode image {self.path} ({reason})"
    if detail:
      msg += f": {detail}"
    super().__init__(msg)


def _classify(exc: BaseException) -> str:
  text = str(exc).lower()
  if isinstance(exc, UnidentifiedImageError):
    return "unidentified"
  if isinstance(exc, Image.DecompressionBombError):
    return "too_large"
  if "truncated" in text or "premature end" in text or "broken data stream" in text:
    return "truncated"
  return "decode_error"


def _to_rgb(im: Image.Image, background: Tuple[int, int, int]) -> np.ndarray:
  """Converts any PIL mode to an RGB uint8 array [H, W, 3]."""
  mode = im.mode
  if mode.startswith("I;16") or mode == "I":
    # 16-bit greyscale (PNG / TIFF). PIL's convert('L') clips at 255, which turns most
    # of a 16-bit image white; rescale the full range instead. 'I' (32-bit int) is how
    # some PIL versions open 16-bit PNGs, so values are assumed to be in [0, 65535].
    arr = np.asarray(im).astype(np.float64)
    arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode == "F":
    arr = np.asarray(im, dtype=np.float64)
    scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    arr = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
      mode == "P" and "transparency" in im.info) or (
          mode in ("L", "RGB") and "transparency" in im.info)
  if has_alpha:
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    im = Image.alpha_composite(base, rgba)
  if im.mode != "RGB":
    im = im.convert("RGB")
  return np.asarray(im, dtype=np.uint8)


def _jpeg_scale_for(size: Tuple[int, int], max_pixels: Optional[int],
                    max_size: Optional[int]) -> int:
  """Largest libjpeg reduction (1, 2, 4, 8) allowed by max_pixels / max_size."""
  w, h = size
  scale = 1
  if max_pixels is not None:
    while scale < 8 and math.ceil(w / scale) * math.ceil(h / scale) > max_pixels:
      scale *= 2
  if max_size is not None:
    # Reduce only while the longer side stays >= max_size (never below it).
    while scale < 8 and math.ceil(max(w, h) / (scale * 2)) >= max_size:
      scale *= 2
  return scale


def _crop(im: Image.Image, bbx: BBox, factor: Tuple[float, float],
          path: str) -> Image.Image:
  x1, y1, x2, y2 = (float(v) for v in bbx)
  fx, fy = factor
  box = (int(round(x1 * fx)), int(round(y1 * fy)),
         int(round(x2 * fx)), int(round(y2 * fy)))
  # Clamp to the image, as the reference's PIL crop would pad with black otherwise.
  box = (max(box[0], 0), max(box[1], 0), min(box[2], im.width), min(box[3], im.height))
  if box[2] <= box[0] or box[3] <= box[1]:
    raise ImageDecodeError(path, "bad_bbx", f"empty crop {tuple(bbx)} of {im.size}")
  return im.crop(box)


def load_rgb(path: str,
             bbx: Optional[BBox] = None,
             max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
             max_size: Optional[int] = None,
             exif_transpose: bool = True,
             rotate: int = 0,
             background: Tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """Reads an image file as RGB uint8.

  Args:
    path: image file (any format PIL reads).
    bbx: optional (x1, y1, x2, y2) crop in the stored pixel frame of the full-size
      image (before EXIF orientation), as in the Revisited Oxford/Paris ground truth.
    max_pixels: bound on decoded pixels; JPEGs above it are decoded at a reduced scale,
      other formats raise ImageDecodeError('too_large'). None: no bound.
    max_size: if set, JPEGs are decoded at the smallest libjpeg scale that keeps the
      longer side >= max_size (faster; not bit-identical to a full decode).
    exif_transpose: apply the EXIF orientation tag.
    rotate: extra clockwise rotation in degrees (multiple of 90) applied last.
    background: colour that transparent pixels are composited over.

  Returns:
    [H, W, 3] uint8 array.

  Raises:
    FileNotFoundError: `path` does not exist (message names the path).
    ImageDecodeError: the file exists but cannot be decoded (has `.path`, `.reason`).
  """
  path = str(path)
  if rotate % 90:
    raise ValueError(f"rotate must be a multiple of 90, got {rotate}")
  try:
    with open(path, "rb") as f:
      with Image.open(f) as im:
        full_size = im.size
        if im.format == "JPEG":
          scale = _jpeg_scale_for(full_size, max_pixels, max_size)
          if scale > 1:
            # draft() picks the largest scale whose output still covers the requested
            # size, so ask for the floor: libjpeg then returns ceil(size / scale).
            im.draft("RGB", (max(1, full_size[0] // scale),
                             max(1, full_size[1] // scale)))
        if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
          raise ImageDecodeError(
              path, "too_large",
              f"{im.size[0]}x{im.size[1]} exceeds max_pixels={max_pixels}")
        im.load()
        if bbx is not None:
          factor = (im.size[0] / full_size[0], im.size[1] / full_size[1])
          im = _crop(im, bbx, factor, path)
        if exif_transpose:
          # exif_transpose reads the tag from the (possibly cropped) image's info.
          im = ImageOps.exif_transpose(im) or im
        arr = _to_rgb(im, background)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"image file not found: {path}") from e
  except ImageDecodeError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
          UnidentifiedImageError, MemoryError, EOFError) as e:
    # PIL reports broken files through many exception types.
    raise ImageDecodeError(path, _classify(e), str(e)) from e
  if rotate % 360:
    # np.rot90 turns counter-clockwise for positive k.
    arr = np.ascontiguousarray(np.rot90(arr, k=-(rotate // 90) % 4))
  return arr


class SkipCounter:
  """Thread-safe count of skipped files by reason, for pipeline summaries.

  Attributes:
    counts: reason -> number of skipped files.
    examples: reason -> up to `max_examples` skipped paths.
  """

  def __init__(self, max_examples: int = 5, log_first: int = 10):
    self._lock = threading.Lock()
    self.counts: Dict[str, int] = collections.Counter()
    self.examples: Dict[str, List[str]] = collections.defaultdict(list)
    self._max_examples = max_examples
    self._log_first = log_first

  def add(self, reason: str, path: str, message: str = "") -> None:
    """Records one skipped file; logs the first `log_first` of each reason."""
    with self._lock:
      self.counts[reason] += 1
      n = self.counts[reason]
      if len(self.examples[reason]) < self._max_examples:
        self.examples[reason].append(str(path))
    if n <= self._log_first:
      logging.warning("Skipping image %s (%s) %s", path, reason, message)
    elif n == self._log_first + 1:
      logging.warning("More '%s' images skipped; further ones are only counted.",
                      reason)

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self.counts.values())

  def summary(self) -> str:
    with self._lock:
      if not self.counts:
        return "no images skipped"
      return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))


# Process-wide counter used when `try_load` is given none.
GLOBAL_SKIPS = SkipCounter()


def try_load(path: str,
             bbx: Optional[BBox] = None,
             counter: Optional[SkipCounter] = None,
             **kwargs) -> Optional[np.ndarray]:
  """Like `load_rgb`, but returns None (logged and counted) for a missing or bad file.

  Args:
    path: image file.
    bbx: optional crop box, see `load_rgb`.
    counter: where the skip is counted; defaults to the module's `GLOBAL_SKIPS`.
    **kwargs: passed to `load_rgb`.

  Returns:
    [H, W, 3] uint8 array, or None when the file was skipped.
  """
  counter = GLOBAL_SKIPS if counter is None else counter
  try:
    return load_rgb(path, bbx=bbx, **kwargs)
  except FileNotFoundError as e:
    counter.add("missing", path, str(e))
  except ImageDecodeError as e:
    counter.add(e.reason, path, str(e))
  return None
