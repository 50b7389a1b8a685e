"""Export a retrieval model for serving: a `jax.export` function and a TF SavedModel.

The TensorFlow port of DELF ships `export_CNN_global_model.py`: a SavedModel whose
signature takes a decoded image of any size plus the input scales and returns the global
descriptor, with multi-scale pooling and whitening inside. This module does the same the
JAX way, writing into one folder D:

* `D/jax/describe.bin`: `jax.export` serialised function, image uint8 [H, W, 3] (H, W
  symbolic: any size) -> descriptor float32 [D]; `D/jax/describe_batch.bin`: images uint8
  [B, H, W, 3] + mask bool [B, H, W] (each image's valid region at the top-left, as our
  evaluation batches) -> [B, D]. The weights are baked in as constants, so
  `jax.export.deserialize(open(path, "rb").read()).call(image)` is all a user needs.
* `D/saved_model/`: the same two functions through `jax2tf` (signatures "describe"
  {"image"} -> {"descriptor"} and "describe_batch" {"images", "mask"} -> {"descriptor"}),
  weights as TF variables; a DELG network also gets the reference's DELG signature
  ("delg", `export_delg.py`); "serving_default" is one of them (`export.serving_default`).
* `D/export.json`: the options, the backbone, the descriptor dimension, the version.

The preprocessing of `--mode=extract` happens inside, under the same input rule
(`data/protocol.py`; `ExportOptions.resample / upscale / multiscale_resize`): the image is
resized as `transforms.thumbnail` (shrink only, Image.thumbnail with its reducing gap: the
reference's) or `transforms.resize_long_side` do, by a re-implementation of Pillow's
Resample.c / Reduce.c with its 22-bit fixed-point weights (`resize_into_canvas`), placed at
the top-left of a square canvas with a validity mask (padding never changes a
descriptor); the other scales come from that input through `data.interpolate` (the
reference's `F.interpolate`) or are resized again from the original; the network describes
each; the per-scale descriptors are combined as `extract.extract_descriptors` does
(`(mean_s v_s^p)^(1/p)` with the learned GeM p, or the mean), L2-normalised, optionally
whitened (`P[:dim] (v - m)`, L2). Pillow's filter values are double, ours float32, so a
rare pixel differs by one grey level; the descriptors agree with the extraction's to 1e-4
(tests/test_export.py). Decoding (and the EXIF orientation) is the caller's.

Cost: the resize is two int32 matrix products per image, O(H' W' side) after the reduce
(H', W' <= ~4 side), fine for photos; very large inputs are cheaper decoded at a reduced
JPEG scale first (what Image.thumbnail's `draft` does for files).
"""
import dataclasses
from importlib import metadata
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import multiscale
from retrieval_jax.data import interpolate
from retrieval_jax.postprocess import whitening

JAX_DIR = "jax"
SAVED_MODEL_DIR = "saved_model"
EXPORT_JSON = "export.json"
SINGLE_FILE = "describe.bin"
BATCH_FILE = "describe_batch.bin"

# Pillow's Resample.c: 32 - 8 (pixel) - 2 (headroom) bits for the fixed-point weights.
_PRECISION_BITS = 22


@dataclasses.dataclass(frozen=True)
class ExportOptions:
  """What the exported function computes (the reference export script's flags).

  Attributes:
    long_side: images are resized so that their longer side is `long_side * scale`.
    scales: input scales; more than one gives a multi-scale descriptor.
    multiscale_combine: "gem" (the learned GeM p for an unwhitened GeM network, else the
      mean; `multiscale.multiscale_p_from`) or "mean".
    normalize: L2-normalise the final descriptor (after combining / whitening).
    whitening: None, or {"m": [D0], "P": [D', D0], "dim": int} (a post-hoc learned or PCA
      whitening, `postprocess.whitening_store`), baked in after the network.
    resample, upscale, multiscale_resize: the evaluation input rule
      (`data.protocol.EvalProtocol`, `config.extract.*`; defaults: the reference's):
      "lanczos" / "bilinear" filter; False: shrink only (Image.thumbnail), True: resize the
      long side to `long_side` (Image.resize); "interpolate": the other scales from the
      `long_side` input as `F.interpolate(bilinear)`, "decode": each scale resized from
      the original image to `round(long_side * s)`.
  """
  long_side: int = 1024
  scales: Tuple[float, ...] = (1.0,)
  multiscale_combine: str = "gem"
  normalize: bool = True
  whitening: Optional[Mapping[str, Any]] = None
  resample: str = "lanczos"
  upscale: bool = False
  multiscale_resize: str = "interpolate"


