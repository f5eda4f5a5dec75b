"""Properties of the shortcut and flow-matching objectives and of the any-step sampler."""

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax.models import DiT
from shortcut_jax.objectives import METHODS, ObjectiveConfig, common, shortcut
from shortcut_jax.objectives.sampling import Sampler, check_budget, euler_sample

FLOOR = 1e-5


def exact_field(x, t, level, label, *, x1):
    """Velocity field of a single data point ``x1`` per row: paths are straight, so the average
    velocity over any step equals the instantaneous one, whatever the step size."""
    del level, label
    t = t.reshape(t.shape + (1,) * (x.ndim - 1))
    x0 = (x - t * x1) / (1.0 - (1.0 - FLOOR) * t)
    return x1 - (1.0 - FLOOR) * x0


def point_cfg(x1, **kw):
    return ObjectiveConfig(
        apply_fn=lambda p, x, t, lv, lb: exact_field(x, t, lv, lb, x1=p), num_classes=0, noise_floor=FLOOR, **kw
    )


@pytest.mark.parametrize("level", range(7))
def test_self_consistency_target_equals_direct_target_for_straight_paths(level):
    rng = np.random.default_rng(level)
    n = 16
    x1 = jnp.asarray(rng.normal(size=(n, 4, 4, 3)) * 0.5, jnp.float32)
    x0 = jnp.asarray(rng.normal(size=(n, 4, 4, 3)), jnp.float32)
    cfg = point_cfg(x1, clip=0.0)
    t = jnp.asarray(rng.integers(0, 2**level, n) / 2**level, jnp.float32)
    x_t = common.interpolate(x0, x1, t, FLOOR)
    target = shortcut.self_consistency_targets(
        cfg.apply_fn, x1, x_t, t, jnp.full((n,), level), jnp.zeros(n, jnp.int32), cfg
    )
    direct = common.flow_velocity(x0, x1, FLOOR)
    np.testing.assert_allclose(target, direct, rtol=1e-4, atol=1e-4)


def test_a_curved_field_gives_a_different_target():
    # Guard against a vacuous target: for a field that is not straight, halves do not average to s(x_t).
    cfg = ObjectiveConfig(apply_fn=lambda p, x, t, lv, lb: jnp.sin(3 * x) + t[:, None], num_classes=0, clip=0.0)
    x_t = jnp.linspace(-1, 1, 8)[:, None] * jnp.ones((8, 2))
    t = jnp.zeros(8)
    target = shortcut.self_consistency_targets(
        cfg.apply_fn, None, x_t, t, jnp.zeros(8, jnp.int32), jnp.zeros(8, jnp.int32), cfg
    )
    assert float(jnp.abs(target - cfg.apply_fn(None, x_t, t, None, None)).max()) > 0.1


@pytest.mark.parametrize("batch,fraction", [(256, 1 / 8), (256, 1 / 4), (64, 1 / 4), (100, 0.125)])
def test_official_assignment_counts_and_t_on_each_rows_grid(batch, fraction):
    cfg = ObjectiveConfig(apply_fn=None, num_classes=10, sc_fraction=fraction)
    x1 = jnp.zeros((batch, 2))
    labels = jnp.arange(batch) % 10
    rows = shortcut.sample_rows(x1, labels, jax.random.key(3), cfg)
    split = rows["rows"]
    n_sc = split.count
    assert n_sc == round(batch * fraction)
    level, t = np.asarray(rows["level"]), np.asarray(rows["t"])
    counts = collections.Counter(split.first(level).tolist())
    per = n_sc // 7
    assert counts == {0: per + n_sc - 7 * per, **{k: per for k in range(1, 7)}}
    assert np.all(split.rest(level) == 7)
    # t on each row's grid: t * 2^k is an integer in [0, 2^k)
    scaled = t * 2.0**level
    np.testing.assert_array_equal(scaled, np.round(scaled))
    assert np.all(scaled >= 0) and np.all(scaled < 2.0**level)
    # self-consistency rows keep their labels; flow rows are dropped to the null class ~10% of the time
    np.testing.assert_array_equal(split.first(np.asarray(rows["label"])), split.first(np.asarray(labels)))


