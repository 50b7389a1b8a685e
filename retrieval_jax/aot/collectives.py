"""The collectives of a compiled program, read from its partitioned HLO (`compiled.as_text()`).

Per kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute): how many,
their bytes per chip (the op's result; a reduce-scatter's input), the bytes one chip sends
(ring algorithms: (n-1)/n of the data, twice for an all-reduce), and which mesh axes the
devices of one replica group differ along. On a multislice topology XLA compiles one
slice's program: collectives inside a slice keep their replica groups (slice-local device
ids), and what crosses slices becomes a Megascale host transfer over DCN (a `send` tagged
`_xla_megascale_transfer_type`), counted here under its kind with the axis "slice".
"""
import collections
import re
from typing import Dict, List, Sequence

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
                 r"collective-permute)(?P<start>-start)?\(")
_SEND = re.compile(r"=\s*(?P<shape>\(.+?\))\s+send\(.*_xla_megascale_transfer_type=\"(?P<kind>\w+)\"")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_MEGASCALE_KIND = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather",
                   "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}


def _arrays(shape: str) -> List[float]:
  """Bytes of every array in an HLO shape (one array or a tuple)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append(n * _BYTES[dtype])
  return out


def parse_groups(line: str, num_partitions: int) -> List[List[int]]:
  """The replica groups (or collective-permute's source-target pairs) of one HLO line."""
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    groups, size = int(iota.group(1)), int(iota.group(2))
    dims = [int(d) for d in iota.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
    return ids.reshape(groups, size).tolist()
  listed = re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}", line)
  if listed and listed.group(1):
    return [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}",
                                                                      listed.group(1))]
  return [list(range(num_partitions))]


def axes_crossed(groups: Sequence[Sequence[int]], mesh_shape: Sequence[int],
                 axis_names: Sequence[str]) -> List[str]:
  """Mesh axes along which the devices of one group differ (ids: flat mesh positions)."""
  total = int(np.prod(mesh_shape))
  crossed = set()
  for g in groups:
    ids = [i for i in g if i < total]
    if len(ids) < 2:
      continue
    coords = np.array(np.unravel_index(ids, tuple(mesh_shape))).T
    for a, name in enumerate(axis_names):
      if len(set(coords[:, a])) > 1:
        crossed.add(name)
  return [n for n in axis_names if n in crossed]


def _wire_bytes(kind: str, size: float, n: int) -> float:
  """Bytes one chip sends for a ring collective of `size` result bytes over `n` devices."""
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * size * (n - 1) / n
  if kind == "reduce-scatter":
    return size * (n - 1)  # `size` is the scattered result: the input is n times it.
  if kind == "collective-permute":
    return size
  return size * (n - 1) / n  # all-gather (size = gathered result), all-to-all


def parse(hlo_text: str, mesh_shape: Sequence[int], axis_names: Sequence[str],
          num_slices: int = 1, slice_axis: str = "slice") -> Dict[str, dict]:
  """{kind: {"count", "bytes", "ici_wire_bytes", "dcn_wire_bytes", "axes", "ops"}} of
  `hlo_text`; "ops" lists each op as (bytes, group size, axes) for the report's details."""
  m = _PARTITIONS.search(hlo_text)
  num_partitions = int(m.group(1)) if m else int(np.prod(mesh_shape))
  out = collections.OrderedDict(
      (k, {"count": 0, "bytes": 0.0, "ici_wire_bytes": 0.0, "dcn_wire_bytes": 0.0, "axes": [],
           "ops": []}) for k in KINDS)
  for line in hlo_text.splitlines():
    if "-done(" in line:
      continue
    op = _OP.search(line)
    if op:
      kind, arrays = op.group("op"), _arrays(op.group("shape"))
      if op.group("start") and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
        arrays = arrays[len(arrays) // 2:]  # (operands, results[, context]): the results.
      size = float(sum(arrays))
      groups = parse_groups(line, num_partitions)
      n = len(groups[0]) if kind != "collective-permute" else 2
      axes = axes_crossed(groups, mesh_shape, axis_names)
      entry = out[kind]
      entry["ici_wire_bytes"] += _wire_bytes(kind, size, n)
    else:
      send = _SEND.search(line)
      if not send or send.group("kind") not in _MEGASCALE_KIND:
        continue
      kind = _MEGASCALE_KIND[send.group("kind")]
      arrays = _arrays(send.group("shape"))
      size = float(arrays[0]) if arrays else 0.0
      n, axes = int(num_slices), [slice_axis]
      entry = out[kind]
      entry["dcn_wire_bytes"] += _wire_bytes(kind, size if kind != "all-gather" else size * n,
                                             n)
    entry["count"] += 1
    entry["bytes"] += size
    entry["axes"] = [a for a in axis_names if a in set(entry["axes"]) | set(axes)]
    entry["ops"].append((size, n, axes))
  return out
