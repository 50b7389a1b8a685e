#!/usr/bin/env bash
# The demo on a fresh machine: set up, train (evaluating before and after), then restore the
# final checkpoint in a fresh process, extract and evaluate again. ~6 minutes on 2 CPU cores
# once the environment is installed.
#   bash launch/demo.sh [WORKDIR] [extra --config.x=y overrides]
# Running it again in the same WORKDIR resumes (or, if finished, only re-evaluates).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP=demo bash launch/setup_env.sh
. .venv/bin/activate
WORKDIR=${1:-workdir/demo}
shift || true
# Compiled programs are kept in the workdir: the evaluate process (and any rerun) loads the
# extraction programs the training process compiled instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(realpath -m "$WORKDIR")/xla_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.3}"
python main.py --config=configs/demo.py --workdir="$WORKDIR" "$@"
python main.py --config=configs/demo.py --workdir="$WORKDIR" --mode=evaluate "$@"
python - "$WORKDIR" <<'PY'
import glob, json, os, re, sys
results = os.path.join(sys.argv[1], "results")
before = json.load(open(os.path.join(results, "before.json")))
# The newest evaluation: the highest checkpoint step, compared as a number.
evals = glob.glob(os.path.join(results, "evaluate_step*.json"))
last = max(evals, key=lambda f: int(re.search(r"evaluate_step(\d+)\.json$", f).group(1)))
after = json.load(open(last))
print(f"demo held-out mAP: before fine-tuning {before['mAP']:.2f}, "
      f"after (restored in a fresh process) {after['mAP']:.2f}")
# The real multi-view photos of unseen places (eval.extra_splits): what fine-tuning forgets.
if "real" in before and "real" in after:
  print(f"demo real-views mAP: before fine-tuning {before['real']['mAP']:.2f}, "
        f"after {after['real']['mAP']:.2f}")
PY