# ----------------------------------------------------------------------------------------------
# Pillow's resize (Resample.c, Reduce.c), in the graph.

# Filter supports of Pillow's `_filters_support`.
_SUPPORT = {"bilinear": 1.0, "lanczos": 3.0}


def _filter(name: str, arg: jnp.ndarray) -> jnp.ndarray:
  """Pillow's `bilinear_filter` / `lanczos_filter` (sinc(x) sinc(x / 3)), float32."""
  if name == "bilinear":
    return jnp.maximum(1.0 - jnp.abs(arg), 0.0)
  def sinc(x):
    safe = jnp.where(x == 0, 1.0, x) * np.pi
    return jnp.where(x == 0, 1.0, jnp.sin(safe) / safe)
  return jnp.where(jnp.abs(arg) < 3.0, sinc(arg) * sinc(arg / 3.0), 0.0)


def _round_div(num, den):
  """round(num / den) for positive int32 arrays, ties to even (as Python's `round`)."""
  q = num // den
  twice_rem = 2 * (num - q * den)
  return q + jnp.where((twice_rem > den) | ((twice_rem == den) & (q % 2 == 1)), 1, 0)


def pil_resample_matrix(n, f, out_size, in_len, out_len: int, resample: str) -> jnp.ndarray:
  """Fixed-point weights of Pillow's resampling along one axis, after a reduce by `f`.

  Pillow (`precompute_coeffs` + `normalize_coeffs_8bpc`) resamples the box [0, n / f) of
  an input of ceil(n / f) pixels (n / f: what remains of n pixels after `reduce(f)`) to
  `out` pixels: with G = f out and F = max(n, G), output j's filter is centred at
  (2j + 1) n / (2G), spans taps [floor(((2j + 1) n - 2 S F + G) / 2G), floor(((2j + 1) n +
  2 S F + G) / 2G)) (S the filter's support), weighs tap x by
  `filter(((2x + 1) G - (2j + 1) n) / 2F)`, normalises to sum 1 and stores
  `round(w 2^22)` (halves away from zero). Bounds and filter arguments are exact integer
  arithmetic here; the filter values are float32 where Pillow uses double.

  Args:
    n: valid input length before the reduce (int32 scalar, may be traced).
    f: the reduce factor (1: none).
    out_size: valid output length (<= out_len).
    in_len: padded input length (static or symbolic), >= ceil(n / f).
    out_len: static output length.
    resample: "bilinear" or "lanczos".
  Returns:
    int32 [out_len, in_len]; rows >= out_size and columns >= ceil(n / f) are zero.
  """
  n, f, o = (jnp.asarray(v, jnp.int32) for v in (n, f, out_size))
  g = f * o
  big_f = jnp.maximum(n, g)
  s2 = int(round(2 * _SUPPORT[resample]))  # 2 S
  j = jnp.arange(out_len, dtype=jnp.int32)[:, None]
  x = jnp.arange(in_len, dtype=jnp.int32)[None, :]
  c2 = (2 * j + 1) * n
  in_size = -(-n // f)
  xmin = jnp.maximum((c2 - s2 * big_f + g) // (2 * g), 0)
  xmax = jnp.minimum((c2 + s2 * big_f + g) // (2 * g), in_size)
  num = (2 * x + 1) * g - c2
  inside = (x >= xmin) & (x < xmax) & (j < o) & (jnp.abs(num) < s2 * big_f)
  w = jnp.where(inside, _filter(resample, num.astype(jnp.float32)
                                / (2 * big_f).astype(jnp.float32)), 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  k = w / jnp.where(total == 0, 1.0, total) * float(1 << _PRECISION_BITS)
  k = (jnp.sign(k) * jnp.floor(jnp.abs(k) + 0.5)).astype(jnp.int32)
  if resample == "bilinear":
    k = _exact_bilinear(jnp.where(inside, 2 * big_f - jnp.abs(num), 0), k)
  return k


def _exact_bilinear(a, approx):
  """Bilinear weights in exact integer arithmetic: tap weight (2F - |num|) / 2F normalised,
  round(a 2^22 / T) (T = the row's sum; halves up, as Pillow's positive weights), which
  float32 filter values miss by one now and then (a grey level off). int32 long division;
  rows where T >= 2^20 (inputs of ~20k px and more) keep the float32 weights `approx`."""
  total = jnp.sum(a, axis=1, keepdims=True)
  safe = jnp.maximum(total, 1)
  hi = a << 12                                  # a <= 2F < 2^19
  q1, r1 = hi // safe, hi % safe                # a 2^12 / T = q1 + r1 / T
  q2 = ((r1 << 11) + safe) // (2 * safe)        # round(r1 2^10 / T), T < 2^20
  exact = (q1 << 10) + q2
  return jnp.where((total > 0) & (total < (1 << 20)) & (a < (1 << 19)), exact, approx)


def _clip8(acc):
  """Pillow's clip8 of a fixed-point accumulator (with its rounding half added)."""
  return jnp.clip((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255)


def _block_sums(x: jnp.ndarray, axis: int, n, f) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Sums of consecutive blocks of `f` along `axis` of the valid length `n` (last partial).

  Returns (sums, same length as the axis, zero past ceil(n / f); counts per block).
  """
  length = x.shape[axis]
  zero = jnp.zeros_like(jnp.take(x, jnp.arange(1), axis=axis))
  cum = jnp.concatenate([zero, jnp.cumsum(x, axis=axis)], axis=axis)
  r = jnp.arange(length, dtype=jnp.int32)
  lo, hi = jnp.minimum(r * f, n), jnp.minimum((r + 1) * f, n)
  sums = jnp.take(cum, hi, axis=axis) - jnp.take(cum, lo, axis=axis)
  return sums, hi - lo


def _pil_reduce(image: jnp.ndarray, h, w, fy, fx) -> jnp.ndarray:
  """`Image.reduce((fx, fy))` of the valid [:h, :w] region (Reduce.c, incl. the corners).

  Each output pixel is the mean of its (possibly partial) block d = rows x cols, rounded as
  Pillow does: `((sum + d // 2) * floor(2^32 / (256 d))) >> 24` (uint32, float32 division).
  """
  x = image.astype(jnp.int32)
  x, cy = _block_sums(x, 0, h, fy)
  x, cx = _block_sums(x, 1, w, fx)
  d = (cy[:, None] * cx[None, :]).astype(jnp.uint32)
  mult = (jnp.float32(2.0 ** 32) / (256 * d).astype(jnp.float32)).astype(jnp.uint32)
  total = x.astype(jnp.uint32) + (d // 2)[..., None]
  out = (total * jnp.where(d > 0, mult, 0)[..., None]) >> 24
  return out.astype(jnp.int32)


def target_size(h, w, side: int, thumbnail: bool):
  """(nh, nw): `transforms.thumbnail` (shrink only, Pillow's aspect rounding) or
  `transforms.resize_long_side` (round(h side / max), ties to even) of an h x w image."""
  h = jnp.asarray(h, jnp.int32)
  w = jnp.asarray(w, jnp.int32)
  if not thumbnail:
    long = jnp.maximum(h, w)
    return (jnp.maximum(_round_div(h * side, long), 1),
            jnp.maximum(_round_div(w * side, long), 1))
  # Pillow's preserve_aspect_ratio: the long side becomes `side`; the other is floor or
  # ceil of side * ratio, whichever keeps the aspect closer (floor on a tie), at least 1.
  # Portrait: |w side - n h| compared for n = floor, ceil. Landscape: |w n - side h| / n.
  portrait = h >= w
  a_p = (w * side) // h
  keep_floor_p = jnp.abs(w * side - a_p * h) <= jnp.abs(w * side - (a_p + 1) * h)
  nw_p = jnp.maximum(jnp.where(keep_floor_p, a_p, a_p + 1), 1)
  a_l = (h * side) // w
  a_l_safe = jnp.maximum(a_l, 1)
  keep_floor_l = ((a_l == 0) | (jnp.abs(w * a_l - side * h) * (a_l + 1)
                                <= jnp.abs(w * (a_l + 1) - side * h) * a_l_safe))
  nh_l = jnp.maximum(jnp.where(keep_floor_l, a_l, a_l + 1), 1)
  nh = jnp.where(portrait, side, nh_l)
  nw = jnp.where(portrait, nw_p, side)
  fits = (h <= side) & (w <= side)
  return jnp.where(fits, h, nh), jnp.where(fits, w, nw)


def resize_into_canvas(image: jnp.ndarray, h, w, side: int, *, resample: str = "bilinear",
                       upscale: bool = True) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """The evaluation resize of `image[:h, :w]` at the top-left of a side x side canvas.

  upscale=True: `transforms.resize_long_side(image, side, resample=...)` (Image.resize, no
  reducing gap). upscale=False: `transforms.thumbnail(image, side, resample)` (shrink only;
  Image.thumbnail's `reducing_gap=2`: first `reduce` by floor(n / 2 out) per axis, then
  resample the remaining box). Pillow resizes horizontally first, rounding to uint8, then
  vertically; so does this.

  Args:
    image: uint8 [H, W, 3] (H, W may be symbolic); the valid region is [:h, :w].
    h, w: valid size (int32 scalars, may be traced).
    side: canvas side (the evaluation long side, static).
    resample: "bilinear" or "lanczos".
    upscale: see above.
  Returns:
    (uint8 [side, side, 3], bool [side, side] mask of the resized valid region).
  """
  if resample not in _SUPPORT:
    raise ValueError(f"resample must be one of {sorted(_SUPPORT)}, got {resample!r}")
  h = jnp.asarray(h, jnp.int32)
  w = jnp.asarray(w, jnp.int32)
  nh, nw = target_size(h, w, side, thumbnail=not upscale)
  pixels = image.astype(jnp.int32)
  if upscale:
    fy = fx = jnp.int32(1)
  else:
    fy, fx = jnp.maximum(h // (2 * nh), 1), jnp.maximum(w // (2 * nw), 1)
    pixels = _pil_reduce(pixels, h, w, fy, fx)
  wx = pil_resample_matrix(w, fx, nw, image.shape[1], side, resample)  # [side, W]
  wy = pil_resample_matrix(h, fy, nh, image.shape[0], side, resample)  # [side, H]
  tmp = _clip8(jnp.einsum("hwc,jw->hjc", pixels, wx, preferred_element_type=jnp.int32))
  out = _clip8(jnp.einsum("ih,hjc->ijc", wy, tmp, preferred_element_type=jnp.int32))
  rows = jnp.arange(side)[:, None] < nh
  cols = jnp.arange(side)[None, :] < nw
  return out.astype(jnp.uint8), rows & cols


def pil_resize_to_size(image: jnp.ndarray, h, w, nh, nw, side: int, *,
                       resample: str = "bilinear") -> jnp.ndarray:
  """`Image.resize((nw, nh), resample)` (no reducing gap) of `image[:h, :w]`, at the
  top-left of a side x side uint8 canvas (zero elsewhere); nh, nw <= side. Resizing to the
  same size is the identity, as Pillow's."""
  if resample not in _SUPPORT:
    raise ValueError(f"resample must be one of {sorted(_SUPPORT)}, got {resample!r}")
  one = jnp.int32(1)
  wx = pil_resample_matrix(w, one, nw, image.shape[1], side, resample)  # [side, W]
  wy = pil_resample_matrix(h, one, nh, image.shape[0], side, resample)  # [side, H]
  pixels = image.astype(jnp.int32)
  tmp = _clip8(jnp.einsum("hwc,jw->hjc", pixels, wx, preferred_element_type=jnp.int32))
  out = _clip8(jnp.einsum("ih,hjc->ijc", wy, tmp, preferred_element_type=jnp.int32))
  return out.astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------
# The exported computation.


def _valid_size(mask: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """[B, H, W] top-left valid masks -> (h [B], w [B]) int32."""
  h = jnp.sum(jnp.any(mask, axis=2), axis=1).astype(jnp.int32)
  w = jnp.sum(jnp.any(mask, axis=1), axis=1).astype(jnp.int32)
  return h, w


def describe_batch_fn(model, options: ExportOptions, multiscale_p: Optional[float]):
  """(variables, images uint8 [B, H, W, 3], mask bool [B, H, W]) -> float32 [B, D].

  `multiscale_p` is `multiscale.multiscale_p_from(variables, options.multiscale_combine,
  model.pooling)`, computed on the host (it decides the graph, so it cannot come from traced variables).
  """
  if options.multiscale_combine not in ("gem", "mean"):
    raise ValueError("export.multiscale_combine must be 'gem' or 'mean' (early fusion is "
                     f"not exportable), got {options.multiscale_combine!r}")
  if options.multiscale_resize not in ("interpolate", "decode"):
    raise ValueError("export.multiscale_resize must be 'interpolate' or 'decode', got "
                     f"{options.multiscale_resize!r}")
  p = 1.0 if multiscale_p is None else float(multiscale_p)
  scales = tuple(float(s) for s in options.scales)
  white = None
  if options.whitening is not None:
    m = np.asarray(options.whitening["m"], np.float32)
    proj = np.asarray(options.whitening["P"], np.float32)
    dim = int(options.whitening.get("dim", 0) or 0) or proj.shape[0]
    white = (m, proj[:dim])

  def describe_batch(variables, images, mask):
    h, w = _valid_size(mask)

    def canvas_of(side):
      return jax.vmap(lambda im, a, b: resize_into_canvas(
          im, a, b, side, resample=options.resample, upscale=options.upscale))(images, h, w)

    base = canvas_of(options.long_side) if options.multiscale_resize == "interpolate" else None
    acc = None
    for s in scales:
      if base is not None:
        canvas, cmask = interpolate.rescale_batch_like_torch(*base, s)
      else:
        canvas, cmask = canvas_of(max(1, int(round(options.long_side * s))))
      v = model.apply(variables, canvas, cmask)["descriptor"].astype(jnp.float32)
      if len(scales) > 1:
        v = multiscale.power_term(v, p, xp=jnp)
      acc = v if acc is None else acc + v
    v = acc
    if len(scales) > 1:
      v = multiscale.finish(v, len(scales), p, xp=jnp, eps=1e-12,
                            normalize=options.normalize or white is not None)
    if white is not None:
      m, proj = white
      with jax.default_matmul_precision("highest"):
        v = whitening.apply_whitening(v, m, proj, xp=jnp, normalize=options.normalize)
    return v

  return describe_batch


def describe_one_fn(model, options: ExportOptions, multiscale_p: Optional[float]):
  """(variables, image uint8 [H, W, 3]) -> float32 [D] (the whole image is valid)."""
  batch_fn = describe_batch_fn(model, options, multiscale_p)

  def describe(variables, image):
    mask = jnp.ones(image.shape[:2], bool)
    return batch_fn(variables, image[None], mask[None])[0]

  return describe


def _multiscale_p(variables, options: ExportOptions,
                  model_pooling: Optional[str] = None) -> Optional[float]:
  if options.multiscale_combine not in ("gem", "mean"):
    raise ValueError("export.multiscale_combine must be 'gem' or 'mean' (early fusion is "
                     f"not exportable), got {options.multiscale_combine!r}")
  return multiscale.multiscale_p_from(variables, options.multiscale_combine, model_pooling)


_FROM_VARIABLES = object()  # multiscale_p not given: computed from the variables


def make_describe_one(model, variables, options: ExportOptions, multiscale_p=_FROM_VARIABLES):
  """image uint8 [H, W, 3] -> descriptor float32 [D], `variables` closed over."""
  if multiscale_p is _FROM_VARIABLES:
    multiscale_p = _multiscale_p(variables, options, model.pooling)
  fn = describe_one_fn(model, options, multiscale_p)
  return lambda image: fn(variables, image)


def make_describe_batch(model, variables, options: ExportOptions,
                        multiscale_p=_FROM_VARIABLES):
  """(images uint8 [B, H, W, 3], mask bool [B, H, W]) -> float32 [B, D], variables closed."""
  if multiscale_p is _FROM_VARIABLES:
    multiscale_p = _multiscale_p(variables, options, model.pooling)
  fn = describe_batch_fn(model, options, multiscale_p)
  return lambda images, mask: fn(variables, images, mask)


# ----------------------------------------------------------------------------------------------
# Writing the artifacts.


def options_from_protocol(protocol, **kwargs) -> ExportOptions:
  """ExportOptions with the input rule of a `data.protocol.EvalProtocol` (+ other fields)."""
  return ExportOptions(resample=protocol.resample, upscale=protocol.upscale,
                       multiscale_resize=protocol.multiscale_resize, **kwargs)


def options_from_settings(settings, *, normalize: bool = True,
                          whitening: Optional[Mapping[str, Any]] = None) -> ExportOptions:
  """ExportOptions describing as a `descriptor_settings.DescriptorSettings` says."""
  return options_from_protocol(settings.protocol, long_side=settings.long_side,
                               scales=settings.scales,
                               multiscale_combine=settings.multiscale_combine,
                               normalize=normalize, whitening=whitening)


def _export_jax(fn, args, platforms) -> jax.export.Exported:
  return jax.export.export(jax.jit(fn), platforms=platforms)(*args)


SERVING_DEFAULTS = ("auto", "describe", "delg")


def resolve_serving_default(choice: str, has_delg: bool) -> str:
  """`export.serving_default`: "auto" is "delg" for a DELG network (the reference's
  signature, `export_delg.py`), else "describe"; "delg" needs a DELG network."""
  if choice not in SERVING_DEFAULTS:
    raise ValueError(f"export.serving_default must be one of {SERVING_DEFAULTS}, got "
                     f"{choice!r}")
  if choice == "auto":
    return "delg" if has_delg else "describe"
  if choice == "delg" and not has_delg:
    raise ValueError("export.serving_default='delg' (the reference DELG signature) needs a "
                     "network with local features: set --config.model.local_head=delg, or "
                     "export.serving_default=describe")
  return choice


def _write_saved_model(model, variables, options: ExportOptions, path: str,
                       platforms, p: Optional[float], delg=None,
                       serving_default: str = "describe") -> None:
  """The functions as a TF SavedModel (jax2tf, native serialisation): "describe",
  "describe_batch", "delg" (with `delg` DelgOptions) and "serving_default" (one of them)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (optional: the tf extra)
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  leaves, treedef = jax.tree_util.tree_flatten(variables)

  def with_params(make):
    fn = make(model, options, p)
    return lambda params, *inputs: fn(jax.tree_util.tree_unflatten(treedef, params), *inputs)

  kw = dict(with_gradient=False, native_serialization_platforms=tuple(platforms))
  one = jax2tf.convert(with_params(describe_one_fn),
                       polymorphic_shapes=[None, "(h, w, 3)"], **kw)
  batch = jax2tf.convert(with_params(describe_batch_fn),
                         polymorphic_shapes=[None, "(b, h, w, 3)", "(b, h, w)"], **kw)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
  def describe(image):
    return {"descriptor": one(module.params, image)}

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
      tf.TensorSpec([None, None, None], tf.bool, name="mask")])
  def describe_batch(images, mask):
    return {"descriptor": batch(module.params, images, mask)}

  module.describe = describe
  module.describe_batch = describe_batch
  signatures = {"describe": describe, "describe_batch": describe_batch}
  if delg is not None:
    from retrieval_jax import export_delg  # pylint: disable=import-outside-toplevel
    module.delg = export_delg.make_delg_function(model, variables, module.params, treedef,
                                                 delg, one, platforms)
    signatures[export_delg.SIGNATURE] = module.delg
  signatures["serving_default"] = signatures[serving_default]
  tf.saved_model.save(module, path, signatures=signatures)


def descriptor_dim(exported_one: jax.export.Exported) -> int:
  """D of the exported single-image function (its output shape; nothing is traced again)."""
  return int(exported_one.out_avals[0].shape[0])


def export_model(model, variables, out_dir: str, options: ExportOptions, *,
                 platforms: Optional[Sequence[str]] = None, saved_model: bool = True,
                 info: Optional[Mapping[str, Any]] = None, delg=None,
                 serving_default: str = "auto") -> Dict[str, Any]:
  """Writes `out_dir/{jax/, saved_model/, export.json}` (see the module docstring).

  Args:
    model: a RetrievalNet.
    variables: its variables (host or device arrays; they are baked in).
    out_dir: output folder D (created).
    options: what the function computes.
    platforms: lowering platforms of the jax.export artifacts (e.g. ("cpu", "cuda",
      "tpu")); default: this process's backend.
    saved_model: also write the TF SavedModel (needs the `tf` extra).
    info: extra fields for export.json (e.g. the checkpoint step, the config).
    delg: `export_delg.DelgOptions` of a DELG network: the SavedModel gets the reference's
      DELG signature "delg" too.
    serving_default: `resolve_serving_default`'s choice of the "serving_default" signature.
  Returns:
    The contents of export.json.
  """
  platforms = tuple(platforms or (jax.default_backend(),))
  serving = resolve_serving_default(serving_default, delg is not None)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  os.makedirs(os.path.join(out_dir, JAX_DIR), exist_ok=True)
  p = _multiscale_p(variables, options, model.pooling)
  one = make_describe_one(model, variables, options, p)
  batch = make_describe_batch(model, variables, options, p)
  h, w = jax.export.symbolic_shape("h, w")
  b, hb, wb = jax.export.symbolic_shape("b, h, w")
  exported = {
      SINGLE_FILE: _export_jax(one, [jax.ShapeDtypeStruct((h, w, 3), jnp.uint8)], platforms),
      BATCH_FILE: _export_jax(batch, [jax.ShapeDtypeStruct((b, hb, wb, 3), jnp.uint8),
                                      jax.ShapeDtypeStruct((b, hb, wb), jnp.bool_)],
                              platforms),
  }
  blobs = {name: e.serialize() for name, e in exported.items()}
  for name, blob in blobs.items():
    with open(os.path.join(out_dir, JAX_DIR, name), "wb") as f:
      f.write(blob)
  if saved_model:
    tf_platforms = tuple("cuda" if p == "gpu" else p for p in platforms)
    _write_saved_model(model, variables, options, os.path.join(out_dir, SAVED_MODEL_DIR),
                       tf_platforms, p, delg=delg, serving_default=serving)
  meta = {
      "backbone": model.backbone,
      "pooling": model.pooling,
      "descriptor_dim": descriptor_dim(exported[SINGLE_FILE]),
      "long_side": int(options.long_side),
      "scales": [float(s) for s in options.scales],
      "multiscale_combine": options.multiscale_combine,
      "multiscale_p": p,
      "normalize": bool(options.normalize),
      "resample": options.resample,
      "upscale": bool(options.upscale),
      "multiscale_resize": options.multiscale_resize,
      "whitening": None if options.whitening is None else {
          "dim": int(options.whitening.get("dim", 0) or 0)
                 or int(np.asarray(options.whitening["P"]).shape[0]),
          "kind": options.whitening.get("kind", "given")},
      "platforms": list(platforms),
      "jax": {"single": f"{JAX_DIR}/{SINGLE_FILE}", "batch": f"{JAX_DIR}/{BATCH_FILE}",
              "version": jax.__version__},
      "saved_model": SAVED_MODEL_DIR if saved_model else None,
      "serving_default": serving,
      "signatures": _signatures(delg),
      "delg": None if delg is None else {
          "long_side": int(delg.long_side), "max_scale": float(delg.max_scale),
          "iou_threshold": float(delg.iou_threshold)},
      "retrieval_jax_version": _version(),
      **dict(info or {}),
  }
  with open(os.path.join(out_dir, EXPORT_JSON), "w") as f:
    json.dump(meta, f, indent=2, default=str)
  return meta


def _signatures(delg) -> Dict[str, Any]:
  out = {"describe": {"image": "uint8 [H, W, 3]", "descriptor": "float32 [D]"},
         "describe_batch": {"images": "uint8 [B, H, W, 3]",
                            "mask": "bool [B, H, W] (valid region top-left)",
                            "descriptor": "float32 [B, D]"}}
  if delg is not None:
    out["delg"] = {"input_image": "uint8 [H, W, 3]", "input_scales": "float32 [S]",
                   "input_max_feature_num": "int32 []", "input_abs_thres": "float32 []",
                   "input_global_scales_ind": "int32 [G] (accepted, unused)",
                   "boxes": "float32 [N, 4] (ymin, xmin, ymax, xmax), input_image pixels",
                   "features": "float32 [N, d] L2-normalised", "scales": "float32 [N]",
                   "scores": "float32 [N, 1]", "global_descriptors": "float32 [1, D]"}
  return out


def _version() -> str:
  try:
    return metadata.version("retrieval_jax")
  except metadata.PackageNotFoundError:  # a source checkout that was never installed
    return "unknown"
