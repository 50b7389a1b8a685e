"""DELF keypoint extraction: image pyramid, top-scoring positions, NMS, L2-normalised descriptors.

As the reference (`delf/python/training/model/export_model_utils.py: ExtractLocalFeatures`):
for every scale s of the pyramid, the image (loaded and bounded by `long_side` as DELG does,
`delg_input.py`) is resized by s like `tf.image.resize` (`round(size * s)`, bilinear, no
antialiasing, on float pixels), the model gives an attention score and a descriptor per
position of its local stage, positions with score >= `score_threshold` are kept with their
receptive box (`receptive_field.receptive_boxes`) divided by s, all scales are pooled and
non-maximum suppression (IoU threshold `iou_threshold`, greedy by score, as
`box_list_ops.non_max_suppression`; the reference's default 1.0 suppresses nothing) keeps at
most `max_features`. Keypoint = box centre; its scale = 1 / s; descriptors are L2-normalised.
`extract_keypoints` then divides the locations by the image's `scale_factors` (DELG's
`locations / scale_factors`): (y, x) pixels of the image as loaded (a query: of its crop).
Boxes and scales are float32 as the reference computes them (`rf_boxes / scale`,
`1 / scale` with a float32 scale); a record also carries its "boxes" (ymin, xmin, ymax,
xmax), in the pixels of the images given to `keypoints_of_batch` and, from
`extract_keypoints`, of the image as loaded (the exported DELG signature's `boxes`,
`export_delg.py`; not kept in the store, whose locations are their centres).

Batched like global extraction: images come in size buckets, padded at the bottom/right with
a mask; the trunk masks its stages, and here padded positions get score -inf before the
top-k on the device, so no keypoint can come from padding, and a padded image gives exactly
the keypoints of the unpadded one. The device returns per image only the top
`max_features` positions of each scale (static shapes, little transfer); with
`iou_threshold < 1` NMS could in principle want more candidates of one scale than that.
"""
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import progress as progress_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.local import delg_input
from retrieval_jax.local import receptive_field as rf_lib

# Per-image record keys (see `LocalFeatures` in store.py).
RECORD_KEYS = ("locations", "scales", "scores", "descriptors")


def select_top_positions(attention: jnp.ndarray, descriptors: jnp.ndarray,
                         mask: Optional[jnp.ndarray], k: int) -> Dict[str, jnp.ndarray]:
  """Top-k positions per image by attention, padded positions excluded.

  Args:
    attention: [B, h, w] scores.
    descriptors: [B, h, w, d].
    mask: optional [B, h, w] bool validity.
    k: positions kept per image (min(k, h * w) are returned).
  Returns:
    {"scores": [B, k'] float32 (-inf where invalid), "index": [B, k'] int32 row-major
     position, "descriptors": [B, k', d] float32 L2-normalised, "valid": [B, k'] bool}.
  """
  b, h, w = attention.shape
  k = min(int(k), h * w)
  scores = attention.astype(jnp.float32).reshape(b, h * w)
  if mask is not None:
    scores = jnp.where(mask.reshape(b, h * w), scores, -jnp.inf)
  top, index = jax.lax.top_k(scores, k)
  flat = descriptors.astype(jnp.float32).reshape(b, h * w, -1)
  desc = jnp.take_along_axis(flat, index[..., None], axis=1)
  desc = desc / jnp.maximum(jnp.linalg.norm(desc, axis=-1, keepdims=True), 1e-12)
  return {"scores": top, "index": index.astype(jnp.int32), "descriptors": desc,
          "valid": jnp.isfinite(top)}


