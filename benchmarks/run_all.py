"""All accelerator benchmarks in one command, side by side with PyTorch, on one device.

  python benchmarks/run_all.py                      # full sizes (one GPU/TPU; ~10-20 min)
  python benchmarks/run_all.py --sections=extract   # one section (extract,train,search,input)
  python benchmarks/run_all.py --quick              # tiny sizes on CPU: checks the code paths

Sections (each measured in this one process, on `jax.devices()[0]` and torch's device):

* extract: RetrievalNet ResNet-101-GeM at 1024 px long side over the Oxford/Paris aspect mix
  (`ASPECT_MIX`: mostly 768x1024 and 1024x768, some odd ones), single scale and 3 scales
  (1, 2^-1/2, 1/2), float32 and bfloat16: this project (`extract.make_describe_fn` over the
  size buckets of `extract`'s pipeline, batches dispatched back to back) vs careful PyTorch
  (same buckets, channels_last, bf16 autocast) vs cnnimageretrieval-pytorch's way (fp32, one
  image at a time at its own size, `.cpu()` per image; float32 rows only). Inputs are
  device-resident uint8 batches, so this is the device's throughput; decoding is `input`.
* train: ResNet-101-GeM at 362 px, contrastive loss with in-step hard-negative mining
  (`train.mining="in_batch"`, K landmarks x 4 images), Adam, global batch 64..512: this
  project's compiled train step vs a careful PyTorch step (bf16 autocast, channels_last,
  BN frozen, the same mining in torch). The mining's share of the step is measured by
  ablation: the mined loss's forward + backward on the step's descriptors, alone.
* search: exact top-100 of 10k queries over 1M x 2048 bfloat16 descriptors: `knn.knn`
  (query chunks, matmul + top-k) vs the same in torch.
* input: decoded + resized images per CPU-second (grain `eval_batches` at 1024 px and the
  training crop at 362 px), from `input_pipeline.py`.

FLOP utilisation = XLA's cost-analysis FLOPs / time / the device's peak (`PEAK_TFLOPS`; none
on CPU). Prints a table and writes JSON (`--json`) with the device, versions, the command
and every row.
"""
import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# JAX and torch share the one device: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repository (retrieval_jax, configs)
sys.path.insert(0, _HERE)  # input_pipeline, torch_baselines

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import gem_resnet101
import input_pipeline
import torch_baselines as tb
# The project's entry points (the only lines to update when modules move).
from retrieval_jax import extract
from retrieval_jax import knn
from retrieval_jax import sharding
from retrieval_jax.data import transforms
from retrieval_jax.mining import in_batch
from retrieval_jax.models import retrieval_net
from retrieval_jax.train import state as train_state
from retrieval_jax.train import step as train_step
# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s per chip: (bfloat16, float32 matmul as XLA runs it by default: TF32 on
# NVIDIA Ampere and later, bf16 passes on TPU). Matched by substring of `device_kind`.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),   # SXM; the PCIe card is ~756 / 378
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "TPU v6": (918.0, 918.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v5": (197.0, 197.0),  # v5 lite / v5e
    "TPU v4": (275.0, 275.0),
}

# Shapes (h, w) at 1024 px long side of a 20-image cycle of Revisited Oxford/Paris: mostly
# 4:3 landscape and portrait, and a few odd ones (3:2, square, 5:4).
ASPECT_MIX = ((768, 1024),) * 9 + ((1024, 768),) * 8 + ((683, 1024), (1024, 1024), (819, 1024))
SCALES_3 = (1.0, 2 ** -0.5, 0.5)

FULL = dict(arch="resnet101", width=64, side=1024, extract_images=512, extract_batch=64,
            cirtorch_images=40, train_size=362, train_batches=(64, 128, 256, 512),
            train_steps=10, search_db=1_000_000, search_dim=2048, search_queries=10_000,
            search_k=100, search_chunk=1024, input_images=480, input_side=1024,
            input_train_size=362)
