"""One parameter tree of another run, read alone: ``restore`` (run folder) over ``checkpoint``
(the saved state's format)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shortcut_jax.infra import checkpoint
from shortcut_jax.training import runs


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(3), jnp.float32),
        }
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir whose checkpoints hold steps 3 and 5 of a state with params, two EMA trees and an
    optimiser tree, and whose manifest records a config."""
    workdir = tmp_path_factory.mktemp("run")
    states = {}
    with checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False, keep=None) as ckpt:
        for step in (3, 5):
            state = {
                "params": _tree(step),
                "ema_params": (_tree(step + 100), _tree(step + 200)),
                "opt_state": {"mu": _tree(step + 300)},
                "step": jnp.asarray(step, jnp.int32),
            }
            ckpt.save(
                step, state, data_state={}, meta={"objective": {"name": "flow_matching"}, "ema_decays": [0.9, 0.99]}
            )
            states[step] = state
    (workdir / "manifest.json").write_text(json.dumps({"config": {"model": {"width": 8}}}))
    return str(workdir), states


def _same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_workdir_and_its_checkpoints_folder_open_the_same_run(run):
    workdir, _ = run
    for path in (workdir, os.path.join(workdir, "checkpoints"), workdir + "/"):
        saved = runs.open_run(path)
        assert (saved.workdir, saved.ckpt_dir, saved.step) == (workdir, os.path.join(workdir, "checkpoints"), 5)
        assert saved.meta["objective"]["name"] == "flow_matching" and saved.config == {"model": {"width": 8}}
    assert runs.open_run(workdir, step=3).step == 3


def test_run_folder_errors_name_the_setting_to_change(run, tmp_path):
    workdir, _ = run
    with pytest.raises(FileNotFoundError, match="train.init_from='/no/such/run' is not a directory"):
        runs.open_run("/no/such/run", what="train.init_from")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="--workdir=.*empty' holds no checkpoint"):
        runs.open_run(str(tmp_path / "empty"), what="--workdir")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4: --step=4 is not saved .*\[3, 5\]"):
        runs.open_run(workdir, step=4, what="--workdir", step_what="--step")
    assert os.listdir(tmp_path / "empty") == []  # nothing was created


def test_each_tree_is_read_alone_as_host_arrays(run):
    workdir, states = run
    saved = runs.open_run(workdir, step=3)
    params = runs.restore_weights(saved, weights="params")
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))
    _same(params, states[3]["params"])
    _same(runs.restore_weights(saved), states[3]["ema_params"][0])
    _same(runs.restore_weights(saved, ema_index=1), states[3]["ema_params"][1])
    assert saved.param_shapes("ema", 1) == {"['dense']['bias']": (3,), "['dense']['kernel']": (8, 3)}


def test_tree_is_restored_onto_the_shardings_asked_for(run):
    workdir, states = run
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    shardings = {"dense": {"kernel": NamedSharding(mesh, P("data", None)), "bias": NamedSharding(mesh, P())}}
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), states[5]["params"], shardings
    )
    got = runs.restore_weights(runs.open_run(workdir), weights="ema", ema_index=1, abstract=abstract)
    for leaf, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    _same(got, states[5]["ema_params"][1])


def test_tree_that_does_not_fit_or_was_not_kept_is_refused_naming_it(run):
    workdir, states = run
    saved = runs.open_run(workdir)
    other = {
        "dense": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32), "scale": jax.ShapeDtypeStruct((3,), jnp.float32)}
    }
    with pytest.raises(ValueError) as err:
        runs.restore_weights(saved, weights="params", abstract=other)
    assert "missing ['dense']['scale']" in str(err.value) and "unexpected ['dense']['bias']" in str(err.value)
    assert "['dense']['kernel']: saved (8, 3), current (8, 4)" in str(err.value)
    with pytest.raises(KeyError, match="holds 2 EMA tree.*EMA tree 2 does not exist"):
        runs.restore_weights(saved, ema_index=2)
    with pytest.raises(ValueError, match="weights='opt_state'"):
        runs.restore_weights(saved, weights="opt_state")