def make_select_fn(model, mesh: Optional[jax.sharding.Mesh], max_features: int) -> Callable:
  """jit'd (variables, images [B, H, W, 3], mask [B, H, W]) -> `select_top_positions` output
  plus "shape" (h, w of the local stage, as a [2] int array).

  `model.apply(variables, images, mask)` must return {"attention", "local_descriptors",
  "local_mask"} (`DelfNet`, or a DELG network). Sharded over the mesh's batch axis when a mesh
  is given.
  """
  def fn(variables, images, mask):
    out = model.apply(variables, images, mask)
    sel = select_top_positions(out["attention"], out["local_descriptors"], out["local_mask"],
                               max_features)
    sel["shape"] = jnp.asarray(out["attention"].shape[1:3], jnp.int32)
    return sel
  if mesh is None:
    return jax.jit(fn)
  rep, batch = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, batch, batch), out_shardings=rep)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one (ymin, xmin, ymax, xmax) box with [N, 4] boxes (areas as TF's box_list_ops)."""
  ih = np.maximum(0.0, np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]))
  iw = np.maximum(0.0, np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]))
  inter = ih * iw
  area = (box[2] - box[0]) * (box[3] - box[1])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / np.maximum(area + areas - inter, 1e-12)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
                        max_output: int) -> np.ndarray:
  """Greedy NMS: indices of kept boxes, by decreasing score (ties: lower index first).

  A box is dropped when its IoU with an already kept box exceeds `iou_threshold`; at 1.0
  (DELF's default) nothing is dropped and this is the top `max_output` by score.
  """
  order = np.argsort(-scores, kind="stable")
  if iou_threshold >= 1.0:
    return order[:max_output]
  keep: List[int] = []
  alive = np.ones(len(order), bool)
  for pos, i in enumerate(order):
    if not alive[pos]:
      continue
    keep.append(i)
    if len(keep) >= max_output:
      break
    rest = order[pos + 1:]
    alive[pos + 1:] &= box_iou(boxes[i], boxes[rest]) <= iou_threshold
  return np.asarray(keep, np.int64)


def empty_record(dim: int) -> Dict[str, np.ndarray]:
  return {"locations": np.zeros((0, 2), np.float32), "boxes": np.zeros((0, 4), np.float32),
          "scales": np.zeros((0,), np.float32),
          "scores": np.zeros((0,), np.float32),
          "descriptors": np.zeros((0, dim), np.float32)}


def keypoints_of_batch(select_fn: Callable, variables: Any, images: np.ndarray,
                       masks: np.ndarray, *, rf: rf_lib.ReceptiveField,
                       scales: Sequence[float] = (1.0,), score_threshold: float = 0.0,
                       max_features: int = 1000, iou_threshold: float = 1.0,
                       put: Optional[Callable] = None) -> List[Dict[str, np.ndarray]]:
  """DELF keypoints of every row of a padded batch.

  Args:
    select_fn: `make_select_fn(model, mesh, max_features)`.
    variables: the model's variables.
    images: uint8 [B, H, W, 3] (at scale 1); masks: bool [B, H, W].
      Locations are in these images' pixels.
    rf: receptive field of the model's local stage.
    scales: image pyramid (DELF: 0.25 ... 2.0; DELG 0.7071, 1, 1.4142).
    score_threshold: minimum attention score.
    max_features: keypoints kept per image.
    iou_threshold: NMS threshold on receptive boxes (1.0: no suppression).
    put: places a host array on the devices (e.g. sharded device_put); default jnp.asarray.
  Returns:
    B dicts {"locations" [n, 2] (y, x), "boxes" [n, 4], "scales" [n], "scores" [n],
    "descriptors" [n, d]}, float32, by decreasing score; empty rows (mask all False) give
    n = 0.
  """
  put = put or jnp.asarray
  b = images.shape[0]
  cands: List[List[Tuple[np.ndarray, ...]]] = [[] for _ in range(b)]
  dim = None
  for scale in scales:
    im, m = delg_input.pyramid_level(images, masks, float(scale))
    sel = jax.device_get(select_fn(variables, put(im), put(m)))
    h, w = (int(v) for v in sel["shape"])
    dim = sel["descriptors"].shape[-1]
    boxes_all = rf_lib.receptive_boxes(h, w, rf).astype(np.float32)  # small integers: exact
    s32 = np.float32(scale)
    for r in range(b):
      keep = sel["valid"][r] & (sel["scores"][r] >= score_threshold)
      if not keep.any():
        continue
      boxes = boxes_all[sel["index"][r][keep]] / s32  # the reference's rf_boxes / scale
      cands[r].append((boxes, sel["scores"][r][keep],
                       sel["descriptors"][r][keep],
                       np.full(int(keep.sum()), np.float32(1.0) / s32, np.float32)))
  records = []
  for r in range(b):
    if not cands[r]:
      records.append(empty_record(dim or 0))
      continue
    boxes, scores, desc, sc = (np.concatenate(x) for x in zip(*cands[r]))
    keep = non_max_suppression(boxes, scores, iou_threshold, max_features)
    records.append({"locations": rf_lib.box_centers(boxes[keep]).astype(np.float32),
                    "boxes": boxes[keep].astype(np.float32),
                    "scales": sc[keep].astype(np.float32),
                    "scores": scores[keep].astype(np.float32),
                    "descriptors": desc[keep].astype(np.float32)})
  return records


