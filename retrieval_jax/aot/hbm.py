"""HBM traffic of a compiled TPU program, read from its scheduled HLO.

XLA's `cost_analysis()["bytes accessed"]` sums every op's operand and result bytes wherever
they live; the TPU compiler keeps many of them in on-chip memory (layouts annotated `S(n)`,
n > 0: VMEM and other spaces), whose traffic never reaches HBM. This estimate sums, over the
top-level ops of the entry computation and of the loops and calls it runs, the bytes of the
operands and results in memory space 0 (HBM): every fusion reads its HBM operands once and
writes its HBM results once (async copies and collectives counted at their start / done, an
async slice by the slice it reads).
It is an estimate of the same kind as XLA's, not a measurement.
"""
import re
from typing import Dict, List, Set

_BLOCK = re.compile(r"^(ENTRY )?%([\w.-]+) ", re.M)
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.*?) ([a-z][\w-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\](\{[^}]*\})?")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "while", "conditional", "call", "opt-barrier",
         "add-dependency", "iota"}
_CALLED = re.compile(r"(?:body|condition|to_apply_call|true_computation|false_computation)="
                     r"%([\w.-]+)|branch_computations=\{([^}]*)\}")


def _all_array_bytes(shape: str):
  out = []
  for dtype, dims, _ in _ARRAY.findall(shape):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    out.append(n * _BYTES.get(dtype, 4))
  return out


def hbm_array_bytes(shape: str) -> float:
  """Bytes of the arrays of an HLO shape that live in HBM (no memory-space annotation)."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if layout and re.search(r"S\([1-9]\d*\)", layout):
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


def _blocks(text: str) -> Dict[str, str]:
  starts = [(m.start(), m.group(2), bool(m.group(1))) for m in _BLOCK.finditer(text)]
  out = {}
  for i, (pos, name, entry) in enumerate(starts):
    end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
    out["ENTRY" if entry else name] = text[pos:end]
  return out


def hbm_traffic_bytes(text: str) -> float:
  """Estimated bytes read from and written to HBM by one run of the program."""
  blocks = _blocks(text)
  if "ENTRY" not in blocks:
    return 0.0
  todo: List[str] = ["ENTRY"]
  seen: Set[str] = set()
  total = 0.0
  while todo:
    name = todo.pop()
    if name in seen or name not in blocks:
      continue
    seen.add(name)
    shapes: Dict[str, str] = {}
    instrs = []
    for line in blocks[name].splitlines()[1:]:
      m = _INSTR.match(line)
      if not m:
        continue
      iname, shape, op, rest = m.groups()
      shapes[iname] = shape
      instrs.append((op, shape, rest))
      if op in ("while", "conditional", "call"):
        for a, b in _CALLED.findall(rest):
          todo.extend([a] if a else [s.strip().lstrip("%") for s in b.split(",")])
    for op, shape, rest in instrs:
      if op in _FREE:
        continue
      args = rest.split(")", 1)[0]
      operands = sum(hbm_array_bytes(shapes.get(a, "")) for a in re.findall(r"%([\w.-]+)", args))
      if op == "slice-start":
        # ((operand), slice, context): only the slice is read from the operand.
        sizes = _all_array_bytes(shape)
        total += sizes[1] if operands and len(sizes) > 1 else 0.0
      elif op.endswith("-start"):
        total += operands
      elif op.endswith("-done"):
        total += hbm_array_bytes(shape)
      else:
        total += operands + hbm_array_bytes(shape)
  return total
