"""Throughput of the grain input pipelines (host CPU only; no device is used).

Measures images/s for decode + resize (+ pad into buckets, batching) of real photographs
(mvtb-data and scikit-image, re-encoded as JPEG at 1024 px long side, quality 90, and
repeated to `--images` paths; the files stay in the page cache, so the numbers are decode
and resize, not disk):

  * `loop`: `image_io.load_rgb` + `transforms.prepare_eval_image` in a plain Python loop
    (one core, no pipeline: the cost of the work itself);
  * `eval`: `grain_pipeline.eval_batches` at each `--sides` long side, with `--threads`
    decoding threads, full JPEG decode (reference parity) and with `jpeg_draft=True`
    (libjpeg decodes at a reduced scale when the target side allows);
  * `train`: `grain_pipeline.train_dataset` (balanced sampler, random resized crop to
    `--train_size`) through `train_iterator` with `--threads` threads.

Two rates are printed: images per wall-clock second (what a training run sees, and what
other processes on the machine take away) and images per CPU-second of this process, all
threads together (the per-core throughput: it does not depend on what else runs).

  python benchmarks/input_pipeline.py --threads 1,2 --sides 362,1024 --images 480
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from retrieval_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
from retrieval_jax.data import image_io
from retrieval_jax.data import transforms

_MVTB = ("church.png", "eiffel-1.png", "eiffel-2.png", "parks.png", "roof.png", "walls-l.png",
         "walls-r.png", "rocks2-l.png", "rocks2-r.png", "lab-scene.png", "road.png",
         "castle.png", "street.png", "building2-1.png", "penguins.png")
_SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket")
SOURCE_LONG_SIDE = 1024


def write_photos(folder: str) -> List[str]:
  """Real photographs as RGB JPEGs of 1024 px long side; returns their paths."""
  import mvtbdata  # pylint: disable=import-outside-toplevel
  from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  mvtb = os.path.join(os.path.dirname(mvtbdata.__file__), "images")
  sources = [Image.open(os.path.join(mvtb, f)) for f in _MVTB]
  sources += [Image.fromarray(getattr(skdata, n)()) for n in _SKIMAGE]
  paths = []
  for k, im in enumerate(sources):
    im = im.convert("RGB")
    scale = SOURCE_LONG_SIDE / max(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    paths.append(os.path.join(folder, f"photo{k:02d}.jpg"))
    im.save(paths[-1], quality=90)
  return paths


def _cpu_seconds() -> float:
  """CPU time of this process, all threads (user + system)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _rate(n: int, fn) -> Tuple[float, float]:
  """(images per wall-clock second, images per CPU second) of `fn` processing n images."""
  wall, cpu = time.perf_counter(), _cpu_seconds()
  fn()
  return n / (time.perf_counter() - wall), n / (_cpu_seconds() - cpu)


def bench_loop(paths, side: int) -> Tuple[float, float]:
  buckets = transforms.square_buckets(side)

  def run():
    for p in paths:
      transforms.prepare_eval_image(image_io.load_rgb(p), side, buckets)
  return _rate(len(paths), run)


def bench_eval(paths, side: int, threads: int, jpeg_draft: bool) -> Tuple[float, float]:
  def run():
    n = 0
    for batch in grain_pipeline.eval_batches(paths, long_side=side, batch_size=16,
                                             num_threads=threads, jpeg_draft=jpeg_draft):
      n += int((batch["index"] >= 0).sum())
    assert n == len(paths), n
  return _rate(len(paths), run)


def bench_train(paths, size: int, threads: int) -> Tuple[float, float]:
  labels = np.arange(len(paths)) % 24  # 24 landmarks with ~20 images each.
  steps = len(paths) // 32
  ds = grain_pipeline.train_dataset(paths, labels, classes_per_batch=8, images_per_class=4,
                                    image_size=size, seed=0, num_steps=steps)

  def run():
    for _ in grain_pipeline.train_iterator(ds, num_threads=threads, prefetch=2 * threads):
      pass
  return _rate(steps * 32, run)


def machine() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                 if l.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    model = platform.processor() or "unknown CPU"
  return f"{model}, {os.cpu_count()} cores"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
  parser.add_argument("--sides", default="362,1024", help="comma-separated long sides")
  parser.add_argument("--train_size", type=int, default=362)
  parser.add_argument("--images", type=int, default=480, help="paths per measurement")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args()
  threads = [int(t) for t in args.threads.split(",")]
  sides = [int(s) for s in args.sides.split(",")]
  cores = os.cpu_count() or 1
  results: List[Dict] = []

  def report(name, side, t, rates):
    rate, per_cpu_s = rates
    results.append(dict(bench=name, side=side, threads=t, images_per_s=round(rate, 1),
                        images_per_cpu_s=round(per_cpu_s, 1)))
    print(f"{name:20s} side={side:5d} threads={t}  {rate:7.1f} images/s  "
          f"{per_cpu_s:7.1f} images/CPU-s", flush=True)

  print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
  with tempfile.TemporaryDirectory() as folder:
    photos = write_photos(folder)
    paths = [photos[i % len(photos)] for i in range(args.images)]
    bench_loop(photos, sides[0])  # Warm-up: page cache, PIL plugins.
    for side in sides:
      report("loop (no pipeline)", side, 1, bench_loop(paths, side))
      for t in threads:
        report("eval_batches", side, t, bench_eval(paths, side, t, jpeg_draft=False))
        report("eval_batches draft", side, t, bench_eval(paths, side, t, jpeg_draft=True))
    for t in threads:
      report("train_dataset crop", args.train_size, t, bench_train(paths, args.train_size, t))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
