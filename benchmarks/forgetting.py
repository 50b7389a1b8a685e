"""Fine-tuning that does not forget (issue 22): the demo's recipe chosen on validation splits.

  python benchmarks/forgetting.py --workdir=/tmp/forgetting                # every candidate
  python benchmarks/forgetting.py --workdir=/tmp/forgetting --candidates=lr1e-6,lr1e-5
  python benchmarks/forgetting.py --workdir=/tmp/forgetting --long_side=640  # evaluate at 640

Each candidate recipe (a set of `--config.*` overrides of configs/demo.py) fine-tunes the
ImageNet MobileNetV2-GeM on the demo's training landmarks, evaluated every `--eval_every`
steps on the VALIDATION splits only: 'val' (held-out synthetic landmarks) and 'val_real'
(real multi-view groups: different photos of places none of the training photos show). A
(candidate, step) qualifies when its val_real mAP is at most `--max_drop` below the
off-the-shelf network's; among those the largest val gain wins. The test splits ('test',
'real') are evaluated once, for the winner only (`--mode=evaluate` on its checkpoint), so
nothing is chosen on them. Prints one table and writes <workdir>/forgetting.json.

A constant learning rate makes step k of a longer run the same network as a run of k steps
(the batches are seeded by step), so the periodic evaluations also choose the length.
"""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> overrides of configs/demo.py. The old recipe first: lr 1e-5 (20 x
# cnnimageretrieval-pytorch's 5e-7 for Adam), GeM p learned at 10 x lr.
CANDIDATES: Dict[str, List[str]] = {
    "lr1e-5": ["--config.optim.lr=1e-5", "--config.model.pooling_kwargs.trainable=True"],
    "lr1e-5_p_fixed": ["--config.optim.lr=1e-5",
                       "--config.model.pooling_kwargs.trainable=False"],
    "lr1e-6": ["--config.optim.lr=1e-6", "--config.model.pooling_kwargs.trainable=True"],
    "lr1e-6_p_fixed": ["--config.optim.lr=1e-6",
                       "--config.model.pooling_kwargs.trainable=False"],
    "lr3e-6_p_fixed": ["--config.optim.lr=3e-6",
                       "--config.model.pooling_kwargs.trainable=False"],
}


def _main_py(workdir: str, args: List[str], log: str) -> None:
  cmd = [sys.executable, os.path.join(REPO, "main.py"),
         f"--config={os.path.join(REPO, 'configs', 'demo.py')}", f"--workdir={workdir}",
         f"--config.data.root={os.path.join(os.path.dirname(workdir), 'data')}",
         "--config.eval.pictures=0"] + args
  print("$", " ".join(cmd), flush=True)
  with open(log, "a") as f:
    subprocess.run(cmd, check=True, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _read(path: str) -> Dict:
  with open(path) as f:
    return json.load(f)


def run_candidate(root: str, name: str, steps: int, eval_every: int, extract: List[str]
                  ) -> List[Dict]:
  """Trains candidate `name` (resuming if already there); its validation rows by step."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir, exist_ok=True)
  _main_py(workdir, CANDIDATES[name] + extract + [
      "--config.eval.split=val", "--config.eval.extra_splits=('val_real',)",
      f"--config.train.num_steps={steps}", f"--config.train.eval_every={eval_every}",
      f"--config.train.checkpoint_every={eval_every}",
      f"--config.train.keep_checkpoints={steps // eval_every + 1}"],
           os.path.join(workdir, "log.txt"))
  results = os.path.join(workdir, "results")
  before = _read(os.path.join(results, "before.json"))
  rows = []
  for step in range(eval_every, steps + 1, eval_every):
    tag = "after" if step == steps else f"step{step}"
    got = _read(os.path.join(results, f"{tag}.json"))
    rows.append(dict(candidate=name, step=step,
                     val_before=before["mAP"], val_after=got["mAP"],
                     val_real_before=before["val_real"]["mAP"],
                     val_real_after=got["val_real"]["mAP"]))
  return rows


def choose(rows: List[Dict], max_drop: float) -> Dict:
  """The largest val gain among rows whose val_real drop is at most `max_drop` (validation
  numbers only); None when no row qualifies."""
  ok = [r for r in rows
        if r["val_real_after"] >= r["val_real_before"] - max_drop and
        r["val_after"] > r["val_before"]]
  return max(ok, key=lambda r: r["val_after"]) if ok else None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--candidates", default=",".join(CANDIDATES))
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--max_drop", type=float, default=1.0)
  p.add_argument("--long_side", type=int, default=0, help="extract.long_side; 0: the demo's")
  a = p.parse_args(argv)
  root = os.path.abspath(a.workdir)
  extract = [f"--config.extract.long_side={a.long_side}"] if a.long_side else []
  rows = []
  for name in a.candidates.split(","):
    if name not in CANDIDATES:
      raise SystemExit(f"--candidates: unknown {name!r}; known: {', '.join(CANDIDATES)}")
    rows += run_candidate(root, name, a.steps, a.eval_every, extract)
  print(f"{'candidate':<16} {'step':>5} {'val':>15} {'val_real':>15}")
  for r in rows:
    print(f"{r['candidate']:<16} {r['step']:>5} {r['val_before']:6.2f} -> {r['val_after']:6.2f}"
          f" {r['val_real_before']:6.2f} -> {r['val_real_after']:6.2f}")
  best = choose(rows, a.max_drop)
  report = {"rows": rows, "chosen": best, "max_drop": a.max_drop, "long_side": a.long_side}
  if best is None:
    print(f"no candidate keeps val_real within {a.max_drop} mAP while raising val")
  else:
    # The test splits, once, for the chosen network only.
    workdir = os.path.join(root, best["candidate"])
    _main_py(workdir, CANDIDATES[best["candidate"]] + extract + [
        "--mode=evaluate", "--config.eval.split=test", "--config.eval.extra_splits=('real',)",
        f"--config.extract.checkpoint_step={best['step']}"], os.path.join(workdir, "log.txt"))
    after = _read(os.path.join(workdir, "results", f"evaluate_step{best['step']}.json"))
    pre = os.path.join(root, "pretrained")
    os.makedirs(pre, exist_ok=True)
    _main_py(pre, extract + ["--mode=evaluate", "--config.eval.split=test",
                             "--config.eval.extra_splits=('real',)"],
             os.path.join(pre, "log.txt"))
    before = _read(os.path.join(pre, "results", "evaluate_pretrained.json"))
    report["test"] = {"test_before": before["mAP"], "test_after": after["mAP"],
                      "real_before": before["real"]["mAP"], "real_after": after["real"]["mAP"]}
    t = report["test"]
    print(f"chosen on validation: {best['candidate']} at {best['step']} steps; test: "
          f"synthetic {t['test_before']:.2f} -> {t['test_after']:.2f}, "
          f"real views {t['real_before']:.2f} -> {t['real_after']:.2f}")
  with open(os.path.join(root, "forgetting.json"), "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
