"""Repeated ``--config.<key>`` overrides on the command line: the last one wins for every type.

ml_collections appends a repeated tuple override to the earlier one, where absl keeps the last
value of any other repeated flag; the entry points pass their argv through
``cli.last_override_wins`` (``cli.run``) so that scripts can put defaults first and let callers replace
them (``experiments/cifar10_methods.sh``, ``launch/sweep.py``).
"""

import os
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from conftest import child_env
from shortcut_jax.infra.cli import last_override_wins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "digits.py") + ":runlocal=True"


def parse(argv):
    """The config that absl and ml_collections build from ``argv``, as the entry points parse it."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv, lock_config=True)
    fv(argv)
    return fv.config


def test_repeated_tuple_override_keeps_the_last_value_like_a_scalar():
    argv = [
        "prog",
        f"--config={CONFIG}",
        "--config.eval.budgets=(1,4)",
        "--config.seed=1",
        "--config.eval.budgets=(8,)",
        "--config.seed=2",
    ]
    assert parse(argv).eval.budgets == (1, 4, 8)  # what ml_collections does on its own
    config = parse(last_override_wins(argv))
    assert config.eval.budgets == (8,)
    assert config.seed == 2


def test_space_separated_and_negated_forms_are_the_same_key():
    argv = [
        "prog",
        "--config=c.py",
        "--config.eval.budgets",
        "(1,2)",
        "--noconfig.train.ema_debias",
        "--workdir",
        "w",
        "--config.train.ema_debias=True",
        "--config.eval.budgets=(4,)",
    ]
    assert last_override_wins(argv) == [
        "prog",
        "--config=c.py",
        "--workdir",
        "w",
        "--config.train.ema_debias=True",
        "--config.eval.budgets=(4,)",
    ]


def test_other_flags_and_everything_after_a_double_dash_are_left_alone():
    argv = [
        "prog",
        "--config=a.py",
        "--config=b.py",
        "--data.split=train",
        "--data.split=test",
        "--",
        "--config.seed=1",
        "--config.seed=2",
    ]
    assert last_override_wins(argv) == argv
    assert last_override_wins(argv, names=("data",)) == [
        "prog",
        "--config=a.py",
        "--config=b.py",
        "--data.split=test",
        "--",
        "--config.seed=1",
        "--config.seed=2",
    ]


def sweep_commands(*args):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--dry_run", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    return done.returncode, [shlex.split(line) for line in done.stdout.splitlines()], done.stderr


def test_sweep_run_flags_replace_the_shared_flags_of_the_same_key(tmp_path):
    code, (own, shared), _ = sweep_commands(
        f"--config={CONFIG}",
        f"--root={tmp_path}",
        "--runs",
        "--config.eval.budgets=(2,)",
        "",
        "--",
        "--config.eval.budgets=(1,4)",
    )
    assert code == 0
    assert own[-1] == f"--workdir={tmp_path}/eval.budgets=_2" and shared[-1] == f"--workdir={tmp_path}/default"
    # each command's flags, without `python -m shortcut_jax.main` and --workdir
    assert parse(last_override_wins(["prog", *own[3:-1]])).eval.budgets == (2,)
    assert parse(last_override_wins(["prog", *shared[3:-1]])).eval.budgets == (1, 4)


def test_sweep_takes_runs_that_start_with_a_flag_as_runs(tmp_path):
    code, commands, _ = sweep_commands(
        f"--config={CONFIG}", "--runs", "", "preset=few_step", "--config.seed=3", f"--root={tmp_path}"
    )
    assert code == 0
    assert [c[-1] for c in commands] == [
        f"--workdir={tmp_path}/{name}" for name in ("default", "preset=few_step", "seed=3")
    ]
    assert [c[3:-1] for c in commands] == [
        [f"--config={CONFIG}"],
        [f"--config={CONFIG},preset=few_step"],
        [f"--config={CONFIG}", "--config.seed=3"],
    ]


def test_sweep_refuses_runs_that_would_share_a_workdir(tmp_path):
    code, commands, err = sweep_commands(f"--config={CONFIG}", f"--root={tmp_path}", "--runs", "seed=1 x", "seed=1_x")
    assert code == 2 and commands == []
    assert "would share the workdir" in err
