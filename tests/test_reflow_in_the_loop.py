"""Reflow through the train loop (stage one's command, the stored-pairs reader, stage two's run)
and warm starts (``train.init_from``), on one tiny trained flow-matching run of the 2-D toy."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from conftest import child_env
from shortcut_jax.data import pairs as pairs_io
from shortcut_jax import config_lib, data, reflow_pairs
from shortcut_jax.training import runs, loop
from shortcut_jax.infra import writers
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.training.runs import warm_start_params
from shortcut_jax.sample import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PAIRS, SHARD_SIZE, BUDGET = 100, 64, 4


def toy(objective="flow_matching", **overrides):
    spec = importlib.util.spec_from_file_location("toy2d", os.path.join(ROOT, "experiments", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"objective={objective},runlocal=True")
    c.train.progress_bar, c.train.use_tensorboard, c.train.async_ckpt = False, False, False
    c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 12, 6, 12, 12
    c.eval.budgets, c.eval.grid_budgets, c.eval.num_samples, c.eval.batch_size = (1,), (1,), 200, 200
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        c[section][key] = value
    return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A flow-matching run trained far enough that its output is not the zero-initialised final
    layer's (constant learning rate; debiased EMA, so the EMA holds no initialisation)."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "fm")
    loop.train_and_evaluate(toy(**{"optim.schedule": "constant", "train.ema_debias": True}), workdir)
    return workdir


@pytest.fixture(scope="module")
def pairs_dir(teacher, tmp_path_factory):
    """Stage one through its command line (parsed in-process)."""
    out = str(tmp_path_factory.mktemp("pairs") / "p")
    argv = [
        "reflow_pairs",
        f"--workdir={teacher}",
        f"--out_dir={out}",
        f"--num_pairs={NUM_PAIRS}",
        f"--budget={BUDGET}",
        "--seed=3",
        f"--shard_size={SHARD_SIZE}",
        "--batch_size=32",
    ]
    fv = reflow_pairs.define_flags(flags.FlagValues(), argv)
    fv(argv)
    reflow_pairs.run(fv)
    return out


# ----------------------------------------------------------------------------- stage one


def test_stage_one_pairs_are_the_runs_sampler_on_the_seeded_noise(teacher, pairs_dir):
    pairs = pairs_io.load_pairs(pairs_dir)
    run = load_run(toy(), teacher)  # the run's own restore path, EMA weights
    try:
        for index in range(2):
            count = min(SHARD_SIZE, NUM_PAIRS - index * SHARD_SIZE)
            noise, labels = pairs_io.shard_inputs(index, count, seed=3, shape=(2,), num_classes=0)
            want = run.exp.sampler.to_host(run.exp.sampler(run.params, noise, None, num_steps=BUDGET))
            rows = slice(index * SHARD_SIZE, index * SHARD_SIZE + count)
            np.testing.assert_array_equal(pairs["noise"][rows], noise)
            np.testing.assert_allclose(pairs["x"][rows], want, rtol=1e-5, atol=1e-6)
    finally:
        run.close()
    # the teacher moved the noise: the pairs are not the identity
    assert np.abs(pairs["x"] - pairs["noise"]).mean() > 1e-2
    with open(os.path.join(pairs_dir, pairs_io.MANIFEST)) as f:
        meta = json.load(f)["meta"]
    assert (meta["teacher_workdir"], meta["teacher_step"], meta["budget"]) == (os.path.abspath(teacher), 12, BUDGET)
    assert meta["data"]["shape"] == [2] and meta["data"]["num_classes"] == 0


def test_stage_one_refuses_a_bad_budget_a_missing_checkpoint_and_other_settings(teacher, pairs_dir, tmp_path):
    with pytest.raises(ValueError, match="--budget"):
        reflow_pairs.generate(teacher, str(tmp_path / "a"), num_pairs=10, budget=3)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        reflow_pairs.generate(str(tmp_path), str(tmp_path / "b"), num_pairs=10)
    before = sorted(os.listdir(pairs_dir))
    with pytest.raises(ValueError, match="other settings"):
        reflow_pairs.generate(teacher, pairs_dir, num_pairs=NUM_PAIRS, budget=2, seed=3, shard_size=SHARD_SIZE)
    assert sorted(os.listdir(pairs_dir)) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- the pairs reader


def fake_pairs(out_dir, num_pairs=50, num_classes=3):
    """Pairs whose sample is a known function of its noise and label: x = 2 noise + label."""

    def sampler(params, noise, labels, num_steps, cfg_scale):
        return 2.0 * noise + labels[:, None].astype(np.float32)

    pairs_io.generate_pairs(
        sampler,
        None,
        out_dir=out_dir,
        shape=(2,),
        num_classes=num_classes,
        num_pairs=num_pairs,
        num_steps=1,
        seed=0,
        shard_size=16,
        batch_size=8,
    )


def pair_source(path, batch_size=8, process_index=0, process_count=1, **keys):
    cfg = data.default_data_config()
    cfg.name, cfg.path = data.PAIRS_DATA, path
    for key, value in keys.items():
        cfg[key] = value
    return data.make_dataset(
        cfg, batch_size=batch_size, seed=5, process_index=process_index, process_count=process_count
    )


def test_noise_rows_stay_with_their_samples_after_shuffling(tmp_path):
    fake_pairs(str(tmp_path))
    source = pair_source(str(tmp_path))
    assert source.spec == data.DataSpec(shape=(2,), num_classes=3, kind="points")
    stored = pairs_io.load_pairs(str(tmp_path))
    seen = []
    for _ in range(14):  # two epochs and a bit: batches that span epoch boundaries
        b = source.next_batch()
        assert b["noise"].shape == b["x"].shape == (8, 2) and b["noise"].dtype == np.float32
        np.testing.assert_allclose(b["x"], 2 * b["noise"] + b["label"][:, None], rtol=1e-6)
        seen.append(b["noise"])
    first_epoch = np.concatenate(seen)[:50]
    # shuffled (not the stored order), and every pair exactly once per epoch
    assert not np.array_equal(first_epoch, stored["noise"])
    assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, stored["noise"]))


def test_resume_mid_epoch_gives_the_same_next_batch_and_processes_split_it(tmp_path):
    fake_pairs(str(tmp_path))
    source = pair_source(str(tmp_path))
    for _ in range(3):
        source.next_batch()
    state = json.loads(json.dumps(source.get_state()))  # as a checkpoint stores it
    expected = source.next_batch()
    resumed = pair_source(str(tmp_path))
    resumed.set_state(state)
    got = resumed.next_batch()
    for key in ("x", "noise", "label"):
        np.testing.assert_array_equal(got[key], expected[key])
    # two processes of half the batch each hold the two halves of the same global batch
    halves = []
    for p in range(2):
        part = pair_source(str(tmp_path), batch_size=4, process_index=p, process_count=2)
        part.set_state(state)
        halves.append(part.next_batch())
    for key in ("x", "noise", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), expected[key])


def test_pairs_reader_refuses_flips_incomplete_sets_and_unlabelled_use_drops_classes(tmp_path):
    fake_pairs(str(tmp_path))
    with pytest.raises(ValueError, match="data.random_flip"):
        pair_source(str(tmp_path), random_flip=True)
    assert pair_source(str(tmp_path), use_labels=False).spec.num_classes == 0
    os.remove(pairs_io.shard_path(str(tmp_path), 1))
    with pytest.raises(ValueError, match="shards are missing"):
        pair_source(str(tmp_path))
    with pytest.raises(ValueError, match="has no manifest.json"):
        pair_source(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- stage two


def test_reflow_trains_from_stored_pairs_through_the_command_line(pairs_dir, tmp_path):
    workdir = str(tmp_path / "reflow")
    # the persistent compilation cache of the tests, for the child process too
    env = child_env(JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:objective=reflow,runlocal=True",
            f"--workdir={workdir}",
            "--config.data.name=reflow_pairs",
            f"--config.data.path={pairs_dir}",
            "--config.train.steps=4",
            "--config.train.log_every=2",
            "--config.train.ckpt_every=4",
            "--config.train.eval_every=4",
            "--config.train.progress_bar=False",
            "--config.train.use_tensorboard=False",
            "--config.eval.budgets=(1,)",
            "--config.eval.grid_budgets=(1,)",
            "--config.eval.num_samples=100",
            "--config.eval.batch_size=100",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["flow_loss"]) and r["flow_loss"] > 0 for r in rows)
    # the data position went through the checkpoint: 4 steps of 64 pairs
    assert os.path.exists(os.path.join(workdir, "eval", "00000004", "evaluation.json"))


def test_reflow_without_pairs_is_refused_naming_the_reader(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="data.name='reflow_pairs'"):
        loop.train_and_evaluate(toy("reflow"), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


# ----------------------------------------------------------------------------- warm start


def test_warm_started_shortcut_run_computes_the_flow_velocity_at_every_level(teacher, tmp_path):
    config = toy("shortcut", **{"train.init_from": teacher})
    exp = Experiment(config, str(tmp_path / "wd"))
    try:
        assert exp.warm_start is not None and exp.warm_start.source_level == 0  # flow matching ignored its level
        assert exp.meta["init_from"]["step"] == 12 and exp.meta["init_from"]["objective"] == "flow_matching"
        fresh = exp.init_state()
        state = runs.warm_started(exp, fresh, exp.warm_start)
        source = load_run(toy(), teacher)
        try:
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
            t = jnp.asarray(rng.uniform(size=16), jnp.float32)
            label = jnp.zeros(16, jnp.int32)
            want = source.exp.apply_fn(source.params, x, t, jnp.zeros(16, jnp.int32), label)
            assert float(jnp.abs(want).mean()) > 1e-2  # a velocity, not the zero-initialised output
            levels = range(config.objective.num_levels + 1)
            for k in levels:
                got = exp.apply_fn(state.params, x, t, jnp.full(16, k, jnp.int32), label)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"level {k}")
            # without the level rewrite the shortcut network would read other levels differently
            plain = warm_start_params(runs.restore_weights(exp.warm_start.saved), fresh.params)
            assert (
                max(
                    float(jnp.abs(exp.apply_fn(plain, x, t, jnp.full(16, k, jnp.int32), label) - want).max())
                    for k in levels
                )
                > 1e-3
            )
        finally:
            source.close()
        # step 0, a fresh optimiser, every EMA tree at the loaded parameters
        assert int(state.step) == 0
        for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
            np.testing.assert_array_equal(a, b)
        for ema in state.ema_params:
            jax.tree.map(np.testing.assert_array_equal, ema, state.params)
    finally:
        exp.close()


def test_warm_start_source_of_another_shape_is_refused_before_compiling(teacher, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    workdir = tmp_path / "wd"
    with pytest.raises(config_lib.ConfigError, match="architecture.width: saved 256, this run 128"):
        loop.train_and_evaluate(toy("shortcut", **{"train.init_from": teacher, "model.width": 128}), str(workdir))
    with pytest.raises(config_lib.ConfigError, match="no checkpoint of step 5"):
        loop.train_and_evaluate(
            toy("shortcut", **{"train.init_from": teacher, "train.init_from_step": 5}), str(workdir)
        )
    assert not compiled and not workdir.exists()


def test_a_resuming_run_does_not_read_its_warm_start_source(teacher):
    # the teacher's own workdir holds a checkpoint: the run resumes, and a source that is gone is not looked at
    exp = Experiment(
        toy(**{"optim.schedule": "constant", "train.ema_debias": True, "train.init_from": "/nonexistent/run"}), teacher
    )
    try:
        assert exp.warm_start is None
    finally:
        exp.close()


def test_level_rule_reads_a_source_that_used_its_level_input_at_its_finest_level():
    assert runs.source_level({"objective": {"name": "shortcut", "num_levels": 5}}) == 5
    assert runs.source_level({"objective": {"name": "live_reflow", "num_levels": 7}}) == 7
    for ignored in ("flow_matching", "diffusion", "reflow", "consistency_training"):
        assert runs.source_level({"objective": {"name": ignored, "num_levels": 7}}) == 0
    with pytest.raises(config_lib.ConfigError, match="objective 'magic'"):
        runs.source_level({"objective": {"name": "magic", "num_levels": 7}})
