"""The comparison methods: each objective's defining property on a case with a known answer,
their samplers, the reflow pair files, the warm start, and the project's train step for every
objective: with the method's state, sharded over 8 devices as on one."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from shortcut_jax.data import pairs as pairs_io
from shortcut_jax import config_lib
from shortcut_jax.objectives import sampling
from shortcut_jax.infra import sharding
from shortcut_jax.models import MLPNet, build_model
from shortcut_jax.objectives import (
    METHODS,
    ObjectiveConfig,
    check_method_config,
    diffusion,
    make_objective_config,
    make_sampler,
    progressive,
    reflow,
    resolve_stages,
)
from shortcut_jax.objectives.common import RowSplit
from shortcut_jax.training import offline
from shortcut_jax.training import runs as warm_start
from shortcut_jax.training.experiment import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = 1e-5
K = 7


def point_velocity(x, t, point):
    """Velocity of the straight path through ``x`` at ``t`` that ends at ``point`` (per row)."""
    t = t.reshape(t.shape + (1,) * (x.ndim - 1))
    x0 = (x - t * point) / (1.0 - (1.0 - FLOOR) * t)
    return point - (1.0 - FLOOR) * x0


def point_field(params, x, t, level, label):
    """The exact velocity field of data that is one point per row; ``params`` holds the points.

    Paths to a single point are straight, so the average velocity over any step equals the
    instantaneous one whatever the level."""
    del level, label
    return point_velocity(x, t, params["point"])


@functools.lru_cache(maxsize=None)
def mlp_model(ignore_level=False, width=32):
    """(apply_fn, jitted init) of a small residual MLP on 2-D points, made once per shape."""
    model = MLPNet(width=width, depth=1, mlp_ratio=2.0, num_classes=0, ignore_level=ignore_level)

    @jax.jit
    def init(key):
        params = model.init(key, jnp.zeros((1, 2)), jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))[
            "params"
        ]
        # non-zero output weights (the output layer starts at zero)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])

    return jax.jit(lambda p, *a: model.apply({"params": p}, *a)), init


def tiny_mlp(ignore_level=False, seed=0, width=32):
    """(apply_fn, params) of the small MLP with the parameters of ``seed``."""
    apply_fn, init = mlp_model(ignore_level, width)
    return apply_fn, init(jax.random.key(seed))


def dispatch_field(mlp_apply):
    """One apply_fn for trees of both kinds: exact point fields and MLP parameters."""

    def apply_fn(params, *a):
        return point_field(params, *a) if "point" in params else mlp_apply(params, *a)

    return apply_fn


def points(n, seed=0, dim=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, dim)) * 0.7, jnp.float32)


# ------------------------------------------------------------------------------------ diffusion


def test_schedules_follow_their_closed_forms_with_the_floor():
    s = np.array([0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
    f = lambda u: np.cos(0.5 * np.pi * (u + 0.008) / 1.008) ** 2  # noqa: E731
    cosine = np.maximum(f(s) / f(0.0), 1e-4)
    linear = np.maximum(np.exp(-1000 * (1e-4 * s + 0.5 * (0.02 - 1e-4) * s**2)), 1e-4)
    np.testing.assert_allclose(diffusion.alpha_bar(s, "cosine", 1e-4), cosine, rtol=1e-5)
    np.testing.assert_allclose(diffusion.alpha_bar(s, "linear", 1e-4), linear, rtol=1e-5)
    assert float(diffusion.alpha_bar(1.0, "cosine", 1e-4)) == pytest.approx(1e-4)
    assert float(diffusion.alpha_bar(0.0, "linear", 1e-4)) == 1.0
    with pytest.raises(ValueError, match="diffusion_schedule"):
        diffusion.alpha_bar(s, "sigmoid")


def eps_of_point_data(schedule, mean, std):
    """Exact noise predictor of Gaussian data N(mean, std^2) per coordinate (std 0: a point)."""

    def apply_fn(params, x, t, level, label):
        a = diffusion.alpha_bar(1.0 - t, schedule, 1e-4)[:, None]
        b2 = 1.0 - a
        return jnp.sqrt(b2) * (x - jnp.sqrt(a) * mean) / (a * std**2 + b2)

    return apply_fn


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 2, 8, 128])
def test_ddim_with_the_exact_noise_predictor_inverts_the_forward_process_for_point_data(schedule, steps):
    mean = points(6, seed=1)
    z = points(6, seed=2) / 0.7
    a1 = diffusion.alpha_bar(1.0, schedule, 1e-4)
    x_start = jnp.sqrt(a1) * mean + jnp.sqrt(1 - a1) * z  # the forward process at s = 1
    out = sampling.ddim_sample(
        eps_of_point_data(schedule, mean, 0.0),
        None,
        x_start,
        jnp.zeros(6, jnp.int32),
        num_steps=steps,
        alpha_bar_fn=lambda s: diffusion.alpha_bar(s, schedule, 1e-4),
        level=K,
    )
    np.testing.assert_allclose(out, mean, atol=2e-4)


def test_ddim_clips_the_data_estimate_only_when_asked():
    far = jnp.full((3, 2), 10.0)  # a data point outside the clip range
    run = functools.partial(
        sampling.ddim_sample,
        eps_of_point_data("cosine", far, 0.0),
        None,
        points(3) / 0.7,
        jnp.zeros(3, jnp.int32),
        num_steps=2,
        level=K,
        alpha_bar_fn=lambda s: diffusion.alpha_bar(s, "cosine", 1e-4),
    )
    np.testing.assert_allclose(run(), far, atol=1e-3)
    np.testing.assert_allclose(run(clip=4.0), jnp.full((3, 2), 4.0), atol=1e-5)


def test_ddim_on_gaussian_data_follows_the_exact_chain_and_reaches_the_data_distribution():
    mean, std = 0.5, 0.3
    ab = lambda s: diffusion.alpha_bar(s, "cosine", 1e-4)  # noqa: E731
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((4000, 2)), jnp.float32)
    labels = jnp.zeros(4000, jnp.int32)
    sampler = sampling.DDIMSampler(eps_of_point_data("cosine", mean, std), ab, num_levels=K, num_classes=0)
    for steps in (1, 2, 8, 128):
        got = np.asarray(sampler(None, noise, labels, num_steps=steps))
        # The chain is affine for Gaussian data: the deviation from the path's mean shrinks by
        # (a a' std^2 + b b') / (a^2 std^2 + b^2) per step (independent reference, float64).
        dev = np.asarray(noise, np.float64) - math.sqrt(float(ab(1.0))) * mean
        for i in range(steps):
            a, a2 = math.sqrt(float(ab(1 - i / steps))), math.sqrt(float(ab(1 - (i + 1) / steps)))
            b, b2 = math.sqrt(1 - a * a), math.sqrt(max(1 - a2 * a2, 0.0))
            dev = dev * (a * a2 * std**2 + b * b2) / (a * a * std**2 + b * b)
        np.testing.assert_allclose(got, mean + dev, rtol=1e-3, atol=1e-4)
    # with many steps the samples have the data's distribution; one step does not
    assert abs(got.mean() - mean) < 0.02 and abs(got.std() / std - 1) < 0.04
    one = np.asarray(sampler(None, noise, labels, num_steps=1))
    assert abs(one.std() / std - 1) > 0.2


def test_diffusion_loss_is_zero_for_the_exact_noise_predictor_on_its_path():
    data = points(64, seed=3)
    cfg = ObjectiveConfig(apply_fn=lambda p, *a: eps_of_point_data("cosine", p, 0.0)(None, *a), num_classes=0)
    loss, metrics = METHODS["diffusion"].loss(
        data, None, {"x": data, "label": jnp.zeros(64, jnp.int32)}, jax.random.key(0), cfg
    )
    assert float(loss) < 1e-6 and float(metrics["eps_loss"]) == float(loss)
    shifted = ObjectiveConfig(apply_fn=lambda p, *a: eps_of_point_data("cosine", p + 0.1, 0.0)(None, *a), num_classes=0)
    assert (
        float(
            METHODS["diffusion"].loss(
                data, None, {"x": data, "label": jnp.zeros(64, jnp.int32)}, jax.random.key(0), shifted
            )[0]
        )
        > 1e-3
    )


# ------------------------------------------------------------------------------------ consistency


def step_batch(x, step):
    return {"x": x, "label": jnp.zeros(x.shape[0], jnp.int32), "step": jnp.int32(step)}


@pytest.mark.parametrize("stage", range(7))
def test_consistency_training_target_is_the_pairs_velocity_when_the_ema_is_exact(stage):
    # With the exact field as EMA, the jump from x_{t+d} lands on the data point, so the target is
    # the flow-matching velocity of the pair at every stage; the exact student has zero loss.
    data = points(32, seed=stage)
    cfg = ObjectiveConfig(apply_fn=point_field, num_classes=0, stage_steps=10)
    exact = {"point": data}
    loss, metrics = METHODS["consistency_training"].loss(
        exact, exact, step_batch(data, 10 * stage + 3), jax.random.key(stage), cfg
    )
    assert float(loss) < 1e-8 and float(metrics["stage"]) == stage
    wrong = {"point": data + 0.2}
    assert (
        float(
            METHODS["consistency_training"].loss(wrong, exact, step_batch(data, 10 * stage), jax.random.key(0), cfg)[0]
        )
        > 1e-3
    )


def test_consistency_training_curriculum_halves_d_on_the_grid_of_each_stage():
    seen = []

    def recording(params, x, t, level, label):
        seen.append((np.asarray(t), np.asarray(level)))
        return jnp.zeros_like(x)

    cfg = ObjectiveConfig(apply_fn=recording, num_classes=0, stage_steps=5)
    data = points(256, seed=0)
    for step, k in [(0, 0), (4, 0), (5, 1), (17, 3), (34, 6), (1000, 6)]:
        seen.clear()
        METHODS["consistency_training"].loss(None, None, step_batch(data, step), jax.random.key(step), cfg)
        (t_next, level_ema), (t, level) = seen  # EMA target pass first, then the student
        np.testing.assert_allclose(t_next - t, 2.0**-k, rtol=1e-6)
        np.testing.assert_array_equal(t * 2**k, np.round(t * 2**k))
        assert t.min() >= 0 and t_next.max() <= 1
        assert len(np.unique(t)) == min(2**k, 256) or k >= 6  # every grid point drawn
        assert np.all(level == K) and np.all(level_ema == K)


def test_consistency_distillation_with_an_exact_teacher_equals_training_at_the_finest_discretisation():
    # One Euler step of the exact teacher is the flow-matching target's Euler step, so at d = 2^-K
    # distillation and training build the same target from the same (non-exact) EMA model.
    mlp_apply, mlp_params = tiny_mlp(seed=0)
    _, student = tiny_mlp(seed=5)
    apply_fn = dispatch_field(mlp_apply)
    data = points(64, seed=4)
    batch = step_batch(data, 10_000)
    ct_cfg = ObjectiveConfig(apply_fn=apply_fn, num_classes=0, stage_steps=10, consistency_final_level=K, clip=0.0)
    cd_cfg = ObjectiveConfig(apply_fn=apply_fn, num_classes=0, clip=0.0)
    ct_loss = jax.jit(lambda *a: METHODS["consistency_training"].loss(*a, ct_cfg)[0])
    cd_loss = jax.jit(lambda *a: METHODS["consistency_distillation"].loss(*a, cd_cfg)[0])
    ct = ct_loss(student, mlp_params, batch, jax.random.key(1))
    cd = cd_loss(student, {"ema": mlp_params, "teacher": {"point": data}}, batch, jax.random.key(1))
    np.testing.assert_allclose(float(cd), float(ct), rtol=1e-5)
    cd_other = cd_loss(student, {"ema": mlp_params, "teacher": {"point": data + 0.5}}, batch, jax.random.key(1))
    assert abs(float(cd_other) - float(ct)) > 1e-4 * float(ct)
    with pytest.raises(TypeError, match="'ema'"):
        METHODS["consistency_distillation"].loss(student, mlp_params, batch, jax.random.key(1), cd_cfg)


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_consistency_sampler_with_the_exact_field_lands_on_the_data(steps):
    data = points(5, seed=7)
    noise = points(5, seed=8) / 0.7
    out = sampling.consistency_sample(
        point_field, {"point": data}, noise, jnp.zeros(5, jnp.int32), num_steps=steps, level=K
    )
    np.testing.assert_allclose(out, data, atol=1e-4)


def test_consistency_sampler_renoises_each_row_from_its_own_noise():
    mlp_apply, params = tiny_mlp(seed=2)
    sampler = sampling.ConsistencySampler(mlp_apply, num_levels=K, num_classes=0, seed=3)
    noise = points(8, seed=9) / 0.7
    full = np.asarray(sampler(params, noise, num_steps=4))
    order = np.array([5, 2, 7, 0, 1, 3, 6, 4])
    permuted = np.asarray(sampler(params, noise[order], num_steps=4))
    np.testing.assert_allclose(permuted, full[order], rtol=1e-5, atol=1e-6)  # independent of batch position
    again = np.asarray(
        sampling.ConsistencySampler(mlp_apply, num_levels=K, num_classes=0, seed=3)(params, noise, num_steps=4)
    )
    np.testing.assert_array_equal(again, full)
    other_seed = np.asarray(
        sampling.ConsistencySampler(mlp_apply, num_levels=K, num_classes=0, seed=4)(params, noise, num_steps=4)
    )
    assert np.abs(other_seed - full).max() > 1e-3  # the re-noising is random, not a no-op
    one = np.asarray(sampler(params, noise, num_steps=1))
    t0 = jnp.zeros(8)
    np.testing.assert_allclose(
        one, noise + mlp_apply(params, noise, t0, jnp.full(8, K), jnp.zeros(8, jnp.int32)), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------------ progressive


@pytest.mark.parametrize("phase", range(7))
def test_progressive_target_from_an_exact_straight_field_equals_the_field(phase):
    data = points(32, seed=phase)
    exact = {"point": data}
    cfg = ObjectiveConfig(apply_fn=point_field, num_classes=0, stage_steps=4, clip=0.0)
    batch = step_batch(data, 4 * phase + 1)
    loss, metrics = METHODS["progressive_distillation"].loss(
        exact, {"ema": None, "teacher": exact}, batch, jax.random.key(phase), cfg
    )
    assert float(loss) < 1e-8 and float(metrics["phase"]) == phase
    # a curved teacher field gives a different target (the test is not vacuous)
    curved = ObjectiveConfig(
        apply_fn=lambda p, x, t, lv, lb: point_field(p, x, t, lv, lb) + jnp.sin(3 * x),
        num_classes=0,
        stage_steps=4,
        clip=0.0,
    )
    assert (
        float(
            METHODS["progressive_distillation"].loss(
                exact, {"ema": None, "teacher": exact}, batch, jax.random.key(phase), curved
            )[0]
        )
        > 1e-4
    )


def test_progressive_phases_halve_the_step_count_and_resnapshot_the_teacher():
    calls = []

    def recording(params, x, t, level, label):
        calls.append((params["id"], np.asarray(level), np.asarray(t)))
        return jnp.zeros_like(x)

    cfg = ObjectiveConfig(apply_fn=recording, num_classes=0, stage_steps=3)
    data = points(64)
    for step, phase in [(0, 0), (2, 0), (3, 1), (10, 3), (18, 6), (500, 6)]:
        calls.clear()
        METHODS["progressive_distillation"].loss(
            {"id": "student"},
            {"ema": {"id": "ema"}, "teacher": {"id": "teacher"}},
            step_batch(data, step),
            jax.random.key(0),
            cfg,
        )
        (who1, lv1, t1), (who2, lv2, t2), (who3, lv3, t3) = calls
        k = K - 1 - phase
        assert (who1, who2, who3) == ("teacher", "teacher", "student")
        assert np.all(lv1 == k + 1) and np.all(lv2 == k + 1) and np.all(lv3 == k)
        np.testing.assert_array_equal(t3 * 2**k, np.round(t3 * 2**k))
        np.testing.assert_allclose(t2 - t1, 2.0 ** -(k + 1), rtol=1e-6)
    old, new = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    snapped = [int(progressive.teacher_for_step(s, old, new, cfg)["w"][0]) for s in range(23)]
    # the teacher becomes the student at the first step of phases 1..6 (steps 3, 6, ..., 18)
    assert [s for s, v in enumerate(snapped) if v] == [3, 6, 9, 12, 15, 18]


def test_curricula_refuse_a_schedule_that_does_not_fit_the_run():
    base = ml_collections.ConfigDict(config_lib.default_config().objective.to_dict())
    base.name = "progressive_distillation"
    base.stage_steps = 200
    with pytest.raises(ValueError, match="stage_steps=200.*train.steps=1000"):
        make_objective_config(base, point_field, 0, total_steps=1000)
    base.stage_steps = 0
    assert make_objective_config(base, point_field, 0, total_steps=1000).stage_steps == 1000 // 7
    with pytest.raises(ValueError, match="train.steps=5"):
        make_objective_config(base, point_field, 0, total_steps=5)
    with pytest.raises(ValueError, match="total_steps"):
        make_objective_config(base, point_field, 0)
    base.name = "consistency_training"
    base.consistency_final_level = 3  # 4 stages
    assert make_objective_config(base, point_field, 0, total_steps=1000).stage_steps == 250
    with pytest.raises(KeyError, match="batch\\['step'\\]"):
        METHODS["consistency_training"].loss(
            None,
            None,
            {"x": points(4), "label": jnp.zeros(4, jnp.int32)},
            jax.random.key(0),
            resolve_stages("consistency_training", ObjectiveConfig(apply_fn=point_field, num_classes=0), 100),
        )


METHOD_CONFIG_ERRORS = {
    "no teacher": ({"name": "progressive_distillation"}, "set objective.teacher_checkpoint"),
    "phases too long": (
        {"name": "progressive_distillation", "teacher_checkpoint": "TMP", "stage_steps": 200},
        "stage_steps=200",
    ),
    "curriculum too long": ({"name": "consistency_training", "stage_steps": 167}, "stage_steps=167"),
    "final level": ({"name": "consistency_training", "consistency_final_level": 9}, "consistency_final_level=9"),
    "schedule": ({"name": "diffusion", "diffusion_schedule": "sigmoid"}, "diffusion_schedule='sigmoid'"),
    "floor": ({"name": "diffusion", "diffusion_min_alpha_bar": 0.0}, "diffusion_min_alpha_bar"),
    "live share": ({"name": "live_reflow", "reflow_fraction": 0.001}, "reflow_fraction=0.001"),
    "live steps": ({"name": "live_reflow", "reflow_steps": 0}, "reflow_steps=0"),
}


@pytest.mark.parametrize("case", sorted(METHOD_CONFIG_ERRORS))
def test_method_config_checks_name_the_key_to_change(case, tmp_path):
    keys, message = METHOD_CONFIG_ERRORS[case]
    obj = config_lib.default_config().objective
    for key, value in keys.items():
        obj[key] = str(tmp_path) if value == "TMP" else value
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        check_method_config(obj, batch_size=64, total_steps=1000)
    # the same keys with valid values pass
    good = config_lib.default_config().objective
    good.name = keys["name"]
    if METHODS[good.name].frozen_teacher:
        good.teacher_checkpoint = str(tmp_path)
    check_method_config(good, batch_size=64, total_steps=1000)


# ------------------------------------------------------------------------------------ reflow


def test_reflow_pairs_come_from_the_teachers_sampler(tmp_path):
    apply_fn, params = tiny_mlp(seed=3)
    sampler = sampling.Sampler(apply_fn, num_levels=K, num_classes=0)
    kw = dict(shape=(2,), num_classes=0, num_pairs=10, num_steps=4, seed=11, shard_size=4, batch_size=3)
    pairs_io.generate_pairs(sampler, params, out_dir=str(tmp_path / "a"), **kw)
    pairs = pairs_io.load_pairs(str(tmp_path / "a"))
    assert pairs["noise"].shape == (10, 2) and pairs["x"].shape == (10, 2)
    fresh = sampler(params, pairs["noise"], jnp.zeros(10, jnp.int32), num_steps=4)
    np.testing.assert_allclose(pairs["x"], fresh, rtol=1e-5, atol=1e-6)
    # same seed: the same files; a lost shard is regenerated as it was
    pairs_io.generate_pairs(sampler, params, out_dir=str(tmp_path / "b"), **kw)
    again = pairs_io.load_pairs(str(tmp_path / "b"))
    for key in ("noise", "x", "label"):
        np.testing.assert_array_equal(again[key], pairs[key])
    os.remove(pairs_io.shard_path(str(tmp_path / "b"), 1))
    with pytest.raises(FileNotFoundError, match="1 of 3 shards"):
        pairs_io.load_pairs(str(tmp_path / "b"))
    pairs_io.generate_pairs(sampler, params, out_dir=str(tmp_path / "b"), **kw)
    np.testing.assert_array_equal(pairs_io.load_pairs(str(tmp_path / "b"))["x"], pairs["x"])
    # another seed draws other noise; other settings are refused before generating
    other = pairs_io.generate_pairs(sampler, params, out_dir=str(tmp_path / "c"), **{**kw, "seed": 12})
    assert other["seed"] == 12
    assert np.abs(pairs_io.load_pairs(str(tmp_path / "c"))["noise"] - pairs["noise"]).min() > 0
    with pytest.raises(ValueError, match="num_steps"):
        pairs_io.generate_pairs(sampler, params, out_dir=str(tmp_path / "a"), **{**kw, "num_steps": 8})


def test_reflow_trains_flow_matching_on_the_stored_noise():
    data, noise = points(32, seed=1), points(32, seed=2) / 0.7
    cfg = ObjectiveConfig(apply_fn=point_field, num_classes=0)
    batch = {"x": data, "noise": noise, "label": jnp.zeros(32, jnp.int32)}
    # the exact field of each pair has zero loss only if the pair's own noise is used
    loss, _ = METHODS["reflow"].loss({"point": data}, None, batch, jax.random.key(0), cfg)
    assert float(loss) < 1e-8
    with pytest.raises(KeyError, match="noise"):
        METHODS["reflow"].loss({"point": data}, None, {"x": data, "label": batch["label"]}, jax.random.key(0), cfg)


def test_live_reflow_trains_generated_one_step_pairs_at_level_zero_without_gradient_through_them(monkeypatch):
    # Exact field of one point for every row: 8 Euler steps generate that point, so the one-step
    # rows (level 0) and flow rows (level K) both have zero loss.
    point = jnp.asarray([[0.4, -0.3]])
    data = jnp.broadcast_to(point, (16, 2))
    levels = []

    def field(params, x, t, level, label):
        levels.append(np.asarray(level))
        return point_velocity(x, t, params["point"])

    cfg = ObjectiveConfig(apply_fn=field, num_classes=0, reflow_fraction=0.25)
    loss, metrics = METHODS["live_reflow"].loss(
        {"point": point}, None, {"x": data, "label": jnp.zeros(16, jnp.int32)}, jax.random.key(0), cfg
    )
    assert float(loss) < 1e-8 and {"reflow_loss", "flow_loss"} <= set(metrics)
    generation, student = levels[0], levels[-1]
    assert generation.shape == (4,) and np.all(generation == K)  # generated at the flow level
    np.testing.assert_array_equal(student, np.where(RowSplit(16, 4).mask(), 0, K))  # 4 of 16: one row in 4

    # Gradient: the same as with the generated samples held fixed at the current parameters.
    mlp_apply, params = tiny_mlp(seed=4)
    cfg = ObjectiveConfig(apply_fn=mlp_apply, num_classes=0, reflow_fraction=0.25)
    batch = {"x": points(16, seed=5), "label": jnp.zeros(16, jnp.int32)}
    grad_fn = lambda p: METHODS["live_reflow"].loss(p, None, batch, jax.random.key(1), cfg)[0]  # noqa: E731
    grad = jax.jit(jax.grad(grad_fn))(params)
    frozen = jax.tree.map(jnp.copy, params)
    original = reflow.generate_live
    monkeypatch.setattr(reflow, "generate_live", lambda p, noise, labels, c: original(frozen, noise, labels, c))
    grad_fixed = jax.jit(jax.grad(grad_fn))(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_fixed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    shifted = jax.tree.map(lambda a: a * 1.5, params)
    assert (
        np.abs(
            np.asarray(original(shifted, batch["x"][:4], batch["label"][:4], cfg))
            - np.asarray(original(params, batch["x"][:4], batch["label"][:4], cfg))
        ).max()
        > 1e-3
    )


# ------------------------------------------------------------------------------------ warm start


@pytest.mark.parametrize("source_ignores_level", [True, False])
def test_warm_start_computes_the_source_function_at_every_level(source_ignores_level):
    source_apply, source = tiny_mlp(ignore_level=source_ignores_level, seed=6)
    target_apply, init = tiny_mlp(ignore_level=False, seed=9)
    source_level = 0 if source_ignores_level else K  # the level the source's flow rows were fed
    params = warm_start.warm_start_params(source, init, source_level=source_level)
    x, t = points(8, seed=3), jnp.linspace(0, 1, 8)
    label = jnp.zeros(8, jnp.int32)
    want = source_apply(source, x, t, jnp.full(8, K), label)
    for level in range(K + 1):
        np.testing.assert_allclose(target_apply(params, x, t, jnp.full(8, level), label), want, rtol=1e-5, atol=1e-6)
    as_loaded = target_apply(source, x, t, jnp.zeros(8, jnp.int32) + (K if source_ignores_level else 0), label)
    assert np.abs(np.asarray(as_loaded - want)).max() > 1e-4  # without the rewrite the levels differ
    # the zeroed weights still learn
    grad = jax.grad(lambda p: jnp.sum(target_apply(p, x, t, jnp.arange(8) % 8, label) ** 2))(params)
    assert np.abs(np.asarray(grad["level_embed"]["hidden"]["kernel"])).max() > 0


def test_warm_start_refuses_parameters_of_another_model():
    _, source = tiny_mlp(width=32)
    init = jax.eval_shape(mlp_model(False, 48)[1], jax.random.key(0))  # shapes suffice
    with pytest.raises(ValueError, match="shape differs.*same architecture"):
        warm_start.warm_start_params(source, init)


# ------------------------------------------------------------------------------------ every objective


def tiny_dit_model(forward_mode=False, guidance_input=False):
    model_cfg = config_lib.default_config().model
    model_cfg.variant, model_cfg.width, model_cfg.depth, model_cfg.num_heads = "", 32, 1, 2
    model_cfg.dtype = "float32"
    model = build_model(model_cfg, num_classes=3, forward_mode=forward_mode, guidance_input=guidance_input)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 3)), jnp.float32)
    init = jax.jit(
        lambda key: jax.tree.map(
            lambda a: a + 0.02,
            model.init(  # the output layer starts at zero
                key, x, jnp.zeros(8), jnp.zeros(8, jnp.int32), jnp.zeros(8, jnp.int32)
            )["params"],
        )
    )
    params = init(jax.random.key(0))
    return (lambda p, *a, **k: model.apply({"params": p}, *a, **k)), params, x


def method_config(name, apply_fn, num_classes, total_steps=8):
    obj = config_lib.default_config().objective
    obj.name = name
    obj.sc_fraction = 0.5
    obj.reflow_fraction = 0.25
    obj.reflow_steps = 2
    obj.reflow_cfg_scale = 1.5 if num_classes else 1.0
    return make_objective_config(obj, apply_fn, num_classes, total_steps=total_steps)


def teacher_tree(name, params, ema):
    return {"ema": ema, "teacher": jax.tree.map(lambda a: a * 0.9, params)} if METHODS[name].frozen_teacher else ema


def method_batch(name, x, labels, step, rng):
    batch = {"x": x, "label": labels}
    if METHODS[name].step:
        batch["step"] = jnp.int32(step)
    if METHODS[name].pairs:
        batch["noise"] = jax.random.normal(rng, x.shape)
    return batch


@pytest.fixture(scope="module")
def dit():
    return tiny_dit_model()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_objective_is_finite_and_differentiable_on_a_tiny_dit(name, dit):
    # a forward-mode method's network is built without the lean backward passes (build_model)
    record = METHODS[name]
    apply_fn, params, x = (
        tiny_dit_model(forward_mode=True, guidance_input=record.guidance_input) if record.forward_mode else dit
    )
    labels = jnp.arange(8) % 3
    cfg = method_config(name, apply_fn, 3)
    ema = jax.tree.map(lambda a: a * 1.1, params)
    batch = method_batch(name, x, labels, 5, jax.random.key(7))
    loss_and_grad = jax.jit(jax.value_and_grad(lambda *a: METHODS[name].loss(*a, cfg), has_aux=True))
    (loss, metrics), grads = loss_and_grad(params, teacher_tree(name, params, ema), batch, jax.random.key(3))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


# ---------------------------------------------------------------- every objective in the train step


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    """Stored reflow pairs of the 2-D toy (x = 2 noise + 0.5), in the pairs reader's files."""
    out = str(tmp_path_factory.mktemp("pairs") / "toy")
    pairs_io.generate_pairs(
        lambda params, noise, labels, num_steps, cfg_scale: 2.0 * noise + 0.5,
        None,
        out_dir=out,
        shape=(2,),
        num_classes=0,
        num_pairs=256,
        num_steps=1,
        seed=0,
        shard_size=256,
        batch_size=256,
    )
    return out


