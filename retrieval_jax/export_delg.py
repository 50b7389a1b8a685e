"""The reference's DELG signature for an exported DELG network (TF SavedModel).

DELF's `export_local_and_global_model.py` (tensorflow/models research/delf) saves a
SavedModel whose "serving_default" takes

    input_image uint8 [H, W, 3], input_scales float32 [S], input_max_feature_num int32 [],
    input_abs_thres float32 [], input_global_scales_ind int32 [G]

and returns (`export_model_utils.ExtractLocalAndGlobalFeatures`)

    boxes float32 [N, 4], features float32 [N, d], scales float32 [N],
    scores float32 [N, 1], global_descriptors float32 [G, D].

`make_delg_function` builds the same signature around our network, so a client written for
the reference (e.g. `delf/python/examples/extractor.py` with `is_tf2_exported`) calls it
unchanged. What it computes is `--mode=extract`'s, not the reference network's:

* local features as `local/keypoints.py` and `local/delg_input.py`: the image is bounded by
  `extract.local_long_side` as DELG's `ResizeImage` does (PIL BILINEAR, shrink only; here
  Pillow's fixed-point resize in the graph, `export.pil_resize_to_size`, exact for
  BILINEAR), every scale s of `input_scales` resized from it like `tf.image.resize`
  (round(size * s), bilinear, half-pixel, no antialiasing), the positions with attention
  >= `input_abs_thres` kept with their receptive boxes divided by s, NMS
  (`extract.local_iou`; TF's `non_max_suppression`, which at 1.0 is the top
  `input_max_feature_num` by score, ties to the earlier scale and position, as
  `keypoints.non_max_suppression`);
* `boxes` are in the pixels of `input_image` (the reference's are in the pixels of the
  image it was given, which its extractor had bounded itself: a reference client passing
  an image already within the bound gets scale factors 1 here, and divides by its own);
* `features` are L2-normalised (the store's descriptors; the reference returns them raw
  and its extractor L2-normalises them, which leaves these unchanged);
* `global_descriptors` is [1, D]: the configured global descriptor (`export.py`: cirtorch's
  input rule, `export.scales`, GeM-combined, whitened as `export.whitening` says, L2).
  The reference returns one row per scale of `input_global_scales_ind` and its extractor
  sums the rows and L2-normalises, which leaves this row as it is; `input_global_scales_ind`
  is accepted and does not change the descriptor.

Variable-length outputs: N is a dynamic dimension of the TF outputs (the reference's own
shape polymorphism, `tf.image.non_max_suppression`), not padding. In the graph every level
is computed on a fixed canvas of side ceil(local_long_side * max_scale) with a validity mask
(the masked network gives the keypoints of the unpadded level); `input_scales` above
`max_scale` (`export.local_max_scale`, default the largest of `extract.local_scales`) fail
with an error naming it.
"""
import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import export as export_lib
from retrieval_jax.local import model as local_model
from retrieval_jax.local import receptive_field as rf_lib

SIGNATURE = "delg"  # the signature's name in the SavedModel; its tensors: the docstring


@dataclasses.dataclass(frozen=True)
class DelgOptions:
  """The local half of the DELG export (`config.extract.local_*`, `export.local_max_scale`).

  Attributes:
    long_side: DELG's `max_image_size`: larger images are shrunk to it (PIL BILINEAR).
    max_scale: the largest `input_scales` value the graph accepts (sizes its level canvas).
    iou_threshold: NMS IoU on the receptive boxes (1.0: none, DELF's default).
  """
  long_side: int
  max_scale: float
  iou_threshold: float = 1.0

  @property
  def level_side(self) -> int:
    """Side of the level canvas: room for round(long_side * s) at every s <= max_scale."""
    return int(math.ceil(float(np.float32(self.long_side) * np.float32(self.max_scale)))) + 1


