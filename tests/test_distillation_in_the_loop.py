"""The distillation objectives in the train loop: a frozen teacher restored from another run.

A tiny flow-matching teacher (the 2-D toy's MLP) is trained once for the module; consistency
and progressive distillation then train from it through the CLI and the train function. The
properties: the frozen teacher is the teacher run's EMA tree bit for bit and stays so
(consistency), it is the student of the step where each phase starts (progressive), an
interrupted run resumes to the state of an unbroken one across a phase start, the teacher read
onto an fsdp mesh is laid out like the parameters and equals one device's, a teacher that does
not fit is refused before anything is compiled or written, and the states and checkpoints of the
other objectives are unchanged.
"""

import glob
import os
import subprocess
import sys
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import child_env
from shortcut_jax import config_lib
from shortcut_jax.infra import checkpoint, sharding, writers
from shortcut_jax.training import runs, loop, train_state
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.sample import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy(objective, **overrides):
    """The 2-D toy's local config for ``objective``, quiet, with one cheap evaluation budget."""
    quick = {
        "train.progress_bar": False,
        "train.use_tensorboard": False,
        "train.async_ckpt": False,
        "eval.budgets": (1,),
        "eval.grid_budgets": (),
        "eval.num_samples": 200,
        "eval.batch_size": 200,
        # no warm-up: a few steps at the full rate give a teacher whose field is not straight,
        # so the distillation targets differ from its own output and the losses are not ~0
        "optim.schedule": "constant",
        "optim.lr": 3e-3,
    }
    return load_config(
        os.path.join(ROOT, "experiments", f"toy2d.py:objective={objective},runlocal=True"), dict(quick, **overrides)
    )


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    """Bit for bit, leaf by leaf, with the same structure."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(host(a))
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(host(b))
    assert a_def == b_def
    for (path, x), (_, y) in zip(a_leaves, b_leaves):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def restore_state(workdir, step, config):
    exp = Experiment(config, workdir)
    try:
        with checkpoint.Checkpointer(exp.ckpt_dir, async_save=False) as ckpt:
            state, _, meta = ckpt.restore(step, exp.abstract_state)
    finally:
        exp.close()
    return state, meta


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """(workdir, its config): flow matching on the toy, 20 steps, checkpoints at steps 10 and 20."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "flow")
    # a short EMA, so that 20 steps leave the EMA tree (the frozen teacher) far from the
    # initialisation, whose output layer is zero
    config = toy(
        "flow_matching",
        **{
            "train.steps": 20,
            "train.ckpt_every": 10,
            "train.log_every": 10,
            "train.eval_every": 100,
            "train.ema_decays": (0.8,),
        },
    )
    with pytest.MonkeyPatch.context() as patch:  # the teacher's own evaluation is not under test
        patch.setattr(loop, "evaluate_state", lambda *a, **k: {})
        loop.train_and_evaluate(config, workdir)
    return workdir, config


def teacher_ema(teacher_run, like):
    """The teacher run's first EMA tree at its latest step, read whole through the ordinary
    restore (not the partial one under test)."""
    workdir, config = teacher_run
    state, _ = restore_state(workdir, None, config)
    ema = state.ema_params[0]
    assert jax.tree.structure(ema) == jax.tree.structure(like)
    return ema


# --------------------------------------------------------------------------- consistency distillation


