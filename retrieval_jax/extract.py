"""Descriptor extraction: bucketed, masked, sharded batches; single- or multi-scale; streamed.

Images keep their aspect ratio: each is resized to `long_side * scale`, padded at the
bottom/right into one of a few bucket shapes with a validity mask, and batched per bucket, so
one compiled function per bucket serves the whole collection and padding never changes a
descriptor (masks are re-applied inside the trunk and respected by the pooling).

Multi-scale descriptors combine the scales in one of two ways:

* late fusion (cnnimageretrieval-pytorch's `extract_ms`): one descriptor per scale, combined
  by a generalised mean with the learned GeM p, `v = (mean_s v_s^p)^(1/p)`, then L2 (or the
  plain mean, p = 1, where the reference uses it: whitened or non-GeM networks);
* early fusion (Seddati et al.): the trunk's feature maps of all scales are resized to the
  largest one's valid size (bilinear, `align_corners=False`, as torch's `interpolate`),
  summed, and pooled once (`early_fusion=True`).

Storage streams: `DescriptorWriter` preallocates `descriptors.npy` `[N, D]` with
`np.lib.format.open_memmap` and `extract_descriptors(..., out_folder=...)` writes every batch
straight into it (multi-scale sums accumulate there too), so a collection of millions of
images never needs its descriptors in host memory. Small sets keep the in-memory path.
"""
import json
import os
import time
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import grain_pipeline
from retrieval_jax.models import layers
from retrieval_jax.models import pooling as pooling_lib
from retrieval_jax.models import pretrained

# Multi-scale combinations accepted in `config.extract.multiscale_combine`.
MULTISCALE_COMBINE = ("gem", "mean", "early_fusion")

# Rows handled at once by the host-side passes over a (possibly memory-mapped) [N, D] array.
_CHUNK = 1 << 15

DESCRIPTORS_FILE = "descriptors.npy"
IMAGES_FILE = "images.txt"
CONFIG_FILE = "config.json"


def make_describe_fn(model, mesh):
  """jit'd (variables, images [B, H, W, 3], mask [B, H, W]) -> descriptors [B, D].

  The batch is sharded over the mesh's "data" axis, the variables replicated.
  """
  batch = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(lambda v, x, m: model.apply(v, x, m)["descriptor"],
                 in_shardings=(rep, batch, batch), out_shardings=rep)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def multiscale_p_from(variables, combine: str = "gem") -> Optional[float]:
  """The exponent that combines per-scale descriptors, or None for the plain mean.

  As cnnimageretrieval-pytorch's test.py: the learned GeM p, but only for a GeM network
  without whitening (whitened descriptors can be negative, where a fractional power is
  undefined); every other network uses the mean (msp = 1).

  Args:
    variables: the model's variables ({"params": ...}).
    combine: "gem" (the reference's rule), "mean" or "early_fusion" (no per-scale
      descriptors to combine: None).
  Returns:
    The mean of `params["pool"]["p"]` as a float, or None.
  """
  if combine not in MULTISCALE_COMBINE:
    raise ValueError(f"extract.multiscale_combine must be one of {MULTISCALE_COMBINE}, "
                     f"got {combine!r}")
  if combine != "gem":
    return None
  params = variables["params"]
  if "whiten" in params:
    return None
  pool = params.get("pool", {})
  if "p" not in pool:
    return None
  return float(np.mean(np.asarray(pool["p"])))


def extract_kwargs(extract_config, variables) -> Dict[str, Any]:
  """`extract_descriptors` keyword arguments from `config.extract`.

  Fields read: long_side, batch_size, scales, multiscale_combine ("gem" when absent).
  """
  combine = extract_config.get("multiscale_combine", "gem")
  return dict(long_side=int(extract_config.long_side),
              batch_size=int(extract_config.batch_size),
              scales=tuple(float(s) for s in extract_config.scales),
              multiscale_p=multiscale_p_from(variables, combine),
              early_fusion=combine == "early_fusion")


# ----------------------------------------------------------------------------------------------
# Streaming storage.


