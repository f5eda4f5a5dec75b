"""Run a sweep of config variants one after another on this host, each in its own workdir.

    python launch/sweep.py --config=experiments/cifar10.py --root=workdirs/sweep \\
        --args "teacher=ema" "teacher=online" "teacher=online,assignment=random" \\
        -- --config.train.steps=3000

Each variant runs `python -m shortcut_jax.main --config=<config>:<args> --workdir=<root>/<name>`,
so an interrupted sweep resumes where it stopped (finished runs resume at their last step and
exit at once). The exit status is non-zero if any run failed; the others still run.
"""
import argparse
import os
import re
import subprocess
import sys


def run_name(args: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", args) or "default"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--args", nargs="+", default=[""], help="one config argument string per run")
    parser.add_argument("--dry_run", action="store_true")
    opts, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    failed = []
    for args in opts.args:
        workdir = os.path.join(opts.root, run_name(args))
        config = f"{opts.config}:{args}" if args else opts.config
        cmd = [sys.executable, "-m", "shortcut_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
        print(" ".join(cmd), flush=True)
        if not opts.dry_run and subprocess.call(cmd) != 0:
            failed.append(args)
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
