"""Adding a method is one record: a method defined here, in the test file, trains through the
real loop and is evaluated with the sampler its record names, with no other change."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from conftest import toy2d_config
from shortcut_jax.infra import writers
from shortcut_jax.objectives import METHODS, Method, common, registry
from shortcut_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = []


def pull_to_data_loss(params, teacher_params, batch, rng, cfg: common.ObjectiveConfig):
    """A method of its own: regress the network at t = 0 on the data itself, scaled by a config
    key no other method reads (``cfg.option``)."""
    CALLS.append(cfg.option("reflow_steps"))  # traced once per compilation
    x1 = batch["x"]
    b = x1.shape[0]
    pred = cfg.apply_fn(
        params,
        jax.random.normal(rng, x1.shape),
        jnp.zeros((b,)),
        jnp.full((b,), cfg.num_levels, jnp.int32),
        common.conditional_labels(batch["label"], cfg),
    )
    loss = jnp.mean(common.per_row_mse(pred, x1))
    return loss, {"loss": loss}


def toy(name):
    return toy2d_config(
        "runlocal=True",
        **{
            "objective.name": name,
            "model.width": 32,
            "model.depth": 2,
            "train.steps": 2,
            "train.log_every": 1,
            "train.ckpt_every": 2,
            "train.eval_every": 2,
            "eval.budgets": (1,),
            "eval.grid_budgets": (1,),
            "eval.num_samples": 100,
            "eval.batch_size": 100,
        },
    )


def test_a_method_defined_in_the_test_file_trains_two_steps_through_the_real_loop(monkeypatch, tmp_path):
    sampled = []

    def counting_sampler(cfg, *, seed=0, mesh=None):
        sampled.append(seed)
        return registry.euler_sampler(cfg, seed=seed, mesh=mesh)

    monkeypatch.setitem(METHODS, "pull_to_data", Method(pull_to_data_loss, counting_sampler, level_input=False))
    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(toy("pull_to_data"), workdir)
    assert int(state.step) == 2
    assert CALLS and CALLS[0] == 8  # the config's objective.reflow_steps reached the loss
    assert sampled, "the record's sampler was not the one evaluation used"
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.exists(os.path.join(workdir, "eval", "00000002", "distance_by_budget.json"))