class DescriptorWriter:
  """Descriptors `[N, D]` float32 written batch by batch into `<folder>/descriptors.npy`.

  The file is a regular `.npy` preallocated with `np.lib.format.open_memmap` (zero-filled,
  so unwritten rows, e.g. unreadable images, read as zeros), created on the first `write`
  once D is known. `close()` flushes and writes `images.txt` (one path per row) and
  `config.json`; `load_descriptors` treats a folder without `config.json` as incomplete.
  """

  def __init__(self, folder: str, num_rows: int, image_list: Optional[Sequence[str]] = None,
               config_json: str = "{}", dim: Optional[int] = None):
    self.folder = folder
    self.num_rows = int(num_rows)
    self.image_list = None if image_list is None else list(image_list)
    if self.image_list is not None and len(self.image_list) != self.num_rows:
      raise ValueError(f"{len(self.image_list)} image names for {num_rows} rows")
    self.config_json = config_json
    self.array: Optional[np.memmap] = None
    os.makedirs(folder, exist_ok=True)
    # A previous, complete extraction is invalid from now on.
    for name in (CONFIG_FILE, IMAGES_FILE):
      if os.path.exists(os.path.join(folder, name)):
        os.remove(os.path.join(folder, name))
    if dim is not None:
      self.allocate(dim)

  @property
  def path(self) -> str:
    return os.path.join(self.folder, DESCRIPTORS_FILE)

  def allocate(self, dim: int) -> np.memmap:
    """The `[N, dim]` memmap (created on first call)."""
    if self.array is None:
      self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                             shape=(self.num_rows, int(dim)))
    elif self.array.shape[1] != dim:
      raise ValueError(f"descriptor dimension {dim} != {self.array.shape[1]} already written")
    return self.array

  def write(self, rows: np.ndarray, values: np.ndarray) -> None:
    """values [n, D] into rows [n] (any order)."""
    self.allocate(values.shape[1])[np.asarray(rows)] = values

  def close(self) -> np.memmap:
    """Flushes and writes the image list and config; returns the array (read-only)."""
    if self.array is None:
      raise RuntimeError(f"nothing was written to {self.folder}")
    self.array.flush()
    if self.image_list is not None:
      with open(os.path.join(self.folder, IMAGES_FILE), "w") as f:
        f.write("".join(f"{p}\n" for p in self.image_list))
    with open(os.path.join(self.folder, CONFIG_FILE), "w") as f:
      f.write(self.config_json)
    shape = self.array.shape
    del self.array
    self.array = None
    return np.load(self.path, mmap_mode="r") if shape[0] else np.zeros(shape, np.float32)


def save_descriptors(path: str, descriptors: np.ndarray, image_list: Sequence[str],
                     config_json: str) -> None:
  """descriptors.npy (memory-mappable) + images.txt + config.json in folder `path`."""
  writer = DescriptorWriter(path, len(descriptors), image_list, config_json,
                            dim=descriptors.shape[1])
  for start in range(0, len(descriptors), _CHUNK):
    rows = np.arange(start, min(start + _CHUNK, len(descriptors)))
    writer.write(rows, np.asarray(descriptors[rows], np.float32))
  writer.close()


def load_descriptors(path: str, mmap: bool = True) -> Dict[str, Any]:
  """{"descriptors": [N, D] (memory-mapped by default), "images": [N] str, "config": dict}."""
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} holds no complete extraction (no {CONFIG_FILE}); "
                            "was it interrupted? Extract again.")
  images = []
  if os.path.exists(os.path.join(path, IMAGES_FILE)):
    with open(os.path.join(path, IMAGES_FILE)) as f:
      images = f.read().splitlines()
  with open(cfg_path) as f:
    config = json.load(f)
  return {"descriptors": np.load(os.path.join(path, DESCRIPTORS_FILE),
                                 mmap_mode="r" if mmap else None),
          "images": images, "config": config}


# ----------------------------------------------------------------------------------------------
# Extraction.