def test_consistency_distillation_trains_through_the_cli_with_the_teachers_ema_frozen(teacher_run, tmp_path):
    teacher_dir, teacher_cfg = teacher_run
    workdir = str(tmp_path / "cd")
    env = child_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_jax.main",
            "--config=experiments/toy2d.py:objective=consistency_distillation,runlocal=True",
            f"--workdir={workdir}",
            f"--config.objective.teacher_checkpoint={teacher_dir}",  # the workdir is accepted for its checkpoints
            "--config.train.steps=4",
            "--config.train.log_every=2",
            "--config.train.ckpt_every=4",
            "--config.train.progress_bar=False",
            "--config.train.use_tensorboard=False",
            "--config.eval.budgets=(1,)",
            "--config.eval.grid_budgets=()",
            "--config.eval.num_samples=200",
            "--config.eval.batch_size=200",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = toy("consistency_distillation", **{"objective.teacher_checkpoint": teacher_dir})
    state, meta = restore_state(workdir, 4, config)
    assert isinstance(state, train_state.DistillationTrainState) and int(state.step) == 4
    ema = teacher_ema(teacher_run, state.params)
    # restored bit for bit and untouched by four updates, while the student moved
    assert_trees_equal(state.frozen_teacher, ema)
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(host(ema)))]
    assert max(moved) > 0
    assert meta["teacher"]["step"] == 20 and meta["teacher"]["weights"] == "ema"
    assert meta["teacher"]["directory"] == os.path.join(teacher_dir, "checkpoints")
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert any("eval/sliced_wasserstein_1step" in r for r in writers.read_metrics(workdir))


# --------------------------------------------------------------------------- progressive distillation

# 3 phases of 3 steps (the last runs to step 8): phases start at updates 0, 3 and 6
PROGRESSIVE = {
    "objective.num_levels": 3,
    "objective.stage_steps": 3,
    "train.steps": 8,
    "train.ckpt_every": 2,
    "train.log_every": 1,
    "train.eval_every": 100,
    "train.keep_ckpts": 10,
}


@pytest.fixture(scope="module")
def progressive_run(teacher_run, tmp_path_factory):
    """(workdir, config, final state) of an unbroken progressive-distillation run, evaluated at
    its last step."""
    config = toy("progressive_distillation", **PROGRESSIVE, **{"objective.teacher_checkpoint": teacher_run[0]})
    workdir = str(tmp_path_factory.mktemp("pd") / "unbroken")
    state = loop.train_and_evaluate(config, workdir)
    return workdir, config, state


def test_progressive_teacher_is_the_level_free_teacher_then_the_student_where_each_phase_starts(
    teacher_run, progressive_run
):
    workdir, config, final = progressive_run
    ema = teacher_ema(teacher_run, final.params)
    at = {step: restore_state(workdir, step, config)[0] for step in (2, 6)}
    # phase 0: the flow-matching teacher ignored its level input (it saw 0); the student reads it,
    # so the teacher's level embedder is made constant at level 0, every other weight as saved
    assert_trees_equal(at[2].frozen_teacher, runs.constant_level_embedding(ema, 0))
    kernel = np.asarray(at[2].frozen_teacher["level_embed"]["hidden"]["kernel"])
    assert not kernel.any() and np.asarray(ema["level_embed"]["hidden"]["kernel"]).any()
    # phase 2 starts at update 6: its teacher is the student after 6 updates, kept to the end
    assert_trees_equal(final.frozen_teacher, at[6].params)
    assert not np.array_equal(
        np.asarray(final.frozen_teacher["out"]["kernel"]), np.asarray(at[2].frozen_teacher["out"]["kernel"])
    )
    rows = writers.read_metrics(workdir)
    assert [r["phase"] for r in rows if "phase" in r] == [0, 0, 0, 1, 1, 1, 2, 2]
    # the one-step samples of the last phase's student, through the Euler sampler
    assert [np.isfinite(r["eval/sliced_wasserstein_1step"]) for r in rows if "eval/num_samples" in r] == [True]


class Interrupted(Exception):
    pass


