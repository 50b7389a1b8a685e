"""CPU evaluation extraction end to end: this project vs cnnimageretrieval-pytorch's way.

  python benchmarks/extract_cpu.py                 # MobileNetV2-GeM, 1024 px, 32 images + 12 crops
  python benchmarks/extract_cpu.py --quick         # tiny sizes (a check, not a figure)
  python benchmarks/extract_cpu.py --whole_process # + whole processes: cirtorch_cpu.py

`--whole_process` adds, after the in-process rows, benchmarks/cirtorch_cpu.py's wall-clock
timing of whole processes (cnnimageretrieval-pytorch's own `extract_vectors` vs `main.py
--mode=extract` / `--mode=describe`, cold and warm compile cache) on its photo set (with
`--quick`: its quick set); the figure a user sees, where the rows here are per CPU-second.

Both sides decode the same real photographs (`input_pipeline.write_photos`: 19 photos at
1024 px long side, repeated) and describe them at `--side` px long side:

* ours: `extract.extract_descriptors` (grain decoding threads, size buckets, the compiled
  describe function) on the devices JAX sees (set XLA_FLAGS=--xla_force_host_platform_
  device_count=N to split batches over N CPU "devices");
* torch: as cnnimageretrieval-pytorch's `extract_vectors` (PIL decode, resize, fp32, one
  image at a time, `net(x).cpu()` per image), `torch.get_num_threads()` intra-op threads.

Then the query case: `--queries` crops of different sizes (Revisited Oxford/Paris queries
are bounding boxes), where each size bucket's compile and padding show.

Printed per side: images/s (wall), images per CPU-second of this process (all threads: the
per-core rate, not disturbed by other jobs), and for ours the XLA compiles and their
seconds. Weights are random (speed does not depend on them).
"""
import argparse
import collections
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax import monitoring
import numpy as np
from PIL import Image
import torch

import input_pipeline
import torch_baselines as tb
from retrieval_jax import extract
from retrieval_jax import sharding
from retrieval_jax.models import retrieval_net
# pylint: enable=g-import-not-at-top,wrong-import-position

_COMPILES = collections.Counter()


def _on_duration(event: str, duration_secs: float, **kwargs) -> None:
  del kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES["n"] += 1
    _COMPILES["s"] += duration_secs


monitoring.register_event_duration_secs_listener(_on_duration)


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def query_boxes(paths: Sequence[str], n: int, seed: int = 0) -> List[tuple]:
  """n crops (x1, y1, x2, y2) of 30-90% of each side: every query a different size."""
  rng = np.random.default_rng(seed)
  boxes = []
  for p in paths[:n]:
    w, h = Image.open(p).size
    bw, bh = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
    x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    boxes.append((x, y, x + bw, y + bh))
  return boxes


def run_ours(model, variables, paths, side: int, batch: int, bboxes=None) -> Dict[str, Any]:
  mesh = sharding.make_mesh()
  before = dict(_COMPILES)
  wall, cpu = time.perf_counter(), _cpu_s()
  out = extract.extract_descriptors(model, variables, paths, mesh=mesh, long_side=side,
                                    batch_size=batch, bboxes=bboxes, num_threads=2)
  wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
  assert out.shape[0] == len(paths) and np.all(np.isfinite(out))
  return dict(images_per_s=len(paths) / wall, images_per_cpu_s=len(paths) / cpu,
              seconds=wall, compiles=_COMPILES["n"] - before.get("n", 0),
              compile_s=_COMPILES["s"] - before.get("s", 0.0), devices=jax.device_count())


def _load_resized(path: str, side: int, bbox=None) -> np.ndarray:
  """cirtorch's loader: PIL RGB, optional crop, resize so the long side is `side`."""
  im = Image.open(path).convert("RGB")
  if bbox is not None:
    im = im.crop(bbox)
  scale = side / max(im.size)
  return np.array(im.resize((max(1, round(im.width * scale)),
                               max(1, round(im.height * scale))), Image.BILINEAR))


def run_torch(net: tb.GeMNet, paths, side: int, bboxes=None) -> Dict[str, Any]:
  device = torch.device("cpu")
  wall, cpu = time.perf_counter(), _cpu_s()
  images = (_load_resized(p, side, None if bboxes is None else bboxes[i])
            for i, p in enumerate(paths))
  out = np.stack([tb.extract_cirtorch(net, [im], device)[0] for im in images])
  wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
  assert out.shape[0] == len(paths)
  return dict(images_per_s=len(paths) / wall, images_per_cpu_s=len(paths) / cpu, seconds=wall,
              threads=torch.get_num_threads())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a check, not a figure")
  parser.add_argument("--arch", default="mobilenet_v2")
  parser.add_argument("--side", type=int, default=1024)
  parser.add_argument("--images", type=int, default=32)
  parser.add_argument("--queries", type=int, default=12)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--whole_process", action="store_true",
                      help="also time whole processes (benchmarks/cirtorch_cpu.py)")
  args = parser.parse_args(argv)
  if args.quick:
    args.side, args.images, args.queries, args.batch = 64, 6, 3, 4
  model = retrieval_net.RetrievalNet(backbone=args.arch, pooling="gem")
  variables = jax.jit(model.init)(jax.random.key(0), retrieval_net.dummy_images(32))
  torch.manual_seed(0)
  net = tb.make_net(args.arch).eval()
  load = os.getloadavg()[0]
  print(f"machine: {input_pipeline.machine()}; load average {load:.2f}; jax devices "
        f"{jax.device_count()}; torch threads {torch.get_num_threads()}", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    photos = input_pipeline.write_photos(folder)
    paths = [photos[i % len(photos)] for i in range(args.images)]
    queries = [photos[i % len(photos)] for i in range(args.queries)]
    boxes = query_boxes(queries, args.queries)
    for what, ps, bb in (("database", paths, None), ("query crops", queries, boxes)):
      ours = run_ours(model, variables, ps, args.side, args.batch, bb)
      ref = run_torch(net, ps, args.side, bb)
      rows += [dict(set=what, impl="retrieval_jax", **ours),
               dict(set=what, impl="torch cirtorch (1 image, fp32)", **ref)]
      for r in rows[-2:]:
        print(f"{r['set']:12s} {r['impl']:32s} {r['images_per_s']:6.2f} images/s "
              f"{r['images_per_cpu_s']:6.2f} images/CPU-s "
              + (f"{r['compiles']} compiles ({r['compile_s']:.1f}s)" if "compiles" in r else ""),
              flush=True)
  report = dict(command=" ".join(["python", "benchmarks/extract_cpu.py", *(argv or sys.argv[1:])]),
                args=vars(args), machine=input_pipeline.machine(), load_average_start=load,
                load_average_end=os.getloadavg()[0],
                xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__,
                torch=torch.__version__, results=rows)
  if args.whole_process:
    import cirtorch_cpu  # pylint: disable=import-outside-toplevel
    print("\nwhole processes (benchmarks/cirtorch_cpu.py):", flush=True)
    report["whole_process"] = cirtorch_cpu.main(["--quick"] if args.quick else [])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  from retrieval_jax import host_memory  # as main.py: freed buffers kept (both sides gain)
  host_memory.keep_freed_memory()
  main()
