#!/usr/bin/env bash
# Multi-node GPU runs, two ways.
#
# SLURM (inside an allocation: `sbatch launch/slurm_gpu.sbatch`, or salloc): ONE PROCESS PER
# GPU. This script calls
#   srun --ntasks-per-node=<GPUs per node> python3 main.py ... --distributed=on
# and jax reads SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NODELIST itself: task
# LOCALID drives GPU LOCALID. (With one task per node, jax would give that task only GPU 0.)
#   CONFIG=configs/gem_resnet101.py WORKDIR=/shared/run bash launch/gpu_multinode.sh \
#     --config.data.root=/data
#
# Explicit coordinator (no SLURM): ONE PROCESS PER NODE driving all its GPUs; run on every
# node with its own PROCESS_ID (0 on the node whose address is COORDINATOR):
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 CONFIG=configs/gem_resnet101.py \
#     WORKDIR=/shared/run bash launch/gpu_multinode.sh --config.data.root=/data
#
# Settings: CONFIG, WORKDIR (required; WORKDIR shared by all nodes: NFS or gs://); MODE
# (train|extract|evaluate); GPUS_PER_NODE (SLURM; default SLURM_GPUS_ON_NODE); PYTHON
# (default python3); HEARTBEAT_TIMEOUT (seconds before the others give up on a dead process,
# default 100); DRY_RUN=1 prints the command instead of running it. Extra arguments reach
# main.py unchanged, e.g. --config.extract.scales='(1, 0.7071, 0.5)'.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

[ -n "${CONFIG:-}" ] || die "set CONFIG to a config file, e.g. CONFIG=configs/gem_resnet101.py"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG: no such file (paths are relative to $(pwd))"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR to a folder every node sees (NFS, or gs://bucket/run)"
MODE=${MODE:-train}
case "$MODE" in train|extract|evaluate) ;; *) die "MODE must be train, extract or evaluate" ;; esac
PYTHON=${PYTHON:-python3}
HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-100}
is_int "$HEARTBEAT_TIMEOUT" || die "HEARTBEAT_TIMEOUT must be seconds, got '$HEARTBEAT_TIMEOUT'"
MAIN=("$PYTHON" main.py "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE"
      "--heartbeat_timeout=$HEARTBEAT_TIMEOUT")

run_cmd() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    exec "$@"
  fi
}

if [ -n "${COORDINATOR:-}" ]; then
  [[ "$COORDINATOR" =~ ^[^:]+:[0-9]+$ ]] || \
    die "COORDINATOR must be host:port of process 0's node, got '$COORDINATOR'"
  is_int "${NUM_PROCESSES:-}" && [ "$NUM_PROCESSES" -ge 1 ] || \
    die "explicit coordinator: set NUM_PROCESSES to the number of nodes (one process each)"
  is_int "${PROCESS_ID:-}" && [ "$PROCESS_ID" -lt "$NUM_PROCESSES" ] || \
    die "explicit coordinator: set PROCESS_ID to this node's index in [0, $NUM_PROCESSES)"
  run_cmd "${MAIN[@]}" "--coordinator_address=$COORDINATOR" "--num_processes=$NUM_PROCESSES" \
    "--process_id=$PROCESS_ID" "$@"
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  is_int "$GPUS_PER_NODE" && [ "$GPUS_PER_NODE" -ge 1 ] || \
    die "set GPUS_PER_NODE (SLURM did not say: request GPUs with --gpus-per-node=N)"
  # The step gets all the node's GPUs and no --gpus-per-task: every task sees all of them,
  # and jax gives task LOCALID the GPU LOCALID.
  run_cmd srun --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
    --kill-on-bad-exit=1 \
    "${MAIN[@]}" --distributed=on "$@"
else
  die "not inside a SLURM allocation (no SLURM_JOB_ID) and no COORDINATOR set: use \
sbatch launch/slurm_gpu.sbatch, or set COORDINATOR, NUM_PROCESSES and PROCESS_ID"
fi
