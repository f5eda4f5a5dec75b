"""FP8 matmuls (models/fp8.py, model.matmul_precision='fp8') on CPU, where XLA computes FP8 dots by
widening the operands: the values are the FP8 network's, checked against exact products and an
independent NumPy/ml_dtypes rendering of the FP8 formulas; the lowered train step holds FP8
dot_generals only when asked; a tiny DiT trains with FP8 as it does without; delayed scaling
(model.fp8_amax_history) takes its scales from the history, and the train step writes the
histories from the layers' observations; the GPU check script runs here on a tiny row."""

import dataclasses
import functools
import gzip
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from benchmarks import fp8_check
from benchmarks import train_step as bench
from shortcut_jax import config_lib
from shortcut_jax.models import DiT, build_model, dit, fp8, layers
from shortcut_jax.objectives import METHODS, make_objective_config
from shortcut_jax.training import experiment, train_state
from shortcut_jax.training import train_step as train_step_lib


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def layer_inputs(seed=0, m=128, k=96, n=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = rng.standard_normal((m, n)).astype(np.float32)
    return x, w, g


def fp8_layer(x, w, g, form, out_dtype=jnp.float32):
    """(y, dx, dw) of ``fp8_matmul`` for the output cotangent ``g``."""
    y, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, out_dtype=out_dtype, form=form), x, w)
    return (y, *vjp(g))


def reference_quantize(t, fmt):
    """NumPy + ml_dtypes per-tensor current scaling: (values of the quantized tensor, scale)."""
    t = np.asarray(t, np.float32)
    limit = np.float32(ml_dtypes.finfo(fmt).max)
    amax = np.float32(np.abs(t).max())
    scale = np.float32(amax / limit) if amax > 0 else np.float32(1.0)
    q = np.clip(t / scale, -limit, limit).astype(fmt)
    return q.astype(np.float64), np.float64(scale)


@pytest.mark.parametrize("form", fp8.FORMS)
def test_fp8_layer_stays_within_fp8_rounding_error_of_the_exact_products(form):
    # e4m3 keeps 3 mantissa bits: each operand element is off by up to 2^-4 of its value, about
    # 2.6% RMS over a binade; two rounded operands give about 3.7% on a sum of independent
    # products. e5m2 (2 bits, gradients) about 5.2% RMS, with the e4m3 operand about 5.8%. The
    # bounds are 1.6x those; the lower bounds, 5-8x bf16's 0.3% on the same layer, show the
    # operands were really rounded to 8 bits.
    x, w, g = layer_inputs()
    y, dx, dw = fp8_layer(x, w, g, form)
    x64, w64, g64 = (v.astype(np.float64) for v in (x, w, g))
    assert 0.015 < rel_err(y, x64 @ w64) < 0.06
    assert 0.025 < rel_err(dx, g64 @ w64.T) < 0.10
    assert 0.025 < rel_err(dw, x64.T @ g64) < 0.10


@pytest.mark.parametrize("form", fp8.FORMS)
def test_fp8_layer_is_exact_on_values_both_formats_represent(form):
    # Powers of two times the tensor's amax map to 448 * 2^-j = 7 * 2^(6-j) in e4m3 and to
    # 57344 * 2^-j = 7 * 2^(13-j) in e5m2: 1.11b fits both mantissas, so nothing is rounded and
    # the only error left is the float32 rounding of amax / 448 in the scales.
    rng = np.random.default_rng(1)

    def powers_of_two(shape, top):
        t = rng.choice([-1.0, 1.0], shape) * 2.0 ** rng.integers(-5, 1, shape) * top
        t.flat[0] = top  # the amax
        return t.astype(np.float32)

    x, w, g = powers_of_two((32, 48), 8.0), powers_of_two((48, 16), 0.5), powers_of_two((32, 16), 2.0**-10)
    y, dx, dw = fp8_layer(x, w, g, form)
    x64, w64, g64 = (v.astype(np.float64) for v in (x, w, g))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-6)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-6)
    np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-6)