def test_progressive_run_interrupted_inside_a_phase_resumes_to_the_unbroken_state(
    progressive_run, tmp_path, monkeypatch
):
    _, config, unbroken = progressive_run
    workdir = str(tmp_path / "interrupted")
    real_write = writers.MetricWriter.write_scalars

    def crash_after_step_5(self, step, scalars):
        if step == 5:
            raise Interrupted("after step 5")
        return real_write(self, step, scalars)

    monkeypatch.setattr(loop, "evaluate_state", lambda *a, **k: {})
    monkeypatch.setattr(writers.MetricWriter, "write_scalars", crash_after_step_5)
    with pytest.raises(Interrupted):
        loop.train_and_evaluate(config, workdir)
    monkeypatch.setattr(writers.MetricWriter, "write_scalars", real_write)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        assert ckpt.latest_step() == 4  # inside phase 1; phase 2 starts at update 6
    # the resumed run takes its teacher (phase 1's snapshot) from its own checkpoint, not the teacher run
    monkeypatch.setattr(runs, "restore_teacher", lambda *a: pytest.fail("the teacher run was read on resume"))
    resumed = loop.train_and_evaluate(config, workdir)
    assert_trees_equal(resumed, unbroken)


def test_teacher_restored_onto_an_fsdp_mesh_is_laid_out_like_the_parameters_and_equals_one_device(
    teacher_run, tmp_path
):
    """A fresh run on data 4 x fsdp 2 reads its teacher into the parameters' shardings, the values
    those of one device. (The sharded train step with a frozen teacher and its re-snapshot is
    tested for every method in test_methods.py.)"""
    assert jax.device_count() == 8

    def start(mesh):
        config = toy(
            "progressive_distillation",
            **{"objective.teacher_checkpoint": teacher_run[0], "objective.num_levels": 2, **mesh},
        )
        exp = Experiment(config, str(tmp_path / "never-written"))
        try:
            state = exp.init_state()
            shardings = (
                [a.sharding for a in jax.tree.leaves(state.frozen_teacher)],
                [a.sharding for a in jax.tree.leaves(state.params)],
            )
        finally:
            exp.close()
        return host(state), shardings

    state1, _ = start({"mesh.data": 1})
    state8, (teacher_shardings, param_shardings) = start({"mesh.data": 4, "mesh.fsdp": 2})
    # the frozen teacher is laid out like the parameters, some of which the fsdp axis splits
    assert teacher_shardings == param_shardings
    assert any("fsdp" in str(s.spec) for s in param_shardings)
    assert_trees_equal(state8, state1)


# --------------------------------------------------------------------------- refused before compiling


def _write_meta_only_checkpoint(directory):
    """A checkpoint of a 'diffusion' run (its meta is what is checked; its arrays are not read)."""
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(
            1,
            {"step": jnp.zeros((), jnp.int32)},
            data_state={},
            meta={"objective": {"name": "diffusion", "num_levels": 7}},
        )


BAD_TEACHERS = {
    "other width": (
        {"model.width": 128},
        r"(?s)objective.teacher_checkpoint=.*architecture.width: saved 256, current 128",
    ),
    "missing folder": (
        {"objective.teacher_checkpoint": "/no/such/run"},
        "objective.teacher_checkpoint='/no/such/run' is not a directory",
    ),
    "no checkpoint": ({"objective.teacher_checkpoint": "EMPTY"}, "objective.teacher_checkpoint=.* holds no checkpoint"),
    "step not saved": ({"objective.teacher_step": 3}, r"objective.teacher_step=3 is not saved .*\[10, 20\]"),
    "not a velocity field": (
        {"objective.teacher_checkpoint": "DIFFUSION"},
        "objective.teacher_checkpoint=.* is a 'diffusion' run",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TEACHERS))
def test_teacher_that_does_not_fit_is_refused_before_compiling_or_writing(case, teacher_run, tmp_path, monkeypatch):
    overrides, message = BAD_TEACHERS[case]
    overrides = dict({"objective.teacher_checkpoint": teacher_run[0]}, **overrides)
    if overrides["objective.teacher_checkpoint"] == "EMPTY":
        overrides["objective.teacher_checkpoint"] = str(tmp_path / "empty")
        os.makedirs(overrides["objective.teacher_checkpoint"])
    if overrides["objective.teacher_checkpoint"] == "DIFFUSION":
        overrides["objective.teacher_checkpoint"] = str(tmp_path / "diffusion")
        _write_meta_only_checkpoint(overrides["objective.teacher_checkpoint"])
    config = toy("consistency_distillation", **overrides)
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1))
    workdir = tmp_path / "wd"
    with pytest.raises(config_lib.ConfigError, match=message):
        loop.train_and_evaluate(config, str(workdir))
    assert not compiled and not workdir.exists()
    assert not os.path.exists("/no/such/run")


