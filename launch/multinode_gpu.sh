#!/usr/bin/env bash
# Train on several GPU hosts under SLURM: one process per host, each driving its local GPUs.
# jax.distributed.initialize() reads the SLURM environment; the workdir must be shared storage.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/multinode_gpu.sh experiments/imagenet.py:variant=XL /shared/runs/in_xl
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=$1; workdir=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
srun python -m shortcut_jax.main --multihost --config="$config" --workdir="$workdir" "$@"
