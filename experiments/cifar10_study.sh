#!/usr/bin/env bash
# One run of the CIFAR-10 few-step study (experiments/cifar10_results.md) on the local GPU(s),
# scored with the shipped classifier (CFD at 1, 2, 4, 8, 32 and 128 steps).
#
#   experiments/cifar10_study.sh NAME CONFIG_ARGS [ARCHIVE] [ROOT] [--config.key=value ...]
#   experiments/cifar10_study.sh preset "preset=few_step" --config.seed=0
#   experiments/cifar10_study.sh fm "objective=flow_matching" --config.train.ema_debias=True --config.seed=0
#   experiments/cifar10_study.sh recipe "objective=shortcut" --config.seed=0
#   experiments/cifar10_study.sh ema99 "" --config.train.ema_decays='(0.99,0.999)' --config.eval.ema_index=1 \
#       --config.train.ema_debias=True --config.objective.sc_fraction=0.25 --config.seed=0
#   python -m benchmarks.budget_study --runs preset=workdirs/cifar10_study/preset \
#       fm=workdirs/cifar10_study/fm recipe=workdirs/cifar10_study/recipe --metric cfd \
#       --out workdirs/cifar10_study/summary
#
# ARCHIVE and ROOT are relative to the repository root. ARCHIVE defaults to
# ../shared/data/cifar10-train.tar.gz (extracted once under ROOT/data);
# ROOT defaults to workdirs/cifar10_study. The run uses the bf16 residual stream (the figures in
# the study page were measured with it); a killed run resumes from its last checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NAME CONFIG_ARGS [ARCHIVE] [ROOT] [--config.key=value ...]" >&2
  exit 2
fi
name=$1; args=$2; shift 2
archive=../shared/data/cifar10-train.tar.gz
root=workdirs/cifar10_study
if [ $# -gt 0 ] && [[ $1 != --* ]]; then archive=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != --* ]]; then root=$1; shift; fi
cd "$(dirname "$0")/.."
data=$(python -c "import sys; from shortcut_jax.data import extract_archive as e; print(e(sys.argv[1], sys.argv[2]))" \
  "$archive" "$root/data")
exec launch/single_host.sh \
  "experiments/cifar10.py:classifier=shortcut_jax/evaluation/cifar10_classifier,$args" "$root/$name" \
  --config.data.path="$data" --config.model.residual_dtype=compute "$@"
