"""MeanFlow and improved MeanFlow (objectives/meanflow.py): the jvp, the target on exact fields,
the reduction to flow matching, the interval sampler, and the config checks for forward-mode
differentiation. (The real train step on 8 devices against one: test_methods.py, for every method.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax import config_lib
from shortcut_jax.models import MLPNet
from shortcut_jax.objectives import METHODS, common, make_objective_config, meanflow, sampling


def objective_config(apply_fn, name="meanflow", num_classes=0, **options):
    c = config_lib.default_config()
    c.objective.name = name
    c.objective.noise_floor = 0.0
    c.objective.meanflow_norm_p = 0.0  # a plain mean, so the loss can be computed by hand
    for key, value in options.items():
        c.objective[key] = value
    return make_objective_config(c.objective, apply_fn, num_classes, total_steps=10)


def with_option(cfg, key, value):
    return dataclasses.replace(cfg, options=tuple((k, value if k == key else v) for k, v in cfg.options))


def batch_of(x1):
    return {"x": x1, "label": jnp.zeros(x1.shape[0], jnp.int32)}


# An analytic "network": u(x, tau, h) = a * tau * x + b * h + c * x**2, whose derivative along
# (v, 1, -1) is a * x + a * tau * v + 2 c x v - b.
def analytic_apply(params, x, tau, h, label):
    del label
    return params["a"] * tau[:, None] * x + params["b"] * h[:, None] + params["c"] * x**2


def analytic_derivative(params, x, tau, v):
    return params["a"] * x + params["a"] * tau[:, None] * v + 2 * params["c"] * x * v - params["b"]


PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(-1.3), "c": jnp.float32(0.4)}


def test_meanflow_loss_regresses_the_network_on_v_plus_h_times_its_derivative():
    """Rules out a target without the derivative term (plain flow matching on every row), a
    derivative taken along the wrong tangent (h not decreasing, or tau fixed), and a missing
    factor h."""
    cfg = objective_config(analytic_apply)
    x1 = jax.random.normal(jax.random.key(0), (64, 3))
    rng = jax.random.key(1)
    x, tau, h, v, _ = meanflow._prepare(batch_of(x1), rng, cfg)
    assert float(jnp.mean(h > 0)) == pytest.approx(0.25)  # 1 - meanflow_flow_fraction of the rows
    u = analytic_apply(PARAMS, x, tau, h, None)
    target = v + h[:, None] * analytic_derivative(PARAMS, x, tau, v)
    want = jnp.mean(jnp.mean((u - target) ** 2, axis=-1))
    loss, metrics = meanflow.loss_fn(PARAMS, None, batch_of(x1), rng, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    without_derivative = jnp.mean(jnp.mean((u - v) ** 2, axis=-1))
    assert abs(float(loss) - float(without_derivative)) > 1e-2 * float(without_derivative)
    assert metrics["flow_error/rows"] == 48 and metrics["interval_error/rows"] == 16


def test_meanflow_v_loss_regresses_the_compound_velocity_on_v():
    """Improved MeanFlow: u + h D u (tangent: the network's own u(x, tau, 0)) against v. Rules out
    the published MeanFlow target in its place, and the empirical v as the tangent."""
    cfg = objective_config(analytic_apply, name="meanflow_v")
    x1 = jax.random.normal(jax.random.key(2), (64, 3))
    rng = jax.random.key(3)
    x, tau, h, v, _ = meanflow._prepare(batch_of(x1), rng, cfg)
    u = analytic_apply(PARAMS, x, tau, h, None)
    tangent = analytic_apply(PARAMS, x, tau, jnp.zeros_like(h), None)
    compound = u - h[:, None] * analytic_derivative(PARAMS, x, tau, tangent)
    want = jnp.mean(jnp.mean((compound - v) ** 2, axis=-1))
    loss, _ = meanflow.v_loss_fn(PARAMS, None, batch_of(x1), rng, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    with_v_tangent = u - h[:, None] * analytic_derivative(PARAMS, x, tau, v)
    assert abs(float(loss) - float(jnp.mean((with_v_tangent - v) ** 2))) > 1e-3


def test_both_forms_hold_the_identity_on_an_exact_curved_field():
    """On dx/dtau = x the exact average velocity is u(x, tau, h) = x (e^h - 1) / h, whose paths bend:
    MeanFlow's target v + h D u equals u, and improved MeanFlow's u - h D u equals v = x. Rules out
    a sign error in either (a straight field, whose D u is 0, cannot)."""

    def exact(params, x, tau, h, label):
        return x * (jnp.expm1(h) / h)[:, None]

    cfg = objective_config(exact)
    x = jax.random.normal(jax.random.key(15), (16, 2))
    tau = jax.random.uniform(jax.random.key(16), (16,), maxval=0.5)
    h = jax.random.uniform(jax.random.key(17), (16,), minval=0.1, maxval=0.5)
    labels = jnp.zeros(16, jnp.int32)
    u, du = meanflow._interval_derivative(None, x, tau, h, labels, x, cfg)  # tangent: v = x
    np.testing.assert_allclose(meanflow.meanflow_target(x, h, du), u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meanflow.compound_velocity(u, h, du), x, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(du))) > 0.05  # the derivative term matters here


def test_jvp_of_a_small_network_matches_finite_differences():
    """The derivative the loss uses, ``D u`` along (v, 1, -1), against a central difference of a
    small MLP (float32), relative error under 1e-3."""
    model = MLPNet(width=32, depth=2, mlp_ratio=2.0, num_classes=0, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(4), (16, 2))
    params = model.init(jax.random.key(5), x, jnp.zeros(16), jnp.zeros(16), jnp.zeros(16, jnp.int32))["params"]
    # the output layer starts at zero: give every parameter a value so the function is not flat
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(6), p.shape), params)
    apply = lambda p, x_, t_, h_, y: model.apply({"params": p}, x_, t_, h_, y)  # noqa: E731
    cfg = objective_config(apply)
    tau = jax.random.uniform(jax.random.key(7), (16,), minval=0.1, maxval=0.6)
    h = jax.random.uniform(jax.random.key(8), (16,), minval=0.1, maxval=0.3)
    v = jax.random.normal(jax.random.key(9), (16, 2))
    labels = jnp.zeros(16, jnp.int32)
    _, du = meanflow._interval_derivative(params, x, tau, h, labels, v, cfg)
    eps = 3e-3
    plus = apply(params, x + eps * v, tau + eps, h - eps, labels)
    minus = apply(params, x - eps * v, tau - eps, h + eps, labels)
    fd = (plus - minus) / (2 * eps)
    assert float(jnp.linalg.norm(du - fd) / jnp.linalg.norm(fd)) < 1e-3


def straight_field(point):
    """The exact average velocity when all data is ``point`` (noise floor 0): paths are straight
    at constant speed, so u(x, tau, h) = (point - x) / (1 - tau) for every h."""

    def apply(params, x, tau, h, label):
        del params, h, label
        return (point[None] - x) / (1.0 - tau[:, None])

    return apply


@pytest.mark.parametrize("name", ["meanflow", "meanflow_v"])
def test_exact_straight_field_has_zero_loss(name):
    """On the exact field of one data point the MeanFlow target equals the field (its derivative
    term vanishes) and the improved-MeanFlow loss is zero; a sign error in the tangent's time
    components would leave a non-zero derivative."""
    point = jnp.array([0.5, -1.0, 2.0])
    cfg = objective_config(straight_field(point), name=name)
    x1 = jnp.broadcast_to(point, (32, 3))
    loss, _ = METHODS[name].loss(None, None, batch_of(x1), jax.random.key(10), cfg)
    assert float(loss) < 1e-8


def test_rows_with_r_equal_t_are_flow_matching():
    """With every row at r = t (h = 0) the loss is flow matching's: u(x, tau, 0) against v."""
    cfg = with_option(objective_config(analytic_apply), "meanflow_flow_fraction", 1.0)
    x1 = jax.random.normal(jax.random.key(11), (32, 3))
    rng = jax.random.key(12)
    x, tau, h, v, _ = meanflow._prepare(batch_of(x1), rng, cfg)
    assert float(jnp.max(h)) == 0.0
    want = jnp.mean(common.per_row_mse(analytic_apply(PARAMS, x, tau, h, None), v))
    np.testing.assert_allclose(float(meanflow.loss_fn(PARAMS, None, batch_of(x1), rng, cfg)[0]), float(want), rtol=1e-6)


@pytest.mark.parametrize("name", ["meanflow", "meanflow_v"])
def test_flow_rows_skip_the_jvp_and_leave_the_loss_and_gradient_unchanged(name):
    """The r = t rows cost one plain network pass each: the loss's traced matmul FLOPs are the
    interval rows' jvp (for meanflow_v with its tangent pass) plus one forward per flow row. The
    loss and its gradient equal the jvp taken over every row, flow rows included."""
    from benchmarks.flops import traced_matmul_flops

    model = MLPNet(width=32, depth=2, mlp_ratio=2.0, num_classes=0, dtype=jnp.float32)
    n = 64
    x1 = jax.random.normal(jax.random.key(20), (n, 2))
    zeros, labels = jnp.zeros(n), jnp.zeros(n, jnp.int32)
    params = model.init(jax.random.key(21), x1, zeros, zeros, labels)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(22), p.shape), params)
    apply = lambda p, x_, t_, h_, y: model.apply({"params": p}, x_, t_, h_, y)  # noqa: E731
    cfg = objective_config(apply, name=name, meanflow_norm_p=1.0)  # the adaptive weight on
    rng = jax.random.key(23)
    k = n - meanflow.num_flow_rows(n, cfg)
    assert 0 < k < n

    def loss_at(c):
        return lambda p: METHODS[name].loss(p, None, batch_of(x1), rng, c)[0]

    forward = traced_matmul_flops(lambda p: apply(p, x1, zeros, zeros, labels), params) / n
    every_row = traced_matmul_flops(loss_at(with_option(cfg, "meanflow_flow_fraction", 0.0)), params) / n
    assert every_row > 1.9 * forward  # a jvp row costs about two passes (three for meanflow_v)
    assert traced_matmul_flops(loss_at(cfg), params) == pytest.approx(k * every_row + (n - k) * forward, rel=1e-6)

    def unsplit(p):  # every row through the jvp, as the papers write it
        x, tau, h, v, y = meanflow._prepare(batch_of(x1), rng, cfg)
        if name == "meanflow":
            u, du = meanflow._interval_derivative(p, x, tau, h, y, v, cfg)
            error = common.per_row_mse(u, jax.lax.stop_gradient(meanflow.meanflow_target(v, h, du)))
        else:
            tangent = jax.lax.stop_gradient(apply(p, x, tau, jnp.zeros_like(h), y))
            u, du = meanflow._interval_derivative(p, x, tau, h, y, tangent, cfg)
            error = common.per_row_mse(meanflow.compound_velocity(u, h, jax.lax.stop_gradient(du)), v)
        return meanflow._weighted_loss(error, cfg)

    got, got_grad = jax.value_and_grad(loss_at(cfg))(params)
    want, want_grad = jax.value_and_grad(unsplit)(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grad, want_grad)


