"""Descriptor extraction: bucketed, masked, sharded batches; single- or multi-scale; streamed.

Images keep their aspect ratio: each is resized to `long_side * scale`, padded at the
bottom/right into one of a few bucket shapes with a validity mask, and batched per bucket, so
one compiled function per bucket serves the whole collection and padding never changes a
descriptor (masks are re-applied inside the trunk and respected by the pooling).

Multi-scale descriptors combine the scales in one of two ways:

* late fusion (cnnimageretrieval-pytorch's `extract_ms`): one descriptor per scale, combined
  by a generalised mean with the learned GeM p, `v = (mean_s v_s^p)^(1/p)`, then L2 (or the
  plain mean, p = 1, where the reference uses it: whitened or non-GeM networks);
* early fusion (Seddati et al.): the trunk's feature maps of all scales
  (`RetrievalNet.trunk`) are resized to the largest one's valid size (bilinear,
  `align_corners=False`, as torch's `interpolate`), summed, and pooled once by the model's
  own `RetrievalNet.head` (`early_fusion=True`).

Storage streams: `extract_descriptors(..., out_folder=...)` writes every batch straight into a
`descriptor_store.DescriptorWriter` memmap (multi-scale sums accumulate there too), so a
collection of millions of images never needs its descriptors in host memory. Small sets keep
the in-memory path.

`described_rows` is the one loop that places batches on the mesh and describes them; the
epoch-level miner (`train/inputs.py`) describes its images through it too.
"""
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import descriptor_store
from retrieval_jax import multiscale
from retrieval_jax import progress as progress_lib
from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import grain_pipeline
from retrieval_jax.data import image_io
from retrieval_jax.data import interpolate
from retrieval_jax.data import protocol as protocol_lib
from retrieval_jax.data import transforms
from retrieval_jax.data import tuples as tuples_lib
from retrieval_jax.models import layers
from retrieval_jax.models import pooling_ops
from retrieval_jax.models import superglobal

def make_describe_fn(model, mesh):
  """jit'd (variables, images [B, H, W, 3], mask [B, H, W]) -> descriptors [B, D].

  The batch is split over the mesh's batch axis, the variables replicated.
  """
  batch = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(lambda v, x, m: model.apply(v, x, m)["descriptor"],
                 in_shardings=(rep, batch, batch), out_shardings=rep)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


# On CPU devices a batch holds at most this many pixels per device (one 1024 x 1024 image).
# Batching does not make XLA's CPU convolutions faster per image, but the activations grow
# with it: 16 images at 1024 px make 1.6 GB layers, whose buffers glibc cannot reuse (their
# sizes change with every size bucket), so they are faulted in afresh (issue 22.3, 50 photos
# at 1024 px, `--mode=describe`, host_memory on: batch 16 used 31 s user + 11.5 s system
# CPU, 2.2M page faults, 8.9 GB RSS; batch 1 27 s + 1.3 s, 0.34M faults, 1.6 GB).
# Small images (tests, the demo's 192 px) keep their configured batch.
CPU_BATCH_PIXELS = 1 << 20


