#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: the same command runs on every host.
#   TPU=my-pod ZONE=us-central2-b CONFIG=configs/gem_resnet101.py WORKDIR=gs://bucket/run \
#     bash launch/tpu_pod.sh --config.data.root=/data/cnnimageretrieval
# Each host reads its own shard of every global batch (grain, process_index/process_count);
# jax.distributed is initialised from the TPU metadata (--distributed=on).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d retrieval_jax ] || git clone $REPO_URL retrieval_jax
  cd retrieval_jax && git pull --ff-only
  python3 -m pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -m pip install -q -r requirements.txt && python3 -m pip install -q --no-deps -e .
  python3 main.py --config=$CONFIG --workdir=$WORKDIR --distributed=on $*
"