def test_distilling_a_run_into_its_own_workdir_is_refused_untouched(teacher_run):
    workdir = teacher_run[0]
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(workdir, "**"), recursive=True)}
    config = toy("consistency_distillation", **{"objective.teacher_checkpoint": workdir})
    with pytest.raises(config_lib.ConfigError, match="objective.name='flow_matching' run.*fresh --workdir"):
        loop.train_and_evaluate(config, workdir)
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(workdir, "**"), recursive=True)} == before


def test_teacher_that_kept_no_ema_needs_its_online_weights(tmp_path):
    directory = str(tmp_path / "checkpoints")
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(
            1,
            {"params": {"w": jnp.zeros((2,))}, "ema_params": ()},
            data_state={},
            meta={
                "objective": {"name": "flow_matching", "num_levels": 7},
                "ema_decays": [],
                "architecture": {},
                "data_shape": [2],
                "num_classes": 0,
            },
        )
    obj = config_lib.default_config().objective
    obj.name, obj.teacher_checkpoint = "consistency_distillation", directory
    with pytest.raises(config_lib.ConfigError, match="set objective.teacher_weights='params'"):
        runs.find_teacher(obj, {"architecture": {}, "data_shape": [2], "num_classes": 0}, {"w": jnp.zeros((2,))})
    obj.teacher_weights = "params"
    found = runs.find_teacher(obj, {"architecture": {}, "data_shape": [2], "num_classes": 0}, {"w": jnp.zeros((2,))})
    assert (found.step, found.weights, found.objective) == (1, "params", "flow_matching")


def test_level_rule_makes_the_teachers_level_embedding_constant_only_where_the_two_networks_differ():
    assert runs.level_rule("flow_matching", "progressive_distillation", 7) == 0
    assert runs.level_rule("shortcut", "consistency_distillation", 7) == 7
    assert runs.level_rule("flow_matching", "consistency_distillation", 7) is None
    assert runs.level_rule("shortcut", "progressive_distillation", 7) is None


# --------------------------------------------------------------------------- other objectives unchanged


class StateBeforeTheTeacher(flax.struct.PyTreeNode):
    """The train state's layout before the frozen teacher existed."""

    step: Any
    params: Any
    ema_params: tuple
    opt_state: Any
    rng: Any
    ema_decays: tuple = flax.struct.field(pytree_node=False, default=(0.999,))


def test_states_without_a_teacher_keep_their_checkpoint_layout_and_old_checkpoints_restore(tmp_path):
    mesh = sharding.make_mesh(config_lib.default_config().mesh, devices=jax.devices()[:1])
    tx = optax.adamw(1e-3)
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    state = train_state.create(params, tx, jax.random.PRNGKey(3), (0.9,))
    assert type(state) is train_state.TrainState and state.frozen_teacher is None
    old = StateBeforeTheTeacher(state.step, state.params, state.ema_params, state.opt_state, state.rng, (0.9,))
    assert jax.tree.leaves(state) == jax.tree.leaves(old)

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), tree)

    for name, saved, target in (("old", old, state), ("new", state, old)):
        with checkpoint.Checkpointer(str(tmp_path / name), async_save=False) as ckpt:
            ckpt.save(1, saved, data_state={}, meta={})
            restored, _, _ = ckpt.restore(1, abstract(target))
        assert type(restored) is type(target)
        for a, b in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(host(saved))):
            np.testing.assert_array_equal(a, b)
    with_teacher = train_state.create(params, tx, jax.random.PRNGKey(3), (0.9,), frozen_teacher=params)
    assert isinstance(with_teacher, train_state.DistillationTrainState)
    assert len(jax.tree.leaves(with_teacher)) == len(jax.tree.leaves(state)) + 2
