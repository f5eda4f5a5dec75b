#!/usr/bin/env bash
# Train on one host with all its local accelerators (one or several GPUs, or CPU).
# JAX runs one process that drives every local device; the batch is split over them.
#
#   launch/single_host.sh experiments/cifar10.py workdirs/cifar10 [--config.train.steps=7000 ...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/single_host.sh experiments/imagenet.py:variant=B workdirs/in_b
#
# SIGTERM (docker stop, Kubernetes, a spot VM's notice) reaches the training process itself: it
# finishes the step, saves a checkpoint and exits 0; the same command resumes the run.
# Several processes on this host instead: launch/local_processes.sh.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA use most of the GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Compiled programs and GEMM autotuning results persist across launches: a resumed or repeated
# run (another seed, the next chunk of a job) skips most of its compile time.
cache=${SHORTCUT_JAX_CACHE:-$HOME/.cache/shortcut_jax}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$cache/jax}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_per_fusion_autotune_cache_dir=$cache/autotune"
mkdir -p "$workdir"
# exec: python replaces this shell, so a SIGTERM sent to the script's process is the loop's.
exec > >(tee -a "$workdir/train.log") 2>&1
exec python -m shortcut_jax.main --config="$config" --workdir="$workdir" "$@"