QUICK = dict(arch="resnet18", width=8, side=64, extract_images=8, extract_batch=4,
             cirtorch_images=3, train_size=32, train_batches=(8,), train_steps=2,
             search_db=2048, search_dim=64, search_queries=96, search_k=10, search_chunk=32,
             input_images=48, input_side=64, input_train_size=32, quick=True)


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  for name, (bf16, fp32) in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _utilisation(flops: float, seconds: float, peak: Optional[float]) -> Optional[float]:
  if not peak or not flops or seconds <= 0:
    return None
  return flops / seconds / (peak * 1e12)


class Bench:
  """The run's context: one JAX device (a 1-device mesh), torch's device, rows, sizes."""

  def __init__(self, sizes: Dict[str, Any], dtypes: Sequence[str]):
    self.sizes = sizes
    self.dtypes = tuple(dtypes)
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh((1,), (sharding.DATA_AXIS,), devices=[self.device])
    self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.rows: List[Dict[str, Any]] = []

  def add(self, **row) -> None:
    row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    self.rows.append(row)
    print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

  def put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, self.device)


def _block(x) -> None:
  jax.block_until_ready(x)


def _timed_jax(fn: Callable[[], Any], repeats: int = 1) -> float:
  """Seconds per call of fn (dispatched `repeats` times back to back, then one block)."""
  t = time.perf_counter()
  outs = [fn() for _ in range(repeats)]
  _block(outs)
  return (time.perf_counter() - t) / repeats


# ----------------------------------------------------------------------------------------------
# Extraction.


def image_shapes(n: int, side: int, scale: float = 1.0) -> List[Tuple[int, int]]:
  """(h, w) of n images of the aspect mix, long side `side * scale`."""
  f = side * scale / 1024
  return [(max(1, round(h * f)), max(1, round(w * f)))
          for h, w in (ASPECT_MIX[i % len(ASPECT_MIX)] for i in range(n))]


def bucket_plan(shapes: Sequence[Tuple[int, int]], long_side: int
                ) -> Dict[Tuple[int, int], int]:
  """{bucket (H, W): images} as `extract`'s pipeline groups them (`square_buckets`)."""
  buckets = transforms.square_buckets(long_side)
  plan: Dict[Tuple[int, int], int] = {}
  for h, w in shapes:
    b = buckets[transforms.pick_bucket(h, w, buckets)]
    plan[b] = plan.get(b, 0) + 1
  return plan


def _arch_model(b: Bench, dtype: str) -> retrieval_net.RetrievalNet:
  kwargs = {} if b.sizes["width"] == 64 else {"width": b.sizes["width"]}
  return retrieval_net.RetrievalNet(backbone=b.sizes["arch"], backbone_kwargs=kwargs,
                                    pooling="gem", dtype=dtype)


def extract_ours(b: Bench, dtype: str, scales: Sequence[float]) -> Dict[str, Any]:
  """This project's compiled describe fn over the bucketed batches of every scale."""
  s = b.sizes
  model = _arch_model(b, dtype)
  variables = jax.jit(model.init)(jax.random.key(0), retrieval_net.dummy_images(32))
  describe = extract.make_describe_fn(model, b.mesh)
  rng = np.random.default_rng(0)
  work = []  # (compiled, images, mask, batches)
  compile_s, flops = 0.0, 0.0
  for scale in scales:
    side = max(1, round(s["side"] * scale))
    plan = bucket_plan(image_shapes(s["extract_images"], s["side"], scale), side)
    for (h, w), count in sorted(plan.items()):
      n = s["extract_batch"]
      x = b.put(rng.integers(0, 256, (n, h, w, 3), np.uint8))
      m = b.put(np.ones((n, h, w), bool))
      t = time.perf_counter()
      compiled = describe.lower(variables, x, m).compile()
      compile_s += time.perf_counter() - t
      batches = math.ceil(count / n)
      flops += _flops(compiled) * batches
      work.append((compiled, x, m, batches))
  for compiled, x, m, _ in work:  # warm-up
    _block(compiled(variables, x, m))

  def run():
    return [compiled(variables, x, m) for compiled, x, m, k in work for _ in range(k)]
  sec = _timed_jax(run)
  return dict(seconds=sec, flops=flops, compile_s=compile_s)


