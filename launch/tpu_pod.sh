#!/usr/bin/env bash
# Train (or extract / evaluate) on a Cloud TPU VM or pod slice: the same command on every host,
# detached from this ssh session, one log per worker, resumed after a preemption.
#
#   export TPU=my-pod ZONE=us-central2-b CONFIG=configs/gem_resnet101.py WORKDIR=gs://bucket/run
#   bash launch/tpu_pod.sh run --config.data.root=/mnt/data  # start, supervise (data: local/gcsfuse)
#   bash launch/tpu_pod.sh logs [WORKER]    # follow worker WORKER's log (default 0)
#   bash launch/tpu_pod.sh status           # VM state, and the job's exit code per worker
#   bash launch/tpu_pod.sh stop             # end the job on every worker
#   bash launch/tpu_pod.sh start ...        # set up and start detached, do not supervise
#
# Extra arguments reach main.py exactly as typed (each one quoted with printf %q), e.g.
# --config.extract.scales='(1, 0.7071, 0.5)'. The job runs under nohup/setsid on each worker
# (log ~/retrieval_jax/run.log, exit code ~/retrieval_jax/run.exit), so closing this terminal
# does not stop it. `run` polls every POLL_S seconds; if the VM is preempted it waits for it
# to come back (or recreates it when ACCELERATOR_TYPE and RUNTIME_VERSION are set) and starts
# the same command again, which resumes from the latest checkpoint in WORKDIR (use a gs://
# WORKDIR: a VM's disk does not survive a preemption). Up to MAX_RESTARTS restarts.
#
# Settings (environment): TPU, ZONE, CONFIG, WORKDIR (required); PROJECT; REPO_URL (default:
# this checkout's origin), REF (default: main); MODE (train|extract|evaluate, default train);
# ACCELERATOR_TYPE, RUNTIME_VERSION (recreate after preemption); MAX_RESTARTS (default 10);
# POLL_S (default 300); DRY_RUN=1 prints every gcloud command instead of running it.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

CMD=${1:-run}
case "$CMD" in
  run|start|logs|status|stop) shift || true ;;
  --*) CMD=run ;;  # only main.py arguments: run
  -h|--help|help) sed -n '2,27p' "$0"; exit 0 ;;
  *) die "unknown subcommand '$CMD' (run, start, logs, status, stop)" ;;
esac

[ -n "${TPU:-}" ] || die "set TPU to the TPU VM / pod slice name (gcloud compute tpus tpu-vm list)"
[ -n "${ZONE:-}" ] || die "set ZONE to the TPU's zone, e.g. ZONE=us-central2-b"
DRY_RUN=${DRY_RUN:-0}
MAX_RESTARTS=${MAX_RESTARTS:-10}
POLL_S=${POLL_S:-300}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '$MAX_RESTARTS'"
[[ "$POLL_S" =~ ^[0-9]+$ ]] || die "POLL_S must be a number of seconds, got '$POLL_S'"
if ! command -v gcloud >/dev/null && [ "$DRY_RUN" != 1 ]; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) first"
fi
GCLOUD_FLAGS=(--zone "$ZONE")
[ -n "${PROJECT:-}" ] && GCLOUD_FLAGS+=(--project "$PROJECT")
REMOTE_DIR='~/retrieval_jax'  # expanded by the worker's shell

# Prints (DRY_RUN=1) or runs a command; printed words are shell-quoted, ready to paste.
exec 3>&1  # dry-run lines go to stdout, also from inside $(...)
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    { printf '+'; printf ' %q' "$@"; printf '\n'; } >&3
  else
    "$@"
  fi
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker="$1" \
    --command "$2"
}

tpu_state() {
  if [ "$DRY_RUN" = 1 ]; then
    run_cmd gcloud compute tpus tpu-vm describe "$TPU" "${GCLOUD_FLAGS[@]}" \
      --format='value(state)'
    echo READY
  else
    gcloud compute tpus tpu-vm describe "$TPU" "${GCLOUD_FLAGS[@]}" --format='value(state)' \
      2>/dev/null || echo NOT_FOUND
  fi
}

case "$CMD" in
  logs)
    WORKER=${1:-0}
    [[ "$WORKER" =~ ^[0-9]+$ ]] || die "logs takes a worker number, got '$WORKER'"
    ssh_workers "$WORKER" "tail -n 200 -F $REMOTE_DIR/run.log"
    exit ;;
  status)
    tpu_state
    ssh_workers all "cat $REMOTE_DIR/run.exit 2>/dev/null || echo running-or-not-started"
    exit ;;
  stop)
    ssh_workers all "[ -f $REMOTE_DIR/run.pid ] && kill -- -\$(cat $REMOTE_DIR/run.pid) \
2>/dev/null; echo stopped > $REMOTE_DIR/run.exit; echo stopped on \$(hostname)"
    exit ;;
