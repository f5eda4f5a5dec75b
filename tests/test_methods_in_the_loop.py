"""The comparison methods that the train loop runs, end to end: a few steps of the 2-D toy,
evaluated with each method's own sampler; and the ones it cannot run yet, refused before training."""

import json
import os

import numpy as np
import pytest

from conftest import toy2d_config
from shortcut_jax.training import loop
from shortcut_jax.infra import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy(objective, **overrides):
    quick = {
        "train.steps": 14,
        "train.log_every": 7,
        "train.ckpt_every": 14,
        "train.eval_every": 14,
        "eval.budgets": (1, 4),
        "eval.grid_budgets": (1,),
        "eval.num_samples": 500,
    }
    return toy2d_config(f"objective={objective},runlocal=True", **{**quick, **overrides})


@pytest.mark.parametrize(
    "objective,sampler",
    [("diffusion", "DDIMSampler"), ("consistency_training", "ConsistencySampler"), ("live_reflow", "Sampler")],
)
def test_method_trains_in_the_loop_and_is_evaluated_with_its_sampler(objective, sampler, tmp_path, monkeypatch):
    from shortcut_jax.training import experiment

    built = []
    real = experiment.make_sampler
    monkeypatch.setattr(experiment, "make_sampler", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    workdir = str(tmp_path / objective)
    state = loop.train_and_evaluate(toy(objective), workdir)
    assert int(state.step) == 14
    assert type(built[0]).__name__ == sampler
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [7, 14] and all(np.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(workdir, "eval", "00000014", "distance_by_budget.json")) as f:
        table = json.load(f)
    assert [int(r["steps"]) for r in table["rows"]] == [1, 4]
    assert all(np.isfinite(r[table["metric_name"]]) for r in table["rows"])
