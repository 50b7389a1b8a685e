"""One program compiled for the topology: memory, cost, collectives and the roofline.

`roofline_seconds` is a LOWER BOUND: max(flops / the chip's bf16 peak, bytes accessed / its
HBM bandwidth) plus every collective's bytes sent per chip over the ICI (inside a slice) or
DCN (across slices) bandwidth of `chips.py` (no overlap of communication with compute is
assumed, but neither latency, nor imperfect overlap of compute and memory traffic). XLA's
own `optimal_seconds` is reported only when positive: it comes back negative for large
programs. The predicted throughput uses the larger of the two times.
"""
import re
import time
from typing import Any, Dict, Optional

from retrieval_jax import storage
from retrieval_jax.aot import chips as chips_lib
from retrieval_jax.aot import collectives as collectives_lib
from retrieval_jax.aot import hbm as hbm_lib
from retrieval_jax.aot import programs as programs_lib

# libtpu's refusals: "... required for HLO temporaries (36.53G) exceeds available HBM
# (15.75G)" or "Used 20.5G of 15.75G hbm".
_OOM = re.compile(r"(?:\(|Used )([\d.]+)([KMGT]?)i?B?\)? (?:exceeds available HBM|of [\d.]+"
                  r"[KMGT]?i?B? hbm)", re.I)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _oom_bytes(message: str) -> Optional[int]:
  """Bytes the compiler needed, from a TPU "Ran out of memory in memory space hbm" error."""
  m = _OOM.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * _UNIT[m.group(2).upper()])


def _cost(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyse(program: programs_lib.Program, mesh, chip: chips_lib.Chip,
            num_slices: int = 1, hlo_path: Optional[str] = None) -> Dict[str, Any]:
  """The report entry of `program` (see the module docstring and report.FIELDS); with
  `hlo_path`, the partitioned HLO is written there too."""
  t0 = time.time()
  entry: Dict[str, Any] = {"program": program.name, "shapes": program.shapes,
                           "batch_per_chip": program.batch_per_chip,
                           "items_per_call": program.items, "unit": program.unit,
                           "notes": list(program.notes),
                           "hbm_capacity_bytes": chip.hbm_bytes}
  try:
    compiled = program.fn.lower(*program.args).compile()
  except Exception as e:  # pylint: disable=broad-except
    needed = _oom_bytes(str(e))
    if needed is None:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      needed = chip.hbm_bytes + 1  # Refused for memory, without a figure.
    # The TPU compiler refuses a program that cannot fit HBM: that is the answer.
    entry.update(hbm_bytes_per_chip=needed, fits=False, compile_seconds=time.time() - t0,
                 error=" ".join(str(e).split())[:300])
    return entry
  entry["compile_seconds"] = time.time() - t0
  mem = compiled.memory_analysis()
  memory = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
            "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
            "code": int(mem.generated_code_size_in_bytes)}
  # Donated outputs alias their arguments: counted once.
  hbm = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
         + memory["code"])
  cost = _cost(compiled)
  flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  optimal = float(cost.get("optimal_seconds", -1.0))
  text = compiled.as_text()
  if hlo_path:
    storage.write_text(hlo_path, text)
  colls = collectives_lib.parse(text, mesh.devices.shape, mesh.axis_names, num_slices)
  # XLA's bytes include on-chip (VMEM) operands; hbm.py keeps those in HBM only.
  hbm_traffic = hbm_lib.hbm_traffic_bytes(text)
  ici_s = sum(c["ici_wire_bytes"] for c in colls.values()) / chip.ici_bytes_per_s
  dcn_s = sum(c["dcn_wire_bytes"] for c in colls.values()) / chip.dcn_bytes_per_s
  compute_s, memory_s = flops / chip.bf16_flops, bytes_accessed / chip.hbm_bytes_per_s
  roofline = max(compute_s, memory_s) + ici_s + dcn_s
  predicted = max(roofline, optimal if optimal > 0 else 0.0)
  chips = int(mesh.devices.size)
  entry.update(
      hbm_bytes_per_chip=int(hbm), memory_breakdown_bytes=memory, fits=bool(hbm <= chip.hbm_bytes),
      flops_per_chip=flops, flops_per_item=flops * chips / max(program.items, 1),
      bytes_accessed=bytes_accessed, hbm_traffic_bytes=hbm_traffic,
      optimal_seconds=optimal if optimal > 0 else None,
      roofline_seconds=roofline,
      roofline_terms_seconds={"compute": compute_s, "hbm": memory_s, "ici": ici_s, "dcn": dcn_s,
                              "hbm_only_traffic": hbm_traffic / chip.hbm_bytes_per_s},
      # The same bound with hbm.py's HBM-only traffic: what the step costs if on-chip
      # operands are free (an optimistic reading; the spec's roofline_seconds is above).
      roofline_hbm_only_seconds=max(compute_s, hbm_traffic / chip.hbm_bytes_per_s) + ici_s
      + dcn_s,
      bound="compute" if compute_s >= memory_s else "memory",
      predicted_seconds=predicted,
      predicted_images_per_second=program.items / predicted if predicted > 0 else None,
      predicted_mfu=flops / (predicted * chip.bf16_flops) if predicted > 0 else None,
      collectives={k: {"count": v["count"], "bytes": v["bytes"],
                       "wire_bytes_per_chip": v["ici_wire_bytes"] + v["dcn_wire_bytes"],
                       "axes": v["axes"]} for k, v in colls.items()},
      collective_ops=[{"kind": k, "bytes": b, "group": n, "axes": a}
                      for k, v in colls.items() for b, n, a in v["ops"]])
  return entry