def test_random_assignment_covers_levels_and_label_dropout_rate():
    cfg = ObjectiveConfig(apply_fn=None, num_classes=10, sc_fraction=0.5, level_assignment="random")
    rows = shortcut.sample_rows(jnp.zeros((20000, 1)), jnp.zeros(20000, jnp.int32), jax.random.key(0), cfg)
    level = rows["rows"].first(np.asarray(rows["level"]))
    freq = np.bincount(level, minlength=7) / 10000
    np.testing.assert_allclose(freq, 1 / 7, atol=0.02)
    dropped = np.mean(rows["rows"].rest(np.asarray(rows["label"])) == 10)
    assert abs(dropped - 0.1) < 0.015


def test_rows_use_disjoint_images_and_independent_noise():
    # Perturb one image at a time: only that image's row may move, in the student's input and in
    # the teacher's (self-consistency rows). The published code cuts both row groups from the same
    # first images, so there one image moves two rows.
    b, cfg_kw = 32, dict(num_classes=0, sc_fraction=0.5, clip=0.0)
    n_sc = shortcut.num_sc_rows(b, 0.5)
    x1 = np.random.default_rng(0).normal(size=(b, 3)).astype(np.float32)
    key = jax.random.key(1)

    @jax.jit
    def inputs(images):
        """(teacher's first half-step input [n_sc, 3], student's input [b, 3]), as the objective
        passes them."""
        calls = []

        def recorder(p, x, t, level, label):
            calls.append(x)
            return jnp.zeros_like(x)

        cfg = ObjectiveConfig(apply_fn=recorder, **cfg_kw)
        shortcut.loss_fn(None, None, {"x": images, "label": jnp.zeros(b, jnp.int32)}, key, cfg)
        teacher_first, _, student = calls  # two teacher half steps, then one student pass
        return teacher_first, student

    rows = shortcut.sample_rows(jnp.asarray(x1), jnp.zeros(b, jnp.int32), key, ObjectiveConfig(apply_fn=None, **cfg_kw))
    t = np.asarray(rows["t"])
    x0 = np.asarray(rows["x0"])
    assert len({tuple(np.round(r, 6)) for r in x0}) == b  # no shared noise between rows
    # rows at t = 0 see pure noise, whatever their image (every level-0 row): most rows do not
    split = rows["rows"]
    sc_rows = np.flatnonzero(np.asarray(split.mask()))  # the batch rows the teacher sees, in order
    assert len(sc_rows) == n_sc
    assert np.count_nonzero(t[sc_rows]) >= n_sc // 2 and np.count_nonzero(split.rest(t)) == b - n_sc
    other_images = shortcut.sample_rows(
        jnp.asarray(x1 + 1.0), jnp.zeros(b, jnp.int32), key, ObjectiveConfig(apply_fn=None, **cfg_kw)
    )
    np.testing.assert_array_equal(np.asarray(other_images["x0"]), x0)  # the noise does not depend on the images
    teacher, student = map(np.asarray, inputs(x1))
    for j in range(b):
        perturbed = x1.copy()
        perturbed[j] += 1.0
        teacher_j, student_j = map(np.asarray, inputs(perturbed))
        moved = np.any(student_j != student, axis=1)
        assert moved.tolist() == [i == j and t[j] > 0 for i in range(b)], j
        moved = np.any(teacher_j != teacher, axis=1)
        assert moved.tolist() == [sc_rows[i] == j and t[j] > 0 for i in range(n_sc)], j