def toy_step_config(name, pairs_dir, mesh):
    """The 2-D toy's local config for method ``name`` on a (data, fsdp) mesh: an MLP of depth 2
    and width 128 (its 128 x 256 kernels are large enough for the fsdp axis to split), batch 64, a constant learning rate (the cosine schedule's warm-up starts at 0); a curriculum
    starts a stage at every update (stage_steps=1), reflow reads stored pairs."""
    overrides = {
        "model.width": 128,
        "model.depth": 2,
        "train.batch_size": 64,
        "optim.schedule": "constant",
        "train.progress_bar": False,
        "train.use_tensorboard": False,
        "mesh.data": mesh[0],
        "mesh.fsdp": mesh[1],
    }
    if METHODS[name].num_stages:
        overrides["objective.stage_steps"] = 1
    if METHODS[name].pairs:
        overrides.update({"data.name": pairs_io.NAME, "data.path": pairs_dir})
    if METHODS[name].frozen_teacher:
        # never read: an Experiment without a workdir starts its frozen teacher at the initial
        # parameters (off_initialisation moves it away)
        overrides["objective.teacher_checkpoint"] = "/teacher-run-not-read"
    return offline.load_config(os.path.join(ROOT, "experiments", f"toy2d.py:objective={name},runlocal=True"), overrides)