@pytest.mark.parametrize("kappa", [0.5, 0.0])
def test_guided_meanflow_takes_a_flow_rows_conditional_term_from_its_own_training_pass(kappa):
    """Guidance folded into the target (class-conditional, omega 1, kappa 0.5 as MeanFlow's
    ImageNet runs, or kappa 0): the guidance pass runs ``u(.|null)`` on every row and ``u(.|c)``
    on the interval rows only (on none with kappa 0); a flow row's ``u(.|c)`` is its own training
    pass. So the loss's traced matmul FLOPs are the unguided loss's plus ``n + k`` forward rows
    (``n`` with kappa 0), not ``2 n``; loss and gradient equal the papers' form (both terms on
    every row, the jvp on every row). Seen failing with both terms on every row (``2 n`` forward
    rows) and with a flow row's conditional term taken from its unconditional pass (the loss)."""
    from benchmarks.flops import traced_matmul_flops

    num_classes, n = 10, 64
    model = MLPNet(width=32, depth=2, mlp_ratio=2.0, num_classes=num_classes, dtype=jnp.float32)
    x1 = jax.random.normal(jax.random.key(30), (n, 2))
    labels = jax.random.randint(jax.random.key(31), (n,), 0, num_classes)
    zeros = jnp.zeros(n)
    params = model.init(jax.random.key(32), x1, zeros, zeros, labels)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(33), p.shape), params)
    apply = lambda p, x_, t_, h_, y: model.apply({"params": p}, x_, t_, h_, y)  # noqa: E731
    options = dict(meanflow_norm_p=1.0, meanflow_cfg_omega=1.0, meanflow_cfg_kappa=kappa)
    cfg = objective_config(apply, num_classes=num_classes, meanflow_cfg_interval=(0.0, 0.8), **options)
    batch, rng = {"x": x1, "label": labels}, jax.random.key(34)
    k = n - meanflow.num_flow_rows(n, cfg)

    x, tau, h, v, y = meanflow._prepare(batch, rng, cfg)
    on = (y != cfg.null_class) & (1.0 - tau <= 0.8)
    assert 0 < int(jnp.sum(on)) < n and int(jnp.sum(y == cfg.null_class)) > 0  # every branch is taken

    def loss_at(c):
        return lambda p: meanflow.loss_fn(p, None, batch, rng, c)[0]

    forward = traced_matmul_flops(lambda p: apply(p, x1, zeros, zeros, labels), params) / n
    off = with_option(with_option(cfg, "meanflow_cfg_omega", 1.0), "meanflow_cfg_kappa", 0.0)
    unguided = traced_matmul_flops(loss_at(off), params)
    omega = 2.0 if kappa == 0.0 else 1.0  # omega 1 with kappa 0 is no guidance: take omega 2 there
    cfg = with_option(cfg, "meanflow_cfg_omega", omega)
    extra = n + (k if kappa else 0)
    assert traced_matmul_flops(loss_at(cfg), params) == pytest.approx(unguided + extra * forward, rel=1e-6)

    def papers(p):
        null = jnp.full_like(y, cfg.null_class)
        cond = jax.lax.stop_gradient(apply(p, x, tau, jnp.zeros_like(h), y))
        uncond = jax.lax.stop_gradient(apply(p, x, tau, jnp.zeros_like(h), null))
        v_g = jnp.where(on[:, None], omega * v + kappa * cond + (1.0 - omega - kappa) * uncond, v)
        u, du = meanflow._interval_derivative(p, x, tau, h, y, v_g, cfg)
        error = common.per_row_mse(u, jax.lax.stop_gradient(meanflow.meanflow_target(v_g, h, du)))
        return meanflow._weighted_loss(error, cfg)

    got, got_grad = jax.value_and_grad(loss_at(cfg))(params)
    want, want_grad = jax.value_and_grad(papers)(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grad, want_grad)


