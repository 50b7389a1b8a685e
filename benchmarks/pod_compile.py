"""Compiler figures for TPU pods: `--mode=compile` over the cases of BENCHMARKS.md.

    python benchmarks/pod_compile.py --cases=pod_v5e,pod_v5e_nomining --out_dir=/tmp/pods
    python benchmarks/pod_compile.py --table --out_dir=/tmp/pods      # markdown of all done

Each case is a config of configs/ with overrides, compiled for a TPU topology on this CPU
machine (retrieval_jax/aot/; libtpu); its report goes to <out_dir>/<case>/compile/*.json and
one summary row to <out_dir>/<case>.json. A ResNet-101 train step takes ~2-4 min to compile on
2 shared cores; run a few cases per call. Nothing here is measured on a TPU: memory, flops,
bytes and collectives are XLA's; times are the roofline lower bound of aot/analysis.py.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

V5E = "v5e:16x16"
_TRAIN = {"compile.programs": ("train",)}
_EXTRACT = {"compile.programs": ("extract",), "compile.extract_buckets": "largest",
            "compile.topology": V5E, "extract.batch_size": 32 * 256}
# case -> (config module, overrides, what it shows)
CASES = {
    "pod_v5e": ("gem_resnet101_pod", dict(_TRAIN, **{"compile.topology": V5E}),
                "pod recipe, in-step mining over 8192 images"),
    "pod_v5e_nomining": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "loss.mining_scope": "chip"}),
                         "pod recipe, mining within each chip (no all-gather)"),
    "pod_v5e_fp32": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "model.dtype": "float32"}), "pod recipe in float32"),
    "pod_v5e_b64": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "compile.batch_per_chip": 64}), "pod recipe, 64 per chip"),
    "pod_v5e_max": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "compile.max_batch": True}), "largest batch per chip"),
    "gem_v5e": ("gem_resnet101", dict(_TRAIN, **{"compile.topology": V5E}),
                "reference recipe: 5 tuples padded to 256 (+ epoch mining's describe)"),
    "gem_v5e_bf16": ("gem_resnet101", dict(_TRAIN, **{"compile.topology": V5E,
                                                     "model.dtype": "bfloat16"}),
                     "reference recipe in bf16"),
    "extract_bf16_1": ("gem_resnet101", dict(_EXTRACT, **{"model.dtype": "bfloat16",
                                                         "extract.scales": (1.0,)}),
                       "extraction 1024 px, 1 scale, bf16, 32 per chip"),
    "extract_bf16_3": ("gem_resnet101", dict(_EXTRACT, **{"model.dtype": "bfloat16"}),
                       "extraction 1024 px, 3 scales, bf16, 32 per chip"),
    "extract_fp32_1": ("gem_resnet101", dict(_EXTRACT, **{"extract.scales": (1.0,)}),
                       "extraction 1024 px, 1 scale, fp32, 32 per chip"),
    "extract_fp32_3": ("gem_resnet101", dict(_EXTRACT),
                       "extraction 1024 px, 3 scales, fp32, 32 per chip"),
    "search_v5e": ("gem_resnet101", {"compile.programs": ("search",), "compile.topology": V5E},
                   "exact search 1M x 2048 bf16, 10k queries, top 100"),
    "pod_v5e_x4_global": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "compile.num_slices": 4, "compile.batch_per_chip": 32,
        "loss.mining_scope": "global"}), "4 x v5e-256, mining across slices (32768 images)"),
    "pod_v5e_x4_slice": ("gem_resnet101_pod", dict(_TRAIN, **{
        "compile.topology": V5E, "compile.num_slices": 4, "compile.batch_per_chip": 32,
        "loss.mining_scope": "slice"}), "4 x v5e-256, mining within each slice"),
    "pod_v4": ("gem_resnet101_pod", dict(_TRAIN, **{"compile.topology": "v4:8x8x8",
                                                   "compile.batch_per_chip": 32}),
               "pod recipe on v4-512"),
    "vit_b14_v5e": ("vit_b14_gem", dict(_TRAIN, **{"compile.topology": V5E}),
                    "DINOv2 ViT-B/14-GeM, 224 px, in-step mining over 8192 images"),
    "vit_b14_v5e_518": ("vit_b14_gem", dict(_TRAIN, **{"compile.topology": V5E,
                                                       "data.image_size": 518,
                                                       "compile.batch_per_chip": 8}),
                        "DINOv2 ViT-B/14-GeM at 518 px (DINOv2's grid), 8 per chip"),
    "pod_v5p": ("gem_resnet101_pod", dict(_TRAIN, **{"compile.topology": "v5p:8x8x8",
                                                    "compile.batch_per_chip": 32}),
                "pod recipe on v5p-512"),
}


def _config(module: str, overrides: dict):
  import importlib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f"configs.{module}").get_config()
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def run_case(name: str, out_dir: str) -> dict:
  from retrieval_jax import config_checks  # pylint: disable=import-outside-toplevel
  from retrieval_jax.aot import mode  # pylint: disable=import-outside-toplevel
  module, overrides, what = CASES[name]
  c = _config(module, dict(overrides, **{"compile.save_hlo": True}))
  config_checks.validate(c, "compile")
  t0 = time.time()
  try:
    summary = mode.run(c, os.path.join(out_dir, name))
    error = None
  except config_checks.ConfigError as e:  # Does not fit: the report is written anyway.
    summary, error = {}, str(e)
  reports = glob.glob(os.path.join(out_dir, name, "compile", "*.json"))
  with open(reports[0]) as f:
    report = json.load(f)
  row = {"case": name, "config": module, "overrides": {k: str(v) for k, v in overrides.items()},
         "what": what, "seconds": time.time() - t0, "error": error,
         "topology": report["topology"], "num_slices": report["num_slices"],
         "programs": [{k: e.get(k) for k in (
             "program", "shapes", "batch_per_chip", "hbm_bytes_per_chip", "fits",
             "flops_per_chip", "flops_per_item", "bytes_accessed", "hbm_traffic_bytes",
             "optimal_seconds", "roofline_seconds", "roofline_hbm_only_seconds", "roofline_terms_seconds", "predicted_images_per_second",
             "predicted_mfu", "compile_seconds", "memory_breakdown_bytes")}
             | {"collectives": {k: v for k, v in (e.get("collectives") or {}).items()
                                if v["count"]}} for e in report["programs"]],
         "max_batch": report.get("max_batch"), "summary": summary}
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(row, f, indent=1)
  return row


def hbm_only_mfu(e) -> str:
  """MFU at the HBM-only roofline (aot/hbm.py's traffic instead of XLA's bytes)."""
  t, mfu = e.get("roofline_hbm_only_seconds"), e.get("predicted_mfu")
  if not t or not mfu or not e.get("roofline_seconds"):
    return "-"
  return f"{100 * mfu * e['roofline_seconds'] / t:.1f}%"


def table(out_dir: str) -> str:
  lines = ["| case | topology | program | batch/chip | HBM GiB/chip | TFLOP/chip | GB accessed "
           "(XLA / HBM only) | roofline ms (compute/HBM/ICI/DCN) | XLA ms | images/s (global) "
           "| MFU (HBM-only bound) | compile s |",
           "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
    with open(path) as f:
      row = json.load(f)
    topo = row["topology"] + (f" x{row['num_slices']}" if row["num_slices"] > 1 else "")
    for e in row["programs"]:
      t = e.get("roofline_terms_seconds") or {}
      terms = "/".join(f"{t.get(k, 0) * 1e3:.1f}" for k in ("compute", "hbm", "ici", "dcn"))
      fmt = lambda v, s=1.0, p=".2f": "-" if v is None else format(v / s, p)
      lines.append(
          f"| {row['case']} | {topo} | {e['program']} | {e['batch_per_chip']} | "
          f"{fmt(e['hbm_bytes_per_chip'], 2 ** 30)} | {fmt(e.get('flops_per_chip'), 1e12, '.3f')} "
          f"| {fmt(e.get('bytes_accessed'), 1e9, '.1f')} / "
          f"{fmt(e.get('hbm_traffic_bytes'), 1e9, '.1f')} | "
          f"{fmt(e.get('roofline_seconds'), 1e-3, '.1f')} ({terms}) | "
          f"{fmt(e.get('optimal_seconds'), 1e-3, '.1f')} | "
          f"{fmt(e.get('predicted_images_per_second'), 1, '.0f')} | "
          f"{fmt(e.get('predicted_mfu'), 0.01, '.1f')}% ({hbm_only_mfu(e)}) | "
          f"{fmt(e.get('compile_seconds'), 1, '.0f')} |")
    if row.get("max_batch"):
      lines.append(f"| {row['case']} | {topo} | largest train batch per chip that fits: "
                   f"**{row['max_batch']['largest_batch_per_chip']}** (tried "
                   f"{row['max_batch']['tried']}) | | | | | | | | | |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", default="pod_v5e", help=f"comma list of {sorted(CASES)}")
  p.add_argument("--out_dir", default="/tmp/pod_compile")
  p.add_argument("--table", action="store_true", help="print the markdown of the done cases")
  a = p.parse_args()
  os.makedirs(a.out_dir, exist_ok=True)
  if a.table:
    print(table(a.out_dir))
    return
  for name in a.cases.split(","):
    row = run_case(name, a.out_dir)
    print(json.dumps({"case": name, "seconds": round(row["seconds"]), "error": row["error"]}),
          flush=True)


if __name__ == "__main__":
  main()