@pytest.mark.parametrize("form", fp8.FORMS)
def test_fp8_gradients_equal_the_fp8_formula(form):
    x, w, g = layer_inputs(seed=2)
    y, dx, dw = fp8_layer(x, w, g, form)
    qx, sx = reference_quantize(x, ml_dtypes.float8_e4m3fn)
    qw, sw = reference_quantize(w, ml_dtypes.float8_e4m3fn)
    qg, sg = reference_quantize(g, ml_dtypes.float8_e5m2)
    # float32 sums of up to 128 products against float64 ones: agreement to 1e-5 of each result's
    # largest value (a rounding step of the 8-bit formats would be 1e-2 or more)
    for got, want in ((y, (qx @ qw) * sx * sw), (dx, (qg @ qw.T) * sg * sw), (dw, (qx.T @ qg) * sx * sg)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # bf16 activations and bf16 GEMM outputs: gradients in the operands' dtypes, the same
    # formula up to bf16's rounding of the GEMM output
    yb, dxb, dwb = fp8_layer(jnp.asarray(x, jnp.bfloat16), w, g, form, out_dtype=jnp.bfloat16)
    assert (yb.dtype, dxb.dtype, dwb.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    qxb, sxb = reference_quantize(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), ml_dtypes.float8_e4m3fn)
    np.testing.assert_allclose(np.asarray(dxb, np.float32), (qg @ qw.T) * sg * sw, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(dwb, (qxb.T @ qg) * sxb * sg, rtol=1e-5, atol=1e-5)


def test_zero_tensors_give_zeros_and_non_finite_ones_stay_non_finite():
    # the gradient that reaches the blocks while the zero-initialised final layer is zero
    x, w, _ = layer_inputs(seed=3)
    y, dx, dw = fp8_layer(np.zeros_like(x), w, np.zeros((x.shape[0], w.shape[1]), np.float32), "direct")
    for t in (y, dx, dw):
        assert np.all(np.asarray(t) == 0)
    # an overflow upstream must reach the loss (training stops on it), not vanish in the scaling
    for bad in (np.inf, np.nan):
        x_bad = x.copy()
        x_bad[5, 7] = bad
        y, dx, dw = fp8_layer(x_bad, w, np.ones((x.shape[0], w.shape[1]), np.float32), "direct")
        assert not np.all(np.isfinite(y)) and not np.all(np.isfinite(dw))


# ----------------------------------------------------------------------------- delayed scaling


def delayed_layer(x, w, g, history, form="direct"):
    """(y, dx, dw, the history's cotangent) of ``fp8_matmul_delayed`` for the output cotangent ``g``."""
    y, vjp = jax.vjp(
        lambda a, b, h: fp8.fp8_matmul_delayed(a, b, h, out_dtype=jnp.float32, form=form), x, w, jnp.asarray(history)
    )
    return (y, *vjp(g))


def fixed_scale_quantize(t, scale, fmt):
    """NumPy + ml_dtypes quantization with a given scale: (values of the quantized tensor, scale)."""
    limit = np.float32(ml_dtypes.finfo(fmt).max)
    q = np.clip(np.asarray(t, np.float32) / np.float32(scale), -limit, limit).astype(fmt)
    return q.astype(np.float64), np.float64(np.float32(scale))


@pytest.mark.parametrize("form", fp8.FORMS)
def test_delayed_scaling_uses_the_largest_amax_of_the_history_and_returns_this_calls_amaxes(form):
    x, w, g = layer_inputs(seed=5)
    ax, ag = np.float32(np.abs(x).max()), np.float32(np.abs(g).max())
    # the largest amaxes sit in the third row, not the first: the scales are those of current
    # scaling, so every output equals the current-scaling layer's to the bit
    history = np.array([[ax / 2, ag / 4], [ax / 3, ag / 2], [ax, ag], [0, 0]], np.float32)
    y, dx, dw, observed = delayed_layer(x, w, g, history, form)
    for got, want in zip((y, dx, dw), fp8_layer(x, w, g, form)):
        np.testing.assert_array_equal(got, want)
    want_observed = np.zeros_like(history)
    want_observed[0] = [ax, ag]
    np.testing.assert_array_equal(observed, want_observed)

    # a history whose largest amax is a quarter of the tensors': the scales come from it, so the
    # largest values saturate at the formats' maxima (the NumPy rendering clips them the same way)
    small = np.array([[ax / 4, ag / 4], [ax / 8, ag / 8]], np.float32)
    y, dx, dw, _ = delayed_layer(x, w, g, small, form)
    qx, sx = fixed_scale_quantize(x, ax / 4 / 448.0, ml_dtypes.float8_e4m3fn)
    qw, sw = reference_quantize(w, ml_dtypes.float8_e4m3fn)  # the kernel keeps its current scale
    qg, sg = fixed_scale_quantize(g, ag / 4 / 57344.0, ml_dtypes.float8_e5m2)
    assert np.abs(qx).max() == 448.0 and np.abs(qg).max() == 57344.0  # saturated
    for got, want in ((y, (qx @ qw) * sx * sw), (dx, (qg @ qw.T) * sg * sw), (dw, (qx.T @ qg) * sx * sg)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a history of zeros (the first step): scale 1
    y, *_ = delayed_layer(x, w, g, np.zeros((3, 2), np.float32), form)
    qx1, _ = fixed_scale_quantize(x, 1.0, ml_dtypes.float8_e4m3fn)
    np.testing.assert_allclose(y, (qx1 @ qw) * sw, rtol=1e-5, atol=1e-5 * np.abs(qx1 @ qw).max() * sw)


def test_observations_leave_the_gradient_and_move_each_history_down_one_row():
    rng = np.random.default_rng(6)
    hist = jnp.asarray(rng.uniform(1, 2, (4, 2)), jnp.float32)
    stacked = jnp.asarray(rng.uniform(1, 2, (3, 4, 2)), jnp.float32)  # model.scan_blocks: [depth, N, 2]
    previous = {"qkv": {"kernel": jnp.ones((2, 3)), fp8.HISTORY: hist}, "blocks": {"fc1": {fp8.HISTORY: stacked}}}
    obs_one = jnp.zeros((4, 2)).at[0].set(jnp.array([7.0, 8.0]))
    obs_stacked = jnp.zeros((3, 4, 2)).at[:, 0].set(jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    grads = {
        "qkv": {"kernel": jnp.full((2, 3), 0.5), fp8.HISTORY: obs_one},
        "blocks": {"fc1": {fp8.HISTORY: obs_stacked}},
    }

    trained, observed = fp8.split_observations(grads)
    np.testing.assert_array_equal(trained["qkv"]["kernel"], 0.5)
    assert not np.any(trained["qkv"][fp8.HISTORY]) and not np.any(trained["blocks"]["fc1"][fp8.HISTORY])
    assert observed["qkv"]["kernel"] is None

    # the optimiser's result for the histories (here: decayed) is discarded; the previous history
    # moves down one row and the observation enters at the top
    updated = jax.tree.map(lambda p: 0.9 * p, previous)
    new = fp8.record_observations(updated, previous, observed)
    np.testing.assert_array_equal(new["qkv"]["kernel"], updated["qkv"]["kernel"])
    np.testing.assert_array_equal(new["qkv"][fp8.HISTORY][0], [7.0, 8.0])
    np.testing.assert_array_equal(new["qkv"][fp8.HISTORY][1:], hist[:3])
    np.testing.assert_array_equal(new["blocks"]["fc1"][fp8.HISTORY][:, 0], obs_stacked[:, 0])
    np.testing.assert_array_equal(new["blocks"]["fc1"][fp8.HISTORY][:, 1:], stacked[:, :3])
    assert fp8.without_histories(new)["qkv"][fp8.HISTORY] is None


def test_accumulated_update_records_the_largest_amax_of_its_micro_batches():
    # a method whose loss is one FP8 layer: micro-batch 0 has inputs of amax 1, micro-batch 1 of
    # amax 5, so the input column must read 5 (a sum would read 6, a mean 3)
    layer = fp8.Fp8Dense(16, dtype=jnp.float32, amax_history=3)
    x = np.ones((4, 32), np.float32)
    x[2:] *= 5.0
    x[:, ::2] *= -1.0
    batch = {"x": jnp.asarray(x)}
    params = layer.init(jax.random.PRNGKey(0), batch["x"])["params"]

    def loss(p, teacher, b, rng, cfg):
        return jnp.mean(layer.apply({"params": p}, b["x"]) ** 2), {}

    record = dataclasses.replace(METHODS["flow_matching"], loss=loss)
    tx = optax.adamw(1e-3, weight_decay=0.1)
    step = jax.jit(train_step_lib.make_train_step(record, None, tx, optax.constant_schedule(1e-3), accum_steps=2))
    state = train_state.create(params, tx, jax.random.PRNGKey(1), (0.999,))
    new, _ = step(state, batch)
    # each micro-batch's incoming-gradient amax, from the layer's own backward pass
    g_amax = [
        delayed_layer(
            batch["x"][i : i + 2],
            params["kernel"],
            np.asarray(jax.grad(lambda y: jnp.mean(y**2))(layer.apply({"params": params}, batch["x"][i : i + 2]))),
            np.zeros((3, 2), np.float32),
        )[3][0, 1]
        for i in (0, 2)
    ]
    np.testing.assert_allclose(new.params[fp8.HISTORY][0], [5.0, max(g_amax)], rtol=1e-6)
    np.testing.assert_array_equal(new.params[fp8.HISTORY][1:], 0.0)


@pytest.mark.parametrize("scan", ["off", "on"])
def test_train_step_writes_the_amax_histories_of_a_delayed_fp8_dit(scan):
    exp = _tiny_experiment(
        "--matmul_precision=fp8", "--fp8_amax_history=4", "--dtype=bfloat16", f"--scan_blocks={scan}", row="tiny-flow"
    )
    histories = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(exp.abstract_state.params)
        if fp8.HISTORY in jax.tree_util.keystr(path)
    ]
    assert len(histories) == 4  # qkv, proj, fc1, fc2 of the one block
    assert all(leaf.shape[-2:] == (4, 2) for _, leaf in histories)
    state = exp.init_state()
    batch = bench.synthetic_batch(exp.spec, exp.config.train.batch_size, exp.mesh)
    step = exp.compile_step()[0]

    def read(state):
        return [np.asarray(leaf).reshape(4, 2) for _, leaf in fp8_histories(state.params)]

    seen = []
    for _ in range(3):
        state, metrics = step(state, batch)
        seen.append(read(state))
    for first, second, third in zip(*seen):
        assert np.all(first[0, 0] > 0) and not np.any(first[1:])  # the input amaxes of step 1, nothing else
        np.testing.assert_array_equal(second[1], first[0])  # moved down one row, untouched by AdamW
        np.testing.assert_array_equal(third[1:3], second[0:2])
        assert third[0, 1] > 0  # the gradient reaches the blocks once the zero-initialised final layer moved
    assert np.isfinite(float(metrics["loss"]))
    # the EMA tree carries the online histories (copied, not averaged), and the network samples from it
    for (_, online), (_, averaged) in zip(fp8_histories(state.params), fp8_histories(state.ema_params[0])):
        np.testing.assert_array_equal(averaged, online)
    out = jax.jit(exp.apply_fn)(
        state.ema_params[0], batch["x"][:2], jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32), batch["label"][:2]
    )
    assert np.all(np.isfinite(np.asarray(out)))


def test_tiny_dit_trains_with_delayed_scaling_as_with_current_scaling():
    # the real train step (flow matching, the same fixed batch and state rng, so the same noise
    # and t at every step) for a tiny FP8 DiT with current and with delayed scaling, from the
    # same weights: delayed scaling's first step quantizes with scale 1 and later ones with the
    # last steps' amaxes; its loss must fall as current scaling's does and stay near it
    rng = np.random.default_rng(7)
    batch, objective = fixed_flow_batch(rng)
    models = {
        h: DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=3, matmul_precision="fp8", fp8_amax_history=h)
        for h in (0, 4)
    }
    example = (batch["x"][:1], jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    start = random_params(jax.eval_shape(models[0].init, jax.random.PRNGKey(0), *example)["params"], rng)
    histories = jax.eval_shape(models[4].init, jax.random.PRNGKey(0), *example)["params"]
    tx = optax.adam(5e-3)
    states, steps = {}, {}
    for h, model in models.items():
        cfg = make_objective_config(objective, functools.partial(apply_params, model), 3)
        steps[h] = train_step_lib.make_train_step("flow_matching", cfg, tx, optax.constant_schedule(5e-3))
        params = start if h == 0 else with_zero_histories(start, histories)
        states[h] = train_state.create(params, tx, jax.random.PRNGKey(2), (0.999,))

    @jax.jit  # both settings in one program: one compilation
    def step(states):
        return {h: steps[h](s, batch) for h, s in states.items()}

    losses = []
    for _ in range(40):
        out = step(states)
        states = {h: o[0] for h, o in out.items()}
        losses.append([float(out[0][1]["loss"]), float(out[4][1]["loss"])])
    ref, got = np.array(losses).T
    assert got[-1] < 0.7 * got[0] and got[0] - got[-1] > 0.8 * (ref[0] - ref[-1])
    np.testing.assert_allclose(got, ref, rtol=0.1)
    assert all(np.any(np.asarray(h)) for _, h in fp8_histories(states[4].params))


def with_zero_histories(params, shapes):
    """``params`` of the current-scaling network plus the zero histories ``shapes`` adds."""
    given = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    return jax.tree_util.tree_map_with_path(
        lambda p, s: given.get(jax.tree_util.keystr(p), jnp.zeros(s.shape, s.dtype)), shapes
    )


def fp8_histories(params):
    return [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) == fp8.HISTORY
    ]


def test_delayed_scaling_is_checked_recorded_in_the_architecture_and_refused_on_resume():
    c = config_lib.default_config()
    assert c.model.fp8_amax_history == 0 and "fp8_amax_history" not in experiment.architecture(c.model)
    c.model.fp8_amax_history = 16
    with pytest.raises(config_lib.ConfigError, match="model.fp8_amax_history=16 sets FP8's delayed scaling"):
        config_lib.validate(c, num_devices=1)
    c.model.matmul_precision = "fp8"
    config_lib.validate(c, num_devices=1)
    assert build_model(c.model, num_classes=3).fp8_amax_history == 16
    assert build_model(c.model, num_classes=3, forward_mode=True).fp8_amax_history == 0
    saved = {"architecture": experiment.architecture(c.model)}
    c.model.fp8_amax_history = 8
    with pytest.raises(config_lib.ConfigError, match="fp8_amax_history"):
        experiment.check_workdir_matches("w", saved, {"architecture": experiment.architecture(c.model)})
    for bad in (-1, True):
        c.model.fp8_amax_history = bad
        with pytest.raises(config_lib.ConfigError, match="must be an integer >= 0"):
            config_lib.validate(c, num_devices=1)


# ----------------------------------------------------------------------------- the DiT


def test_fp8_dit_has_the_default_parameters_and_the_same_values_when_rematerialised():
    base = DiT(patch_size=2, width=32, depth=2, num_heads=2, num_classes=3)
    model = base.clone(matmul_precision="fp8")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    inputs = (x, jnp.linspace(0.1, 0.9, 4), jnp.array([0, 1, 2, 7]), jnp.array([0, 1, 2, 3]))
    # the same parameter names, shapes and dtypes as the default network, and the FP8 layers
    # initialise the values nn.Dense does: a checkpoint moves between the two unchanged
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    assert shapes == jax.eval_shape(base.init, jax.random.PRNGKey(0), *inputs)["params"]
    h, init = jnp.ones((2, 3, 8)), layers.xavier_uniform()
    jax.tree.map(
        np.testing.assert_array_equal,
        fp8.dense(16, kernel_init=init, dtype=jnp.float32, fp8_form="direct", name=None).init(jax.random.PRNGKey(1), h),
        nn.Dense(16, kernel_init=init).init(jax.random.PRNGKey(1), h),
    )
    params = random_params(shapes, rng)
    # the first block under the 'dots' policy, the second plain: the rematerialised forward
    # recomputes the same FP8 values, so loss and gradients are those of the plain network
    # (other policies, lean ops and the bf16 residual stream: the lowered-step test below)
    remat = model.clone(remat="dots", remat_blocks=1)

    @jax.jit  # one program for both: one compilation
    def losses_and_grads(params):
        def loss(m, p):
            return jnp.mean((m.apply({"params": p}, *inputs) - x) ** 2)

        return [jax.value_and_grad(functools.partial(loss, m))(params) for m in (model, remat)]

    text = str(jax.make_jaxpr(losses_and_grads)(params))
    assert text.count("remat") + text.count("checkpoint[") == 1  # the first block of the second model
    (loss, grads), (remat_loss, remat_grads) = losses_and_grads(params)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), remat_grads, grads)


