#!/usr/bin/env bash
# The demo on a fresh machine: set up, train (evaluating before and after), then restore the
# final checkpoint in a fresh process, extract and evaluate again. ~5-10 minutes on 2 CPU cores.
#   bash launch/demo.sh [WORKDIR] [extra --config.x=y overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
WORKDIR=${1:-workdir/demo}
shift || true
python main.py --config=configs/demo.py --workdir="$WORKDIR" "$@"
python main.py --config=configs/demo.py --workdir="$WORKDIR" --mode=evaluate "$@" \
  | tee "$WORKDIR/evaluate_summary.json"
python - "$WORKDIR" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/results/train_summary.json"))
e = json.load(open(sys.argv[1] + "/results/" + sorted(
    f for f in __import__("os").listdir(sys.argv[1] + "/results")
    if f.startswith("evaluate_step") and f.endswith(".json"))[-1]))
print(f"demo held-out mAP: before fine-tuning {s['before']['mAP']:.2f}, "
      f"after (restored in a fresh process) {e['mAP']:.2f}")
PY
