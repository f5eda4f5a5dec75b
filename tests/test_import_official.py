"""Importing a reference-code checkpoint pickle: parameters, EMA and Adam moments carry over,
and training resumes from it.

The pickle is built as the reference code writes it: ``{'train_state': TrainStateEma.save(),
'_timestamp': ...}``, whose ``opt_state`` is the optax state object itself (a tuple of named
tuples), in the reference network's parameter names. The flax state-dict form of the same state
is a second accepted format.
"""

import json
import logging
import os
import pickle

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SHARED_DATA
from shortcut_jax import config_lib, data, import_official
from shortcut_jax.infra import checkpoint, sharding
from shortcut_jax.training import loop
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.models import convert

STEP = 1234  # the reference run's step and Adam count


def small_config(data_path=""):
    c = config_lib.default_config()
    c.model.variant = ""
    c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
    c.model.dtype = "float32"
    c.train.batch_size = 64
    c.train.progress_bar = False
    c.train.use_tensorboard = False
    c.train.async_ckpt = False
    c.train.eval_every = 10_000
    c.mesh.data = 1
    c.data.name = "arrays"
    c.data.path = data_path
    return c


def reference_params():
    """The golden reference network's parameters, in the reference code's module names."""
    g = np.load(os.path.join(SHARED_DATA, "official_dit_golden.npz"))
    return convert.from_slash_names({k[len("param/") :]: g[k] for k in g.files if k.startswith("param/")})


def reference_adamw_state(params):
    """``optax.adamw(...).init(params)`` as a run of the reference code holds it after STEP updates:
    the real optax objects, with non-zero moments and the count at STEP."""
    state = optax.adamw(1e-4, weight_decay=0.1).init(params)
    rng = np.random.default_rng(0)
    adam = state[0]._replace(
        count=jnp.asarray(STEP, jnp.int32),
        mu=jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params),
        nu=jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape), jnp.float32), params),
    )
    return (adam,) + tuple(state[1:])


def write_reference_pickle(path, opt_state, params):
    train_state = {
        "params": params,
        "params_ema": jax.tree.map(lambda p: p * 0.5, params),
        "opt_state": opt_state,
        "step": jnp.asarray(STEP, jnp.int32),
    }
    with open(path, "wb") as f:
        pickle.dump({"train_state": train_state, "_timestamp": 1_733_100_000.0}, f)
    return str(path)


@pytest.fixture(scope="module")
def optax_pickle(tmp_path_factory):
    """The format the reference code writes: the raw optax state."""
    params = reference_params()
    path = write_reference_pickle(
        tmp_path_factory.mktemp("official") / "ckpt.pkl", reference_adamw_state(params), params
    )
    with open(path, "rb") as f:  # the fixture really is in that form once unpickled
        assert isinstance(pickle.load(f)["train_state"]["opt_state"][0], optax.ScaleByAdamState)
    return path


@pytest.fixture(scope="module")
def state_dict_pickle(tmp_path_factory):
    """The same state as a flax state dict (``{'0': {'count', 'mu', 'nu'}, '1': {}, ...}``)."""
    params = reference_params()
    opt_state = flax.serialization.to_state_dict(reference_adamw_state(params))
    assert set(opt_state) == {"0", "1", "2"}
    return write_reference_pickle(tmp_path_factory.mktemp("official_sd") / "ckpt.pkl", opt_state, params)


def adam_state_of(opt_state) -> optax.ScaleByAdamState:
    (adam,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return adam


def schedule_counts_of(opt_state) -> list[int]:
    return [
        int(s.count)
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)
    ]


def assert_trees_equal(expected, got):
    got = jax.device_get(got)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def restore_imported(cfg, workdir):
    spec = data.DataSpec(shape=(8, 8, 4), num_classes=10, kind="images")
    exp = Experiment(cfg, workdir, spec=spec)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        state, data_state, _ = ckpt.restore(None, exp.abstract_state)
    return state, data_state


