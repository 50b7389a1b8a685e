"""`--mode=compile`: every program of a run compiled for a TPU topology on this machine.

  python main.py --config=configs/gem_resnet101.py --workdir=W --mode=compile \
      --config.compile.topology=v5e:16x16 [--config.compile.num_slices=2] \
      [--config.compile.max_batch=True]

Nothing executes and no dataset is read. Writes W/compile/<topology>[_x<slices>].json, prints
the table, and exits 2 with one line when a program does not fit the chip's HBM.
"""
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging

from retrieval_jax.aot import analysis
from retrieval_jax.aot import chips as chips_lib
from retrieval_jax.aot import programs as programs_lib
from retrieval_jax.aot import report as report_lib
from retrieval_jax.aot import topology


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 1
                    ) -> Tuple[int, Dict[int, bool]]:
  """The largest b in [1, limit] with fits(b) (fits monotone), by doubling then bisection;
  0 if even 1 does not fit. Returns it and every b tried."""
  tried: Dict[int, bool] = {}

  def check(b):
    if b not in tried:
      tried[b] = bool(fits(b))
    return tried[b]

  b = max(1, min(start, limit))
  lo, hi = (b, None) if check(b) else (0, b)  # lo fits (0: none known); hi does not.
  while hi is None:
    if lo >= limit:
      return lo, tried
    b = min(2 * lo, limit)
    if check(b):
      lo = b
    else:
      hi = b
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if check(mid):
      lo = mid
    else:
      hi = mid
  return lo, tried


def _max_batch(config, mesh, chip, num_slices: int, start: int) -> Dict[str, Any]:
  def fits(b):
    entry = analysis.analyse(programs_lib.train_program(config, mesh, b), mesh, chip, num_slices)
    logging.info("train batch %d per chip: %.2f GiB, fits=%s", b,
                 entry["hbm_bytes_per_chip"] / report_lib.GIB, entry["fits"])
    return entry["fits"]

  best, tried = largest_fitting(fits, int(config.compile.max_batch_limit), start)
  return {"largest_batch_per_chip": best, "tried": {str(k): v for k, v in sorted(tried.items())},
          "limit": int(config.compile.max_batch_limit)}


def run(config, workdir: str) -> Dict[str, Any]:
  """The compile mode (see the module docstring); returns the JSON summary main.py prints."""
  c = config.compile
  t0 = time.time()
  chip = chips_lib.chip_of(c.topology)
  devices = topology.topology_devices(c.topology, int(c.num_slices))
  mesh = topology.make_mesh(devices, config.mesh.shape, config.mesh.axes, int(c.num_slices))
  entries = []
  hlo_dir = os.path.join(workdir, "compile", report_lib.file_name(
      c.topology, int(c.num_slices))[:-len(".json")]) if c.save_hlo else None
  for program in programs_lib.build(config, mesh, tuple(c.programs)):
    logging.info("compiling %s (%s) for %s", program.name, program.shapes, c.topology)
    entries.append(analysis.analyse(
        program, mesh, chip, int(c.num_slices),
        hlo_path=os.path.join(hlo_dir, f"{program.name}.hlo.txt") if hlo_dir else None))
  max_batch: Optional[Dict[str, Any]] = None
  train = [e for e in entries if e["program"] == "train"]
  if c.max_batch and "train" in c.programs:
    max_batch = _max_batch(config, mesh, chip, int(c.num_slices),
                           train[0]["batch_per_chip"] if train else 1)
  report = {"topology": c.topology, "num_slices": int(c.num_slices),
            "chips": int(mesh.devices.size), "mesh": dict(mesh.shape),
            "chip": {k: v for k, v in vars(chip).items()},
            "model": {"backbone": config.model.backbone, "dtype": config.model.dtype,
                      "image_size": int(config.data.image_size)},
            "mining": {"train.mining": config.train.mining,
                       "loss.mining_scope": config.loss.get("mining_scope", "global")},
            "note": report_lib.ROOFLINE_NOTE, "programs": entries,
            "max_batch": max_batch, "seconds": time.time() - t0}
  path = report_lib.write(workdir, report)
  print(f"{c.topology} x{c.num_slices} slice(s), {mesh.devices.size} chips, mesh "
        f"{dict(mesh.shape)}; {report_lib.ROOFLINE_NOTE}")
  print(report_lib.table(entries))
  if max_batch is not None:
    print(f"largest train batch per chip that fits: {max_batch['largest_batch_per_chip']} "
          f"(tried {max_batch['tried']})")
  print(f"report: {path}")
  report_lib.check_fits(entries, chip)
  summary = {"report": path, "chips": int(mesh.devices.size)}
  for e in entries:
    summary[e["program"]] = {k: e.get(k) for k in ("hbm_bytes_per_chip", "fits",
                                                   "predicted_images_per_second",
                                                   "predicted_mfu")}
  if max_batch is not None:
    summary["largest_batch_per_chip"] = max_batch["largest_batch_per_chip"]
  return summary
