"""SuperGlobal's training-free pieces on the demo set: off-the-shelf MobileNetV2-GeM and each
change, with and without SuperGlobal re-ranking; a markdown table.

    python benchmarks/superglobal_demo.py --workdir=/tmp/sg_demo
    python benchmarks/superglobal_demo.py --workdir=/tmp/sg_demo --variants=gem,sgem --json=a.json

Every row is one `--mode=evaluate` of configs/demo.py with no checkpoint (the ImageNet weights
as they are) and the row's overrides plus `--config.eval.rerank=superglobal`, i.e. exactly

    python main.py --config=configs/demo.py --workdir=W --mode=evaluate \
        --config.eval.rerank=superglobal --config.eval.superglobal_m=<M> <the row's flags>

which reports the global mAP and, from the same descriptors, the re-ranked one. The demo's
database is small, so SuperGlobal's M (400 in the paper) is the whole database by default
(`--m`); K and beta stay the paper's (9, 0.15). The data set is built once in
`<workdir>/data` (retrieval_jax/data/demo.py) and named in the table's caption by its build
key and file fingerprint, since the demo set changes from time to time.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# SuperGlobal's three scales (the official test.py: 2^-1/2, 1, 2^1/2).
SG_SCALES = (0.7071, 1.0, 1.4142)
_GEM_PLUS = {"model.pooling_kwargs.p_init": 4.6, "model.pooling_kwargs.trainable": False}
_RELU_PLUS = {"model.relup_alpha": 0.014}
_RGEM = {"model.regional_gem": True}
_SGEM = {"extract.scales": SG_SCALES, "extract.multiscale_combine": "sgem"}
# name -> (what, overrides of configs/demo.py), in the table's order.
VARIANTS: Dict[str, Tuple[str, Dict]] = {
    "gem": ("GeM (the demo's network, p = 3 as initialised, 1 scale)", {}),
    "gem_plus": ("GeM+ (fixed p = 4.6)", _GEM_PLUS),
    "relu_plus": ("ReLU+ (map clamped below at 0.014)", _RELU_PLUS),
    "rgem": ("regional GeM (p 2.5, 5 x 5)", _RGEM),
    "ms_gem": ("3 scales combined by GeM (the reference's multi-scale)",
               {"extract.scales": SG_SCALES}),
    "sgem": ("3 scales combined by scale-GeM (max of L2-normalised)", _SGEM),
    "all": ("GeM+ + ReLU+ + regional GeM + scale-GeM", dict(_GEM_PLUS, **_RELU_PLUS, **_RGEM,
                                                            **_SGEM)),
}
HEADER = ("variant", "flags", "mAP", "mAP + SuperGlobal")


def _set(config, key: str, value) -> None:
  node = config
  *parents, last = key.split(".")
  for p in parents:
    node = node[p]
  if last not in node:
    raise KeyError(f"{key}: not a field of the config")
  node[last] = value


def flags(overrides: Dict) -> str:
  """The overrides as main.py flags."""
  out = []
  for k, v in overrides.items():
    v = f"'{tuple(v)}'" if isinstance(v, (tuple, list)) else v
    out.append(f"--config.{k}={v}")
  return " ".join(out)


def demo_config(overrides: Dict, m: int, base: Optional[Dict] = None):
  """configs/demo.py with `base` then `overrides`, evaluated with SuperGlobal (M = `m`)."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.get_config()
  for k, v in dict(base or {}, **{"eval.rerank": "superglobal", "eval.superglobal_m": m,
                                  "eval.pictures": 0}, **overrides).items():
    _set(c, k, v)
  return c


def describe_demo_set(data_root: str, seed: int = 0) -> Dict:
  """What the table was measured on: the demo set's build key, sizes and fingerprint."""
  # pylint: disable=import-outside-toplevel
  from retrieval_jax.data import demo
  folder = demo.build(data_root, seed)
  test = demo.load(data_root, "test", seed)
  with open(os.path.join(folder, "meta.json")) as f:
    key = json.load(f)["key"]
  return {"key": key, "queries": len(test.query_images), "database": len(test.db_images),
          "held_out_landmarks": len(set(test.query_labels.tolist())),
          "fingerprint": demo.fingerprint(folder)[:12]}


