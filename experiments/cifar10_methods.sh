#!/usr/bin/env bash
# The paper's comparison on CIFAR-10: every method trains the same DiT-S/2 on 32x32x3 pixels with
# the same data, optimiser and steps (7,000) and is scored with the shipped classifier (CFD at 1,
# 4 and 128 steps, 5,000 samples, the final step only). Each run is one
# experiments/cifar10_study.sh call; two lanes run at once on the local GPU(s), each process
# with 45% of the GPU memory:
#   lane A: fm (flow matching) -> pd (progressive distillation from fm) -> cd (consistency
#           distillation from fm); the distillation runs read fm's workdir as their teacher, so
#           they cost 7,000 teacher + 7,000 student steps
#   lane B: preset (shortcut, preset=few_step) -> ct (consistency training) -> lr (live reflow)
#           -> diffusion -> mf (MeanFlow) -> mfv (improved MeanFlow); the same optimiser as every
#           other row (preset=meanflow / meanflow_v would give the published one instead) and
#           MeanFlow's own CIFAR-10 time sampling (experiments/cifar10.py)
#
#   experiments/cifar10_methods.sh [ARCHIVE] [ROOT] [--config.key=value ...]
#   METHODS="fm pd ct lr" experiments/cifar10_methods.sh          # a subset, lanes kept
#   METHODS=lr experiments/cifar10_methods.sh --config.seed=1
#   CONFIG_ARG_EXTRA=",runlocal=True" experiments/cifar10_methods.sh /tmp/tiny.tar.gz /tmp/tiny \
#       --config.train.steps=7    # the whole table with a tiny model on a CPU, as a check
#
# ARCHIVE and ROOT as in cifar10_study.sh (defaults ../shared/data/cifar10-train.tar.gz and
# workdirs/cifar10_study); extra flags go to every run. Each run's log is ROOT/NAME.out, its
# table ROOT/NAME/eval/<step>/distance_by_budget.md; ROOT/events lists starts and ends. A
# stopped run resumes from its last checkpoint when the script is started again; a finished one
# (ROOT/NAME.done) is skipped. On one H200 the two lanes together train about 6,000 images/s, about what
# one process reaches alone: the lanes keep the GPU busy while the other compiles or evaluates.
# Two MeanFlow runs side by side did worse: about 2,600 images/s together on one H100 against
# 3,132 for one alone (2026-12-07), so mf and mfv share lane B and run one after the other.
set -uo pipefail
cd "$(dirname "$0")/.."
archive=../shared/data/cifar10-train.tar.gz
root=workdirs/cifar10_study
if [ $# -gt 0 ] && [[ $1 != --* ]]; then archive=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != --* ]]; then root=$1; shift; fi
# lane A: the teacher run, then the runs distilled from it; lane B: the runs of their own
lane_a="fm pd cd"
lane_b="preset ct lr diffusion mf mfv"

args_of() {  # the experiment file's argument of each method; nothing for an unknown name
  case $1 in
    fm) echo "objective=flow_matching" ;;
    pd) echo "objective=progressive_distillation" ;;
    cd) echo "objective=consistency_distillation" ;;
    preset) echo "preset=few_step" ;;
    ct) echo "objective=consistency_training" ;;
    lr) echo "objective=live_reflow" ;;
    diffusion) echo "objective=diffusion" ;;
    mf) echo "objective=meanflow" ;;
    mfv) echo "objective=meanflow_v" ;;
  esac
}

methods=${METHODS:-$lane_a $lane_b}
for m in $methods; do
  if [ -z "$(args_of "$m")" ]; then
    echo "unknown method '$m' in METHODS: use $lane_a $lane_b" >&2; exit 2
  fi
done
mkdir -p "$root"
rm -f "$root/.stop"
# Extract once here: two runs extracting into the same folder at once would race.
python -c "import sys; from shortcut_jax.data import extract_archive as e; e(sys.argv[1], sys.argv[2])" \
  "$archive" "$root/data" || exit 1
# Defaults first: a caller's flag of the same key comes later and replaces it (tuples too).
common=(--config.train.eval_every=7000 "--config.eval.budgets=(1,4,128)" "--config.eval.grid_budgets=(1,4,128)" "$@")
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

flags_of() {
  case $1 in
    fm|mf|mfv) echo "--config.train.ema_debias=True" ;;  # as in the few-step study
    pd|cd) echo "--config.objective.teacher_checkpoint=$root/fm" ;;
  esac
}

run() {
  local name=$1
  if [[ " $methods " != *" $name "* ]] || [ -f "$root/.stop" ]; then return 0; fi
  if [ -f "$root/$name.done" ]; then echo "$(date +%T) $name already finished" >> "$root/events"; return 0; fi
  echo "$(date +%T) start $name" >> "$root/events"
  # shellcheck disable=SC2046
  experiments/cifar10_study.sh "$name" "$(args_of "$name")${CONFIG_ARG_EXTRA:-}" "$archive" "$root" "${common[@]}" \
    $(flags_of "$name") > "$root/$name.out" 2>&1
  local rc=$?
  echo "$(date +%T) end $name rc=$rc" >> "$root/events"
  if [ $rc -eq 0 ] && [ ! -f "$root/.stop" ]; then touch "$root/$name.done"; fi
}

lane() { for name in "$@"; do run "$name"; done; }
# A SIGTERM or Ctrl-C (timeout, docker stop, a scheduler's notice) reaches every run started here,
# not only this shell: each training process (a lane's child) checkpoints and stops, no lane starts
# another run, and a stopped run is not marked finished; starting the script again resumes it.
trap 'touch "$root/.stop"; for job in $(jobs -p); do pkill -TERM -P "$job"; done; wait; exit 143' TERM INT
# shellcheck disable=SC2086
lane $lane_a &
# shellcheck disable=SC2086
lane $lane_b &
wait
for m in $methods; do
  table=$(ls -d "$root/$m"/eval/*/distance_by_budget.md 2>/dev/null | tail -n 1)
  if [ -n "$table" ]; then echo "== $m ($table)"; cat "$table"; else echo "== $m: no table (see $root/$m.out)"; fi
done