def extract_keypoints(model, variables, paths: Sequence[str], *, rf: rf_lib.ReceptiveField,
                      mesh: Optional[jax.sharding.Mesh], long_side: int,
                      scales: Sequence[float] = (0.7071, 1.0, 1.4142),
                      score_threshold: float = 0.0, max_features: int = 1000,
                      iou_threshold: float = 1.0, batch_size: int = 8,
                      bboxes=None, skip: Optional[Callable[[int], bool]] = None,
                      num_threads: int = 2, log_every_s: float = 10.0,
                      exif_transpose: bool = False
                      ) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
  """Yields (image index, keypoint record) for every readable image of `paths`.

  Images are read and bounded by `long_side` as DELG does and bucketed
  (`delg_input.batches`), so a batch shape compiles once per bucket and scale; locations
  are returned in the pixels of the image as loaded (`locations / scale_factors`).

  Args:
    model, variables: see `make_select_fn`.
    paths: N image files.
    rf: receptive field of the model's local stage (`receptive_field.receptive_field`).
    mesh: device mesh (batch sharded over its batch axis) or None (one device).
    long_side: resize target of the longer side (DELG: 1024).
    scales, score_threshold, max_features, iou_threshold: see `keypoints_of_batch`.
    batch_size: images per batch (rounded up to the data parallelism).
    bboxes: optional per-image crop boxes (Revisited query crops).
    skip: index -> True for images already done (resuming); they are not read.
    num_threads: decoding threads.
    log_every_s: period of the progress line.
    exif_transpose: apply the EXIF orientation (False for the benchmarks, as DELG).
  """
  if mesh is not None:
    k = sharding_lib.data_parallelism(mesh)
    batch_size = -(-batch_size // k) * k
    bs = sharding_lib.batch_sharding(mesh)
    put = functools.partial(jax.device_put, device=bs)
  else:
    put = None
  todo = [i for i in range(len(paths)) if skip is None or not skip(i)]
  select_fn = make_select_fn(model, mesh, max_features)
  progress = progress_lib.Progress(len(todo), every_s=log_every_s)
  for batch in delg_input.batches(
      [paths[i] for i in todo], long_side=long_side, batch_size=batch_size,
      bboxes=None if bboxes is None else [bboxes[i] for i in todo],
      exif_transpose=exif_transpose, num_threads=num_threads):
    records = keypoints_of_batch(select_fn, variables, batch["image"], batch["mask"], rf=rf,
                                 scales=scales, score_threshold=score_threshold,
                                 max_features=max_features, iou_threshold=iou_threshold,
                                 put=put)
    n = int((batch["index"] >= 0).sum())
    progress.update(progress.done + n, images=n)
    if progress.due():
      logging.info("local features: %d/%d images, %.1f images/s, ETA %.0fs", progress.done,
                   progress.total, progress.rate(), progress.eta_s())
    for r, j in enumerate(batch["index"]):
      if j >= 0:
        yield todo[int(j)], in_loaded_pixels(records[r], batch["scale_factors"][r])


def in_loaded_pixels(record: Dict[str, np.ndarray], scale_factors) -> Dict[str, np.ndarray]:
  """`record` (pixels of the bounded image) in the pixels of the image as loaded: boxes
  divided by the (y, x) `scale_factors` in float32, locations their centres."""
  sf = np.asarray(scale_factors, np.float32)
  boxes = (record["boxes"] / np.concatenate([sf, sf])).astype(np.float32)
  return dict(record, boxes=boxes,
              locations=rf_lib.box_centers(boxes).astype(np.float32))