def extract_torch_careful(b: Bench, net: tb.GeMNet, dtype: str, scales: Sequence[float]
                          ) -> float:
  """Seconds for the same bucketed batches in careful PyTorch (multi-scale: every scale)."""
  s = b.sizes
  rng = np.random.default_rng(0)
  batches = []
  for scale in scales:
    side = max(1, round(s["side"] * scale))
    plan = bucket_plan(image_shapes(s["extract_images"], s["side"], scale), side)
    for (h, w), count in sorted(plan.items()):
      x = torch.from_numpy(rng.integers(0, 256, (s["extract_batch"], 3, h, w), np.uint8))
      batches += [x.to(b.torch_device)] * math.ceil(count / s["extract_batch"])
  return tb.timed(lambda: tb.extract_batched(net, batches, b.torch_device,
                                             dtype == "bfloat16"), b.torch_device)


def extract_torch_cirtorch(b: Bench, net: tb.GeMNet, scales: Sequence[float]) -> float:
  """Seconds per image, cnnimageretrieval-pytorch's way (fp32, one image, own size)."""
  s = b.sizes
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8)
            for h, w in image_shapes(s["cirtorch_images"], s["side"])]
  sec = tb.timed(lambda: tb.extract_cirtorch(net, images, b.torch_device, scales, msp=3.0),
                 b.torch_device)
  return sec / len(images)


def bench_extract(b: Bench) -> None:
  s = b.sizes
  kind = b.device.device_kind
  width = s["width"]
  for dtype in b.dtypes:
    peak = peak_tflops(kind, dtype)
    for scales in ((1.0,), SCALES_3):
      if s.get("quick") and dtype != "float32" and len(scales) > 1:
        continue  # the same code path as float32's: saves compiles in the CPU test
      label = "1 scale" if len(scales) == 1 else "3 scales"
      n = s["extract_images"]
      ours = extract_ours(b, dtype, scales)
      b.add(section="extract", impl="retrieval_jax", dtype=dtype, scales=label,
            images_per_s=n / ours["seconds"],
            gflop_per_image=ours["flops"] / n / 1e9,
            utilisation=_utilisation(ours["flops"], ours["seconds"], peak),
            compile_s=ours["compile_s"])
      torch.manual_seed(0)
      net = tb.careful_net(tb.make_net(s["arch"], width), b.torch_device)
      sec = extract_torch_careful(b, net, dtype, scales)
      b.add(section="extract", impl="torch careful", dtype=dtype, scales=label,
            images_per_s=n / sec,
            utilisation=_utilisation(ours["flops"], sec, peak))
      if dtype == "float32":
        net = tb.make_net(s["arch"], width).to(b.torch_device).eval()
        per_image = extract_torch_cirtorch(b, net, scales)
        b.add(section="extract", impl="torch cirtorch (1 image, fp32)", dtype=dtype,
              scales=label, images_per_s=1.0 / per_image)


# ----------------------------------------------------------------------------------------------
# Training.


def train_config(b: Bench, batch: int, dtype: str):
  """configs/gem_resnet101.py with in-step mining over K x 4 batches, random init."""
  s = b.sizes
  c = gem_resnet101.get_config()
  c.model.pretrained = ""
  c.model.backbone = s["arch"]
  if s["width"] != 64:
    c.model.backbone_kwargs.width = s["width"]
  c.model.dtype = dtype
  c.train.mining = "in_batch"
  c.data.image_size = s["train_size"]
  c.data.images_per_class = 4
  c.data.classes_per_batch = batch // 4
  return c