def off_initialisation(state, shardings):
    """The state with the student, every EMA tree and the frozen teacher moved apart by noise.

    A fresh state has the three equal and the output layer at zero: there, handing the loss one
    tree for another, or dropping the gradient of every layer but the last, changes nothing."""
    rng = np.random.default_rng(0)
    host = jax.device_get(state)

    def moved(tree):
        return jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), tree)

    host = host.replace(params=moved(host.params), ema_params=tuple(moved(e) for e in host.ema_params))
    if host.frozen_teacher is not None:
        host = host.replace(frozen_teacher=moved(host.frozen_teacher))
    return jax.device_put(host, shardings)


def two_real_steps(name, pairs_dir, mesh):
    """Two updates of ``Experiment.compile_step`` on the experiment's own batches: the batches,
    the states before each update and after the last (on the host), the metrics."""
    exp = Experiment(toy_step_config(name, pairs_dir, mesh), None)
    run = {"batches": [], "states": [], "metrics": [], "obj_cfg": exp.obj_cfg}
    try:
        state = off_initialisation(exp.init_state(), exp.state_shardings)
        run["shardings"] = exp.state_shardings
        compiled, _ = exp.compile_step()
        for _ in range(2):
            batch = exp.source.next_batch()
            run["batches"].append(batch)
            run["states"].append(jax.device_get(state))
            state, metrics = compiled(state, sharding.global_batch(batch, exp.mesh))
            run["metrics"].append(jax.device_get(metrics))
        run["states"].append(jax.device_get(state))
    finally:
        exp.close()
    return run