def test_shortcut_loss_is_zero_for_the_exact_field_and_metrics_per_level():
    rng = np.random.default_rng(0)
    point = jnp.asarray(rng.normal(size=(1, 2)), jnp.float32) * 0.5
    x1 = jnp.broadcast_to(point, (64, 2))
    cfg = point_cfg(point, sc_fraction=0.25)
    # every row shares one data point, which the exact field receives as its "params"
    loss, metrics = METHODS["shortcut"].loss(
        point, point, {"x": x1, "label": jnp.zeros(64, jnp.int32)}, jax.random.key(0), cfg
    )
    assert float(loss) < 1e-8
    assert {f"sc_loss/level_{k}" for k in range(7)} <= set(metrics)
    assert {"loss", "flow_loss", "sc_loss"} <= set(metrics)


def test_shortcut_loss_with_a_real_network_and_level_weights():
    model = DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4, 4, 3)), jnp.float32)
    labels = jnp.arange(32) % 4
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(32), jnp.zeros(32, jnp.int32), labels)["params"]
    # give the output layer weights so the network is not identically zero
    params = jax.tree.map(lambda a: a + 0.01, params)
    apply_fn = lambda p, *a: model.apply({"params": p}, *a)
    batch = {"x": x, "label": labels}

    def objective(**kw):  # (student params, teacher params) -> (loss, metrics), compiled
        cfg = ObjectiveConfig(apply_fn=apply_fn, num_classes=4, sc_fraction=0.25, **kw)
        return jax.jit(lambda p, teacher: METHODS["shortcut"].loss(p, teacher, batch, jax.random.key(2), cfg))

    base = objective()
    loss, m = base(params, params)
    np.testing.assert_allclose(float(loss), (8 * float(m["sc_loss"]) + 24 * float(m["flow_loss"])) / 32, rtol=1e-5)
    per_level = np.array([float(m[f"sc_loss/level_{k}"]) for k in range(7)])
    # official assignment with 8 rows: 2 at level 0, one each at 1..6
    np.testing.assert_allclose(float(m["sc_loss"]), (2 * per_level[0] + per_level[1:].sum()) / 8, rtol=1e-5)
    loss_w, _ = objective(level_weights=(1, 0, 0, 0, 0, 0, 0))(params, params)
    np.testing.assert_allclose(float(loss_w), (2 * 7 * per_level[0] + 24 * float(m["flow_loss"])) / 32, rtol=1e-5)
    # online teacher ignores teacher_params
    online = objective(teacher="online")
    other = jax.tree.map(lambda a: a * 3, params)
    l_on, _ = online(params, other)
    np.testing.assert_allclose(float(l_on), float(loss), rtol=1e-6)
    l_ema, _ = base(params, other)
    assert abs(float(l_ema) - float(loss)) > 1e-6
    # gradients reach the student only: with the online teacher (the differentiated parameters
    # themselves) the gradient is the one with the teacher's weights, hence its targets, held fixed
    g_online = jax.jit(jax.grad(lambda p: online(p, other)[0]))(params)
    g_fixed = jax.jit(jax.grad(lambda p: base(p, params)[0]))(params)
    assert jax.tree.structure(g_online) == jax.tree.structure(g_fixed)
    for a, b in zip(jax.tree.leaves(g_online), jax.tree.leaves(g_fixed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert sum(float(jnp.sum(jnp.square(a))) for a in jax.tree.leaves(g_fixed)) > 0


def test_teacher_half_steps_run_at_the_next_level():
    # A field that depends on the level only, p * 2^level: the student predicts p 2^k on a
    # self-consistency row at level k, two teacher half steps at level k + 1 give the target
    # p 2^(k+1), so the row's loss is p^2 4^k (a teacher at level k would give 0).
    p = 0.01
    field = lambda params, x, t, level, label: (
        params
        * jnp.broadcast_to(  # noqa: E731
            (2.0 ** level.astype(jnp.float32))[:, None], x.shape
        )
    )
    cfg = ObjectiveConfig(apply_fn=field, num_classes=0, sc_fraction=0.25, clip=0.0)
    x1 = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    batch = {"x": x1, "label": jnp.zeros(64, jnp.int32)}
    for teacher in ("ema", "online"):
        objective = functools.partial(METHODS["shortcut"].loss, cfg=dataclasses.replace(cfg, teacher=teacher))
        _, metrics = jax.jit(objective)(p, p, batch, jax.random.key(0))
        per_level = np.array([float(metrics[f"sc_loss/level_{k}"]) for k in range(7)])
        np.testing.assert_allclose(per_level, p**2 * 4.0 ** np.arange(7), rtol=1e-5)


def test_bootstrap_cfg_changes_only_the_smallest_level_targets():
    calls = []

    def field(p, x, t, lv, lb):
        calls.append(1)
        return jnp.where((lb == 4)[:, None], 0.0, 1.0) * jnp.ones_like(x)  # cond 1, uncond 0

    cfg = ObjectiveConfig(apply_fn=field, num_classes=4, bootstrap_cfg=True, bootstrap_cfg_scale=1.5, clip=0.0)
    level = jnp.arange(7)
    tgt = shortcut.self_consistency_targets(
        field, None, jnp.zeros((7, 2)), jnp.zeros(7), level, jnp.zeros(7, jnp.int32), cfg
    )
    np.testing.assert_allclose(np.asarray(tgt)[:, 0], [1, 1, 1, 1, 1, 1, 1.5])


def test_flow_matching_target_and_level():
    seen = {}

    def field(p, x, t, lv, lb):
        seen["level"] = lv
        return jnp.zeros_like(x)

    cfg = ObjectiveConfig(apply_fn=field, num_classes=0)
    x1 = jnp.ones((8, 2))
    loss, m = METHODS["flow_matching"].loss(
        None, None, {"x": x1, "label": jnp.zeros(8, jnp.int32)}, jax.random.key(0), cfg
    )
    assert np.all(np.asarray(seen["level"]) == 7)
    x0 = jax.random.normal(jax.random.split(jax.random.key(0), 3)[0], x1.shape)
    np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.square(x1 - (1 - 1e-5) * x0))), rtol=1e-5)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("steps", [1, 2, 8, 128])