def _tiny_experiment(*extra_flags, row="tiny-shortcut"):
    opts = bench.parse_args(list(extra_flags))
    config = bench.row_config(bench.ROWS[row], bench.ROWS[row].batches[0], opts)
    return bench.experiment_for(config, bench.ROWS[row], opts)


def _lowered_step_dots(exp) -> dict:
    text = jax.jit(exp.train_step_fn()).lower(exp.abstract_state, exp.abstract_batch()).as_text()
    counts = {}
    for line in text.splitlines():
        if "stablehlo.dot_general" in line:
            operands = line.rsplit(":", 1)[1].split("->")[0]
            kinds = tuple(t for t in ("f8E4M3FN", "f8E5M2") for _ in range(operands.count(t)))
            key = tuple(sorted(kinds)) if kinds else "other"
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_lowered_train_step_has_fp8_dot_generals_only_with_fp8():
    # tiny-shortcut: one block, its four FP8 layers in the student's forward and in the
    # teacher's two half steps (e4m3 x e4m3), and in the student's backward pass (e5m2 x e4m3
    # for the input gradients, e4m3 x e5m2 for the kernel gradients)
    fp8_dots = _lowered_step_dots(_tiny_experiment("--matmul_precision=fp8", "--dtype=bfloat16"))
    e4, e5 = "f8E4M3FN", "f8E5M2"
    assert fp8_dots[(e4, e4)] == 4 * 3 and fp8_dots[(e4, e5)] == 4 + 4
    assert fp8_dots["other"] > 0  # adaLN, embedders, final layer, attention stay in bf16
    assert set(_lowered_step_dots(_tiny_experiment("--dtype=bfloat16"))) == {"other"}
    # with the other execution levers: rematerialised blocks add recomputed forward dots
    levers = _lowered_step_dots(
        _tiny_experiment(
            "--matmul_precision=fp8", "--dtype=bfloat16", "--remat=full", "--residual_dtype=compute", "--lean_ops=none"
        )
    )
    assert levers[(e4, e4)] >= 4 * 3 and levers[(e4, e5)] == 4 + 4