def loss_by_hand(name, cfg, state, batch):
    """The loss of the update from ``state`` as the method's record defines it (registry.py):
    the first EMA tree as teacher, or ``{'ema': it, 'teacher': the frozen teacher}`` re-snapshotted
    where the method says so; ``batch['step']`` for a curriculum; the key fold_in(rng, step)."""
    record = METHODS[name]
    teacher = state.ema_params[0]
    if record.frozen_teacher:
        frozen = state.frozen_teacher
        if record.teacher_snapshot is not None:
            frozen = record.teacher_snapshot(state.step, frozen, state.params, cfg)
        teacher = {"ema": teacher, "teacher": frozen}
    if record.step:
        batch = dict(batch, step=state.step)
    return record.loss(state.params, teacher, batch, jax.random.fold_in(state.rng, state.step), cfg)[0]


def assert_states_close(got, want, start, mesh):
    """Step and rng exactly; parameters, EMA trees and frozen teacher tree by tree, within 1e-4 of
    their norm and 1e-2 of the norm of what the updates changed (``start``: the state before).

    Tree by tree rather than leaf by leaf: Adam divides each gradient entry by its own magnitude,
    so an entry whose gradient is near 0 turns float32 summation order into a visible step."""
    assert int(got.step) == int(want.step)
    np.testing.assert_array_equal(got.rng, want.rng)
    for tree in ("params", "ema_params", "frozen_teacher"):
        leaves = [jax.tree.leaves(getattr(s, tree)) for s in (got, want, start)]
        assert jax.tree.structure(getattr(got, tree)) == jax.tree.structure(getattr(want, tree)), tree
        if not leaves[1]:
            continue
        g, w, s = (np.concatenate([np.ravel(a) for a in tree_leaves]) for tree_leaves in leaves)
        error = np.linalg.norm(g - w)
        assert error <= 1e-4 * np.linalg.norm(w), (mesh, tree, error)
        assert error <= 1e-2 * np.linalg.norm(w - s), (mesh, tree, error, np.linalg.norm(w - s))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_objectives_step_on_a_data_axis_of_8_moves_no_row_between_devices(name, toy_pairs):
    """The compiled step (``Experiment.compile_step``, 8 devices of 8 rows each) has no collective
    but all-reduces (the gradient's and the metrics'): the objectives that cut the batch into row
    groups (shortcut, MeanFlow, live reflow: ``common.RowSplit``) cut and join them on the device
    that holds the rows. Seen failing with the groups cut as the batch's first rows and the rest:
    collective-permutes and all-gathers of rows (meanflow 32 and 2, shortcut 14 and 4, live reflow
    16 and 2)."""
    from benchmarks.memory_per_device import collective_traffic

    assert jax.device_count() == 8
    exp = Experiment(toy_step_config(name, toy_pairs, (8, 1)), None)
    try:
        compiled, _ = exp.compile_step()
    finally:
        exp.close()
    kinds = collective_traffic(compiled.as_text())
    assert "all-reduce" in kinds
    assert set(kinds) == {"all-reduce"}, kinds


