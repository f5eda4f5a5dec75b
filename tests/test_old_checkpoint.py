"""A run saved by the code before the package's layout moved (tests/goldens/run_2026_12_04: the
2-D toy, MLP width 32, depth 2, 4 steps, written by the 2026-12-04 release) still restores:
training continues from it, and it samples with only --config and --workdir."""

import importlib.util
import os
import shutil

import numpy as np

from shortcut_jax import sample
from shortcut_jax.infra import writers
from shortcut_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "tests", "goldens", "run_2026_12_04")


def saved_config():
    spec = importlib.util.spec_from_file_location("toy2d", os.path.join(ROOT, "experiments", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("runlocal=True")
    c.model.width, c.model.depth = 32, 2
    c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 4, 2, 4, 1000
    c.train.progress_bar, c.train.use_tensorboard, c.train.async_ckpt = False, False, False
    c.train.batch_size = 32
    return c


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