def test_sampler_with_exact_field_lands_on_the_data_point(steps):
    x1 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    sampler = Sampler(lambda p, x, t, lv, lb: exact_field(x, t, lv, lb, x1=p), num_levels=7, num_classes=0)
    out = sampler(x1, noise, num_steps=steps)
    np.testing.assert_allclose(out, x1, atol=1e-4)


def test_sampler_passes_the_budget_level_and_grid_times():
    seen = []

    def field(p, x, t, lv, lb):
        jax.debug.callback(lambda t, lv: seen.append((float(t[0]), int(lv[0]))), t, lv)
        return jnp.zeros_like(x)

    euler_sample(field, None, jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), num_steps=4, num_levels=7)
    assert seen == [(0.0, 2), (0.25, 2), (0.5, 2), (0.75, 2)]


def tiny_conditional_dit():
    """(apply_fn, params, noise, labels): a one-block DiT over 3 classes with non-zero weights."""
    model = DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=3)
    noise = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 3)), jnp.float32)
    labels = jnp.array([0, 1, 2])
    params = model.init(jax.random.key(0), noise, jnp.zeros(3), jnp.zeros(3, jnp.int32), labels)["params"]
    params = jax.tree.map(lambda a: a + 0.05, params)
    return (lambda p, *a: model.apply({"params": p}, *a)), params, noise, labels