def test_tiny_dit_trains_with_fp8_as_with_the_compute_dtype():
    # flow matching on a fixed batch with fixed noise and t at every step: the loss of each
    # precision is a deterministic curve, from the same initial parameters; the FP8 one must fall
    # as the float32 one does and stay near it
    rng = np.random.default_rng(4)
    batch, objective = fixed_flow_batch(rng)
    models = {
        p: DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=3, matmul_precision=p)
        for p in config_lib.MATMUL_PRECISIONS
    }
    cfgs = {p: make_objective_config(objective, functools.partial(apply_params, m), 3) for p, m in models.items()}
    example = (batch["x"][:1], jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    start = random_params(jax.eval_shape(models["bf16"].init, jax.random.PRNGKey(0), *example)["params"], rng)
    params = {p: start for p in models}
    tx = optax.adam(5e-3)

    @jax.jit  # both precisions in one program: one compilation
    def step(params, opt_state):
        out = {}
        for p, cfg in cfgs.items():
            (loss, _), grads = jax.value_and_grad(METHODS["flow_matching"].loss, has_aux=True)(
                params[p], None, batch, jax.random.PRNGKey(1), cfg
            )
            updates, state = tx.update(grads, opt_state[p], params[p])
            out[p] = (optax.apply_updates(params[p], updates), state, loss)
        return tuple({p: v[i] for p, v in out.items()} for i in range(3))

    opt_state = {p: tx.init(params[p]) for p in models}
    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append([float(loss["bf16"]), float(loss["fp8"])])
    ref, got = np.array(losses).T
    # FP8 gradients are off by about 6% (first test); over 40 Adam steps the two curves part by a
    # few percent (6% at most, at the end, on this machine's runs), while gradients of the wrong
    # sign or from the wrong operands would stop the descent
    assert ref[-1] < 0.7 * ref[0] and got[-1] < 0.7 * got[0]
    assert got[0] - got[-1] > 0.8 * (ref[0] - ref[-1])
    np.testing.assert_allclose(got, ref, rtol=0.1)


def fixed_flow_batch(rng):
    """A batch of 32 8x8x3 images with labels of 3 classes, and the flow-matching objective."""
    batch = {
        "x": jnp.asarray(rng.standard_normal((32, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, 32), jnp.int32),
    }
    objective = config_lib.default_config().objective
    objective.name = "flow_matching"
    return batch, objective


def apply_params(model, params, *inputs):
    return model.apply({"params": params}, *inputs)


def random_params(shapes, rng):
    """Parameters drawn in NumPy for the shapes of an initialised network (its own initialiser,
    hundreds of random-bit computations, takes longer to compile on CPU than the test's step):
    matrices and kernels at 1/sqrt(fan-in), vectors zero."""

    def draw(s):
        if len(s.shape) < 2:
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)

    return jax.tree.map(draw, shapes)


# ----------------------------------------------------------------------------- config, benchmarks


def test_matmul_precision_config_key_is_checked_and_reaches_the_model():
    assert config_lib.MATMUL_PRECISIONS == dit.MATMUL_PRECISIONS
    c = config_lib.default_config()
    assert c.model.matmul_precision == "bf16" and build_model(c.model, num_classes=3).matmul_precision == "bf16"
    c.model.matmul_precision = "fp8"
    config_lib.validate(c, num_devices=1)
    assert build_model(c.model, num_classes=3).matmul_precision == "fp8"
    c.model.matmul_precision = "fp16"
    with pytest.raises(config_lib.ConfigError, match=r"model.matmul_precision='fp16' is not one of \['bf16', 'fp8'\]"):
        config_lib.validate(c, num_devices=1)
    c.model.name, c.model.matmul_precision = "mlp", "fp8"
    with pytest.raises(config_lib.ConfigError, match="model.matmul_precision='fp8' applies to the DiT"):
        config_lib.validate(c, num_devices=1)
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        DiT(width=32, depth=1, num_heads=2, matmul_precision="int8").init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, 4, 4, 3)),
            jnp.zeros(1),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.int32),
        )