class _Progress:
  """Images/s and ETA in the log every `every_s` seconds."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s = total, every_s
    self.start = self.last = time.time()
    self.done = 0

  def add(self, n: int) -> None:
    self.done += n
    if time.time() - self.last > self.every_s:
      rate = self.done / max(time.time() - self.start, 1e-9)
      logging.info("extract: %d/%d images, %.1f images/s, ETA %.0fs", self.done, self.total,
                   rate, (self.total - self.done) / max(rate, 1e-9))
      self.last = time.time()


def _finalize(acc: np.ndarray, num_scales: int, p: float, out: np.ndarray) -> None:
  """out = L2((acc / num_scales)^(1/p)) row-wise, in chunks.

  `acc` may be a memmap, and `out` may be `acc` itself (the streamed path).
  """
  for start in range(0, acc.shape[0], _CHUNK):
    v = np.asarray(acc[start:start + _CHUNK], np.float64) / num_scales
    if p != 1:
      v = np.power(np.maximum(v, 0), 1.0 / p)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    # The reference divides by the norm; unreadable images (zero rows) stay zero.
    out[start:start + _CHUNK] = v / np.where(norm > 0, norm, 1.0)


def extract_descriptors(model, variables, paths: Sequence[str], *, mesh, long_side: int,
                        batch_size: int = 8, scales: Sequence[float] = (1.0,),
                        multiscale_p: Optional[float] = None, early_fusion: bool = False,
                        bboxes=None, rotations=None, describe_fn=None,
                        out_folder: Optional[str] = None,
                        image_list: Optional[Sequence[str]] = None, config_json: str = "{}",
                        num_threads: int = 2, log_every_s: float = 10.0) -> np.ndarray:
  """Descriptors [N, D] (float32, rows L2-normalised) of `paths`, in order.

  Args:
    model: a RetrievalNet (or any module whose apply(variables, images, mask) returns
      {"descriptor": [B, D]}; early fusion needs a RetrievalNet).
    variables: its variables.
    paths: N image files.
    mesh: the device mesh; batches are sharded over its "data" axis.
    long_side: images are resized so that their longer side is `long_side * scale`.
    batch_size: images per batch (rounded up to a multiple of the data parallelism).
    scales: input scales; more than one gives a multi-scale descriptor.
    multiscale_p: late fusion exponent (see `multiscale_p_from`); None or 1: plain mean.
    early_fusion: fuse the scales' feature maps before pooling (Seddati et al.).
    bboxes: optional per-image (x1, y1, x2, y2) crops (queries of Revisited Oxford/Paris).
    rotations: optional per-image clockwise degrees (Holidays orientation fixes).
    describe_fn: a compiled `make_describe_fn` to reuse between calls.
    out_folder: stream the descriptors into `<out_folder>/descriptors.npy` (see
      `DescriptorWriter`) instead of host memory; the result is then a read-only memmap.
    image_list, config_json: what `out_folder` records beside the array (default: paths).
    num_threads: decoding threads.
    log_every_s: progress log period.
  Returns:
    [N, D] float32. Images that cannot be read get a zero row (logged by the pipeline).
  """
  n = len(paths)
  scales = tuple(float(s) for s in scales)
  batch_size = _round_up(batch_size, sharding_lib.data_parallelism(mesh))
  writer = None
  if out_folder is not None:
    writer = DescriptorWriter(out_folder, n, list(paths) if image_list is None else image_list,
                              config_json)
  if early_fusion and len(scales) > 1:
    return _extract_early_fusion(model, variables, paths, mesh=mesh, long_side=long_side,
                                 batch_size=batch_size, scales=scales, bboxes=bboxes,
                                 rotations=rotations, writer=writer, num_threads=num_threads,
                                 log_every_s=log_every_s)
  describe = describe_fn or make_describe_fn(model, mesh)
  p = 1.0 if multiscale_p is None else float(multiscale_p)
  single = len(scales) == 1
  batch_sharding = sharding_lib.batch_sharding(mesh)
  acc = None  # [N, D]: the descriptors (one scale) or the sum of their p-th powers.
  progress = _Progress(n * len(scales), log_every_s)
  for scale in scales:
    side = max(1, int(round(long_side * scale)))
    for batch in grain_pipeline.eval_batches(paths, long_side=side, batch_size=batch_size,
                                             bboxes=bboxes, rotations=rotations,
                                             num_threads=num_threads):
      d = np.asarray(describe(variables, *[jax.device_put(batch[k], batch_sharding)
                                           for k in ("image", "mask")]))
      keep = batch["index"] >= 0
      rows, d = batch["index"][keep], d[keep]
      if acc is None:
        acc = (writer.allocate(d.shape[1]) if writer is not None
               else np.zeros((n, d.shape[1]), np.float32 if single else np.float64))
      if single:
        acc[rows] = d
      else:
        # Sums of powers accumulate in place, so a streamed run needs no [N, D] in memory.
        acc[rows] += d if p == 1 else np.maximum(d, 0) ** p
      progress.add(len(rows))
  if acc is None:
    raise RuntimeError("no image could be read: check the dataset paths")
  if writer is not None:
    if not single:
      _finalize(acc, len(scales), p, acc)
    return writer.close()
  if single:
    return acc
  out = np.empty(acc.shape, np.float32)
  _finalize(acc, len(scales), p, out)
  return out


# ----------------------------------------------------------------------------------------------
# Early fusion (Seddati et al.): feature maps of several input sizes summed before pooling.


def _resize_axis(x: jnp.ndarray, axis: int, src: jnp.ndarray, dst: jnp.ndarray,
                 out_len: int) -> jnp.ndarray:
  """Bilinear resize along `axis` of every example's valid length `src` [B] to `dst` [B].

  torch's `interpolate(mode="bilinear", align_corners=False)` for an output size:
  `s = (i + 0.5) * src / dst - 0.5`, clamped at 0; neighbours `floor(s)` and the next one,
  clamped to the valid length, so padding never contributes. Outputs past `dst` are
  meaningless (the caller masks them).

  Args:
    x: [B, H, W, C].
    axis: 1 (rows) or 2 (columns).
    src, dst: [B] int32 valid lengths before / after.
    out_len: static output length along `axis` (>= max dst).
  Returns:
    x resized along `axis` to `out_len`.
  """
  src_f = src.astype(jnp.float32)[:, None]
  scale = src_f / jnp.maximum(dst, 1).astype(jnp.float32)[:, None]
  pos = jnp.maximum((jnp.arange(out_len, dtype=jnp.float32)[None] + 0.5) * scale - 0.5, 0.0)
  last = jnp.maximum(src - 1, 0)[:, None]
  i0 = jnp.minimum(jnp.floor(pos).astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  w = jnp.clip(pos - i0.astype(jnp.float32), 0.0, 1.0)  # [B, out_len]
  shape = [x.shape[0], 1, 1, 1]
  shape[axis] = out_len
  gather = lambda i: jnp.take_along_axis(x, i.reshape(shape), axis=axis)
  w = w.reshape(shape)
  return gather(i0) * (1.0 - w) + gather(i1) * w


def resize_valid(x: jnp.ndarray, mask: jnp.ndarray, target_mask: jnp.ndarray) -> jnp.ndarray:
  """Resizes each example's valid region of `x` to the valid size of `target_mask`.

  Args:
    x: [B, h, w, C] feature maps, valid region top-left (`mask`).
    mask: [B, h, w] bool.
    target_mask: [B, H, W] bool, the valid regions to fill.
  Returns:
    [B, H, W, C], zero outside `target_mask`.
  """
  hs, ws = pooling_lib.valid_sizes(mask)
  ht, wt = pooling_lib.valid_sizes(target_mask)
  y = _resize_axis(x.astype(jnp.float32), 1, hs, ht, target_mask.shape[1])
  y = _resize_axis(y, 2, ws, wt, target_mask.shape[2])
  return layers.apply_mask(y, target_mask)


def _trunk_features(model, variables, images, mask):
  """The trunk part of `RetrievalNet.__call__`: (feature maps, masks) of the pooled layers."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(model.mean, jnp.float32)) / jnp.asarray(model.std, jnp.float32)
  x = layers.apply_mask(x, mask)
  spec = pretrained.get_backbone(model.backbone)
  trunk = spec.make(dtype=jnp.dtype(model.dtype), **dict(model.backbone_kwargs or {}))
  trunk_vars = {col: tree["backbone"] for col, tree in variables.items()
                if isinstance(tree, Mapping) and "backbone" in tree}
  feats = trunk.apply(trunk_vars, x, mask, False)
  maps = [(feats["feature_map"].astype(jnp.float32), feats["mask"])]
  if model.multi_layer:
    maps.append((feats["stages"][-2].astype(jnp.float32), feats["stage_masks"][-2]))
  return maps