def bounded_size(h, w, side: int):
  """(nh, nw) of DELG's `ResizeImage`: unchanged within `side`, else round(size * side /
  longer side) (ties to even; exact integer arithmetic where the reference rounds a float
  product, which can differ only on an exact .5), at least 1."""
  h = jnp.asarray(h, jnp.int32)
  w = jnp.asarray(w, jnp.int32)
  nh, nw = export_lib.target_size(h, w, side, thumbnail=False)
  fits = jnp.maximum(h, w) <= side
  return jnp.where(fits, h, nh), jnp.where(fits, w, nw)


def bound_image(image: jnp.ndarray, side: int
                ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """`delg_input.resize_to_max_side` in the graph.

  Args:
    image: uint8 [H, W, 3] (H, W may be symbolic).
    side: the bound (static).
  Returns:
    (uint8 [side, side, 3] canvas with the image at the top-left, int32 [2] (nh, nw),
     float32 [2] scale factors nh / H, nw / W).
  """
  h = jnp.asarray(image.shape[0], jnp.int32)
  w = jnp.asarray(image.shape[1], jnp.int32)
  nh, nw = bounded_size(h, w, side)
  canvas = export_lib.pil_resize_to_size(image, h, w, nh, nw, side, resample="bilinear")
  factors = jnp.stack([nh.astype(jnp.float32) / h.astype(jnp.float32),
                       nw.astype(jnp.float32) / w.astype(jnp.float32)])
  return canvas, jnp.stack([nh, nw]), factors


def _tf_axis(in_size, out_size, out_len: int):
  """TF's half-pixel bilinear taps along one axis (`delg_input._axis`), float32."""
  x = ((jnp.arange(out_len, dtype=jnp.float32) + 0.5)
       * (in_size.astype(jnp.float32) / out_size.astype(jnp.float32)) - 0.5)
  floor = jnp.floor(x)
  lower = jnp.clip(floor, 0, in_size - 1).astype(jnp.int32)
  upper = jnp.clip(jnp.ceil(x), 0, in_size - 1).astype(jnp.int32)
  return lower, upper, x - floor


def tf_resize_level(canvas: jnp.ndarray, size: jnp.ndarray, out_size: jnp.ndarray,
                    out_len: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`tf.image.resize(canvas[:h, :w], out_size)` (bilinear, no antialiasing), at the
  top-left of an out_len x out_len float32 canvas, and its mask (`delg_input.pyramid_level`)."""
  image = canvas.astype(jnp.float32)
  ly, uy, fy = _tf_axis(size[0], out_size[0], out_len)
  lx, ux, fx = _tf_axis(size[1], out_size[1], out_len)
  fx = fx[None, :, None]

  def rows(idx):
    r = jnp.take(image, idx, axis=0)
    left, right = jnp.take(r, lx, axis=1), jnp.take(r, ux, axis=1)
    return left + (right - left) * fx
  top, bottom = rows(ly), rows(uy)
  out = top + (bottom - top) * fy[:, None, None]
  valid = ((jnp.arange(out_len) < out_size[0])[:, None]
           & (jnp.arange(out_len) < out_size[1])[None, :])
  return jnp.where(valid[..., None], out, 0.0), valid


def level_fn(model, options: DelgOptions):
  """(variables, canvas uint8 [L, L, 3], size int32 [2], scale float32 []) ->
  (scores [P], boxes [P, 4], descriptors [P, d] L2-normalised, valid [P]) of one pyramid
  level: every position of the level's feature map (row-major), boxes = receptive boxes /
  scale in the pixels of the bounded image, valid = inside the level."""
  rf = local_model.local_receptive_field(model)
  side = options.level_side

  def level(variables, canvas, size, scale):
    scale = scale.astype(jnp.float32)
    out_size = jnp.maximum(jnp.round(size.astype(jnp.float32) * scale), 1.0).astype(jnp.int32)
    image, mask = tf_resize_level(canvas, size, out_size, side)
    out = model.apply(variables, image[None], mask[None])
    att = out["attention"][0].astype(jnp.float32)
    h, w = att.shape
    boxes = jnp.asarray(rf_lib.receptive_boxes(h, w, rf).astype(np.float32)) / scale
    desc = out["local_descriptors"][0].astype(jnp.float32).reshape(h * w, -1)
    desc = desc / jnp.maximum(jnp.linalg.norm(desc, axis=-1, keepdims=True), 1e-12)
    valid = out["local_mask"][0].reshape(h * w)
    return att.reshape(h * w), boxes, desc, valid

  return level


def level_shapes(model, variables, options: DelgOptions):
  """The static output shapes of `level_fn` (P positions of the level canvas's map)."""
  return jax.eval_shape(level_fn(model, options), variables,
                        jax.ShapeDtypeStruct((int(options.long_side),) * 2 + (3,), jnp.uint8),
                        jax.ShapeDtypeStruct((2,), jnp.int32),
                        jax.ShapeDtypeStruct((), jnp.float32))


def make_delg_function(model, variables, params, treedef, options: DelgOptions,
                       describe_one, platforms):
  """The reference's signature as a tf.function.

  Args:
    model: the DelgNet.
    variables: its variables (host arrays; only their shapes are used here).
    params: the tf.Variables holding the flattened leaves of `variables`.
    treedef: the pytree structure of `variables`.
    options: DelgOptions.
    describe_one: the jax2tf'd global describe, (params, image uint8 [H, W, 3]) -> [D].
    platforms: native serialisation platforms.
  Returns:
    A tf.function with the reference's input signature, returning its five outputs.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  kw = dict(with_gradient=False, native_serialization_platforms=tuple(platforms))
  side = int(options.long_side)
  bound = jax2tf.convert(lambda image: bound_image(image, side),
                         polymorphic_shapes=["(h, w, 3)"], **kw)
  jax_level = level_fn(model, options)
  level = jax2tf.convert(
      lambda leaves, *a: jax_level(jax.tree_util.tree_unflatten(treedef, leaves), *a), **kw)
  shapes = level_shapes(model, variables, options)
  max_scale = float(options.max_scale)
  iou = float(options.iou_threshold)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
      tf.TensorSpec([None], tf.float32, name="input_scales"),
      tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
      tf.TensorSpec([], tf.float32, name="input_abs_thres"),
      tf.TensorSpec([None], tf.int32, name="input_global_scales_ind")])
  def delg(input_image, input_scales, input_max_feature_num, input_abs_thres,
           input_global_scales_ind):
    del input_global_scales_ind  # the global descriptor is the configured one (docstring)
    check = tf.debugging.assert_less_equal(
        input_scales, tf.constant(max_scale, tf.float32),
        message=f"input_scales: this export takes scales up to {max_scale} "
                "(export.local_max_scale)")
    with tf.control_dependencies([check]):
      canvas, size, factors = bound(input_image)
    scores, boxes, desc, valid = tf.map_fn(
        lambda s: tuple(level(params, canvas, size, s)), input_scales,
        fn_output_signature=tuple(tf.TensorSpec(x.shape, tf.as_dtype(x.dtype))
                                  for x in shapes))
    per_level = tf.shape(scores)[1]
    level_scales = tf.repeat(1.0 / input_scales, per_level)
    scores, valid = tf.reshape(scores, [-1]), tf.reshape(valid, [-1])
    boxes, desc = tf.reshape(boxes, [-1, 4]), tf.reshape(desc, [-1, shapes[2].shape[-1]])
    keep = tf.where(tf.logical_and(valid, scores >= input_abs_thres))[:, 0]
    scores, boxes = tf.gather(scores, keep), tf.gather(boxes, keep)
    desc, level_scales = tf.gather(desc, keep), tf.gather(level_scales, keep)
    count = tf.minimum(input_max_feature_num, tf.shape(scores)[0])
    chosen = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=iou)
    sf = tf.concat([factors, factors], 0)
    return {"boxes": tf.gather(boxes, chosen) / sf[None, :],
            "features": tf.gather(desc, chosen),
            "scales": tf.gather(level_scales, chosen),
            "scores": tf.gather(scores, chosen)[:, None],
            "global_descriptors": describe_one(params, input_image)[None]}

  return delg