def test_meanflow_steps_all_reduce_one_gradient_as_flow_matching_does(toy_pairs):
    """Both MeanFlow losses take their gradient through one pass over every row (the jvp runs
    without gradient), so on a data axis of 8 their compiled steps all-reduce as many bytes as
    flow matching's step of the same network. Seen failing with the gradient taken through two
    passes (the interval rows' jvp and the flow rows' plain pass): about twice the bytes."""
    from benchmarks.memory_per_device import collective_traffic

    reduced = {}
    for name in ("flow_matching", "meanflow", "meanflow_v"):
        exp = Experiment(toy_step_config(name, toy_pairs, (8, 1)), None)
        try:
            compiled, _ = exp.compile_step()
        finally:
            exp.close()
        reduced[name] = collective_traffic(compiled.as_text())["all-reduce"][1]
    for name in ("meanflow", "meanflow_v"):
        assert reduced[name] <= 1.05 * reduced["flow_matching"], reduced


@pytest.mark.parametrize("preset", ["meanflow", "meanflow_v"])
def test_guided_meanflow_step_on_a_data_axis_of_8_moves_no_row_between_devices(preset):
    """MeanFlow with guidance folded into its target (a tiny class-conditional DiT, kappa 0.5):
    the guidance call holds every row once with the null label and the interval rows once more
    with theirs, 64 + 16 rows on 8 devices, interleaved so each device keeps its own rows; and
    improved MeanFlow with the guidance scale and interval as inputs (``[B, 3]`` per row, cut
    into the row groups with the rest). The compiled step has no collective but all-reduces.
    Seen failing (MeanFlow) with the call's rows concatenated as [every row, interval rows]: 6
    collective-permutes, 3 all-gathers and 3 all-to-alls."""
    from benchmarks.memory_per_device import collective_traffic
    from shortcut_jax.data import DataSpec

    overrides = {"mesh.data": 8, "model.width": 64, "train.batch_size": 64}
    if preset == "meanflow":
        overrides["objective.meanflow_cfg_kappa"] = 0.5
    config = offline.load_config(
        os.path.join(ROOT, "experiments", f"imagenet.py:runlocal=True,preset={preset}"), overrides
    )
    assert preset == "meanflow" or config.objective.meanflow_interval_input
    exp = Experiment(config, None, spec=DataSpec((8, 8, 4), 10, "images"))
    try:
        compiled, _ = exp.compile_step()
    finally:
        exp.close()
    kinds = collective_traffic(compiled.as_text())
    assert set(kinds) == {"all-reduce"}, kinds