def train_ours(b: Bench, batch: int, dtype: str) -> Dict[str, Any]:
  s = b.sizes
  c = train_config(b, batch, dtype)
  model, tx, state = train_state.create(c, b.mesh)
  step = train_step.compile_train_step(model, tx, c.loss, b.mesh, state)
  rng = np.random.default_rng(0)
  size = s["train_size"]
  labels = np.repeat(np.arange(batch // 4, dtype=np.int32), 4)
  data = sharding.to_global({"image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                             "label": labels}, b.mesh)
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t
  flops = _flops(compiled)
  state, metrics = compiled(state, data)
  _block(metrics)
  t = time.perf_counter()
  for _ in range(s["train_steps"]):
    state, metrics = compiled(state, data)
  _block(metrics)
  sec = (time.perf_counter() - t) / s["train_steps"]
  # Ablation: the mined loss alone (forward + backward w.r.t. the descriptors).
  dim = jax.eval_shape(lambda v, x: model.apply(v, x)["descriptor"],
                       state.variables, retrieval_net.dummy_images(size)).shape[-1]
  desc = rng.standard_normal((batch, dim)).astype(np.float32)
  desc /= np.linalg.norm(desc, axis=1, keepdims=True)
  desc, lab = sharding.to_global({"d": desc, "l": labels}, b.mesh).values()

  def mined(d):
    return in_batch.in_batch_mined_loss(
        d, lab, mesh=b.mesh, loss_name=c.loss.name, margin=c.loss.margin,
        num_negatives=c.loss.num_negatives, positives=c.loss.positives,
        reduction=c.loss.reduction)[0]
  mining = jax.jit(jax.value_and_grad(mined))
  _block(mining(desc))
  mining_sec = _timed_jax(lambda: mining(desc), repeats=max(3, s["train_steps"]))
  return dict(seconds=sec, flops=flops, compile_s=compile_s, mining_s=mining_sec,
              loss=float(metrics["loss"]))


def train_torch(b: Bench, batch: int, dtype: str) -> float:
  s = b.sizes
  torch.manual_seed(0)
  step = tb.make_train_step(tb.make_net(s["arch"], s["width"]), b.torch_device,
                            bf16=dtype == "bfloat16")
  size = s["train_size"]
  x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).to(b.torch_device)
  y = torch.arange(batch // 4).repeat_interleave(4).to(b.torch_device)
  return tb.timed(lambda: step(x, y), b.torch_device, repeats=s["train_steps"])


def bench_train(b: Bench) -> None:
  s = b.sizes
  kind = b.device.device_kind
  dtype = b.dtypes[-1]  # bfloat16 on accelerators; float32 only when asked for alone
  peak = peak_tflops(kind, dtype)
  for batch in s["train_batches"]:
    try:
      ours = train_ours(b, batch, dtype)
      b.add(section="train", impl="retrieval_jax", dtype=dtype, batch=batch,
            images_per_s=batch / ours["seconds"],
            gflop_per_image=ours["flops"] / batch / 1e9,
            utilisation=_utilisation(ours["flops"], ours["seconds"], peak),
            mining_share=ours["mining_s"] / ours["seconds"], compile_s=ours["compile_s"])
      flops = ours["flops"]
    except Exception as e:  # pylint: disable=broad-except
      # Out of memory at a large batch is a result, not a crash of the whole run.
      b.add(section="train", impl="retrieval_jax", dtype=dtype, batch=batch,
            error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      flops = 0.0
    try:
      sec = train_torch(b, batch, dtype)
      b.add(section="train", impl="torch careful", dtype=dtype, batch=batch,
            images_per_s=batch / sec, utilisation=_utilisation(flops, sec, peak))
    except Exception as e:  # pylint: disable=broad-except
      b.add(section="train", impl="torch careful", dtype=dtype, batch=batch,
            error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if b.torch_device.type == "cuda":
      torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Search.


def bench_search(b: Bench) -> None:
  s = b.sizes
  n, d, nq, k = s["search_db"], s["search_dim"], s["search_queries"], s["search_k"]

  @jax.jit
  def make(key):
    x = jax.random.normal(key, (n, d), jnp.float32)
    return (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(jnp.bfloat16)
  db = jax.device_put(make(jax.random.key(0)), b.device)
  queries = np.asarray(make(jax.random.key(1))[:nq].astype(jnp.float32))
  knn.knn(queries[:s["search_chunk"]], db, k, dtype="bfloat16",
             query_batch=s["search_chunk"])  # compile
  t = time.perf_counter()
  scores, index = knn.knn(queries, db, k, dtype="bfloat16", query_batch=s["search_chunk"])
  sec = time.perf_counter() - t
  b.add(section="search", impl="retrieval_jax", dtype="bfloat16", queries_per_s=nq / sec,
        db=n, dim=d, k=k)
  tdb = torch.from_numpy(np.array(db.astype(jnp.float32))).to(b.torch_device).bfloat16()
  tq = torch.from_numpy(queries).to(b.torch_device)
  sec = tb.timed(lambda: tb.knn(tq, tdb, k, s["search_chunk"]), b.torch_device)
  t_scores, t_index = tb.knn(tq, tdb, k, s["search_chunk"])
  # Same neighbours (up to bf16 ties): the fraction of ours found by torch.
  t_index = t_index.cpu().numpy()
  agree = np.mean([len(set(a) & set(c)) / k for a, c in zip(index, t_index)])
  b.add(section="search", impl="torch careful", dtype="bfloat16", queries_per_s=nq / sec,
        db=n, dim=d, k=k, overlap_with_ours=float(agree))
  del db, tdb


# ----------------------------------------------------------------------------------------------
# Input pipeline.


def bench_input(b: Bench) -> None:
  s = b.sizes
  with tempfile.TemporaryDirectory() as folder:
    photos = input_pipeline.write_photos(folder)
    paths = [photos[i % len(photos)] for i in range(s["input_images"])]
    input_pipeline.bench_loop(photos[:4], s["input_side"])  # warm-up
    per_s, per_cpu_s = input_pipeline.bench_eval(paths, s["input_side"], 1, jpeg_draft=False)
    b.add(section="input", impl="grain eval_batches", side=s["input_side"], threads=1,
          images_per_s=per_s, images_per_cpu_s=per_cpu_s)
    per_s, per_cpu_s = input_pipeline.bench_train(paths, s["input_train_size"], 1)
    b.add(section="input", impl="grain train_dataset", side=s["input_train_size"], threads=1,
          images_per_s=per_s, images_per_cpu_s=per_cpu_s)


SECTIONS = {"extract": bench_extract, "train": bench_train, "search": bench_search,
            "input": bench_input}


# ----------------------------------------------------------------------------------------------
# Report.


def environment(argv: Sequence[str]) -> Dict[str, Any]:
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=_HERE, capture_output=True, text=True,
                            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return ""
  import flax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {
      "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python", "benchmarks/run_all.py", *argv]),
      "device": {"platform": dev.platform, "kind": dev.device_kind,
                 "count_visible": jax.device_count(),
                 "torch": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                           else "cpu")},
      "host": {"machine": input_pipeline.machine(), "load_average": list(os.getloadavg())},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
                   "flax": flax.__version__, "torch": torch.__version__,
                   "numpy": np.__version__},
      "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--short"))},
  }


