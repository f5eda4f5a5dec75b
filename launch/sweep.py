"""Run a sweep of config variants one after another on this host, each in its own workdir.

    python launch/sweep.py --config=experiments/cifar10.py --root=workdirs/sweep \\
        --runs "" "preset=few_step" "--config.objective.level_assignment=random" \\
               "objective=flow_matching --config.train.ema_debias=True" \\
        -- --config.train.steps=3000

The runs are the arguments after ``--runs`` (a run may start with ``--config.``); the flags after
``--`` are shared by every run.
Each run is a string of the experiment file's argument (``key=value,...``: its switches) and/or
``--config.key=value`` flags (switches given in ``--config=file.py:arg`` are kept and the run's
are appended); it runs `python -m shortcut_jax.main --config=<config>[:<argument>]
<shared flags> <flags> --workdir=<root>/<name>`, so an interrupted sweep resumes where it stopped
(finished runs resume at their last step and exit at once). A run's own flag replaces a shared
flag of the same key, whatever its type (tuples included: the entry points keep the last of
repeated ``--config.<key>`` overrides). The exit status is non-zero if any run failed; the
others still run.
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


OWN_OPTIONS = ("--config", "--root", "--runs", "--dry_run", "--help", "-h")


def is_own_option(token: str) -> bool:
    return token.split("=", 1)[0] in OWN_OPTIONS


def split_argv(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``(the sweep's own options, the runs, the shared flags)``.

    The runs are every token after ``--runs`` up to the next of the sweep's own options or ``--``,
    whatever they start with: argparse alone would take a run such as
    ``"--config.seed=1"`` for an option and end the list there. The shared flags are the tokens
    after ``--``, and any ``--config.<key>`` flag given outside ``--runs``.
    """
    shared = []
    if "--" in argv:
        argv, shared = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    own, runs, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.split("=", 1)[0] != "--runs":
            own.append(token)
            continue
        if "=" in token:
            runs.append(token.split("=", 1)[1])
        while i < len(argv) and not is_own_option(argv[i]):
            runs.append(argv[i])
            i += 1
    loose = [t for t in own if t.startswith("--config.")]
    return [t for t in own if t not in loose], runs, loose + shared


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument(
        "--runs",
        nargs="*",
        metavar="RUN",  # for --help: split_argv takes the runs
        help="one string per run: the experiment file's argument and/or --config.key=value flags"
        " (default: one run of the config as it is)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    own, runs, shared = split_argv(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(own)
    runs = runs or [""]
    by_workdir = {}
    for run in runs:
        by_workdir.setdefault(run_name(run), []).append(run)
    clashes = [names for names in by_workdir.values() if len(names) > 1]
    if clashes:
        parser.error(
            f"runs {clashes[0]} would share the workdir {os.path.join(opts.root, run_name(clashes[0][0]))}:"
            " make them differ in more than punctuation"
        )
    failed = []
    for run in runs:
        args, flags = split_run(run)
        workdir = os.path.join(opts.root, run_name(run))
        config = opts.config if not args else f"{opts.config}{',' if ':' in opts.config else ':'}{args}"
        cmd = [sys.executable, "-m", "shortcut_jax.main", f"--config={config}", *shared, *flags, f"--workdir={workdir}"]
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        if not opts.dry_run and subprocess.call(cmd) != 0:
            failed.append(run)
    if failed:
        print(f"failed runs: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
