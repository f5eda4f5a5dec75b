#!/usr/bin/env bash
# Train on several GPU hosts under SLURM: one process per host, each driving its local GPUs.
# jax.distributed.initialize() reads the SLURM environment; the workdir must be shared storage
# (a shared file system, or gs://... through orbax and etils.epath).
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/multinode_gpu.sh experiments/imagenet.py:variant=XL /shared/runs/in_xl
#
# Preemption: SLURM sends SIGTERM to every task on scancel, preemption and (with --signal below)
# 120 s before the time limit. JAX's preemption service picks one step for all processes; each
# saves it and exits 0. With --requeue a preempted job is queued again and resumes by itself.
# INIT_TIMEOUT (seconds, default 300) bounds how long the processes wait for each other to join.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
config=$1; workdir=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Compiled programs and GEMM autotuning results persist across launches: a resumed or repeated
# run (another seed, the next chunk of a job) skips most of its compile time.
cache=${SHORTCUT_JAX_CACHE:-$HOME/.cache/shortcut_jax}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$cache/jax}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_per_fusion_autotune_cache_dir=$cache/autotune"
# --kill-on-bad-exit: a process that fails ends the others instead of leaving them waiting.
exec srun --kill-on-bad-exit=1 python -m shortcut_jax.main --multihost --initialization_timeout="${INIT_TIMEOUT:-300}" \
    --config="$config" --workdir="$workdir" "$@"