def run_variants(workdir: str, names: Sequence[str], m: int = 0,
                 base: Optional[Dict] = None) -> Dict:
  """Evaluates each variant (a fresh workdir each, one shared data folder).

  Args:
    workdir: where the data set and the variants' results go.
    names: keys of VARIANTS.
    m: SuperGlobal's M; 0 = the whole database.
    base: overrides applied to every variant first (the tests shrink the images).
  Returns:
    {"demo_set": describe_demo_set(...), "m": M, "rows": [{variant, what, flags, mAP,
     mAP_superglobal}]}.
  """
  # pylint: disable=import-outside-toplevel
  from retrieval_jax import run
  from retrieval_jax.modes import common as modes_common
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  data_root = os.path.join(workdir, "data")
  demo_set = describe_demo_set(data_root)
  m = int(m) or demo_set["database"]
  base = dict(base or {}, **{"data.root": data_root})
  rows = []
  for name in names:
    what, overrides = VARIANTS[name]
    c = demo_config(overrides, m, base)
    summary = run.run("evaluate", c, os.path.join(workdir, name))
    result = summary[modes_common.OFF_THE_SHELF]
    rows.append({"variant": name, "what": what, "flags": flags(overrides),
                 "mAP": float(result["mAP"]), "mAP_superglobal": float(result["mAP_superglobal"])})
  return {"demo_set": demo_set, "m": m, "rows": rows}


def caption(report: Dict) -> str:
  s = report["demo_set"]
  return (f"Demo set {json.dumps(s['key'], sort_keys=True)} (files sha256 "
          f"{s['fingerprint']}...): {s['queries']} queries, {s['database']} database images, "
          f"{s['held_out_landmarks']} held-out landmarks. SuperGlobal M={report['m']} K=9 "
          "beta=0.15.")


def markdown(report: Dict) -> str:
  lines = [caption(report), "", "| " + " | ".join(HEADER) + " |", "|---|---|---:|---:|"]
  for r in report["rows"]:
    lines.append(f"| {r['what']} | `{r['flags'] or '(none)'}` | {r['mAP']:.2f} | "
                 f"{r['mAP_superglobal']:.2f} |")
  return "\n".join(lines)


def parse_table(text: str) -> List[Dict]:
  """The rows of a table `markdown` wrote: [{variant text, flags, mAP, mAP + SuperGlobal}]."""
  rows = [l for l in text.splitlines() if l.startswith("| ")]
  header = [h.strip() for h in rows[0].strip("|").split("|")]
  if tuple(header) != HEADER:
    raise ValueError(f"not a superglobal_demo table: header {header}")
  out = []
  for line in rows[1:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != len(HEADER):
      raise ValueError(f"row with {len(cells)} cells, want {len(HEADER)}: {line}")
    out.append({"variant": cells[0], "flags": cells[1].strip("`"), "mAP": float(cells[2]),
                "mAP + SuperGlobal": float(cells[3])})
  return out


def main(argv=None) -> Dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/superglobal_demo")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
  p.add_argument("--m", type=int, default=0, help="SuperGlobal's M (0: the whole database)")
  p.add_argument("--long_side", type=int, default=0,
                 help="extract.long_side (0: the demo config's 192; the tests use 64)")
  p.add_argument("--json", default="", help="also write the report here")
  p.add_argument("--markdown", default="", help="also write the table here")
  a = p.parse_args(argv)
  base = {"extract.long_side": a.long_side} if a.long_side else {}
  report = run_variants(a.workdir, [n for n in a.variants.split(",") if n], a.m, base)
  table = markdown(report)
  print(table)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=1)
  if a.markdown:
    with open(a.markdown, "w") as f:
      f.write(table + "\n")
  return report


if __name__ == "__main__":
  main()
