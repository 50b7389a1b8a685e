"""Per-chip figures of the TPU generations the compile mode rehearses, with their sources.

Bandwidths are one-way bytes/s per chip: a ring collective moves each byte once per chip in
one direction. Sources (Cloud TPU system architecture pages, read 2026-12):
  v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s;
       ICI from "all-reduce bandwidth per Pod 1.1 PB/s" over 4096 chips (~268 GB/s); DCN per
       chip not published: taken as v5p's 50 Gbps.
  v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s, 16 GiB at 819 GB/s, bidirectional
       ICI 400 GB/s per chip (200 GB/s one way = "all-reduce bandwidth per Pod 51.2 TB/s" /
       256); DCN: 2 x 100 Gbps NICs per 8-chip host = 25 Gbps per chip.
  v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s, 95 GiB at 2765 GB/s, bidirectional
       ICI 1200 GB/s per chip, DCN 50 Gbps per chip.
  v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 32 GiB at 1640 GB/s, bidirectional
       ICI 800 GB/s per chip ("all-reduce bandwidth per Pod 102.4 TB/s" / 256 = 400 GB/s);
       DCN not in the table: taken as 100 Gbps per chip.
"""
import dataclasses
from typing import Dict

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int                 # HBM capacity per chip
  bf16_flops: float              # peak bf16 FLOP/s per chip
  hbm_bytes_per_s: float         # HBM bandwidth
  ici_bytes_per_s: float         # one-way inter-chip interconnect bandwidth per chip
  dcn_bytes_per_s: float         # data-centre network bandwidth per chip (between slices)
  source: str


CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 1.1e15 / 4096, 50e9 / 8,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 200e9, 25e9 / 8,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 600e9, 50e9 / 8,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 400e9, 100e9 / 8,
                "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as "v5e:16x16" (the part before the colon)."""
  name = topology.split(":")[0].lower()
  if name not in CHIPS:
    raise ValueError(f"unknown TPU generation {name!r} in topology {topology!r}; known: "
                     f"{sorted(CHIPS)}")
  return CHIPS[name]
