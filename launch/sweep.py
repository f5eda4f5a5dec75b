"""Run a sweep of config variants one after another on this host, each in its own workdir.

    python launch/sweep.py --config=experiments/cifar10.py --root=workdirs/sweep \\
        --runs "" "preset=few_step" "--config.objective.level_assignment=random" \\
               "objective=flow_matching --config.train.ema_debias=True" \\
        -- --config.train.steps=3000

Each run is a string of the experiment file's argument (``key=value,...``: its switches) and/or
``--config.key=value`` flags; it runs `python -m shortcut_jax.main --config=<config>[:<argument>]
<flags> <shared flags> --workdir=<root>/<name>`, so an interrupted sweep resumes where it stopped
(finished runs resume at their last step and exit at once). The exit status is non-zero if any
run failed; the others still run.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys


def run_name(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", run.replace("--config.", "")).strip("_") or "default"


def split_run(run: str) -> tuple[str, list[str]]:
    """'preset=few_step --config.seed=1' -> ('preset=few_step', ['--config.seed=1'])."""
    tokens = shlex.split(run)
    flags = [t for t in tokens if t.startswith("--")]
    args = [t for t in tokens if not t.startswith("--")]
    return ",".join(args), flags


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--runs", nargs="+", default=[""],
                        help="one string per run: the experiment file's argument and/or --config.key=value flags")
    parser.add_argument("--dry_run", action="store_true")
    opts, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    failed = []
    for run in opts.runs:
        args, flags = split_run(run)
        workdir = os.path.join(opts.root, run_name(run))
        config = f"{opts.config}:{args}" if args else opts.config
        cmd = [sys.executable, "-m", "shortcut_jax.main", f"--config={config}", *flags, *overrides,
               f"--workdir={workdir}"]
        print(" ".join(cmd), flush=True)
        if not opts.dry_run and subprocess.call(cmd) != 0:
            failed.append(run)
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
