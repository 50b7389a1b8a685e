#!/usr/bin/env bash
# Multi-node GPU training: run this on every node (e.g. from a SLURM array or by hand).
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 CONFIG=configs/gem_resnet101.py \
#     WORKDIR=/shared/run bash launch/gpu_multinode.sh --config.data.root=/data
# Under SLURM, jax.distributed reads SLURM_* variables itself: leave the three unset.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (shared by all nodes)}"
if [ -n "${COORDINATOR:-}" ]; then
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="${NUM_PROCESSES:?}" \
    JAX_PROCESS_ID="${PROCESS_ID:?}"
fi
# One process per node drives all its local GPUs.
exec python main.py --config="$CONFIG" --workdir="$WORKDIR" --distributed=on "$@"