def test_shortcut_teachers_guided_rows_on_an_fsdp_mesh_move_rows_between_devices_never_activations():
    """Bootstrap CFG appends the guided rows to the teacher's batch (8 + 1 rows on 8 devices):
    the compiled step (a tiny class-conditional DiT, fsdp 8) moves only rows of its inputs (the
    data's [8, 8, 4] and per-row scalars) by collective-permute. Seen failing without
    ``sharding.batch_rows`` on the teacher's inputs: 112 more permutes of per-device slices of
    activations ([9, 8], [9, 16], ...: the call partitioned by features)."""
    import re

    from shortcut_jax.data import DataSpec

    config = offline.load_config(
        os.path.join(ROOT, "experiments", "imagenet.py:runlocal=True"),
        {"mesh.data": 1, "mesh.fsdp": 8, "model.width": 64, "train.batch_size": 64},
    )
    assert config.objective.bootstrap_cfg and config.objective.name == "shortcut"
    exp = Experiment(config, None, spec=DataSpec((8, 8, 4), 10, "images"))
    try:
        compiled, _ = exp.compile_step()
    finally:
        exp.close()
    moved = re.findall(r"= \w+\[([0-9,]*)\]\S* collective-permute\(", compiled.as_text())
    assert moved  # the guided rows
    for dims in moved:
        shape = tuple(int(d) for d in dims.split(","))
        assert len(shape) == 1 or shape[1:] == (8, 8, 4), shape


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_objective_gives_the_same_two_steps_on_8_devices_as_on_one(name, toy_pairs):
    """The project's train step (``Experiment``: its state, shardings, batches and compiled step)
    on 8 devices, as a data axis of 8 and as data 4 x fsdp 2 (the MLP's kernels split), gives the
    losses and the parameters, EMA trees and frozen teacher of one device; on one device, each
    update's loss is the method's loss of the state as the registry defines it: the EMA teacher,
    the frozen teacher (consistency distillation keeps it, progressive distillation re-snapshots
    it at the phase that the second update starts), the curriculum step, the stored noise (reflow).

    Seen to fail (then reverted) on a train step that computes each device's rows on their own,
    the gradient not averaged over the data axis (every method; the losses differ); on one that
    hands the loss the EMA tree in place of the frozen teacher (both distillation methods), one
    that leaves out the teacher's re-snapshot (progressive distillation), and one that gives the
    loss step 0 at every update (consistency training, progressive distillation)."""
    assert jax.device_count() == 8
    record = METHODS[name]
    one = two_real_steps(name, toy_pairs, (1, 1))
    sharded = {mesh: two_real_steps(name, toy_pairs, mesh) for mesh in ((8, 1), (4, 2))}
    for run in sharded.values():
        for b1, b8 in zip(one["batches"], run["batches"]):
            assert sorted(b1) == sorted(b8) == sorted(["x", "label"] + (["noise"] if record.pairs else []))
            for key in b1:
                np.testing.assert_array_equal(b8[key], b1[key])
    # the fsdp axis splits the MLP's kernels, and the frozen teacher is laid out like them
    specs = sharded[4, 2]["shardings"]
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(specs.params))
    if record.frozen_teacher:
        assert jax.tree.leaves(specs.frozen_teacher) == jax.tree.leaves(specs.params)

    by_hand = jax.jit(functools.partial(loss_by_hand, name, one["obj_cfg"]))
    for state, batch, metrics in zip(one["states"], one["batches"], one["metrics"]):
        np.testing.assert_allclose(float(metrics["loss"]), float(by_hand(state, batch)), rtol=1e-5)
    loss1 = [float(m["loss"]) for m in one["metrics"]]
    assert loss1[0] != loss1[1]
    for mesh, run in sharded.items():
        np.testing.assert_allclose([float(m["loss"]) for m in run["metrics"]], loss1, rtol=1e-5, err_msg=str(mesh))
        assert_states_close(run["states"][-1], one["states"][-1], one["states"][0], mesh)

    if record.num_stages:  # each update in its own stage
        stage = "phase" if "phase" in one["metrics"][0] else "stage"
        assert [int(m[stage]) for m in one["metrics"]] == [0, 1]
    for run in (one, *sharded.values()):
        before, middle, after = run["states"]
        if record.teacher_snapshot is not None:  # the student before the second update
            for a, b in zip(jax.tree.leaves(middle.params), jax.tree.leaves(after.frozen_teacher)):
                np.testing.assert_array_equal(b, a)
        elif record.frozen_teacher:  # never trained nor averaged
            for a, b in zip(jax.tree.leaves(before.frozen_teacher), jax.tree.leaves(after.frozen_teacher)):
                np.testing.assert_array_equal(b, a)
        else:
            assert after.frozen_teacher is None


