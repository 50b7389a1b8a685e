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
  EXIF orientation). The crop happens first, exactly as the reference's
  `img.convert('RGB').crop(bbx)`: PIL rounds each coordinate, and a box reaching past the
  image is padded with black (only a box that misses the image entirely is an error).
  Then the EXIF orientation (`exif_transpose`; on by default for user folders, off for
  the benchmark datasets, whose reference code never applies it, see
  `retrieval_jax/data/protocol.py`), then an optional extra `rotate` (used for the
  Holidays images whose orientation is wrong without any EXIF tag).
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
import io
import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from retrieval_jax import errors

# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that. 2**29 (537 Mpx, ~1.6 GB
# as RGB) lets real 20000 x 20000 scans open; `max_pixels` below bounds what we decode.
PIL_PIXEL_LIMIT = 1 << 29
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PIL_PIXEL_LIMIT:
  Image.MAX_IMAGE_PIXELS = PIL_PIXEL_LIMIT

# Default bound on decoded pixels (~400 MB as RGB uint8).
DEFAULT_MAX_PIXELS = 1 << 27

BBox = Sequence[float]

# The files a folder of photos contributes (--mode=describe, the folder dataset), by name.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm")


class ImageDecodeError(errors.UserError, RuntimeError):
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


class NothingReadableError(errors.UserError, RuntimeError):
  """Not one of the images given could be read (a one-line error, exit code 2)."""


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


def _crop(arr: np.ndarray, bbx: BBox, factor: Tuple[float, float],
          path: str) -> np.ndarray:
  """PIL's `Image.crop(bbx)` of an RGB array: rounded box, black outside the image."""
  x1, y1, x2, y2 = (float(v) for v in bbx)
  fx, fy = factor
  # PIL's crop rounds each coordinate with Python's round() (half to even).
  box = (int(round(x1 * fx)), int(round(y1 * fy)),
         int(round(x2 * fx)), int(round(y2 * fy)))
  h, w = arr.shape[:2]
  inside = (max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h))
  if box[2] <= box[0] or box[3] <= box[1] or inside[2] <= inside[0] or inside[3] <= inside[1]:
    raise ImageDecodeError(path, "bad_bbx", f"empty crop {tuple(bbx)} of {w}x{h}")
  if inside == box:
    return np.ascontiguousarray(arr[box[1]:box[3], box[0]:box[2]])
  out = np.zeros((box[3] - box[1], box[2] - box[0], 3), np.uint8)
  out[inside[1] - box[1]:inside[3] - box[1], inside[0] - box[0]:inside[2] - box[0]] = (
      arr[inside[1]:inside[3], inside[0]:inside[2]])
  return out


# EXIF orientation -> PIL transpose, as `ImageOps.exif_transpose`.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(0x0112, 1) or 1)
  except Exception:  # pylint: disable=broad-except (a broken EXIF block: ignore it)
    return 1


def open_image_file(path: str):
  """A local file, or the bytes of an object in a bucket (gs://...) read whole into memory
  (PIL decodes from memory; a missing object is FileNotFoundError, as a missing file)."""
  if "://" not in path:
    return open(path, "rb")
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(path)
  return io.BytesIO(p.read_bytes())


def load_rgb(path: str,
             bbx: Optional[BBox] = None,
             max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
             max_size: Optional[int] = None,
             exif_transpose: bool = True,
             rotate: int = 0,
             background: Tuple[int, int, int] = (255, 255, 255),
             with_full_size: bool = False):
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
    with_full_size: also return the (width, height) of the whole decoded image, before
      the crop (the reference scales a query crop by the whole image's factor).

  Returns:
    [H, W, 3] uint8 array; with `with_full_size`, (array, (width, height)).

  Raises:
    FileNotFoundError: `path` does not exist (message names the path).
    ImageDecodeError: the file exists but cannot be decoded (has `.path`, `.reason`).
  """
  path = str(path)
  if rotate % 90:
    raise ValueError(f"rotate must be a multiple of 90, got {rotate}")
  try:
    with open_image_file(path) as f:
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
        decoded_size = im.size
        orientation = _orientation(im) if exif_transpose else 1
        arr = _to_rgb(im, background)
        if bbx is not None:
          factor = (decoded_size[0] / full_size[0], decoded_size[1] / full_size[1])
          arr = _crop(arr, bbx, factor, path)
        if orientation in _ORIENTATION:
          arr = np.asarray(Image.fromarray(arr).transpose(_ORIENTATION[orientation]))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"image file not found: {path}") from e
  except ImageDecodeError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL reports broken files through many exception types (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, IndexError, DecompressionBombError, ...): any of
    # them means "this file is unreadable", skipped and listed, never a crash.
    raise ImageDecodeError(path, _classify(e), str(e)) from e
  if rotate % 360:
    # np.rot90 turns counter-clockwise for positive k.
    arr = np.ascontiguousarray(np.rot90(arr, k=-(rotate // 90) % 4))
  if with_full_size:
    return arr, decoded_size
  return arr


class SkipCounter:
  """Thread-safe count of skipped files by reason, for pipeline summaries.

  Attributes:
    counts: reason -> number of skipped files.
    examples: reason -> up to `max_examples` skipped paths.
    entries: every (path, reason) skipped, in order (for `paths.write_skipped_list`).
  """

  def __init__(self, max_examples: int = 5, log_first: int = 10):
    self._lock = threading.Lock()
    self.counts: Dict[str, int] = collections.Counter()
    self.examples: Dict[str, List[str]] = collections.defaultdict(list)
    self.entries: List[Tuple[str, str]] = []
    self._max_examples = max_examples
    self._log_first = log_first

  def add(self, reason: str, path: str, message: str = "") -> None:
    """Records one skipped file; logs the first `log_first` of each reason."""
    with self._lock:
      self.counts[reason] += 1
      n = self.counts[reason]
      self.entries.append((str(path), reason))
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


def skipped_list_text(entries: Sequence[Tuple[str, str]]) -> Optional[str]:
  """`# N skipped files` then `<reason>\t<image path>` lines; None when there are none.

  Duplicates are listed once, in first-seen order.
  """
  seen, lines = set(), []
  for image, reason in entries:
    if (image, reason) not in seen:
      seen.add((image, reason))
      lines.append(f"{reason}\t{image}\n")
  if not lines:
    return None
  return f"# {len(lines)} skipped files: <reason>\t<path>\n" + "".join(lines)


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
