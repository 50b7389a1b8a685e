"""The compile report: a table on stdout, `<workdir>/compile/<topology>[_x<slices>].json`, and
the one-line refusal of a program that does not fit the chip's HBM."""
import json
import os
from typing import Any, Dict, List

from retrieval_jax import config_checks
from retrieval_jax import storage
from retrieval_jax.aot import chips as chips_lib

GIB = float(1 << 30)
# Every program entry carries these (None where a value does not exist, e.g. XLA's
# optimal_seconds when it is not positive).
FIELDS = ("hbm_bytes_per_chip", "hbm_capacity_bytes", "fits", "flops_per_chip",
          "bytes_accessed", "optimal_seconds", "roofline_seconds",
          "predicted_images_per_second", "predicted_mfu", "collectives")
ROOFLINE_NOTE = ("roofline_seconds is a lower bound: max(flops / bf16 peak, bytes accessed / "
                 "HBM bandwidth) + collective bytes sent per chip / ICI or DCN bandwidth, with "
                 "the chip figures of retrieval_jax/aot/chips.py (Cloud TPU documentation); "
                 "predictions use max(roofline_seconds, XLA's optimal_seconds when positive)")


def file_name(topology: str, num_slices: int) -> str:
  name = topology.replace(":", "_")
  return f"{name}_x{num_slices}.json" if num_slices > 1 else f"{name}.json"


def write(workdir: str, report: Dict[str, Any]) -> str:
  path = os.path.join(workdir, "compile", file_name(report["topology"], report["num_slices"]))
  storage.write_text(path, json.dumps(report, indent=1, default=float))
  return path


def _fmt(v, scale=1.0, spec=".2f") -> str:
  return "-" if v is None else format(v / scale, spec)


def table(entries: List[Dict[str, Any]]) -> str:
  """One line per program: HBM, fit, TFLOP, GB moved, times, throughput, MFU, collectives."""
  head = (f"{'program':<28} {'HBM GiB':>8} {'fits':>5} {'TFLOP':>8} {'GB acc':>8} "
          f"{'roof ms':>9} {'xla ms':>8} {'items/s':>10} {'MFU':>6}  collectives")
  lines = [head, "-" * len(head)]
  for e in entries:
    colls = ", ".join(f"{k} x{v['count']} {v['bytes'] / 1e6:.1f}MB[{'/'.join(v['axes'])}]"
                      for k, v in (e.get("collectives") or {}).items() if v["count"])
    lines.append(
        f"{e['program']:<28} {_fmt(e.get('hbm_bytes_per_chip'), GIB):>8} "
        f"{str(e.get('fits')):>5} {_fmt(e.get('flops_per_chip'), 1e12, '.3f'):>8} "
        f"{_fmt(e.get('bytes_accessed'), 1e9):>8} {_fmt(e.get('roofline_seconds'), 1e-3):>9} "
        f"{_fmt(e.get('optimal_seconds'), 1e-3):>8} "
        f"{_fmt(e.get('predicted_images_per_second'), 1, '.1f'):>10} "
        f"{_fmt(e.get('predicted_mfu'), 0.01, '.1f'):>5}%  {colls}")
  return "\n".join(lines)


def check_fits(entries: List[Dict[str, Any]], chip: chips_lib.Chip) -> None:
  """Raises a one-line ConfigError for the first program that does not fit the chip's HBM."""
  for e in entries:
    if e.get("fits") is False:
      if e["program"] == "train":
        change = ("lower --config.compile.batch_per_chip (or the config's batch; "
                  "--config.compile.max_batch=True finds the largest), use "
                  "--config.model.dtype=bfloat16, or freeze/remat the trunk")
      elif e["program"] == "search":
        change = "lower compile.search_query_batch or shard the database over more chips"
      else:
        change = ("lower --config.extract.batch_size, use --config.model.dtype=bfloat16, or "
                  "fewer/smaller extract.scales")
      raise config_checks.ConfigError(
          f"program {e['program']} ({e.get('shapes', '')}) needs "
          f"{'at least ' if e.get('error') else ''}{e['hbm_bytes_per_chip'] / GIB:.2f} GiB of HBM per chip, the {chip.name} chip "
          f"has {chip.hbm_bytes / GIB:.0f} GiB: {change}")