# --------------------------------------------------------------------------- finding the moments


def test_adam_moments_are_found_in_every_form_an_optax_state_takes():
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    forms = {
        "adamw": optax.adamw(1e-3, weight_decay=0.1).init(params),
        "chain with clipping": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params),
        "masked decay, schedule": optax.adamw(
            optax.linear_schedule(0.0, 1e-3, 10), weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ).init(params),
        "injected hyperparameters": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3).init(params),
        "state dict": flax.serialization.to_state_dict(optax.adamw(1e-3).init(params)),
        "list": list(optax.adamw(1e-3).init(params)),
    }
    for name, state in forms.items():
        found = import_official._find_adam_moments(state)
        assert found is not None, name
        assert set(found) >= {"count", "mu", "nu"}, name
        assert jax.tree.structure(found["mu"]) == jax.tree.structure(params), name
    assert import_official._find_adam_moments(optax.sgd(0.1, momentum=0.9).init(params)) is None
    assert import_official._find_adam_moments(None) is None


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("form", ["optax", "state_dict"])
def test_import_carries_params_ema_and_adam_moments(form, request, tmp_path):
    path = request.getfixturevalue(f"{form}_pickle")
    with open(path, "rb") as f:
        ts = pickle.load(f)["train_state"]
    workdir = str(tmp_path / "imported")
    cfg = small_config()
    step = import_official.import_checkpoint(import_official.load_pickle(path), cfg, workdir, image_size=8)
    assert step == STEP
    state, data_state = restore_imported(cfg, workdir)
    assert int(state.step) == STEP and data_state == {}
    assert_trees_equal(convert.official_to_project(ts["params"]), state.params)
    assert_trees_equal(convert.official_to_project(ts["params_ema"]), state.ema_params[0])
    # the moments and count the reference optimiser reached, converted to this project's names
    reference_adam = ts["opt_state"]["0"] if form == "state_dict" else ts["opt_state"][0]._asdict()
    adam = adam_state_of(state.opt_state)
    assert int(adam.count) == int(reference_adam["count"]) == STEP
    assert_trees_equal(convert.official_to_project(reference_adam["mu"]), adam.mu)
    assert_trees_equal(convert.official_to_project(reference_adam["nu"]), adam.nu)
    # the learning-rate schedule continues from the imported step instead of restarting
    assert schedule_counts_of(state.opt_state) == [STEP]


def test_a_pickle_without_adam_state_is_imported_with_a_warning_naming_what_it_holds(tmp_path, caplog):
    params = reference_params()
    path = write_reference_pickle(tmp_path / "sgd.pkl", optax.sgd(0.1, momentum=0.9).init(params), params)
    workdir = str(tmp_path / "imported")
    cfg = small_config()
    with caplog.at_level(logging.WARNING, logger=import_official.__name__):
        with pytest.warns(UserWarning, match=r"no Adam state .*TraceState\(trace=dict"):
            import_official.import_checkpoint(import_official.load_pickle(path), cfg, workdir, image_size=8)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no Adam state" in m and "TraceState" in m and "EmptyState" in m for m in logged), logged
    state, _ = restore_imported(cfg, workdir)
    assert_trees_equal(convert.official_to_project(params), state.params)  # the rest still imports
    adam = adam_state_of(state.opt_state)
    assert int(adam.count) == 0 and all(not np.any(np.asarray(m)) for m in jax.tree.leaves(jax.device_get(adam.mu)))