def cpu_batch_size(batch_size: int, long_side: int, mesh,
                   max_pixels: int = CPU_BATCH_PIXELS) -> int:
  """`batch_size`, or fewer images where the mesh is CPU devices and a batch of `long_side`
  squares would exceed `max_pixels` per device; a multiple of the data parallelism."""
  dp = sharding_lib.data_parallelism(mesh)
  if mesh.devices.flat[0].platform == "cpu" and max_pixels:
    batch_size = min(batch_size, dp * max(1, max_pixels // max(1, long_side) ** 2))
  return _round_up(batch_size, dp)


def described_rows(describe: Callable[..., Any], variables, batches: Iterable[Mapping[str, Any]],
                   mesh, inputs: Optional[Callable[[Mapping[str, Any]], Tuple[Any, ...]]] = None
                   ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(rows [n], descriptors [n, D]) of every batch's valid rows (`batch["index"] >= 0`).

  Args:
    describe: a compiled describe function (`make_describe_fn`, `make_fused_describe_fn`).
    variables: the model's variables (replicated).
    batches: host batches with "index" [B] (-1: padding) and what `inputs` reads.
    mesh: the device mesh; every input is placed explicitly on its batch sharding (every
      process holds the same whole batch, and a raw numpy argument to a sharded jit is
      refused on multi-host runs).
    inputs: batch -> the describe function's array arguments (pytrees of host arrays);
      default (image, mask).
  """
  sharding = sharding_lib.batch_sharding(mesh)
  inputs = inputs or (lambda batch: (batch["image"], batch["mask"]))
  trim = mesh.devices.flat[0].platform == "cpu"
  dp = sharding_lib.data_parallelism(mesh)
  pending = None  # (index, descriptors still on the device) of the batch in flight
  for batch in batches:
    if trim:
      batch = trim_partial_batch(batch, dp)
    placed = jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), inputs(batch))
    # Dispatch returns at once: the device describes this batch while the host fetches the
    # previous one's result, hands it to the caller and decodes / assembles the next batch.
    out = describe(variables, *placed)
    if pending is not None:
      yield _valid_rows(*pending)
    pending = (batch["index"], out)
  if pending is not None:
    yield _valid_rows(*pending)


def described_training_rows(describe: Callable[..., Any], variables, images: Sequence[str],
                            indices: np.ndarray, *, mesh, image_size: int, batch_size: int,
                            num_threads: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """`described_rows` of `images[indices]` prepared as training sees them.

  The images are resized and padded to `image_size` squares (`tuples.describe_dataset`) in
  batches of `batch_size` rounded up to a multiple of the data parallelism; epoch mining and
  the NetVLAD k-means both describe training images this way.
  """
  ds = tuples_lib.describe_dataset(
      images, indices, image_size=image_size,
      batch_size=_round_up(batch_size, sharding_lib.data_parallelism(mesh)))
  batches = grain_pipeline.train_iterator(ds, num_threads=num_threads)
  yield from described_rows(describe, variables, batches, mesh)


def _valid_rows(index: np.ndarray, out) -> Tuple[np.ndarray, np.ndarray]:
  keep = index >= 0
  return index[keep], np.asarray(out)[keep]


def trim_partial_batch(batch: Mapping[str, Any], multiple: int = 1,
                       min_pixels: int = 4 << 20) -> Mapping[str, Any]:
  """A bucket's last, partly empty batch cut to the next power of two rows (>= its images).

  `eval_batches` pads every bucket's last batch to the full batch size, so 3 query crops in
  a bucket of 16 would cost 16 images of compute. On CPU, where an image costs more than a
  compile, the batch is cut to 4 rows: at most log2(batch size) extra shapes per bucket.
  (`described_rows` does this on CPU only: on accelerators a compile costs more than the
  padding.) Full batches, batches whose padding rows are not all at the end, and cuts that
  would save fewer than `min_pixels` padded pixels (4 Mpx: about 4 images at 1024 px, more
  compute than a compile on CPU; never for small test images) are returned unchanged.

  Args:
    batch: {"index": [B] (-1: padding), "image": [B, H, W, 3], every other value [B, ...]}.
    multiple: the row count stays a multiple of this (the mesh's data parallelism).
    min_pixels: the least padding, in pixels, worth a cut.
  """
  index = np.asarray(batch["index"])
  valid = int((index >= 0).sum())
  size = index.shape[0]
  rows = _round_up(1 << max(valid - 1, 0).bit_length(), multiple)
  if rows >= size or valid == 0 or np.any(index[valid:] >= 0):
    return batch
  if "image" in batch and (size - rows) * np.prod(batch["image"].shape[1:3]) < min_pixels:
    return batch  # small images: the padding costs less than another compile
  return {k: v[:rows] for k, v in batch.items()}


def _report(progress: progress_lib.Progress, n: int) -> None:
  """Counts n more images; images/s and ETA in the log every `progress.every_s` seconds."""
  progress.update(progress.done + n, images=n)
  if progress.due():
    logging.info("extract: %d/%d images, %.1f images/s, ETA %.0fs", progress.done,
                 progress.total, progress.rate(), progress.eta_s())


def _finalize(acc: np.ndarray, num_scales: int, p: float, out: np.ndarray) -> None:
  """out = `multiscale.finish` of the sums of powers `acc`, row-wise in float64 chunks.

  `acc` may be a memmap, and `out` may be `acc` itself (the streamed path).
  """
  for start in range(0, acc.shape[0], descriptor_store.CHUNK):
    v = np.asarray(acc[start:start + descriptor_store.CHUNK], np.float64)
    out[start:start + descriptor_store.CHUNK] = multiscale.finish(v, num_scales, p)


def make_multiscale_describe_fn(describe: Callable[..., Any], scales: Sequence[float]):
  """jit'd (variables, images, mask) -> descriptors [B, S, D], one per scale.

  The `long_side` batch is resized on the device to every scale exactly as the reference's
  `F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`
  (`data/interpolate.py`); scale 1 is the batch itself.
  """
  scales = tuple(float(s) for s in scales)

  def fn(variables, images, mask):
    return jnp.stack([describe(variables,
                               *interpolate.rescale_batch_like_torch(images, mask, s))
                      for s in scales], axis=1)  # [B, S, D]

  return jax.jit(fn)


_MULTISCALE_FNS: Dict[Tuple[int, Tuple[float, ...]], Callable[..., Any]] = {}


def _multiscale_fn(describe, scales):
  key = (id(describe), tuple(scales))
  if key not in _MULTISCALE_FNS:
    _MULTISCALE_FNS.clear()  # One network at a time: compiled functions are not kept.
    _MULTISCALE_FNS[key] = (describe, make_multiscale_describe_fn(describe, scales))
  return _MULTISCALE_FNS[key][1]


def extract_descriptors(model, variables, paths: Sequence[str], *, mesh, long_side: int,
                        batch_size: int = 8, scales: Sequence[float] = (1.0,),
                        multiscale_p: Optional[float] = None, early_fusion: bool = False,
                        bboxes=None, rotations=None, describe_fn=None,
                        out_folder: Optional[str] = None,
                        image_list: Optional[Sequence[str]] = None, config_json: str = "{}",
                        num_threads: int = 2, log_every_s: float = 10.0,
                        protocol: protocol_lib.EvalProtocol = protocol_lib.REFERENCE,
                        skipped: Optional[image_io.SkipCounter] = None,
                        scale_gem: Optional[Tuple[bool, float]] = None) -> np.ndarray:
  """Descriptors [N, D] (float32, rows L2-normalised) of `paths`, in order.

  Args:
    model: a RetrievalNet (or any module whose apply(variables, images, mask) returns
      {"descriptor": [B, D]}; early fusion needs its `trunk` and `head` methods).
    variables: its variables.
    paths: N image files.
    mesh: the device mesh; batches are split over its batch axis.
    long_side: images are resized so that their longer side is `long_side * scale`.
    batch_size: images per batch (rounded up to a multiple of the data parallelism); on CPU
      at most `CPU_BATCH_PIXELS` per device (`cpu_batch_size`).
    scales: input scales; more than one gives a multi-scale descriptor.
    multiscale_p: late fusion exponent (`multiscale.multiscale_p_from`); None or 1: the
      plain mean.
    early_fusion: fuse the scales' feature maps before pooling (Seddati et al.).
    bboxes: optional per-image (x1, y1, x2, y2) crops (queries of Revisited Oxford/Paris).
    rotations: optional per-image clockwise degrees (Holidays orientation fixes).
    describe_fn: a compiled `make_describe_fn` to reuse between calls.
    out_folder: stream the descriptors into `<out_folder>/descriptors.npy` (see
      `descriptor_store.DescriptorWriter`) instead of host memory; the result is then a
      read-only memmap.
    image_list, config_json: what `out_folder` records beside the array (default: paths).
    num_threads: decoding threads.
    log_every_s: progress log period.
    protocol: the input rule (`data/protocol.py`; cirtorch's by default): query crops,
      enlarging, filter, EXIF, and how the other scales are made ("interpolate": from
      the `long_side` batch on the device, as the reference; "decode": each scale decoded
      again at `round(long_side * s)`).
    skipped: counter of unreadable images (default `image_io.GLOBAL_SKIPS`).
    scale_gem: (infinity, p): SuperGlobal's scale-GeM combines the scales instead
      (`superglobal.scale_gem`; `multiscale.scale_gem_of`); needs the "interpolate" protocol.
  Returns:
    [N, D] float32. Images that cannot be read get a zero row (logged by the pipeline).
  """
  n = len(paths)
  scales = tuple(float(s) for s in scales)
  batch_size = _round_up(batch_size, sharding_lib.data_parallelism(mesh))
  writer = None
  if out_folder is not None:
    writer = descriptor_store.DescriptorWriter(
        out_folder, n, list(paths) if image_list is None else image_list, config_json)
  fused = early_fusion and len(scales) > 1
  single = len(scales) == 1 or fused  # one descriptor per image, nothing to combine
  p = 1.0 if multiscale_p is None else float(multiscale_p)
  # SuperGlobal's scale-GeM: all scales of a batch at once, one descriptor per image.
  combined = scale_gem is not None and not single
  if combined and protocol.multiscale_resize != "interpolate":
    raise ValueError("extract.multiscale_combine=sgem / sgem_power combines the scales of a "
                     "batch on the device: set extract.multiscale_resize=interpolate")
  on_device = not single and protocol.multiscale_resize == "interpolate"
  describe = describe_fn or make_describe_fn(model, mesh)
  # (decoded long side, describe function, its inputs of a batch) per decoding pass.
  if fused:  # one pass at the largest scale, the others made from it (Seddati et al.)
    passes = [_early_fusion_pass(model, mesh, long_side, scales)]
  elif on_device:  # one pass at long_side, every scale made on the device
    passes = [(long_side, _multiscale_fn(describe, scales), None)]
  else:  # "decode": one pass per scale (a single scale: one pass)
    passes = [(max(1, int(round(long_side * s))), describe, None) for s in scales]
  acc = None  # [N, D]: the descriptors (one scale) or the sum of their p-th powers.
  progress = progress_lib.Progress(n * (1 if fused else len(scales)), every_s=log_every_s)
  for side, fn, inputs in passes:
    batches = grain_pipeline.eval_batches(paths, long_side=side,
                                          batch_size=cpu_batch_size(batch_size, side, mesh),
                                          bboxes=bboxes, rotations=rotations,
                                          num_threads=num_threads, protocol=protocol,
                                          skipped=skipped)
    for rows, ds in described_rows(fn, variables, batches, mesh, inputs=inputs):
      if combined:  # [n, S, D] -> [n, 1, D], then stored as one scale.
        ds = np.asarray(pooling_ops.normalize(superglobal.scale_gem(
            ds, scale_gem[1], scale_gem[0])), np.float32)[:, None]
      for d in (ds.transpose(1, 0, 2) if on_device else (ds,)):  # [S, n, D] on the device.
        if acc is None:
          acc = (writer.allocate(d.shape[1]) if writer is not None
                 else np.zeros((n, d.shape[1]), np.float32 if single or combined
                               else np.float64))
        if single or combined:
          acc[rows] = d
        else:
          # Sums of powers accumulate in place, so a streamed run needs no [N, D] in memory.
          acc[rows] += multiscale.power_term(d, p)
        _report(progress, len(rows) * (len(scales) if combined else 1))
  if acc is None:
    raise image_io.NothingReadableError(
        f"none of the {len(paths)} images could be read (e.g. {paths[0]}): check the paths")
  if writer is not None:
    if not single and not combined:
      _finalize(acc, len(scales), p, acc)
    return writer.close()
  if single or combined:
    return acc
  out = np.empty(acc.shape, np.float32)
  _finalize(acc, len(scales), p, out)
  return out


# ----------------------------------------------------------------------------------------------
# Early fusion (Seddati et al.): feature maps of several input sizes summed before pooling.


def _resize_axis(x: jnp.ndarray, axis: int, src: jnp.ndarray, dst: jnp.ndarray,
                 out_len: int) -> jnp.ndarray:
  """Bilinear resize along `axis` of every example's valid length `src` [B] to `dst` [B].

  torch's `interpolate(mode="bilinear", align_corners=False)` for an output size
  (`interpolate.axis_plan` with the scale src / dst), so padding never contributes.
  Outputs past `dst` are meaningless (the caller masks them).

  Args:
    x: [B, H, W, C].
    axis: 1 (rows) or 2 (columns).
    src, dst: [B] int32 valid lengths before / after.
    out_len: static output length along `axis` (>= max dst).
  Returns:
    x resized along `axis` to `out_len`.
  """
  inv_scale = src.astype(jnp.float32) / jnp.maximum(dst, 1).astype(jnp.float32)
  i0, i1, w0, w1 = interpolate.axis_plan(out_len, src, inv_scale)
  shape = [x.shape[0], 1, 1, 1]
  shape[axis] = out_len
  gather = lambda i: jnp.take_along_axis(x, i.reshape(shape), axis=axis)
  return gather(i0) * w0.reshape(shape) + gather(i1) * w1.reshape(shape)


def resize_valid(x: jnp.ndarray, mask: jnp.ndarray, target_mask: jnp.ndarray) -> jnp.ndarray:
  """Resizes each example's valid region of `x` to the valid size of `target_mask`.

  Args:
    x: [B, h, w, C] feature maps, valid region top-left (`mask`).
    mask: [B, h, w] bool.
    target_mask: [B, H, W] bool, the valid regions to fill.
  Returns:
    [B, H, W, C], zero outside `target_mask`.
  """
  hs, ws = pooling_ops.valid_sizes(mask)
  ht, wt = pooling_ops.valid_sizes(target_mask)
  y = _resize_axis(x.astype(jnp.float32), 1, hs, ht, target_mask.shape[1])
  y = _resize_axis(y, 2, ws, wt, target_mask.shape[2])
  return layers.apply_mask(y, target_mask)



def make_fused_describe_fn(model, mesh):
  """jit'd (variables, images tuple, masks tuple) -> early-fused descriptors [B, D].

  `images[0]` / `masks[0]` is the largest scale: the other scales' feature maps
  (`model.trunk`) are resized to its valid size, summed with it, and the sum goes through
  the model's own pooling and whitening (`model.head`).
  """
  batch = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)

  def describe(variables, images, masks):
    fused = None
    for x, m in zip(images, masks):
      maps = model.apply(variables, x, m, method="trunk")
      if fused is None:
        fused = maps
      else:
        fused = [(f + resize_valid(g, gm, fm), fm) for (f, fm), (g, gm) in zip(fused, maps)]
    return model.apply(variables, fused, method="head")["descriptor"]

  return jax.jit(describe, in_shardings=(rep, batch, batch), out_shardings=rep)


def _early_fusion_pass(model, mesh, long_side: int, scales: Sequence[float]):
  """(decoded long side, fused describe function, its inputs of a batch) of early fusion.

  The batch is decoded at the largest scale; every other scale is that batch resized by
  PIL bilinear (`transforms.rescale_rows_like_pil`), largest first.
  """
  order = sorted(scales, reverse=True)
  top = order[0]

  def scales_of(batch):
    images, masks = [batch["image"]], [batch["mask"]]
    for s in order[1:]:
      im, m, _ = transforms.rescale_rows_like_pil(batch["image"], batch["mask"], s / top)
      images.append(im)
      masks.append(m)
    return tuple(images), tuple(masks)

  return (max(1, int(round(long_side * top))), make_fused_describe_fn(model, mesh),
          scales_of)