@pytest.mark.parametrize("draw,median", [("uniform", 4.5), ("log_uniform", 8.0**0.5)])
def test_guidance_scales_are_drawn_in_the_range_uniformly_or_log_uniformly(draw, median):
    """Over (1, 8): every draw inside the range, the median at the middle (4.5) or, log-uniform,
    at the geometric middle (sqrt 8 = 2.83); rows without a label get 1."""
    cfg = objective_config(analytic_apply, "meanflow_v", num_classes=10, meanflow_omega_range=(1.0, 8.0))
    cfg = with_option(cfg, "meanflow_omega_draw", draw)
    labels = jnp.arange(20_000) % 11  # class 10 is the null class
    omega = np.asarray(meanflow.sample_guidance(jax.random.key(40), labels, cfg))
    null = np.asarray(labels) == cfg.null_class
    assert np.all(omega[null] == 1.0)
    drawn = omega[~null]
    assert drawn.min() >= 1.0 and drawn.max() <= 8.0
    assert np.median(drawn) == pytest.approx(median, rel=0.03)


def test_imagenet_meanflow_folds_guidance_into_training_and_samples_without_a_guidance_pass():
    """``imagenet.py:preset=meanflow`` (and ``preset=one_step``): the published guidance (omega 1,
    kappa 0.5, every t) is in the training target and evaluation takes no second pass; improved
    MeanFlow's network is trained over the guidance scales its evaluation asks for, and reads
    the guidance interval as published."""
    import os

    from shortcut_jax.training import offline

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "imagenet.py")
    for preset in ("meanflow", "one_step"):
        c = offline.load_config(f"{path}:variant=B,preset={preset}", {})
        cfg = make_objective_config(c.objective, analytic_apply, 1000, total_steps=10)
        assert meanflow.guidance_on(cfg) and cfg.option("meanflow_cfg_kappa") == 0.5, preset
        assert c.eval.cfg_scale == 1.0, preset
    c = offline.load_config(f"{path}:variant=B,preset=meanflow_v", {})
    low, high = c.objective.meanflow_omega_range
    assert low <= c.eval.cfg_scale <= high and high > low
    assert c.objective.meanflow_omega_draw == "log_uniform"
    assert meanflow.interval_input(make_objective_config(c.objective, analytic_apply, 1000, total_steps=10))


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_interval_sampler_on_the_exact_field_maps_noise_to_the_data_point(steps):
    """One step (and any even chain of intervals) of the exact average velocity lands on the data."""
    point = jnp.array([0.5, -1.0])
    sampler = sampling.IntervalSampler(straight_field(point), num_levels=7, num_classes=0)
    noise = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    out = np.asarray(sampler(None, noise, num_steps=steps))
    np.testing.assert_allclose(out, np.broadcast_to(point, (8, 2)), atol=1e-5)