def _head(model, variables, maps):
  """The pooling / whitening part of `RetrievalNet.__call__` on given feature maps."""
  params = variables["params"]
  kwargs = dict(model.pooling_kwargs or {})

  def pool(name, fmap, mask):
    module = pooling_lib.build_pooling(model.pooling, **kwargs)
    return module.apply({"params": params[name]} if name in params else {}, fmap, mask)

  l2n = lambda v: v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)
  pooled = pool("pool", *maps[0])
  if model.multi_layer:
    pooled = jnp.concatenate([l2n(pooled), l2n(pool("pool_prev", *maps[1]))], axis=-1)
  descriptor = pooled = l2n(pooled)
  if model.whitening_dim:
    dense = nn.Dense(model.whitening_dim)
    descriptor = l2n(dense.apply({"params": params["whiten"]}, pooled))
  return descriptor


def make_fused_describe_fn(model, mesh):
  """jit'd (variables, images tuple, masks tuple) -> early-fused descriptors [B, D].

  `images[0]` / `masks[0]` is the largest scale: the other scales' feature maps are resized
  to its valid size, summed with it, and the sum is pooled (and whitened) as the model does.
  """
  batch = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)

  def describe(variables, images, masks):
    fused = None
    for x, m in zip(images, masks):
      maps = _trunk_features(model, variables, x, m)
      if fused is None:
        fused = maps
      else:
        fused = [(f + resize_valid(g, gm, fm), fm) for (f, fm), (g, gm) in zip(fused, maps)]
    return _head(model, variables, fused)

  return jax.jit(describe, in_shardings=(rep, batch, batch), out_shardings=rep)