def table(rows: Sequence[Dict[str, Any]]) -> str:
  cols = ["section", "impl", "dtype", "scales", "batch", "images_per_s", "queries_per_s",
          "images_per_cpu_s", "utilisation", "mining_share", "gflop_per_image", "compile_s",
          "error"]
  cols = [c for c in cols if any(c in r for r in rows)]

  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
  lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
  lines += [" | ".join(fmt(r.get(c)) for c in cols) for r in rows]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes (ResNet-18 at width 8, 64 px): a CPU check, not a figure")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="extraction dtypes; training uses the last one")
  parser.add_argument("--json", default="run_all.json", help="where the results go")
  parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(),
                                                          "retrieval_jax_bench_xla_cache"),
                      help="persistent XLA compile cache ('' for none): reruns skip compiles")
  args = parser.parse_args(argv)
  sections = [x for x in args.sections.split(",") if x]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  b = Bench(dict(QUICK if args.quick else FULL), args.dtypes.split(","))
  env = environment(argv)
  print(f"device: {env['device']}; host: {env['host']}", flush=True)
  for name in sections:
    print(f"[{name}]", flush=True)
    t = time.perf_counter()
    try:
      SECTIONS[name](b)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      b.add(section=name, impl="(section failed)",
            error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    print(f"[{name}] {time.perf_counter() - t:.1f}s", flush=True)
    if b.torch_device.type == "cuda":
      torch.cuda.empty_cache()
  ru = resource.getrusage(resource.RUSAGE_SELF)
  report = dict(env, sizes=b.sizes, dtypes=list(b.dtypes), sections=sections,
                cpu_seconds=ru.ru_utime + ru.ru_stime, results=b.rows)
  print(table(b.rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.json}")
  return report


if __name__ == "__main__":
  rows = main()["results"]
  sys.exit(1 if any("error" in r and r.get("impl") == "(section failed)" for r in rows) else 0)
