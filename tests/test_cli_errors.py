"""User errors on the command line: one line on stderr naming the flag and the fix, exit status 1,
no traceback (unless --debug or SHORTCUT_JAX_DEBUG=1)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from shortcut_jax import config_lib
from shortcut_jax.infra import cli
from shortcut_jax.training import offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(*args, module="shortcut_jax.main", env=None):
    base = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    env = {**base, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_error(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) <= 3, result.stderr
    assert lines[-1] == f"error: {message}", result.stderr


CASES = {
    "misspelt key": (
        ["--config=experiments/toy2d.py:runlocal=True", "--config.train.stpes=5"],
        '--config.train.stpes=5: the config has no key \'stpes\'. Did you mean "steps" instead of "stpes"?',
    ),
    "missing config file": (
        ["--config=experiments/nope.py", "--config.train.steps=3"],
        f"--config=experiments/nope.py: the config file experiments/nope.py is missing (looked"
        f" for from {ROOT}); give the path of an experiment file, e.g. experiments/toy2d.py",
    ),
    "negative batch": (
        ["--config=experiments/toy2d.py:runlocal=True", "--config.train.batch_size=-4"],
        "train.batch_size=-4 must be >= 1, e.g. --config.train.batch_size=64",
    ),
    "config argument": (
        ["--config=experiments/toy2d.py:objectiv=x"],
        "--config=experiments/toy2d.py:objectiv=x: config argument 'objectiv=x': expected key=value"
        " with key in ['objective', 'preset', 'runlocal']",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line_without_traceback(name, tmp_path):
    args, message = CASES[name]
    workdir = tmp_path / "wd"
    assert_one_error(command(*args, f"--workdir={workdir}"), message)
    assert not workdir.exists()


def test_missing_required_flag_and_sample_errors_are_one_line(tmp_path):
    assert_one_error(command("--config=experiments/toy2d.py"), "--workdir is required: give --workdir=...")
    assert_one_error(
        command(
            "--config=experiments/toy2d.py:runlocal=True",
            f"--workdir={tmp_path}",
            "--num_images=0",
            "--out=g.png",
            module="shortcut_jax.sample",
        ),
        "--num_images=0 must be >= 1",
    )


def test_debug_flag_or_variable_shows_the_traceback(tmp_path):
    args = ["--config=experiments/toy2d.py:runlocal=True", "--config.train.batch_size=-4", f"--workdir={tmp_path}"]
    for result in (command("--debug", *args), command(*args, env={cli.DEBUG_ENV: "1"})):
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "ConfigError: train.batch_size=-4" in result.stderr


def test_errors_raised_inside_libraries_are_bugs_and_keep_their_traceback():
    assert cli.user_message(config_lib.ConfigError("x=1 is wrong")) == "x=1 is wrong"
    assert cli.user_message(KeyError("k")) is None
    try:
        np.reshape(np.zeros(3), (2, 2))
    except ValueError as err:
        assert cli.user_message(err) is None
    try:
        offline.check_guidance(1.5, 0)  # the package's ValueError for a bad flag
    except ValueError as err:
        assert cli.user_message(err).startswith("--cfg_scale=1.5: guidance needs a class-conditional model")