esac

# run / start: check what the workers need before touching them.
[ -n "${CONFIG:-}" ] || die "set CONFIG to a config file in the repository, e.g. CONFIG=configs/gem_resnet101.py"
[ -n "${WORKDIR:-}" ] || die "set WORKDIR, e.g. WORKDIR=gs://my-bucket/gem101 (shared by all workers)"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
[ -f "$HERE/$CONFIG" ] || die "CONFIG=$CONFIG is not a file of this repository ($HERE)"
case "$WORKDIR" in
  gs://*) ;;
  *) echo "tpu_pod.sh: warning: WORKDIR=$WORKDIR is not gs://: each worker writes its own disk," \
       "and a preempted VM cannot resume" >&2 ;;
esac
MODE=${MODE:-train}
case "$MODE" in train|extract|evaluate) ;; *) die "MODE must be train, extract or evaluate" ;; esac
if [ -z "${REPO_URL:-}" ]; then
  REPO_URL=$(git -C "$HERE" config --get remote.origin.url || true)
  [ -n "$REPO_URL" ] || die "this checkout has no git remote 'origin': set REPO_URL to a URL \
the TPU workers can clone (e.g. REPO_URL=https://github.com/you/retrieval_jax.git)"
fi
REF=${REF:-main}

# The job, as one shell-quoted line: every extra argument survives both shells unchanged.
JOB=$(printf '%q ' python3 main.py "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE" \
  --distributed=on "$@")
SETUP="set -e; mkdir -p $REMOTE_DIR; cd $REMOTE_DIR; \
[ -d src/.git ] || git clone -q $(printf %q "$REPO_URL") src; cd src; \
git fetch -q origin $(printf %q "$REF"); git checkout -q --force FETCH_HEAD; \
python3 -m pip install -q -e '.[tpu]'"
START="cd $REMOTE_DIR/src && rm -f ../run.exit && \
(setsid nohup bash -c $(printf %q "$JOB; echo \$? > $REMOTE_DIR/run.exit") \
> $REMOTE_DIR/run.log 2>&1 < /dev/null & echo \$! > $REMOTE_DIR/run.pid)"

start_job() {
  ssh_workers all "$SETUP"
  ssh_workers all "$START"
}

if [ "$CMD" = start ]; then
  start_job
  echo "started; follow it with: bash launch/tpu_pod.sh logs 0" >&2
  exit
fi

# run: start, then supervise until the job ends; restart after a preemption.
restarts=0
while :; do
  state=$(tpu_state | tail -n 1)
  case "$state" in
    READY) ;;
    PREEMPTED|TERMINATED|NOT_FOUND)
      if [ -n "${ACCELERATOR_TYPE:-}" ] && [ -n "${RUNTIME_VERSION:-}" ]; then
        [ "$state" = NOT_FOUND ] || run_cmd gcloud compute tpus tpu-vm delete "$TPU" \
          "${GCLOUD_FLAGS[@]}" --quiet
        run_cmd gcloud compute tpus tpu-vm create "$TPU" "${GCLOUD_FLAGS[@]}" \
          --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION"
      else
        echo "tpu_pod.sh: $TPU is $state; waiting for it (set ACCELERATOR_TYPE and" \
          "RUNTIME_VERSION to recreate it)" >&2
        sleep "$POLL_S"; continue
      fi ;;
    *) echo "tpu_pod.sh: $TPU is $state; waiting" >&2; sleep "$POLL_S"; continue ;;
  esac
  start_job
  [ "$DRY_RUN" = 1 ] && exit 0
  # Poll: every worker's exit code, or a preemption.
  while sleep "$POLL_S"; do
    state=$(tpu_state | tail -n 1)
    [ "$state" = READY ] || break
    codes=$(gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all \
      --command "cat $REMOTE_DIR/run.exit 2>/dev/null || echo running" 2>/dev/null || echo lost)
    if echo "$codes" | grep -qE 'running|lost'; then continue; fi
    if echo "$codes" | grep -qvx 0; then
      echo "tpu_pod.sh: the job failed (exit codes: $(echo $codes)); last lines of worker 0:" >&2
      gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=0 \
        --command "tail -n 40 $REMOTE_DIR/run.log" >&2 || true
      exit 1
    fi
    echo "tpu_pod.sh: done; results in $WORKDIR" >&2
    exit 0
  done
  restarts=$((restarts + 1))
  [ "$restarts" -le "$MAX_RESTARTS" ] || die "gave up after $MAX_RESTARTS restarts"
  echo "tpu_pod.sh: $TPU was $state (preempted?); restart $restarts of $MAX_RESTARTS," \
    "resuming from the latest checkpoint in $WORKDIR" >&2
done
