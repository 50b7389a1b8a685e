"""Local-feature extraction and geometric verification throughput, beside global extraction.

  python benchmarks/local_features.py --backbone=resnet50 --long_side=512 --batch=8 \
      --scales=0.7071,1.0,1.4142 --repeats=3

On whatever devices JAX sees (the batch is sharded over all of them): images/s of
* global extraction: RetrievalNet (GeM) descriptors at scale 1 (`extract.make_describe_fn`);
* local extraction: DelgNet-style local head on stages[-2], the DELG pyramid, top-1000
  positions per scale on the device, receptive boxes + NMS on the host
  (`keypoints.keypoints_of_batch`);
and verified pairs/s of matching + RANSAC (`matching.verify_pair`, 1000 x 1000 features of
`--dim` size, affine, 1000 trials) on the host's threads. Inputs are random uint8 images
(the device's work does not depend on pixel values; decoding is `input_pipeline.py`'s).
Weights are random: the extraction cost does not depend on them.
"""
import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from retrieval_jax import sharding
from retrieval_jax.local import keypoints as kp_lib
from retrieval_jax.local import matching
from retrieval_jax.local import model as model_lib
from retrieval_jax.local import receptive_field as rf_lib
from retrieval_jax.models import retrieval_net


def _time(fn, repeats):
  fn()  # compile
  t = time.time()
  for _ in range(repeats):
    fn()
  return (time.time() - t) / repeats


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--long_side", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--scales", default="0.7071,1.0,1.4142")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--pairs", type=int, default=16)
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args()
  mesh = sharding.make_mesh()
  batch = -(-a.batch // sharding.data_parallelism(mesh)) * sharding.data_parallelism(mesh)
  h, w = int(a.long_side * 0.75), a.long_side
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (batch, h, w, 3), np.uint8)
  masks = np.ones((batch, h, w), bool)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731

  glob = retrieval_net.RetrievalNet(backbone=a.backbone, pooling="gem")
  gv = jax.jit(glob.init)(jax.random.PRNGKey(0), images[:1], masks[:1])
  describe = jax.jit(lambda v, x, m: glob.apply(v, x, m)["descriptor"])
  t_glob = _time(lambda: jax.block_until_ready(describe(gv, put(images), put(masks))),
                 a.repeats)

  local = model_lib.DelgNet(backbone=a.backbone, pooling="gem", reduced_dim=a.dim)
  lv = jax.jit(local.init)(jax.random.PRNGKey(0), images[:1], masks[:1])
  select = kp_lib.make_select_fn(local, mesh, 1000)
  scales = tuple(float(s) for s in a.scales.split(","))
  rf = rf_lib.receptive_field(a.backbone)
  recs = []

  def run_local():
    recs[:] = kp_lib.keypoints_of_batch(select, lv, images, masks, rf=rf, scales=scales,
                                        score_threshold=-1.0, max_features=1000, put=put)
  t_local = _time(run_local, a.repeats)

  desc = rng.normal(size=(2, 1000, a.dim)).astype(np.float32)
  desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
  pair = [{"locations": rng.uniform(0, a.long_side, (1000, 2)), "descriptors": d}
          for d in desc]
  t = time.time()
  with concurrent.futures.ThreadPoolExecutor(a.threads) as pool:
    list(pool.map(lambda _: matching.verify_pair(*pair), range(a.pairs)))
  t_pairs = (time.time() - t) / a.pairs

  dev = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"devices={dev} backbone={a.backbone} images {h}x{w} batch={batch}")
  print(f"global (1 scale):           {batch / t_glob:8.1f} images/s")
  print(f"local ({len(scales)} scales, top-1000): {batch / t_local:8.1f} images/s "
        f"({np.mean([len(r['scores']) for r in recs]):.0f} keypoints/image)")
  print(f"matching + RANSAC (1000x1000, {a.threads} threads): {1 / t_pairs:8.1f} pairs/s")


if __name__ == "__main__":
  main()