def test_make_sampler_gives_each_method_its_sampler_compiled_once_for_every_budget():
    apply_fn, params = tiny_mlp(seed=2)
    kinds = {}
    for name in METHODS:
        cfg = method_config(name, apply_fn, 0, total_steps=100)
        kinds[name] = type(make_sampler(name, cfg)).__name__
    assert kinds["diffusion"] == "DDIMSampler"
    assert kinds["consistency_training"] == kinds["consistency_distillation"] == "ConsistencySampler"
    assert {kinds[n] for n in ("shortcut", "flow_matching", "progressive_distillation", "reflow", "live_reflow")} == {
        "Sampler"
    }
    assert kinds["meanflow"] == kinds["meanflow_v"] == "IntervalSampler"
    traces = []
    counted = lambda p, *a: traces.append(1) or apply_fn(p, *a)  # noqa: E731
    for name in ("diffusion", "consistency_training", "meanflow"):
        sampler = make_sampler(name, method_config(name, counted, 0, total_steps=100))
        traces.clear()
        for steps in (1, 2, 4, 128, 3):
            out = sampler(params, points(4), num_steps=steps)
            assert out.shape == (4, 2) and np.all(np.isfinite(np.asarray(out)))
        assert len(traces) == 1, name
        with pytest.raises(ValueError, match="positive integer"):
            sampler(params, points(4), num_steps=0)


def test_method_records_say_what_each_method_needs():
    assert {n for n, needs in METHODS.items() if needs.frozen_teacher} == {
        "consistency_distillation",
        "progressive_distillation",
    }
    # curricula, and the shortcut objective's growing self-consistency share
    assert {n for n, needs in METHODS.items() if needs.step} == {
        "consistency_training",
        "progressive_distillation",
        "shortcut",
    }
    assert {n for n, needs in METHODS.items() if needs.teacher_snapshot} == {"progressive_distillation"}
    assert {n for n, needs in METHODS.items() if needs.forward_mode} == {"meanflow", "meanflow_v"}
    assert {n for n, needs in METHODS.items() if needs.pairs} == {"reflow"}
