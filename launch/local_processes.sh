#!/usr/bin/env bash
# Several training processes on this machine, joined into one job through jax.distributed: the
# multi-host code path (per-process data slices, collectives between processes, checkpoints
# written by every process, a preemption agreed by all) on one machine, CPU by default.
#
#   launch/local_processes.sh 2 experiments/digits.py:runlocal=True workdirs/two_processes --config.mesh.data=-1
#   DEVICES_PER_PROCESS=4 launch/local_processes.sh 2 experiments/toy2d.py workdirs/toy --config.mesh.data=-1
#   PLATFORM=gpu launch/local_processes.sh 4 experiments/cifar10.py workdirs/c10    # one GPU per process
#
# Process 0 is the coordinator (PORT, default 12355, on this machine); INIT_TIMEOUT (default 300)
# bounds how long each process waits for the others to join. Process 0 writes to WORKDIR/train.log
# (shown here too), process i to WORKDIR/process_<i>.log. A SIGTERM to this script is passed to
# every process: JAX's preemption service picks one step for all of them, they save it and exit 0.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
num=$1; config=$2; workdir=$3; shift 3
cd "$(dirname "$0")/.."
platform=${PLATFORM:-cpu}
port=${PORT:-12355}
cache=${SHORTCUT_JAX_CACHE:-$HOME/.cache/shortcut_jax}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$cache/jax}
mkdir -p "$workdir"
pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM
for ((i = 0; i < num; i++)); do
  if [ "$platform" = cpu ]; then
    env=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}")
  else
    env=(CUDA_VISIBLE_DEVICES=$i)
  fi
  log="$workdir/process_$i.log"
  [ "$i" -eq 0 ] && log="$workdir/train.log"
  # exec: the recorded pid is the training process itself, which the signal must reach
  ( exec env "${env[@]}" python -m shortcut_jax.main --config="$config" --workdir="$workdir" --multihost \
      --coordinator_address="localhost:$port" --num_processes="$num" --process_id="$i" \
      --initialization_timeout="${INIT_TIMEOUT:-300}" "$@" ) >> "$log" 2>&1 &
  pids+=($!)
done
tail -n 0 -f --pid="${pids[0]}" "$workdir/train.log" &  # process 0 on the terminal
status=0
for pid in "${pids[@]}"; do
  # wait returns early when a trapped signal arrives; wait again until the process has ended
  while true; do
    set +e; wait "$pid"; code=$?; set -e
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" -ne 0 ] && status=$code
done
wait
exit $status
