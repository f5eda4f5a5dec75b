#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker; JAX finds its peers.
# The workdir must be shared storage (a gs:// bucket) so checkpoints are visible to all hosts.
#
#   launch/tpu_pod.sh my-tpu us-central2-b experiments/imagenet.py:variant=XL gs://bucket/runs/in_xl
#
# Preemption and maintenance: JAX's preemption service receives the TPU's maintenance notice (and
# SIGTERM), every worker saves the same step and exits 0; run this command again (or let a queued
# resource restart it) and the run resumes from gs://. INIT_TIMEOUT (seconds, default 300) bounds
# how long the workers wait for each other to join.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
extra=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/shortcut_jax && git pull --ff-only && pip install -q -e '.[tfds]' &&
  python -m shortcut_jax.main --multihost --initialization_timeout=${INIT_TIMEOUT:-300} \
      --config=$(printf %q "$config") --workdir=$(printf %q "$workdir")$extra"