def test_sampler_compiles_once_for_every_budget_and_matches_the_static_loop():
    apply_fn, params, noise, labels = tiny_conditional_dit()
    sampler = Sampler(apply_fn, num_levels=7, num_classes=3)
    traces = []
    counted = lambda p, *a: traces.append(1) or apply_fn(p, *a)
    sampler.apply_fn = counted
    for steps, scale in [(1, 1.0), (2, 1.0), (8, 1.0), (2, 2.5), (4, 4.0)]:
        got = sampler(params, noise, labels, num_steps=steps, cfg_scale=scale)
        want = euler_sample(
            apply_fn,
            params,
            noise,
            labels,
            num_steps=steps,
            num_levels=7,
            cfg_scale=None if scale == 1.0 else scale,
            null_class=3,
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(traces) == 2  # one trace unguided, one guided, whatever the budget or scale


@pytest.mark.parametrize("bad", [3, 0, 6, 256, 2.0])
def test_sampler_refuses_invalid_budgets(bad):
    with pytest.raises(ValueError, match="valid budget"):
        check_budget(bad, 7)


def test_cfg_scale_one_equals_the_conditional_output():
    apply_fn, params, noise, labels = tiny_conditional_dit()
    cond = euler_sample(apply_fn, params, noise, labels, num_steps=2, num_levels=7)
    guided_1 = euler_sample(apply_fn, params, noise, labels, num_steps=2, num_levels=7, cfg_scale=1.0, null_class=3)
    guided_3 = euler_sample(apply_fn, params, noise, labels, num_steps=2, num_levels=7, cfg_scale=3.0, null_class=3)
    np.testing.assert_allclose(guided_1, cond, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(guided_3 - cond).max()) > 1e-3


def test_bootstrap_cfg_on_the_tail_rows_equals_guiding_every_row_and_selecting():
    model = DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=4)
    rng = np.random.default_rng(0)
    n = 16  # official assignment of 16 rows over 7 levels: levels 0 (4 rows), 1..6 (2 rows each)
    level = shortcut.assign_levels(None, n, 7, "official")
    assert np.all(np.asarray(level)[-2:] == 6) and np.all(np.asarray(level)[:-2] < 6)
    x = jnp.asarray(rng.normal(size=(n, 4, 4, 3)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 2, n) / 2, jnp.float32)
    labels = jnp.arange(n) % 4
    params = model.init(jax.random.key(0), x, t, level, labels)["params"]
    params = jax.tree.map(lambda a: a + 0.05, params)
    apply_fn = lambda p, *a: model.apply({"params": p}, *a)
    cfg = ObjectiveConfig(apply_fn=apply_fn, num_classes=4, bootstrap_cfg=True, bootstrap_cfg_scale=1.5, clip=0.0)
    every = shortcut.self_consistency_targets(apply_fn, params, x, t, level, labels, cfg)
    tail = shortcut.self_consistency_targets(apply_fn, params, x, t, level, labels, cfg, guided_tail=2)
    np.testing.assert_allclose(tail, every, rtol=1e-5, atol=1e-6)
    plain = shortcut.self_consistency_targets(
        apply_fn, params, x, t, level, labels, ObjectiveConfig(apply_fn=apply_fn, num_classes=4, clip=0.0)
    )
    assert float(jnp.abs(plain[-2:] - every[-2:]).max()) > 1e-4  # guidance does act on the tail
    np.testing.assert_allclose(plain[:-2], every[:-2], rtol=1e-5, atol=1e-6)


def curved_teacher_cfg(**kw):
    """A field whose self-consistency targets depend on its parameters (a teacher that matters)."""
    return ObjectiveConfig(
        apply_fn=lambda p, x, t, lv, lb: p * jnp.sin(3 * x) + (t + 0.1 * lv.astype(jnp.float32))[:, None],
        num_classes=0,
        teacher="ema",
        clip=0.0,
        **kw,
    )