def test_guidance_is_folded_into_the_target_for_labelled_rows_only():
    """omega v + kappa u(c) + (1 - omega - kappa) u(null) on rows with a label; v on null rows."""

    def apply(params, x, tau, h, label):
        return jnp.where(label[:, None] == 3, 1.0, 5.0) + 0.0 * x

    cfg = objective_config(apply, num_classes=3, meanflow_cfg_omega=2.0, meanflow_cfg_kappa=0.5)
    x = jnp.zeros((4, 2))
    v = jnp.full((4, 2), 10.0)
    labels = jnp.array([0, 1, 3, 2])
    tau = jnp.full((4,), 0.5)
    got = meanflow.guided_velocity(None, x, tau, v, labels, cfg)
    guided = 2.0 * 10.0 + 0.5 * 5.0 + (1 - 2.0 - 0.5) * 1.0
    np.testing.assert_allclose(np.asarray(got), [[guided] * 2, [guided] * 2, [10.0] * 2, [guided] * 2])


def test_forward_mode_objectives_train_through_the_configured_kernels_and_give_the_jvp_plain_ones():
    """A config asking MeanFlow for the cuDNN attention kernel and FP8 dense layers (neither has a
    forward-mode rule) passes the checks: the run trains through a network with them, and the
    jvp gets the same network (the same parameters) built with XLA's attention, bf16 matmuls and
    no hand-written backward passes."""
    from shortcut_jax.models import build_model

    c = config_lib.default_config()
    c.objective.name = "meanflow"
    c.model.name, c.model.variant = "dit", "S"
    c.model.attention_impl, c.model.matmul_precision = "cudnn", "fp8"
    config_lib.validate(c, num_devices=1)
    trained = build_model(c.model, num_classes=0)
    jvp = build_model(c.model, num_classes=0, forward_mode=True)
    assert trained.attention_impl == "cudnn" and trained.matmul_precision == "fp8" and trained.lean_ops != ()
    assert jvp.attention_impl is None and jvp.matmul_precision == "bf16" and jvp.lean_ops == ()
    # the same parameter tree (traced on this CPU with XLA's attention in place of cuDNN's)
    c.model.width, c.model.depth, c.model.num_heads, c.model.variant = 32, 1, 2, ""
    c.model.attention_impl = "xla"
    args = (jnp.zeros((1, 8, 8, 3)), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    shapes = [
        jax.tree.map(jnp.shape, jax.eval_shape(lambda m=m: m.init(jax.random.key(0), *args))["params"])
        for m in (build_model(c.model, num_classes=0), build_model(c.model, num_classes=0, forward_mode=True))
    ]
    assert shapes[0] == shapes[1]
    # FP8 with delayed scaling adds amax histories to the trained network's tree; the jvp's
    # network has none and reads the same tree, the histories left aside
    c.model.fp8_amax_history = 4
    config_lib.validate(c, num_devices=1)
    trained, jvp = build_model(c.model, num_classes=0), build_model(c.model, num_classes=0, forward_mode=True)
    params = trained.init(jax.random.key(0), *args)["params"]

    def drop_histories(tree):
        return {k: drop_histories(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "amax_history"}

    without = drop_histories(params)
    assert len(jax.tree.leaves(params)) - len(jax.tree.leaves(without)) == 4  # qkv, proj, fc1, fc2
    np.testing.assert_array_equal(jvp.apply({"params": params}, *args), jvp.apply({"params": without}, *args))


def guided_analytic_apply(params, x, tau, h, label, guidance=None):
    """analytic_apply plus a term in the guidance input and the label, so both matter."""
    g = jnp.ones(x.shape[0]) if guidance is None else guidance
    return analytic_apply(params, x, tau, h, label) + 0.3 * g[:, None] * (label[:, None] + 1.0)


def written_out_v_loss(apply, x, tau, h, v, labels, guidance, no_guidance, w):
    """Improved MeanFlow's loss written out for a network that reads ``guidance``: the target
    ``w v + (1 - w) u(x, tau, 0 | null)`` (``no_guidance`` the unconditional term's input), the
    compound velocity ``u - h D u`` with the network's own velocity as the tangent, plain mean."""
    uncond = apply(PARAMS, x, tau, jnp.zeros_like(h), jnp.full_like(labels, 3), no_guidance)
    v_g = w[:, None] * v + (1 - w[:, None]) * uncond
    u = apply(PARAMS, x, tau, h, labels, guidance)
    tangent = apply(PARAMS, x, tau, jnp.zeros_like(h), labels, guidance)
    compound = u - h[:, None] * analytic_derivative(PARAMS, x, tau, tangent)
    return jnp.mean(jnp.mean((compound - v_g) ** 2, axis=-1))


def test_class_conditional_meanflow_v_trains_on_the_guidance_it_is_given_as_an_input():
    """Each row draws omega in meanflow_omega_range (1 without a label); the network reads it,
    and its target is omega v + (1 - omega) u(x, tau, 0 | null). Rules out a network that is not
    given omega, and a target guided by a fixed scale."""
    cfg = objective_config(guided_analytic_apply, name="meanflow_v", num_classes=3, meanflow_omega_range=(1.5, 4.0))
    x1 = jax.random.normal(jax.random.key(13), (64, 3))
    batch = {"x": x1, "label": jnp.arange(64, dtype=jnp.int32) % 3}
    rng = jax.random.key(14)
    x, tau, h, v, labels = meanflow._prepare(batch, rng, cfg)
    omega = meanflow.sample_guidance(jax.random.fold_in(rng, 1), labels, cfg)
    assert float(jnp.min(jnp.where(labels == 3, 9.0, omega))) >= 1.5 and float(jnp.max(omega)) <= 4.0
    assert bool(jnp.all(jnp.where(labels == 3, omega == 1.0, True)))  # dropped labels: no guidance
    want = written_out_v_loss(guided_analytic_apply, x, tau, h, v, labels, omega, jnp.ones(64), omega)
    loss, _ = meanflow.v_loss_fn(PARAMS, None, batch, rng, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_guidance_input_sampler_passes_the_scale_to_the_network_in_one_pass():
    """One step of the guided-input interval sampler is x + u(x, 0, 1 | c, scale): the scale is the
    network's input (a second, unconditional pass would double the rows)."""
    calls = []

    def apply(params, x, tau, h, label, guidance=None):
        calls.append(x.shape[0])
        return guidance[:, None] * jnp.ones_like(x)

    sampler = sampling.IntervalSampler(apply, num_levels=7, num_classes=3, guidance_input=True)
    noise = np.zeros((4, 2), np.float32)
    for scale in (1.0, 2.5):
        out = np.asarray(sampler(None, noise, np.array([0, 1, 2, 0], np.int32), num_steps=1, cfg_scale=scale))
        np.testing.assert_allclose(out, np.full((4, 2), scale))
    assert set(calls) == {4}


def test_guidance_input_adds_an_embedding_only_where_asked():
    from shortcut_jax.models import build_model

    c = config_lib.default_config()
    c.model.name, c.model.width, c.model.depth = "mlp", 16, 1
    x = jnp.zeros((2, 2))
    args = (x, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    plain = build_model(c.model, num_classes=3).init(jax.random.key(0), *args)["params"]
    guided_model = build_model(c.model, num_classes=3, guidance_input=True)
    guided = guided_model.init(jax.random.key(0), *args)["params"]
    assert "guidance_embed" in guided and "guidance_embed" not in plain
    guided = jax.tree.map(lambda p: p + 0.1, guided)  # the output layer starts at zero
    low = guided_model.apply({"params": guided}, *args, jnp.full(2, 1.0))
    high = guided_model.apply({"params": guided}, *args, jnp.full(2, 3.0))
    assert float(jnp.max(jnp.abs(low - high))) > 1e-4


def interval_analytic_apply(params, x, tau, h, label, guidance=None):
    """analytic_apply plus terms in the guidance scale and in the guidance interval's ends."""
    g = jnp.tile(jnp.array([[1.0, 0.0, 1.0]]), (x.shape[0], 1)) if guidance is None else guidance
    extra = 0.3 * g[:, :1] * (label[:, None] + 1.0) + 0.2 * g[:, 1:2] - 0.1 * g[:, 2:3]
    return analytic_apply(params, x, tau, h, label) + extra


def test_interval_input_guides_each_row_inside_its_own_drawn_interval_only():
    """With ``meanflow_interval_input`` each labelled row draws (omega, start, end), start in
    [0, 1/2] and end in [1/2, 1]; the network reads all three, and the row's target is guided by
    omega only where its papers' t = 1 - tau lies in its own [start, end] (``v`` elsewhere).
    Seen failing when the target used the fixed ``meanflow_cfg_interval`` instead of the row's
    draw, and when the network was given the scale alone."""
    cfg = objective_config(
        interval_analytic_apply,
        name="meanflow_v",
        num_classes=3,
        meanflow_omega_range=(1.5, 4.0),
        meanflow_interval_input=True,
        meanflow_cfg_interval=(0.0, 1.0),
    )
    x1 = jax.random.normal(jax.random.key(15), (256, 3))
    batch = {"x": x1, "label": jnp.arange(256, dtype=jnp.int32) % 3}
    rng = jax.random.key(16)
    x, tau, h, v, labels = meanflow._prepare(batch, rng, cfg)
    drawn = meanflow.sample_guidance(jax.random.fold_in(rng, 1), labels, cfg)
    assert drawn.shape == (256, 3)
    omega, start, end = drawn[:, 0], drawn[:, 1], drawn[:, 2]
    labelled = labels != 3
    assert bool(jnp.all(jnp.where(labelled, (start >= 0) & (start <= 0.5) & (end >= 0.5) & (end <= 1), True)))
    np.testing.assert_array_equal(np.asarray(drawn[~labelled]), np.tile([[1.0, 0.0, 1.0]], (int((~labelled).sum()), 1)))
    t = 1.0 - tau
    inside = (t >= start) & (t <= end)
    assert 0 < int(jnp.sum(inside & labelled)) < int(jnp.sum(labelled))  # both kinds of row occur
    w = jnp.where(inside, omega, 1.0)
    want = written_out_v_loss(interval_analytic_apply, x, tau, h, v, labels, drawn, meanflow.no_guidance(256, cfg), w)
    loss, _ = meanflow.v_loss_fn(PARAMS, None, batch, rng, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_interval_input_sampler_gives_the_network_scale_and_interval_in_one_pass():
    """A network that reads the guidance interval gets (scale, start, end) of the call on every
    row, one pass per step; a sampler whose network guides every step refuses an interval."""
    calls = []

    def apply(params, x, tau, h, label, guidance=None):
        calls.append(guidance.shape)
        return (guidance[:, 0:1] + 10.0 * guidance[:, 1:2] + 100.0 * guidance[:, 2:3]) * jnp.ones_like(x)

    sampler = sampling.IntervalSampler(
        apply, num_levels=7, num_classes=3, guidance_input=True, guidance_interval_input=True
    )
    noise = np.zeros((4, 2), np.float32)
    labels = np.array([0, 1, 2, 0], np.int32)
    out = np.asarray(sampler(None, noise, labels, num_steps=1, cfg_scale=2.5, guidance_interval=(0.2, 0.7)))
    np.testing.assert_allclose(out, np.full((4, 2), 2.5 + 2.0 + 70.0), rtol=1e-6)
    out = np.asarray(sampler(None, noise, labels, num_steps=1, cfg_scale=2.5))  # default: every t
    np.testing.assert_allclose(out, np.full((4, 2), 2.5 + 0.0 + 100.0), rtol=1e-6)
    assert set(calls) == {(4, 3)}
    plain = sampling.IntervalSampler(apply, num_levels=7, num_classes=3, guidance_input=True)
    with pytest.raises(ValueError, match="only a network trained with objective.meanflow_interval_input"):
        plain(None, noise, labels, num_steps=1, cfg_scale=2.5, guidance_interval=(0.2, 0.7))


def test_guidance_interval_input_adds_embeddings_the_output_depends_on():
    from shortcut_jax.models import build_model

    c = config_lib.default_config()
    c.model.name, c.model.width, c.model.depth = "mlp", 16, 1
    x = jnp.zeros((2, 2))
    args = (x, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    scale_only = build_model(c.model, num_classes=3, guidance_input=True).init(jax.random.key(0), *args)["params"]
    model = build_model(c.model, num_classes=3, guidance_input=True, guidance_interval_input=True)
    params = model.init(jax.random.key(0), *args)["params"]
    assert {"guidance_start_embed", "guidance_end_embed"} <= set(params)
    assert not {"guidance_start_embed", "guidance_end_embed"} & set(scale_only)
    params = jax.tree.map(lambda p: p + 0.1, params)  # the output layer starts at zero
    every_t = model.apply({"params": params}, *args, jnp.array([[3.0, 0.0, 1.0]] * 2))
    late = model.apply({"params": params}, *args, jnp.array([[3.0, 0.4, 1.0]] * 2))
    early = model.apply({"params": params}, *args, jnp.array([[3.0, 0.0, 0.6]] * 2))
    assert float(jnp.max(jnp.abs(every_t - late))) > 1e-4 and float(jnp.max(jnp.abs(every_t - early))) > 1e-4


@jax.custom_vjp
def _no_forward_rule(u):
    """The identity with a hand-written backward pass: ``jax.jvp`` refuses it, as it refuses the
    lean ops and the cuDNN attention kernel."""
    return u


_no_forward_rule.defvjp(lambda u: (u, None), lambda _, g: (g,))


@pytest.mark.parametrize("name", ["meanflow", "meanflow_v"])
def test_the_gradient_goes_through_the_configured_network_and_the_jvp_through_the_forward_mode_one(name):
    """The loss's one pass with gradient runs through ``apply_fn`` even where it has no
    forward-mode rule, and the jvp through ``jvp_apply_fn``: loss and gradient equal those of
    the plain network everywhere. Seen failing with the jvp taken through ``apply_fn`` (jax
    refuses forward mode through a custom_vjp function)."""

    def configured(params, x, tau, h, label):
        return _no_forward_rule(analytic_apply(params, x, tau, h, label))

    plain = objective_config(analytic_apply, name=name, meanflow_norm_p=1.0)
    split = dataclasses.replace(
        objective_config(configured, name=name, meanflow_norm_p=1.0), jvp_apply_fn=analytic_apply
    )
    x1 = jax.random.normal(jax.random.key(21), (16, 3))
    loss_fn = METHODS[name].loss
    want, want_grad = jax.value_and_grad(lambda p: loss_fn(p, None, batch_of(x1), jax.random.key(22), plain)[0])(PARAMS)
    got, got_grad = jax.value_and_grad(lambda p: loss_fn(p, None, batch_of(x1), jax.random.key(22), split)[0])(PARAMS)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for key in PARAMS:
        np.testing.assert_allclose(np.asarray(got_grad[key]), np.asarray(want_grad[key]), rtol=1e-5, atol=1e-7)
