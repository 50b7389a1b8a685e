"""Descriptor extraction: bucketed, masked, sharded batches; single- or multi-scale.

Images keep their aspect ratio: each is resized to `long_side * scale`, padded at the
bottom/right into one of a few bucket shapes with a validity mask, and batched per bucket, so
one compiled function per bucket serves the whole collection and padding never changes a
descriptor (masks are re-applied inside the trunk and respected by the pooling).
"""
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import sharding as sharding_lib
from retrieval_jax.data import grain_pipeline


def make_describe_fn(model, mesh):
  """jit'd (variables, images, mask) -> descriptors, batch sharded over "data"."""
  batch = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(lambda v, x, m: model.apply(v, x, m)["descriptor"],
                 in_shardings=(rep, batch, batch), out_shardings=rep)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def extract_descriptors(model, variables, paths: Sequence[str], *, mesh, long_side: int,
                        batch_size: int = 8, scales: Sequence[float] = (1.0,),
                        multiscale_p: Optional[float] = None, bboxes=None,
                        describe_fn=None, log_every_s: float = 10.0) -> np.ndarray:
  """Descriptors [N, D] (float32, rows L2-normalised) of `paths`, in order.

  Multi-scale combines the per-scale descriptors as the reference does: a generalised mean
  over scales with exponent `multiscale_p` (the learned GeM p; None or 1 = plain mean), then
  L2. Images that cannot be read get a zero row (logged by the pipeline).
  """
  n = len(paths)
  batch_size = _round_up(batch_size, sharding_lib.data_parallelism(mesh))
  describe = describe_fn or make_describe_fn(model, mesh)
  p = 1.0 if multiscale_p is None else float(multiscale_p)
  total, start, last_log, done = None, time.time(), time.time(), 0
  for scale in scales:
    side = max(1, int(round(long_side * scale)))
    for batch in grain_pipeline.eval_batches(paths, long_side=side, batch_size=batch_size,
                                             bboxes=bboxes):
      d = np.asarray(describe(variables, *[jax.device_put(batch[k]) for k in ("image", "mask")]))
      if total is None:
        total = np.zeros((n, d.shape[1]), np.float64)
      keep = batch["index"] >= 0
      d = d[keep] if p == 1 else np.maximum(d[keep], 0) ** p
      total[batch["index"][keep]] += d
      done += int(keep.sum())
      if time.time() - last_log > log_every_s:
        rate = done / (time.time() - start)
        eta = (n * len(scales) - done) / max(rate, 1e-9)
        logging.info("extract: %d/%d images, %.1f images/s, ETA %.0fs", done,
                     n * len(scales), rate, eta)
        last_log = time.time()
  if total is None:
    raise RuntimeError("no image could be read: check the dataset paths")
  v = total / len(scales)
  if p != 1:
    v = np.power(np.maximum(v, 0), 1.0 / p)
  v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-6
  return v.astype(np.float32)


def multiscale_p_from(variables, combine: str) -> Optional[float]:
  """The learned GeM p (scalar) for combining scales the reference's way, or None."""
  if combine != "gem":
    return None
  pool = variables["params"].get("pool", {})
  if "p" not in pool:
    return None
  return float(np.mean(np.asarray(pool["p"])))


def save_descriptors(path: str, descriptors: np.ndarray, image_list: Sequence[str],
                     config_json: str) -> None:
  """descriptors.npy (memory-mappable) + images.txt + config.json in folder `path`."""
  os.makedirs(path, exist_ok=True)
  np.save(os.path.join(path, "descriptors.npy"), descriptors)
  with open(os.path.join(path, "images.txt"), "w") as f:
    f.write("\n".join(image_list) + "\n")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config_json)


def load_descriptors(path: str) -> Dict[str, Any]:
  with open(os.path.join(path, "images.txt")) as f:
    images = f.read().splitlines()
  return {"descriptors": np.load(os.path.join(path, "descriptors.npy"), mmap_mode="r"),
          "images": images,
          "config": json.load(open(os.path.join(path, "config.json")))}
