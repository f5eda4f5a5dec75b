"""The training loop end to end: CLI run, exact resume after SIGKILL, data parallelism,
config checks before compiling, non-finite losses, gradient accumulation."""

import glob
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import child_env
from shortcut_jax import config_lib, evaluate
from shortcut_jax.infra import checkpoint, sharding
from shortcut_jax.training import loop, train_state, train_step
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.objectives import METHODS, Method, make_objective_config, shortcut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def load_experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def override(config, overrides: dict):
    """Set dotted keys (``'train.steps'``) on a config; returns it."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def quiet(config):
    config.train.progress_bar = False
    config.train.use_tensorboard = False
    return config


def toy_config(**overrides):
    c = quiet(load_experiment("toy2d").get_config("runlocal=True"))
    c.train.async_ckpt = False
    return override(c, overrides)


def digits_config(**overrides):
    return override(quiet(load_experiment("digits").get_config("runlocal=True")), overrides)


def params_of(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- end to end


def test_cli_run_writes_checkpoint_metrics_manifest_and_grids(tmp_path):
    workdir = str(tmp_path / "run")
    env = child_env(JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:runlocal=True",
            f"--workdir={workdir}",
            "--config.train.progress_bar=False",
            "--config.train.eval_every=10",
            "--config.eval.num_samples=300",
            "--config.eval.final_num_samples=1000",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        assert ckpt.latest_step() == 20
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for key in (
        "flow_loss",
        "sc_loss",
        "sc_loss/level_0",
        "sc_loss/level_6",
        "grad_norm",
        "param_norm",
        "update_norm",
        "lr",
        "input_wait_ms",
        "images_per_second",
    ):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    # cheap evaluations on the way, the last one with eval.final_num_samples
    eval_rows = [r for r in rows if "eval/sliced_wasserstein_1step" in r]
    assert [(r["step"], r["eval/num_samples"]) for r in eval_rows] == [(10, 300), (20, 1000)]
    manifest = json.load(open(os.path.join(workdir, "manifest.json")))
    assert manifest["config"]["train"]["steps"] == 20
    assert "jax" in json.dumps(manifest)
    evals = glob.glob(os.path.join(workdir, "eval", "*", "*"))
    names = {os.path.basename(p) for p in evals}
    assert {"samples_1step.png", "distance_by_budget.md", "distance_by_budget.png"} <= names
    # the offline entry point evaluates the saved run the same way
    results = evaluate.evaluate_checkpoint(toy_config(), workdir, out_dir=str(tmp_path / "offline"))
    assert sorted(results) == [1, 128] and all(np.isfinite(v) for v in results.values())
    assert os.path.exists(tmp_path / "offline" / "distance_by_budget.json")
    # By default it never replaces a finished evaluation, nor the run's metrics...
    own = os.path.join(workdir, "eval", "00000020")
    table = open(os.path.join(own, "distance_by_budget.md")).read()
    lines = len(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    again = evaluate.evaluate_checkpoint(toy_config(), workdir)
    assert again == results and open(os.path.join(own, "distance_by_budget.md")).read() == table
    assert os.path.exists(own + "_offline1/evaluation.json")
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == lines
    # ...but completes one that was cut off, as the training loop would have written it.
    os.remove(os.path.join(own, "evaluation.json"))
    assert evaluate.evaluate_checkpoint(toy_config(), workdir) == results  # a table alone also counts
    assert os.path.exists(own + "_offline2/evaluation.json")
    for name in ("evaluation.json", "distance_by_budget.json"):
        if os.path.exists(os.path.join(own, name)):
            os.remove(os.path.join(own, name))
    evaluate.evaluate_checkpoint(toy_config(), workdir)
    last = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
    assert last["step"] == 20 and last["eval/num_samples"] == 1000
    assert last["eval/sliced_wasserstein_1step"] == results[1]
    assert json.load(open(os.path.join(own, "evaluation.json")))["num_samples"] == 1000


def test_image_run_writes_grids_and_resumes_to_more_steps(tmp_path):
    workdir = str(tmp_path / "digits")
    state = loop.train_and_evaluate(digits_config(), workdir)
    assert int(state.step) == 6
    assert glob.glob(os.path.join(workdir, "eval", "00000006", "samples_1step.png"))
    # raising the step budget continues from the saved step instead of starting over
    state = loop.train_and_evaluate(digits_config(**{"train.steps": 8}), workdir)
    assert int(state.step) == 8
    rows = [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert rows == [2, 4, 6, 8]


# --------------------------------------------------------------------------- exact resume


def test_sigkill_and_resume_is_bitwise_identical(tmp_path, caplog):
    steps = 40
    overrides = {
        "train.steps": steps,
        "train.ckpt_every": 4,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.async_ckpt": True,
    }
    reference = loop.train_and_evaluate(toy_config(**overrides), str(tmp_path / "reference"))

    # The kill point comes from a seed that is printed and named in every failure message:
    # SIGKILL_TEST_SEED=<seed> replays it.
    seed = int(os.environ.get("SIGKILL_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    kill_after = int(np.random.default_rng(seed).integers(9, 30))
    replay = f"kill after step {kill_after}; replay with SIGKILL_TEST_SEED={seed}"
    print(replay)
    workdir = str(tmp_path / "killed")
    args = [f"--config.{k}={v}" for k, v in overrides.items()] + ["--config.train.progress_bar=False"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:runlocal=True",
            f"--workdir={workdir}",
            *args,
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics):
                logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
                if logged and logged[-1] >= kill_after:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and saved < steps, f"killed too late (saved {saved}); {replay}"

    with caplog.at_level(logging.INFO, logger=loop.__name__):
        resumed = loop.train_and_evaluate(toy_config(**overrides), workdir)
    # it resumed from the saved step, not from scratch: the log says so, and the metrics hold every
    # step once (the killed run's rows past its checkpoint dropped, then logged again)
    assert f"resumed from step {saved}" in [r.getMessage() for r in caplog.records], replay
    logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert logged == list(range(1, steps + 1)), replay
    # the whole state (step, parameters, EMA, optimiser state, rng) is bit for bit the reference's
    ref_leaves, ref_tree = jax.tree.flatten(jax.device_get(reference))
    res_leaves, res_tree = jax.tree.flatten(jax.device_get(resumed))
    assert res_tree == ref_tree, replay
    for a, b in zip(ref_leaves, res_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=replay)


# --------------------------------------------------------------------------- data parallelism


def run_steps(config, n, batches):
    exp = Experiment(config, "/nonexistent-workdir-for-test")
    state = exp.init_state()
    compiled, _ = exp.compile_step()
    losses = []
    for b in batches[:n]:
        state, m = compiled(state, sharding.global_batch(b, exp.mesh))
        losses.append(float(m["loss"]))
    exp.source.close()
    return np.array(losses), params_of(state)


def test_data_parallel_on_8_devices_matches_one_device():
    assert jax.device_count() == 8
    cfg1 = digits_config(**{"mesh.data": 1})
    exp = Experiment(cfg1, "/nonexistent-workdir-for-test")
    batches = [exp.source.next_batch() for _ in range(5)]
    exp.source.close()
    loss1, params1 = run_steps(cfg1, 5, batches)
    loss8, params8 = run_steps(digits_config(**{"mesh.data": -1}), 5, batches)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    flat1 = np.concatenate([a.ravel() for a in jax.tree.leaves(params1)])
    flat8 = np.concatenate([a.ravel() for a in jax.tree.leaves(params8)])
    assert np.linalg.norm(flat8 - flat1) / np.linalg.norm(flat1) <= 1e-5


def test_fsdp_mesh_shards_parameters_and_matches():
    # width 64: the MLP kernels (64 x 256) are large enough to be sharded
    cfg = digits_config(**{"mesh.data": 4, "mesh.fsdp": 2, "model.width": 64})
    exp = Experiment(cfg, "/nonexistent-workdir-for-test")
    specs = [s.spec for s in jax.tree.leaves(exp.state_shardings)]
    assert any("fsdp" in str(spec) for spec in specs)
    batches = [exp.source.next_batch() for _ in range(3)]
    exp.source.close()
    loss_fsdp, params_fsdp = run_steps(cfg, 3, batches)
    loss_one, params_one = run_steps(digits_config(**{"mesh.data": 1, "model.width": 64}), 3, batches)
    np.testing.assert_allclose(loss_fsdp, loss_one, rtol=1e-5)
    assert jax.tree.structure(params_fsdp) == jax.tree.structure(params_one)
    flat_one = np.concatenate([a.ravel() for a in jax.tree.leaves(params_one)])
    flat_fsdp = np.concatenate([a.ravel() for a in jax.tree.leaves(params_fsdp)])
    assert np.linalg.norm(flat_fsdp - flat_one) / np.linalg.norm(flat_one) <= 1e-5


# --------------------------------------------------------------------------- config checks


def _listing(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


BAD_CONFIGS = {
    "objective": ({"objective.name": "consistency_magic"}, "objective.name"),
    "dataset": ({"data.name": "imagenet9000"}, "imagenet9000"),
    "devices": ({"mesh.data": 8, "train.batch_size": 60}, "divisible by the 8 devices"),
    "accumulation": ({"optim.accum_steps": 3}, "accum_steps"),
    "too small for levels": ({"train.batch_size": 16}, "self-consistency rows"),
    "patch": ({"model.patch_size": 3}, "patch_size"),
    "budget": ({"eval.budgets": (3,)}, "eval budget 3"),
    "ema decay": ({"train.ema_decays": (0.999, 1.0)}, "ema_decays"),
    "final samples": ({"eval.final_num_samples": -1}, "final_num_samples"),
    "eval ema": ({"eval.ema_index": 1}, "eval.ema_index"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_raises_before_compiling_or_writing(name, tmp_path, monkeypatch):
    overrides, message = BAD_CONFIGS[name]
    cfg = override(digits_config(), overrides)
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    workdir = tmp_path / "wd"
    with pytest.raises((config_lib.ConfigError, ValueError), match=message):
        loop.train_and_evaluate(cfg, str(workdir))
    assert not compiled
    assert not workdir.exists()


def test_workdir_with_a_different_model_is_refused_untouched(tmp_path):
    workdir = str(tmp_path / "wd")
    loop.train_and_evaluate(digits_config(**{"train.steps": 3, "train.eval_every": 100}), workdir)
    before = _listing(workdir)
    with pytest.raises(config_lib.ConfigError, match="architecture.width"):
        loop.train_and_evaluate(digits_config(**{"train.steps": 6, "model.width": 64}), workdir)
    assert _listing(workdir) == before
    # execution choices that leave the parameters' shapes alone may change between launches
    state = loop.train_and_evaluate(
        digits_config(**{"train.steps": 4, "train.eval_every": 100, "model.remat": "full"}), workdir
    )
    assert int(state.step) == 4


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    cfg = toy_config(
        **{
            "optim.lr": 1e12,
            "optim.schedule": "constant",
            "train.steps": 40,
            "train.ckpt_every": 1,
            "train.log_every": 1,
            "optim.weight_decay": 0.0,
        }
    )
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite .* at step \d+"):
        loop.train_and_evaluate(cfg, workdir)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        last = ckpt.latest_step()
        exp = Experiment(cfg, workdir)
        state, _, _ = ckpt.restore(last, exp.abstract_state)
        exp.source.close()
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(jax.device_get(state.params)))


# --------------------------------------------------------------------------- accumulation


def test_accumulation_spreads_levels_over_the_global_batch():
    from shortcut_jax.objectives import ObjectiveConfig

    cfg = ObjectiveConfig(apply_fn=None, num_classes=0, sc_fraction=0.125)
    plan = shortcut.plan_micro_batches(jax.random.key(0), 256, 4, cfg)["sc_level"]
    assert plan.shape == (4, 8)
    counts = np.bincount(np.asarray(plan).ravel(), minlength=7)
    np.testing.assert_array_equal(counts, [4 + (32 - 28), 4, 4, 4, 4, 4, 4])  # the global assignment
    assert all(len(set(np.asarray(row).tolist())) >= 4 for row in plan)  # each micro-batch mixes levels


def test_training_with_accumulation_logs_every_level_weighted_by_its_rows(tmp_path):
    # 16 self-consistency rows of a 64-row batch over 7 levels, dealt to 4 micro-batches: levels
    # 1..6 have one row in two of the micro-batches and none in the other two.
    cfg = digits_config(
        **{
            "optim.accum_steps": 4,
            "train.batch_size": 64,
            "train.steps": 2,
            "train.log_every": 1,
            "train.eval_every": 100,
        }
    )
    levels = cfg.objective.num_levels
    n_sc = shortcut.num_sc_rows(64, cfg.objective.sc_fraction)
    plan = shortcut.plan_micro_batches(jax.random.key(0), 64, 4, make_objective_config(cfg.objective, None, 10))
    plan = plan["sc_level"]
    assert any(set(range(levels)) - set(np.asarray(row).tolist()) for row in plan)  # some level is missing
    global_rows = np.bincount(np.asarray(shortcut.assign_levels(None, n_sc, levels, "official")), minlength=levels)

    state = loop.train_and_evaluate(cfg, str(tmp_path / "acc"))
    rows = [r for r in read_jsonl(str(tmp_path / "acc" / "metrics.jsonl")) if "loss" in r]
    assert int(state.step) == 2 and [r["step"] for r in rows] == [1, 2]
    for r in rows:
        per_level = np.array([r[f"sc_loss/level_{i}"] for i in range(levels)])
        counts = np.array([r[f"sc_loss/level_{i}/rows"] for i in range(levels)])
        np.testing.assert_array_equal(counts, global_rows)  # the rows of the whole global batch
        assert np.all(np.isfinite(per_level))
        # each level's mean, weighted by its rows, gives the mean over every self-consistency row
        # (a level's mean divided by the micro-batch count would fall short of it)
        np.testing.assert_allclose(np.sum(counts * per_level) / n_sc, r["sc_loss"], rtol=1e-5)
        np.testing.assert_allclose((n_sc * r["sc_loss"] + (64 - n_sc) * r["flow_loss"]) / 64, r["loss"], rtol=1e-5)
    # The zero-initialised output layer makes the first step's self-consistency losses all zero;
    # after one update every level has a loss of its own.
    assert all(rows[-1][f"sc_loss/level_{i}"] > 0 for i in range(levels))


ROWWISE = "rowwise_levels_for_test"


def rowwise_objective(params, teacher_params, batch, rng, cfg):
    """A deterministic objective in the objectives' metric convention: each row's loss depends on
    its own row only, its level is its label, and per-level means come with their row counts."""
    del teacher_params, rng, cfg
    err = jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["x"][:, ::-1]), axis=-1)  # [rows]
    one_hot = jax.nn.one_hot(batch["label"], 5, dtype=jnp.float32)  # [rows, levels]
    counts = jnp.sum(one_hot, axis=0)
    per_level = jnp.sum(one_hot * err[:, None], axis=0) / jnp.maximum(counts, 1.0)
    metrics = {"loss": jnp.mean(err)}
    for i in range(5):
        metrics[f"err/level_{i}"] = per_level[i]
        metrics[f"err/level_{i}/rows"] = counts[i]
    return jnp.mean(err), metrics


def test_accumulated_step_equals_one_step_on_the_global_batch_with_levels_missing_from_micro_batches(monkeypatch):
    monkeypatch.setitem(METHODS, ROWWISE, Method(rowwise_objective))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    # 4 micro-batches of 8 rows: level 0 in every one, level 1 in the first only, level 2 in the
    # first (one row) and the last (five), level 3 in the third only, level 4 nowhere
    level = np.array([0, 0, 1, 1, 1, 2, 0, 0] + [0] * 8 + [3, 3, 0, 0, 0, 0, 0, 0] + [2] * 5 + [0] * 3, np.int32)
    batch = {"x": jnp.asarray(x), "label": jnp.asarray(level)}
    params = {"w": jnp.asarray(rng.standard_normal((6, 6)) * 0.3, jnp.float32)}
    tx = optax.adam(1e-2)
    schedule = optax.constant_schedule(1e-2)
    results = {}
    for accum in (1, 4):
        step = jax.jit(train_step.make_train_step(ROWWISE, None, tx, schedule, accum_steps=accum))
        state = train_state.create(params, tx, jax.random.PRNGKey(0), (0.9,))
        new_state, metrics = step(state, batch)
        results[accum] = (params_of(new_state), jax.device_get(metrics))
    (params_1, m1), (params_4, m4) = results[1], results[4]
    assert set(m1) == set(m4)
    err = np.mean(np.square(x @ np.asarray(params["w"]) - x[:, ::-1]), axis=-1)  # independent reference
    for i in range(5):
        rows = level == i
        assert m4[f"err/level_{i}/rows"] == m1[f"err/level_{i}/rows"] == rows.sum()
        want = err[rows].mean() if rows.any() else 0.0
        np.testing.assert_allclose(m1[f"err/level_{i}"], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(m4[f"err/level_{i}"], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(params_4["w"], params_1["w"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(params_1["w"], np.asarray(params["w"]))  # the step did move the parameters


# --------------------------------------------------------------------------- experiments


def _experiment_variants():
    out = []
    for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        module = load_experiment(name)
        for arg in getattr(module, "TEST_ARGS", ("",)):
            out.append((name, arg))
    return out


@pytest.mark.parametrize("name,arg", _experiment_variants())
def test_every_experiment_file_builds_and_validates(name, arg):
    cfg = load_experiment(name).get_config(arg)
    assert name.split("_")[0] in load_experiment(name).__doc__ or "Command" in load_experiment(name).__doc__
    assert "python -m shortcut_jax.main" in load_experiment(name).__doc__
    data_axis, fsdp = sharding.mesh_shape(cfg.mesh, 8)
    config_lib.validate(cfg, num_devices=data_axis * fsdp)


# --------------------------------------------------------------------------- EMA


def test_debiased_ema_is_the_normalised_weighted_mean_of_the_iterates():
    from shortcut_jax.training import train_state

    rng = np.random.default_rng(0)
    iterates = [rng.standard_normal(5).astype(np.float32) for _ in range(40)]
    decays = (0.9, 0.5)
    init = {"w": np.full(5, 100.0, np.float32)}  # far from every iterate: any weight left on it shows
    biased = debiased = (init, init)
    for n, p in enumerate(iterates, start=1):
        debiased = train_state.update_ema(debiased, {"w": p}, decays, count=n)
        biased = train_state.update_ema(biased, {"w": p}, decays)
    for i, d in enumerate(decays):
        weights = np.array([d ** (len(iterates) - k) for k in range(1, len(iterates) + 1)])
        expected = (weights[:, None] * np.stack(iterates)).sum(0) / weights.sum()
        np.testing.assert_allclose(np.asarray(debiased[i]["w"]), expected, rtol=1e-5, atol=1e-5)
        plain = d ** len(iterates) * 100.0 + (1 - d) * (weights[:, None] * np.stack(iterates)).sum(0)
        np.testing.assert_allclose(np.asarray(biased[i]["w"]), plain, rtol=1e-5, atol=1e-5)
    # After one update the debiased average is that update's parameters.
    one = train_state.update_ema((init,), {"w": iterates[0]}, (0.999,), count=1)
    np.testing.assert_allclose(np.asarray(one[0]["w"]), iterates[0], rtol=1e-6)


def test_compiled_step_updates_the_donated_state_in_place_unless_told_not_to():
    exp = Experiment(digits_config(), "/nonexistent-workdir-for-test")
    exp.source.close()
    state_bytes = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state))
    donated, _ = exp.compile_step()
    kept, _ = exp.compile_step(donate=False)
    assert donated.memory_analysis().alias_size_in_bytes == state_bytes  # every state buffer is reused
    assert kept.memory_analysis().alias_size_in_bytes == 0


def test_state_initialised_on_the_host_equals_the_one_initialised_on_the_fsdp_mesh():
    cfg = digits_config(**{"mesh.data": 4, "mesh.fsdp": 2, "model.width": 64})
    exp = Experiment(cfg, "/nonexistent-workdir-for-test")
    on_device = exp.init_state()
    exp.host_cpu = jax.local_devices(backend="cpu")[0]  # as train.init_on='host' sets it
    on_host = exp.init_state()
    # a GPU attention kernel cannot be traced for the CPU: the host path initialises with XLA's
    # attention instead, which has the same (no) parameters
    exp.model = exp.model.clone(attention_impl="cudnn")
    on_host_cudnn = exp.init_state()
    exp.source.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), on_host, on_host_cudnn)
    leaves_d, tree_d = jax.tree.flatten(on_device)
    leaves_h, tree_h = jax.tree.flatten(on_host)
    assert tree_d == tree_h
    assert any("fsdp" in str(x.sharding.spec) for x in leaves_h)  # placed shard by shard, not replicated
    for d, h, want in zip(leaves_d, leaves_h, jax.tree.leaves(exp.state_shardings)):
        assert h.sharding == want
        np.testing.assert_array_equal(np.asarray(jax.device_get(h)), np.asarray(jax.device_get(d)))
    with pytest.raises(config_lib.ConfigError, match="train.init_on"):
        config_lib.validate(digits_config(**{"train.init_on": "cpu"}), num_devices=8)


def test_train_step_ema_follows_the_debiased_or_the_reference_formula(tmp_path):
    steps = 3
    states = {}
    for debias in (False, True):
        cfg = toy_config(
            **{
                "train.steps": steps,
                "train.ema_debias": debias,
                "objective.teacher": "ema",
                "train.ema_decays": (0.999,),
            }
        )
        exp = Experiment(cfg, None)
        initial = params_of(exp.init_state())
        compiled, _ = exp.compile_step()
        state = exp.init_state()
        batch = sharding.global_batch(
            {
                "x": np.random.default_rng(0).standard_normal((cfg.train.batch_size, 2)).astype(np.float32),
                "label": np.zeros(cfg.train.batch_size, np.int32),
            },
            exp.mesh,
        )
        iterates = []
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            iterates.append(params_of(state))
        assert np.isfinite(float(metrics["loss"]))
        states[debias] = (initial, iterates, jax.tree.map(np.asarray, jax.device_get(state.ema_params[0])))
    initial, iterates, ema = states[True]
    w = np.array([0.999 ** (steps - k) for k in range(1, steps + 1)])
    expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)) / w.sum(), *iterates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ema, expected)
    initial, iterates, ema = states[False]
    expected = jax.tree.map(
        lambda i, *xs: 0.999**steps * i + 0.001 * sum(0.999 ** (steps - k) * x for k, x in enumerate(xs, 1)),
        initial,
        *iterates,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ema, expected)


def test_evaluation_samples_the_chosen_ema_tree_and_the_teacher_reads_the_first():
    cfg = toy_config(**{"train.ema_decays": (0.99, 0.999), "eval.ema_index": 1})
    exp = Experiment(cfg, None)
    state = exp.init_state()
    state = state.replace(
        ema_params=(jax.tree.map(lambda p: p + 1.0, state.params), jax.tree.map(lambda p: p + 2.0, state.params))
    )
    assert exp.eval_params(state) is state.ema_params[1]
    assert state.teacher_params is state.ema_params[0]
    cfg.eval.use_ema = False
    assert Experiment(cfg, None).eval_params(state) is state.params


def test_config_is_locked_so_a_misspelt_key_fails_where_it_is_set():
    cfg = load_experiment("toy2d").get_config("")
    with pytest.raises(AttributeError, match="stepz"):
        cfg.train.stepz = 3
    with pytest.raises(config_lib.ConfigError, match="expected key=value with key in"):
        load_experiment("toy2d").get_config("steps=10")  # a single key is a --config flag, not an argument


def test_cifar10_preset_sets_the_recommended_keys_and_flags_still_win():
    cifar10 = load_experiment("cifar10")
    preset = cifar10.get_config("preset=few_step")
    recipe = cifar10.get_config("")
    assert preset != recipe
    changed = {"objective.teacher": "online", "objective.sc_fraction": 0.25, "train.ema_debias": True}
    assert preset == override(recipe, changed)
    # a --config flag is applied after get_config, so it overrides the preset's value
    assert (
        override(cifar10.get_config("preset=few_step"), {"objective.sc_fraction": 0.125}).objective.sc_fraction == 0.125
    )
    with pytest.raises(config_lib.ConfigError, match="few_step"):
        cifar10.get_config("preset=fast")
    for name, arg in (("celebahq", ""), ("imagenet", "variant=B")):
        cfg = load_experiment(name).get_config(",".join(filter(None, (arg, "preset=few_step"))))
        assert (cfg.objective.teacher, cfg.objective.sc_fraction, cfg.train.ema_debias) == ("online", 0.25, True)
        cfg = load_experiment(name).get_config(arg)
        assert (cfg.objective.teacher, cfg.objective.sc_fraction, cfg.train.ema_debias) == ("ema", 0.125, False)


def test_one_step_preset_is_meanflow_with_the_recipes_optimiser_and_the_debiased_ema():
    cifar10 = load_experiment("cifar10")
    cfg = cifar10.get_config("preset=one_step")
    # the objective=meanflow run of the comparison table with the debiased EMA, nothing else
    assert cfg == override(cifar10.get_config("objective=meanflow"), {"train.ema_debias": True})
    assert (cfg.objective.name, cfg.objective.meanflow_t_mean, cfg.objective.meanflow_norm_p) == (
        "meanflow",
        -2.0,
        0.75,
    )
    # the optimiser and EMA of the shortcut recipe, not MeanFlow's published ones (preset=meanflow)
    assert cfg.optim == cifar10.get_config("").optim and cfg.train.ema_decays == cifar10.get_config("").train.ema_decays
    assert cfg.optim != cifar10.get_config("preset=meanflow").optim
    assert (
        override(cifar10.get_config("preset=one_step"), {"objective.meanflow_norm_p": 0.0}).objective.meanflow_norm_p
        == 0.0
    )


def test_cifar10_meanflow_runs_take_meanflows_cifar10_time_sampling_and_only_they():
    cifar10 = load_experiment("cifar10")
    published = {
        "objective.meanflow_t_mean": -2.0,
        "objective.meanflow_t_std": 2.0,
        "objective.meanflow_flow_fraction": 0.25,
        "objective.meanflow_norm_p": 0.75,
    }
    for arg in ("objective=meanflow", "objective=meanflow_v", "preset=meanflow", "preset=meanflow_v"):
        cfg = cifar10.get_config(arg)
        plain = override(cifar10.get_config(""), {"objective.name": cfg.objective.name})
        if arg.startswith("preset="):
            plain = override(plain, {k: v for k, v in config_lib.PRESETS[cfg.objective.name].items()})
        assert cfg == override(plain, published), arg
    # the other objectives keep the package's (ImageNet) MeanFlow defaults, unused by them
    shortcut = cifar10.get_config("")
    assert (shortcut.objective.meanflow_t_mean, shortcut.objective.meanflow_flow_fraction) == (-0.4, 0.75)


def test_experiment_reads_and_checks_the_data_once(tmp_path, monkeypatch):
    from shortcut_jax.data import registry

    np.save(tmp_path / "points.npy", np.random.default_rng(0).standard_normal((256, 2)).astype(np.float32))
    real = registry.READERS["arrays"]
    prepared = []

    def counting_prepare(config, name):
        prepared.append(name)
        return real.prepare(config, name)

    monkeypatch.setitem(registry.READERS, "arrays", registry.Reader(prepare=counting_prepare, build=real.build))
    cfg = toy_config(**{"data.name": "arrays", "data.path": str(tmp_path / "points.npy")})
    exp = Experiment(cfg, None)
    assert exp.source.num_examples == 256 and exp.source.next_batch()["x"].shape == (64, 2)
    exp.close()
    assert prepared == ["arrays"]  # loaded and scanned for non-finite values once, not twice


def test_log_interval_means_weight_level_losses_by_their_rows():
    fetched = [
        (1, {"loss": 1.0, "sc_loss/level_3": 0.0, "sc_loss/level_3/rows": 0.0}),
        (2, {"loss": 3.0, "sc_loss/level_3": 0.5, "sc_loss/level_3/rows": 4.0}),
        (3, {"loss": 2.0, "sc_loss/level_3": 0.2, "sc_loss/level_3/rows": 1.0}),
    ]
    means = loop._mean_metrics(fetched)
    assert means["loss"] == pytest.approx(2.0)
    # the step without level-3 rows counts for nothing: (0.5 * 4 + 0.2 * 1) / 5
    assert means["sc_loss/level_3"] == pytest.approx(0.44)
    assert means["sc_loss/level_3/rows"] == pytest.approx(5 / 3)
