"""A run saved by the code before the package's layout moved (tests/goldens/run_2026_12_04: the
2-D toy, MLP width 32, depth 2, 4 steps, written by the 2026-12-04 release) still restores:
training continues from it, and it samples with only --config and --workdir."""

import os
import shutil

import numpy as np

from conftest import toy2d_config
from shortcut_jax import sample
from shortcut_jax.infra import writers
from shortcut_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "tests", "goldens", "run_2026_12_04")


def saved_config():
    """The settings the saved run was trained with."""
    return toy2d_config(
        "runlocal=True",
        **{
            "model.width": 32,
            "model.depth": 2,
            "train.steps": 4,
            "train.log_every": 2,
            "train.ckpt_every": 4,
            "train.eval_every": 1000,
            "train.batch_size": 32,
        },
    )


def test_a_run_saved_before_the_layout_moved_continues_training(tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(SAVED, workdir)
    config = saved_config()
    config.train.steps = 6
    state = loop.train_and_evaluate(config, workdir)
    assert int(state.step) == 6
    steps = [r["step"] for r in writers.read_metrics(workdir) if "loss" in r]
    assert steps == [6]  # resumed at 4: nothing before it was trained again


def test_a_run_saved_before_the_layout_moved_samples(tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(SAVED, workdir)
    run = sample.load_run(saved_config(), workdir)
    try:
        assert run.step == 4
        points, _ = sample.sample(run, num_images=16, num_steps=1, seed=0)
    finally:
        run.close()
    assert points.shape == (16, 2) and np.all(np.isfinite(points))