@pytest.mark.parametrize("step, sc_rows", [(0, 0), (50, 8), (100, 16), (400, 16)])
def test_growing_share_has_its_rows_at_each_step_and_inactive_rows_are_flow_rows(step, sc_rows):
    # batch 64, share 1/4 at the end (16 layout rows), 0 at step 0, linear over 100 steps
    cfg = curved_teacher_cfg(sc_fraction=0.25, sc_fraction_start=0.0, sc_ramp_steps=100)
    x1 = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    batch = {"x": x1, "label": jnp.zeros(64, jnp.int32), "step": jnp.int32(step)}
    loss_at = jax.jit(
        lambda teacher: METHODS["shortcut"].loss(jnp.float32(1.0), teacher, batch, jax.random.key(1), cfg)
    )
    loss, m = loss_at(jnp.float32(1.0))
    assert int(m["sc_loss/rows"]) == sc_rows and int(m["flow_loss/rows"]) == 64 - sc_rows
    assert sum(int(m[f"sc_loss/level_{k}/rows"]) for k in range(7)) == sc_rows
    np.testing.assert_allclose(
        float(loss), (sc_rows * float(m["sc_loss"]) + (64 - sc_rows) * float(m["flow_loss"])) / 64, rtol=1e-5
    )
    # the teacher reaches the loss through the self-consistency rows only
    other, _ = loss_at(jnp.float32(3.0))
    if sc_rows == 0:
        assert float(other) == float(loss)
    else:
        assert abs(float(other) - float(loss)) > 1e-4


def test_growing_share_reaches_the_loss_through_the_train_step_counter():
    from shortcut_jax.training import train_state, train_step
    import optax

    model = DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4, 4, 3)), jnp.float32)
    labels = jnp.zeros(32, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros(32), jnp.zeros(32, jnp.int32), labels)["params"]
    cfg = ObjectiveConfig(
        apply_fn=lambda p, *a: model.apply({"params": p}, *a),
        num_classes=0,
        sc_fraction=0.25,
        sc_fraction_start=0.0,
        sc_ramp_steps=2,
        teacher="online",
    )
    tx = optax.adam(1e-3)
    step = jax.jit(train_step.make_train_step("shortcut", cfg, tx, optax.constant_schedule(1e-3)))
    state = train_state.create(params, tx, jax.random.PRNGKey(0), (0.9,))
    rows = []
    for _ in range(3):
        state, metrics = step(state, {"x": x, "label": labels})
        rows.append(int(metrics["sc_loss/rows"]))
    assert rows == [0, 4, 8]  # round(32 * 0.25 * step / 2) at steps 0, 1, 2


def test_growing_share_refuses_a_start_above_the_final_share():
    from shortcut_jax import config_lib

    c = config_lib.default_config()
    c.objective.sc_fraction_start = 0.5
    with pytest.raises(ValueError, match="sc_fraction_start=0.5 must be at most objective.sc_fraction=0.125"):
        METHODS["shortcut"].check(c.objective, batch_size=256, total_steps=100)


@pytest.mark.parametrize("size,count", [(256, 64), (256, 32), (64, 48), (12, 9), (100, 33), (16, 0), (16, 16)])
def test_row_split_interleaves_the_exact_share_with_the_shortest_period_and_join_inverts_the_cut(size, count):
    """``count`` rows in the first group, the same number in every period of ``size / gcd`` rows
    (so every device of a mesh whose block the period divides holds the same share), batch order
    kept within each group, and ``join`` puts the cut back; without a common divisor, the first
    ``count`` rows."""
    rows = common.RowSplit(size, count)
    a = np.arange(size * 3).reshape(size, 3)
    first, rest = np.asarray(rows.first(a)), np.asarray(rows.rest(a))
    in_first = np.asarray(rows.mask())
    assert rows.period == size // math.gcd(size, count) and in_first.sum() == count
    np.testing.assert_array_equal(first[:, 0] // 3, np.flatnonzero(in_first))
    np.testing.assert_array_equal(rest[:, 0] // 3, np.flatnonzero(~in_first))
    np.testing.assert_array_equal(np.asarray(rows.join(first, rest)), a)
    periods = in_first.reshape(-1, rows.period)
    assert np.all(periods.sum(axis=1) == rows.per_period) and np.all(periods[:, : rows.per_period])
    if math.gcd(size, count) == 1:
        np.testing.assert_array_equal(in_first, np.arange(size) < count)
    if size == 256:  # 8 devices of 32 rows: each holds count / 8 of the first group
        assert np.all(in_first.reshape(8, 32).sum(axis=1) == count // 8)