def rescale_batch(batch: Mapping[str, np.ndarray], scale: float
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """A padded batch at `scale`: every valid region resized (PIL bilinear) and re-padded.

  Args:
    batch: {"image": uint8 [B, H, W, 3], "mask": bool [B, H, W]} (bottom/right padding).
    scale: factor (< 1 for the smaller scales).
  Returns:
    image uint8 [B, ceil(H s), ceil(W s), 3] and mask bool, valid sizes `round(h s)`.
  """
  b, h, w = batch["mask"].shape
  out_h, out_w = max(1, int(np.ceil(h * scale))), max(1, int(np.ceil(w * scale)))
  image = np.zeros((b, out_h, out_w, 3), np.uint8)
  mask = np.zeros((b, out_h, out_w), bool)
  for r in range(b):
    vh, vw = int(batch["mask"][r, :, 0].sum()), int(batch["mask"][r, 0, :].sum())
    if vh == 0 or vw == 0:
      continue
    nh = min(out_h, max(1, int(round(vh * scale))))
    nw = min(out_w, max(1, int(round(vw * scale))))
    im = Image.fromarray(batch["image"][r, :vh, :vw]).resize((nw, nh), Image.BILINEAR)
    image[r, :nh, :nw] = np.asarray(im)
    mask[r, :nh, :nw] = True
  return image, mask


def _extract_early_fusion(model, variables, paths, *, mesh, long_side, batch_size, scales,
                          bboxes, rotations, writer, num_threads, log_every_s) -> np.ndarray:
  """Early-fused multi-scale descriptors (see `make_fused_describe_fn`)."""
  order = sorted(scales, reverse=True)
  top = order[0]
  side = max(1, int(round(long_side * top)))
  describe = make_fused_describe_fn(model, mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  out = None
  progress = _Progress(len(paths), log_every_s)
  for batch in grain_pipeline.eval_batches(paths, long_side=side, batch_size=batch_size,
                                           bboxes=bboxes, rotations=rotations,
                                           num_threads=num_threads):
    images, masks = [batch["image"]], [batch["mask"]]
    for s in order[1:]:
      im, m = rescale_batch(batch, s / top)
      images.append(im)
      masks.append(m)
    put = lambda xs: tuple(jax.device_put(x, batch_sharding) for x in xs)
    d = np.asarray(describe(variables, put(images), put(masks)))
    keep = batch["index"] >= 0
    if out is None:
      out = (writer.allocate(d.shape[1]) if writer is not None
             else np.zeros((len(paths), d.shape[1]), np.float32))
    out[batch["index"][keep]] = d[keep]
    progress.add(int(keep.sum()))
  if out is None:
    raise RuntimeError("no image could be read: check the dataset paths")
  return writer.close() if writer is not None else out


def iter_chunks(array: np.ndarray, chunk: int = _CHUNK) -> Iterator[Tuple[int, np.ndarray]]:
  """(start, rows) of a possibly memory-mapped [N, D] array, `chunk` rows at a time."""
  for start in range(0, array.shape[0], chunk):
    yield start, np.asarray(array[start:start + chunk])


def apply_to_folder(src: str, dst: str, fn, config_json: Optional[str] = None) -> np.ndarray:
  """Streams a row-wise function (e.g. whitening) over a stored extraction into `dst`.

  Args:
    src: folder written by `DescriptorWriter` / `save_descriptors`.
    dst: output folder (same images.txt).
    fn: [n, D] -> [n, D'] float array, applied chunk by chunk.
    config_json: recorded in dst (default: src's).
  Returns:
    The new [N, D'] array, memory-mapped.
  """
  stored = load_descriptors(src)
  x = stored["descriptors"]
  writer = DescriptorWriter(dst, x.shape[0], stored["images"] or None,
                            config_json or json.dumps(stored["config"]))
  for start, rows in iter_chunks(x):
    writer.write(np.arange(start, start + len(rows)), np.asarray(fn(rows), np.float32))
  return writer.close()
