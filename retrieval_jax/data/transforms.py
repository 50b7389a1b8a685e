"""Image transforms on numpy/PIL (no JAX): resizing, crops, flips, padding into size buckets.

All functions take and return uint8 RGB `[H, W, 3]` arrays; normalisation by the weights'
mean/std happens on the device inside the model (uint8 moves 4x fewer bytes to it).
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def resize_long_side(image: np.ndarray, long_side: int, upscale: bool = True,
                     resample: str = "bilinear") -> np.ndarray:
  """Resizes so that max(H, W) == long_side, keeping the aspect ratio (antialiased).

  Args:
    image: [H, W, 3] uint8.
    long_side: target length of the longer side.
    upscale: if False, images already smaller than `long_side` are returned unchanged, as
      the reference's `imresize` (PIL `thumbnail`) does for its training images.
    resample: "bilinear" (default) or "lanczos".

  Returns:
    [H', W', 3] uint8 with max(H', W') == long_side (or the input when not upscaled).
  """
  h, w = image.shape[:2]
  scale = long_side / max(h, w)
  if scale > 1 and not upscale:
    return image
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  if (nh, nw) == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((nw, nh), RESAMPLE[resample]))


def thumbnail(image: np.ndarray, max_side: float, resample: str = "lanczos") -> np.ndarray:
  """PIL's `Image.thumbnail((max_side, max_side), filter)`: shrinks only, keeps the aspect.

  The reference's `imresize` (cirtorch `datahelpers.py`) is exactly this call with
  ANTIALIAS (= LANCZOS): the size is floored, an image that already fits is returned
  unchanged (never enlarged), and PIL's two-step `reducing_gap=2.0` resize is used.

  Args:
    image: [H, W, 3] uint8.
    max_side: bound on both sides (a float, as the reference passes for query crops).
    resample: "lanczos" (the reference) or "bilinear".

  Returns:
    [H', W', 3] uint8 with max(H', W') <= floor(max_side), or the input when it fits.
  """
  if resample not in RESAMPLE:
    raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
  im = Image.fromarray(image)
  im.thumbnail((max_side, max_side), RESAMPLE[resample])
  return image if im.size == (image.shape[1], image.shape[0]) else np.asarray(im)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: Tuple[float, float] = (0.5, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop of a random area fraction and aspect ratio, resized to size x size."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # Fall back to the central square crop.
    ch = cw = min(h, w)
    y, x = (h - ch) // 2, (w - cw) // 2
  crop = Image.fromarray(image[y:y + ch, x:x + cw])
  return np.asarray(crop.resize((size, size), Image.BILINEAR))


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2 (one draw from `rng`)."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def pick_bucket(h: int, w: int, buckets: Sequence[Tuple[int, int]]) -> int:
  """Index of the smallest bucket (H, W) that holds an h x w image (by area)."""
  fits = [i for i, (bh, bw) in enumerate(buckets) if h <= bh and w <= bw]
  if not fits:
    raise ValueError(f"image of size {h}x{w} fits no bucket of {list(buckets)}")
  return min(fits, key=lambda i: buckets[i][0] * buckets[i][1])


def pad_to(image: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """Pads at the bottom/right to `size` (H, W); returns (image, validity mask [H, W] bool).

  Bottom/right padding keeps the valid region aligned with every stride of the network.
  """
  h, w = image.shape[:2]
  out = np.zeros((size[0], size[1], 3), np.uint8)
  out[:h, :w] = image
  mask = np.zeros(size, bool)
  mask[:h, :w] = True
  return out, mask


def square_buckets(long_side: int) -> Tuple[Tuple[int, int], ...]:
  """Default evaluation buckets for images resized to `long_side`: landscape, portrait, square.

  Three shapes cover any aspect ratio with at most ~2x padding; each shape compiles once.
  """
  s = long_side
  half = int(np.ceil(s * 0.75))
  return ((half, s), (s, half), (s, s))


def prepare_eval_image(image: np.ndarray, long_side: int,
                       buckets: Optional[Sequence[Tuple[int, int]]] = None):
  """Resize to long_side, pad into its bucket. Returns (padded, mask, bucket index).

  The former evaluation rule (bilinear, enlarging; `protocol.LEGACY`); the pipelines resize
  by `protocol.EvalProtocol.resize`, cirtorch's rule by default.
  """
  image = resize_long_side(image, long_side)
  buckets = buckets or square_buckets(long_side)
  b = pick_bucket(image.shape[0], image.shape[1], buckets)
  padded, mask = pad_to(image, buckets[b])
  return padded, mask, b


def resize_pad_square(image: np.ndarray, size: int, upscale: bool = False
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """Long side resized to `size`, padded at the bottom/right into a `size` x `size` square.

  The reference trains on whole images resized by their long side (no crop); a static
  batch shape needs the padding, and the mask tells the model which pixels are real.

  Args:
    image: [H, W, 3] uint8.
    size: side of the output square.
    upscale: also enlarge images smaller than `size` (the reference does not).

  Returns:
    (padded [size, size, 3] uint8, validity mask [size, size] bool).
  """
  return pad_to(resize_long_side(image, size, upscale=upscale), (size, size))


def rescale_rows_like_pil(images: np.ndarray, masks: np.ndarray, scale: float
                          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every row's valid region resized by `scale` with PIL's bilinear filter, re-padded.

  PIL's (antialiased) bilinear resize of each image to `round(size * scale)`: the early
  fusion scales (`extract.py`). The DELG pyramid resizes like `tf.image.resize` instead
  (`local/delg_input.py`). The cirtorch
  multi-scale input is `data/interpolate.py`'s `rescale_batch_like_torch` instead.

  Args:
    images: uint8 [B, H, W, 3]; masks: bool [B, H, W] (bottom/right padding).
    scale: factor (1: the inputs unchanged).
  Returns:
    images uint8 [B, ceil(H s), ceil(W s), 3], masks, and per row the (y, x) factors
    actually applied [B, 2] (new valid size / old valid size; 0 for empty rows).
  """
  b, h, w = masks.shape
  if scale == 1.0:
    factors = np.where(masks.any(axis=(1, 2))[:, None], 1.0, 0.0) * np.ones((b, 2))
    return images, masks, factors
  out_h, out_w = max(1, int(np.ceil(h * scale))), max(1, int(np.ceil(w * scale)))
  out = np.zeros((b, out_h, out_w, 3), np.uint8)
  out_mask = np.zeros((b, out_h, out_w), bool)
  factors = np.zeros((b, 2))
  for r in range(b):
    vh, vw = int(masks[r, :, 0].sum()), int(masks[r, 0, :].sum())
    if vh == 0 or vw == 0:
      continue
    nh = min(out_h, max(1, int(round(vh * scale))))
    nw = min(out_w, max(1, int(round(vw * scale))))
    out[r, :nh, :nw] = np.asarray(Image.fromarray(images[r, :vh, :vw]).resize(
        (nw, nh), Image.BILINEAR))
    out_mask[r, :nh, :nw] = True
    factors[r] = (nh / vh, nw / vw)
  return out, out_mask, factors