def test_train_step_benchmark_forwards_the_precision_and_the_dot_form():
    exp = _tiny_experiment("--matmul_precision=fp8", "--fp8_form=dequant", "--fp8_amax_history=8")
    assert exp.config.model.matmul_precision == "fp8" and exp.model.fp8_form == "dequant"
    assert exp.config.model.fp8_amax_history == 8 and exp.model.fp8_amax_history == 8
    assert _tiny_experiment("--matmul_precision=fp8").model.fp8_form == "direct"
    # the row's child process gets all three
    assert {"matmul_precision", "fp8_form", "fp8_amax_history"} <= set(bench.FORWARDED)
    with pytest.raises(SystemExit):
        bench.parse_args(["--fp8_form=qdq"])


GPU_HLO = """HloModule jit_train_step
%fused_quantize (param_0.1: bf16[256,768]) -> f8e4m3fn[256,768] {
  %param_0.1 = bf16[256,768]{1,0} parameter(0)
  ROOT %convert.1 = f8e4m3fn[256,768]{1,0} convert(%param_0.1)
}
ENTRY %main (p0: bf16[256,768], p1: f8e4m3fn[3072,768], p2: f8e5m2[256,3072], p3: bf16[768,768]) -> bf16[256,768] {
  %p0 = bf16[256,768]{1,0} parameter(0)
  %p1 = f8e4m3fn[3072,768]{1,0} parameter(1)
  %p2 = f8e5m2[256,3072]{1,0} parameter(2)
  %p3 = bf16[768,768]{1,0} parameter(3)
  %one = f32[] constant(1)
  %q = f8e4m3fn[256,768]{1,0} fusion(%p0), kind=kLoop, calls=%fused_quantize
  %cublas-lt-matmul.1 = (bf16[256,3072]{1,0}, s8[33554432]{0}) custom-call(%q, %p1, %one, %one, %one, %one), custom_call_target="__cublas$lt$matmul$f8", backend_config={}
  %cublas-lt-matmul.2 = (bf16[256,768]{1,0}, s8[33554432]{0}) custom-call(%p2, %p1, %one, %one, %one, %one), custom_call_target="__cublas$lt$matmul$f8"
  %cublas-gemm.3 = (bf16[256,768]{1,0}, s8[4194304]{0}) custom-call(%p0, %p3), custom_call_target="__cublas$gemm"
  %fmha = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%p0), custom_call_target="__cudnn$fmhaSoftmax"
  %triton = bf16[256,768]{1,0} fusion(%p0, %p3), kind=kCustom, calls=%fused_quantize, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %gte = bf16[256,768]{1,0} get-tuple-element(%cublas-gemm.3), index=0
}
"""