def test_training_resumes_from_an_imported_checkpoint(optax_pickle, tmp_path, caplog):
    rng = np.random.default_rng(0)
    arrays = tmp_path / "latents.npz"
    np.savez(arrays, x=rng.normal(size=(128, 8, 8, 4)).astype(np.float32), labels=np.arange(128) % 10)
    workdir = str(tmp_path / "resume")
    cfg = small_config(str(arrays))
    import_official.import_checkpoint(import_official.load_pickle(optax_pickle), cfg, workdir, image_size=8)
    cfg.train.steps = STEP + 2
    cfg.train.log_every = 1

    # The loss of one step from the imported state on the stream's first batch (an imported
    # checkpoint carries no stream position, so the run starts the stream afresh too).
    exp = Experiment(cfg, workdir)

    def restore():
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            return ckpt.restore(None, exp.abstract_state)[0]

    compiled, _ = exp.compile_step(donate=False)  # the training run's program
    batch = sharding.global_batch(exp.source.next_batch(), exp.mesh)
    imported = restore()
    updated, first = compiled(imported, batch)
    # a fresh start has another loss on the same batch
    _, fresh = compiled(exp.init_state(), batch)
    assert abs(float(fresh["loss"]) - float(first["loss"])) > 1e-3 * abs(float(first["loss"]))
    # the imported Adam moments shape the first update: without them (zero moments, the same
    # count) the same parameters and batch give another update
    adam = adam_state_of(imported.opt_state)
    no_moments = imported.replace(
        opt_state=jax.tree.map(
            lambda s: (
                s._replace(mu=jax.tree.map(jnp.zeros_like, s.mu), nu=jax.tree.map(jnp.zeros_like, s.nu))
                if s is adam
                else s
            ),
            imported.opt_state,
            is_leaf=lambda s: s is adam,
        )
    )
    without, _ = compiled(no_moments, batch)
    assert (
        max(
            np.abs(np.asarray(a) - np.asarray(b)).max()
            for a, b in zip(
                jax.tree.leaves(jax.device_get(updated.params)), jax.tree.leaves(jax.device_get(without.params))
            )
        )
        > 1e-6
    )
    # the run's two steps, taken here from the imported state
    second_batch = sharding.global_batch(exp.source.next_batch(), exp.mesh)
    two_steps, _ = compiled(updated, second_batch)
    two_steps = jax.device_get(two_steps.params)
    exp.close()

    with caplog.at_level(logging.INFO, logger=loop.__name__):
        state = loop.train_and_evaluate(cfg, workdir)
    assert f"resumed from step {STEP}" in [r.getMessage() for r in caplog.records]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == [STEP + 1, STEP + 2]
    # the first step started from the imported parameters (a fresh start gives another loss)...
    np.testing.assert_allclose(rows[0]["loss"], float(first["loss"]), rtol=1e-6)
    # ...and the updates of the imported moments: the run's parameters are those two steps
    for a, b in zip(jax.tree.leaves(two_steps), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # ...and from the imported optimiser: Adam's count and the schedule went on from STEP
    assert int(state.step) == STEP + 2
    assert int(adam_state_of(state.opt_state).count) == STEP + 2
    assert schedule_counts_of(state.opt_state) == [STEP + 2]


def test_import_refuses_a_mismatched_config_and_a_used_workdir(optax_pickle, tmp_path):
    cfg = small_config()
    cfg.model.width = 128
    with pytest.raises(config_lib.ConfigError, match="shape"):
        import_official.import_checkpoint(
            import_official.load_pickle(optax_pickle), cfg, str(tmp_path / "a"), image_size=8
        )
    delayed = small_config()
    delayed.model.matmul_precision, delayed.model.fp8_amax_history = "fp8", 16
    with pytest.raises(config_lib.ConfigError, match="the reference checkpoint has no FP8 amax histories"):
        import_official.import_checkpoint(
            import_official.load_pickle(optax_pickle), delayed, str(tmp_path / "a"), image_size=8
        )
    good = small_config()
    import_official.import_checkpoint(
        import_official.load_pickle(optax_pickle), good, str(tmp_path / "b"), image_size=8
    )
    with pytest.raises(FileExistsError):
        import_official.import_checkpoint(
            import_official.load_pickle(optax_pickle), good, str(tmp_path / "b"), image_size=8
        )
