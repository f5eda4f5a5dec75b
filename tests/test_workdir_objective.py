"""A run's workdir keeps its objective: another objective (or level count) is refused before
anything is compiled or written, naming the saved and the given setting."""

import hashlib
import os
import subprocess
import sys

import jax
import pytest

from shortcut_jax import config_lib
from shortcut_jax.training import loop
from test_train import load_experiment, quiet


def toy(arg="runlocal=True", **overrides):
    c = quiet(load_experiment("toy2d").get_config(arg))
    c.train.async_ckpt = False
    c.train.steps = 3
    c.eval.budgets = (1,)
    c.eval.grid_budgets = (1,)
    c.eval.num_samples = c.eval.batch_size = 64
    for key, value in overrides.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def file_hashes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("shortcut_run"))
    loop.train_and_evaluate(toy(), workdir)
    return workdir


@pytest.mark.parametrize(
    "arg, overrides, saved, given, flags",
    [
        (
            "runlocal=True,objective=flow_matching",
            {},
            "objective.name='shortcut'",
            "objective.name='flow_matching'",
            "--config.objective.name=shortcut",
        ),
        (
            "runlocal=True",
            {"objective.num_levels": 5},
            "objective.num_levels=7",
            "objective.num_levels=5",
            "--config.objective.num_levels=7",
        ),
    ],
)
def test_other_objective_is_refused_with_the_workdir_untouched(
    shortcut_run, monkeypatch, arg, overrides, saved, given, flags
):
    before = file_hashes(shortcut_run)
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    with pytest.raises(config_lib.ConfigError) as err:
        loop.train_and_evaluate(toy(arg, **overrides), shortcut_run)
    assert str(err.value) == (
        f"--workdir={shortcut_run} holds a run trained with {saved}; the config gives {given}: continue that run"
        f" with its setting ({flags}) or use a fresh --workdir"
    )
    assert not compiled
    assert file_hashes(shortcut_run) == before


def test_command_line_refusal_is_one_line_and_leaves_the_files_alone(shortcut_run):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = file_hashes(shortcut_run)
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    env.pop("SHORTCUT_JAX_DEBUG", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:runlocal=True,objective=flow_matching",
            f"--workdir={shortcut_run}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={shortcut_run} holds a run trained with objective.name='shortcut'; the config gives"
        " objective.name='flow_matching': continue that run with its setting (--config.objective.name=shortcut)"
        " or use a fresh --workdir"
    )
    assert file_hashes(shortcut_run) == before


def test_sampling_with_another_architecture_is_refused_in_one_line(shortcut_run):
    from shortcut_jax.training import offline

    config = toy()
    config.model.depth += 1
    with pytest.raises(config_lib.ConfigError) as err:
        offline.load_run(config, shortcut_run)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--workdir={shortcut_run} holds a checkpoint written by a different configuration (")
    assert f"depth: saved {config.model.depth - 1}, current {config.model.depth}" in message