def test_fp8_check_reads_gemm_kinds_and_element_types_from_gpu_hlo():
    counts = fp8_check.compiled_matmuls(GPU_HLO)
    assert counts == {
        "__cublas$gemm bf16 x bf16 -> bf16": 1,
        "__cublas$lt$matmul$f8 f8e4m3fn x f8e4m3fn -> bf16": 1,
        "__cublas$lt$matmul$f8 f8e5m2 x f8e4m3fn -> bf16": 1,
        "__cudnn$fmhaSoftmax": 1,
        "triton_gemm fusion -> bf16": 1,
    }
    summary = fp8_check.f8_summary({"f8E4M3FN x f8E4M3FN -> bf16": 2, "bf16 x bf16 -> bf16": 5}, counts)
    assert summary == {"lowered_f8_dots": 2, "compiled_f8_gemms": 2, "compiled_other_cublas_gemms": 1}


def test_fp8_check_runs_on_cpu_on_a_tiny_row(tmp_path, capsys):
    out = tmp_path / "check"
    # tiny-flow: one block, its four FP8 layers forward and in the two gradient GEMMs; in the
    # 'dequant' form each FP8 dot reads two operands converted from FP8
    assert fp8_check.main(["--row=tiny-flow", "--sections=step", "--variants=dequant", f"--out={out}"]) == 0
    step = json.loads((out / "fp8_check.json").read_text())["step"]["variants"]["dequant"]
    assert step["lowered_dots"]["dequantized FP8 operands"] == 2 * 4 * 3 and step["lowered_f8_dots"] == 4 * 3
    assert sum(step["compiled_matmuls"].values()) > 0 and step["compiled_f8_gemms"] == 0  # no cuBLAS on CPU
    assert "HloModule" in gzip.open(step["hlo"], "rt").read(200)
    assert "FP8 GEMMs: 0 of 12 FP8 dots" in capsys.readouterr().out  # the line to read on a GPU

    assert (
        fp8_check.main(
            [
                "--sections=matmul",
                "--matmul_shape=64,32,48/32,48,16",
                "--warm_s=0",
                "--repeats=1",
                "--calls=1",
                f"--out={out}",
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads((out / "fp8_check.json").read_text())["matmul"]["rows"]
    assert [(r["shape"], r["variant"], r["mode"]) for r in rows] == [
        (s, v, m)
        for s in ([64, 32, 48], [32, 48, 16])
        for v in fp8_check.VARIANTS
        for m in ("gemm", "forward", "forward_backward")
    ]
    assert all(r["tflops"] > 0 and r["matmuls"] for r in rows)
    assert all(r["vs_bf16"] == 1.0 for r in rows if r["variant"] == "bf16")
    for bad in (["--variants=fp16"], ["--matmul_shape=1,2"], ["--train_step_args=--remat=sometimes"]):
        with pytest.raises(SystemExit):
            fp8_check.parse_args(bad)
