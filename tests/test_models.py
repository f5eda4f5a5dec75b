"""The DiT reproduces the reference network; variants have the reference parameter counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DATA
from shortcut_jax import config_lib
from shortcut_jax.models import DiT, MLPNet, build_model, convert, layers, resolve_attention_impl
from shortcut_jax.objectives.sampling import Sampler

GOLDEN = os.path.join(SHARED_DATA, "official_dit_golden.npz")


@pytest.fixture(scope="module")
def golden():
    g = np.load(GOLDEN)
    official = convert.from_slash_names({k[len("param/") :]: g[k] for k in g.files if k.startswith("param/")})
    model = DiT(patch_size=2, width=64, depth=2, num_heads=4, mlp_ratio=4, num_classes=10)
    return g, official, model


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_converted_reference_network_gives_golden_outputs(golden):
    g, official, model = golden
    params = convert.official_to_project(official)
    out = model.apply({"params": params}, g["x"], g["t"], g["level"], g["label"])
    assert rel_err(out, g["out"]) <= 1e-5
    # the converted tree has exactly the structure of a freshly initialised project model
    fresh = jax.eval_shape(model.init, jax.random.key(0), g["x"], g["t"], g["level"], g["label"])["params"]
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    assert all(a.shape == np.shape(b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params)))


def test_project_sampler_gives_golden_samples(golden):
    g, official, model = golden
    params = convert.official_to_project(official)
    sampler = Sampler(lambda p, *a: model.apply({"params": p}, *a), num_levels=7, num_classes=10)
    for n in (1, 4):
        sample = sampler(params, jnp.asarray(g["noise"]), jnp.asarray(g["sample_label"]), num_steps=n)
        assert rel_err(sample, g[f"sample_{n}"]) <= 1e-5, n


def test_reference_config_read_from_tree(golden):
    _, official, _ = golden
    cfg = convert.infer_official_config(official)
    assert cfg == {
        "patch_size": 2,
        "in_channels": 4,
        "width": 64,
        "depth": 2,
        "mlp_ratio": 4.0,
        "num_classes": 10,
        "out_channels": 4,
    }


def test_converter_rejects_foreign_parameters(golden):
    _, official, _ = golden
    bad = dict(official)
    bad["Mystery_0"] = {"kernel": np.zeros(3)}
    with pytest.raises(ValueError, match="Mystery_0"):
        convert.official_to_project(bad)


@pytest.mark.parametrize("variant,millions", [("S", 33.11), ("B", 131.09), ("L", 459.14), ("XL", 676.44)])
def test_parameter_counts_match_reference(variant, millions):
    width, depth, heads = config_lib.DIT_VARIANTS[variant]
    model = DiT(patch_size=2, width=width, depth=depth, num_heads=heads, num_classes=1000)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 4)),
        jnp.zeros(1),
        jnp.zeros(1, jnp.int32),
        jnp.zeros(1, jnp.int32),
    )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert round(count / 1e6, 2) == millions


def test_position_table_convention():
    # Column index in the first half of the channels, row index in the second, [sin, cos] each.
    table = layers.sincos_2d_positions(8, 3)
    assert table.shape == (9, 8)
    row1_col2 = table[1 * 3 + 2]
    np.testing.assert_allclose(row1_col2[:2], np.sin([2.0, 2.0 / 100]), rtol=1e-6)
    np.testing.assert_allclose(row1_col2[4:6], np.sin([1.0, 1.0 / 100]), rtol=1e-6)


def test_init_options_change_what_they_say():
    x = jnp.ones((2, 8, 8, 3))
    args = (x, jnp.array([0.1, 0.5]), jnp.array([0, 3]), jnp.array([0, 0]))
    ref = DiT(patch_size=2, width=32, depth=2, num_heads=2).init(jax.random.key(0), *args)["params"]
    paper = DiT(patch_size=2, width=32, depth=2, num_heads=2, zero_init="adaln").init(jax.random.key(0), *args)[
        "params"
    ]
    assert float(jnp.abs(ref["block_0"]["adaln"]["kernel"]).max()) > 0
    assert float(jnp.abs(paper["block_0"]["adaln"]["kernel"]).max()) == 0
    assert float(jnp.abs(ref["final"]["out"]["kernel"]).max()) == 0
    # every parameter is float32 whatever the compute dtype
    bf16 = DiT(patch_size=2, width=32, depth=2, num_heads=2, dtype=jnp.bfloat16).init(jax.random.key(0), *args)
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype("float32")}


def test_attention_scale_option_matters(golden):
    g, official, model = golden
    params = convert.official_to_project(official)
    other = model.clone(attention_scale="sqrt_head_dim")
    out = other.apply({"params": params}, g["x"], g["t"], g["level"], g["label"])
    assert rel_err(out, g["out"]) > 1e-3


def test_bf16_compute_close_to_float32(golden):
    g, official, model = golden
    params = convert.official_to_project(official)
    out = model.clone(dtype=jnp.bfloat16).apply({"params": params}, g["x"], g["t"], g["level"], g["label"])
    assert out.dtype == jnp.float32
    assert rel_err(out, g["out"]) < 5e-2


def test_mlp_net_shapes_and_zero_output_at_init():
    net = MLPNet(width=32, depth=2, num_classes=3)
    x = jnp.ones((5, 2))
    args = (x, jnp.linspace(0, 1, 5), jnp.arange(5), jnp.array([0, 1, 2, 3, 3]))
    params = net.init(jax.random.key(0), *args)
    out = net.apply(params, *args)
    assert out.shape == (5, 2)
    assert float(jnp.abs(out).max()) == 0.0  # output layer starts at zero


def test_bf16_residual_stream_stays_close_to_the_float32_stream(golden):
    g, official, model = golden
    params = convert.official_to_project(official)
    args = (g["x"], g["t"], g["level"], g["label"])
    ref = model.clone(dtype=jnp.bfloat16).apply({"params": params}, *args)
    lean = model.clone(dtype=jnp.bfloat16, residual_dtype=jnp.bfloat16).apply({"params": params}, *args)
    assert rel_err(lean, np.asarray(ref)) < 2e-2
    # with float32 compute the option changes nothing
    same = model.clone(residual_dtype=jnp.float32).apply({"params": params}, *args)
    np.testing.assert_array_equal(same, model.apply({"params": params}, *args))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"backend": "gpu", "compute_capability": "9.0"}, "cudnn"),
        ({"backend": "gpu", "compute_capability": "9.0", "head_dim": 72}, "cudnn"),  # DiT-XL/2
        ({"backend": "gpu", "compute_capability": "9.0", "head_dim": 60}, None),  # not a multiple of 8
        ({"backend": "gpu", "compute_capability": "9.0", "head_dim": 256}, None),
        ({"backend": "gpu", "compute_capability": "9.0", "dtype": jnp.float32}, None),
        ({"backend": "gpu", "compute_capability": "7.5"}, None),
        ({"backend": "tpu"}, None),
        ({"backend": "cpu"}, None),
    ],
)
def test_auto_attention_picks_cudnn_only_where_it_applies(kwargs, expected):
    assert resolve_attention_impl("auto", **kwargs) == expected
    assert resolve_attention_impl("xla", **kwargs) == "xla"


def test_auto_attention_on_cpu_builds_an_xla_attention_model_that_runs():
    cfg = config_lib.default_config().model
    cfg.variant, cfg.width, cfg.depth, cfg.num_heads = "", 32, 1, 2
    model = build_model(cfg, num_classes=3)
    assert jax.default_backend() == "cpu" and model.attention_impl is None
    x = jnp.zeros((2, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(0), x, jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
    assert model.apply(params, x, jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)).shape == x.shape


def _regression_problem(model, seed: int, move: float):
    """A tiny batch, the model's parameters moved off their initial values (the final layer starts
    at zero; moved, gradients reach every block) and ``loss(model, params)``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    t, level, label = jnp.linspace(0.1, 0.9, 4), jnp.array([0, 1, 2, 7]), jnp.array([0, 1, 2, 3])
    params = model.init(jax.random.PRNGKey(0), x, t, level, label)["params"]
    params = jax.tree.map(lambda p: p + move * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

    def loss(m, p):
        return jnp.mean((m.apply({"params": p}, x, t, level, label) - x) ** 2)

    return params, loss, (x, t, level, label)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_plain_loss_and_gradients(remat):
    model = DiT(patch_size=2, width=32, depth=2, num_heads=2, num_classes=3)
    params, loss, _ = _regression_problem(model, seed=0, move=0.01)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    remat_model = model.clone(remat=remat)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got_grads, ref_grads)


def test_remat_blocks_rematerialises_only_the_first_blocks_with_the_same_gradients():
    model = DiT(patch_size=2, width=32, depth=3, num_heads=2, num_classes=3)
    params, loss, (x, t, level, label) = _regression_problem(model, seed=1, move=0.01)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)

    def saved_bytes(m):  # the residuals jax.vjp keeps for the backward pass
        _, vjp = jax.vjp(lambda p: loss(m, p), params)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "dtype"))

    sizes = []
    for blocks in (0, 1, 2, 3, -1):
        m = model.clone(remat="full", remat_blocks=blocks)
        got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(m, p)))(params)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got_grads, ref_grads)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(m, p)))(params))
        assert jaxpr.count("remat") + jaxpr.count("checkpoint[") == (3 if blocks < 0 else blocks)
        sizes.append(saved_bytes(m))
    # every block taken into remat keeps less; 0 keeps what the plain model keeps, -1 what 3 of 3 keep
    assert sizes[0] == saved_bytes(model) and sizes[0] > sizes[1] > sizes[2] > sizes[3] == sizes[4]


def test_config_check_rejects_remat_blocks_beyond_the_depth():
    from shortcut_jax import config_lib

    c = config_lib.default_config()
    c.model.variant, c.model.remat, c.model.remat_blocks = "S", "dots", 13
    with pytest.raises(config_lib.ConfigError, match=r"model.remat_blocks=13 must be -1 \(every block\) or 0..12"):
        config_lib.validate(c, num_devices=1)
    for ok in (-1, 0, 12):
        c.model.remat_blocks = ok
        config_lib.validate(c, num_devices=1)
    c.model.remat = "none"
    with pytest.raises(config_lib.ConfigError, match="set model.remat"):
        config_lib.validate(c, num_devices=1)


def test_config_check_knows_every_remat_policy():
    from shortcut_jax import config_lib
    from shortcut_jax.models.dit import REMAT_POLICIES

    assert set(config_lib.REMAT_CHOICES) == {"none", *REMAT_POLICIES}


def _lean_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)) * 2.0 + 0.5, jnp.float32)
    shift, scale = (jnp.asarray(rng.standard_normal((3, 16)), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    return x, shift, scale, weights


def test_norm_modulate_has_the_plain_value_and_gradients():
    x, shift, scale, w = _lean_inputs()

    def plain(x, a, b):
        return jnp.sum(w * layers.modulate(layers.layer_norm(x), a, b))

    def lean(x, a, b):
        return jnp.sum(w * layers.norm_modulate(x, a, b))

    np.testing.assert_allclose(lean(x, shift, scale), plain(x, shift, scale), rtol=1e-6)
    want = jax.grad(plain, (0, 1, 2))(x, shift, scale)
    for got in (jax.grad(lean, (0, 1, 2))(x, shift, scale), jax.jit(jax.grad(lean, (0, 1, 2)))(x, shift, scale)):
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # [batch, width] inputs (no token axis) and a bf16 output / bf16 input keep their dtypes
    np.testing.assert_allclose(
        jax.grad(lambda a: jnp.sum(layers.norm_modulate(x[:, 0], a, scale) ** 2))(shift),
        jax.grad(lambda a: jnp.sum(layers.modulate(layers.layer_norm(x[:, 0]), a, scale) ** 2))(shift),
        rtol=1e-5,
    )
    out = layers.norm_modulate(x.astype(jnp.bfloat16), shift, scale, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    dx = jax.grad(lambda v: jnp.sum(layers.norm_modulate(v, shift, scale, jnp.bfloat16).astype(jnp.float32)))(
        x.astype(jnp.bfloat16)
    )
    assert dx.dtype == jnp.bfloat16


def test_gelu_tanh_has_the_plain_value_and_gradient_and_keeps_only_its_input():
    x = jnp.linspace(-6.0, 6.0, 301, dtype=jnp.float32)
    np.testing.assert_allclose(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(layers.gelu_tanh(v)))(x),
        jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=True)))(x),
        rtol=1e-5,
        atol=5e-6,
    )
    # bf16 in, bf16 out, computed in float32: closer to the float32 function than bf16 arithmetic
    xb = x.astype(jnp.bfloat16)
    assert layers.gelu_tanh(xb).dtype == jnp.bfloat16
    exact = jax.nn.gelu(xb.astype(jnp.float32), approximate=True)
    assert float(jnp.max(jnp.abs(layers.gelu_tanh(xb).astype(jnp.float32) - exact))) <= float(
        jnp.max(jnp.abs(jax.nn.gelu(xb, approximate=True).astype(jnp.float32) - exact))
    )

    def saved_bytes(fn):
        _, vjp = jax.vjp(lambda v: jnp.sum(fn(v) * v), x)  # the product keeps x either way
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "dtype"))

    assert saved_bytes(layers.gelu_tanh) < saved_bytes(lambda v: jax.nn.gelu(v, approximate=True))


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_gated_add_has_the_plain_value_and_gradients_and_keeps_its_branch_in_bf16(x_dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), x_dtype)
    gate = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
    branch = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)

    def plain(x, gate, branch):
        return x + (gate[:, None] * branch.astype(jnp.float32)).astype(x.dtype)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)

    got = layers.gated_add(x, gate, branch)
    assert got.dtype == x_dtype
    np.testing.assert_array_equal(got, plain(x, gate, branch))
    for g_lean, g_plain in zip(
        jax.grad(loss(layers.gated_add), (0, 1, 2))(x, gate, branch), jax.grad(loss(plain), (0, 1, 2))(x, gate, branch)
    ):
        assert g_lean.dtype == g_plain.dtype
        np.testing.assert_allclose(np.asarray(g_lean, np.float32), np.asarray(g_plain, np.float32), rtol=1e-6)

    def saved(fn):
        _, vjp = jax.vjp(fn, x, gate, branch)
        return sorted(
            (leaf.shape, str(leaf.dtype))
            for leaf in jax.tree.leaves(vjp)
            if hasattr(leaf, "dtype") and leaf.shape == branch.shape
        )

    # the token-sized value kept for the gate's gradient: the branch as it came, not a float32 copy
    assert saved(layers.gated_add) == [((2, 5, 8), "bfloat16")]
    assert saved(plain) == [((2, 5, 8), "float32")]


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_lean_ops_give_the_plain_network_loss_and_gradients(remat):
    plain = DiT(patch_size=2, width=32, depth=2, num_heads=2, num_classes=3, lean_ops=(), remat=remat)
    params, loss, (x, t, level, label) = _regression_problem(plain, seed=1, move=0.05)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    for lean_ops in (("norm",), ("gelu",), ("gate",), config_lib.LEAN_OPS):
        model = plain.clone(lean_ops=lean_ops)
        # same parameters (names, shapes, initial values)
        jax.tree.map(
            np.testing.assert_array_equal,
            model.init(jax.random.PRNGKey(0), x, t, level, label)["params"],
            plain.init(jax.random.PRNGKey(0), x, t, level, label)["params"],
        )
        got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got_grads, ref_grads)


def test_three_qkv_gemms_have_the_fused_layers_parameters_golden_outputs_and_gradients(golden):
    g, official, fused = golden
    split = fused.clone(qkv_gemms=3)
    params = convert.official_to_project(official)
    inputs = (g["x"], g["t"], g["level"], g["label"])
    # the same parameter tree and initial values, the reference network's outputs
    jax.tree.map(
        np.testing.assert_array_equal,
        split.init(jax.random.PRNGKey(0), *inputs)["params"],
        fused.init(jax.random.PRNGKey(0), *inputs)["params"],
    )
    assert rel_err(split.apply({"params": params}, *inputs), g["out"]) <= 1e-5
    # the same gradients: to float32 rounding in float32; with bf16 matmuls the three GEMMs' input
    # gradients are each rounded to bf16 before their sum, where the fused GEMM rounds once, so
    # each gradient leaf may differ by a few bf16 roundings (bf16's epsilon is 0.8%)
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        models = [m.clone(dtype=dtype) for m in (fused, split)]
        (loss_f, grads_f), (loss_s, grads_s) = jax.jit(
            lambda p: [
                jax.value_and_grad(lambda q, m=m: jnp.mean((m.apply({"params": q}, *inputs) - g["x"]) ** 2))(p)
                for m in models
            ]
        )(params)
        np.testing.assert_allclose(loss_s, loss_f, rtol=1e-6)
        errors = jax.tree.map(rel_err, grads_s, grads_f)
        assert max(jax.tree.leaves(errors)) < tolerance, errors


def test_lean_ops_config_values():
    from shortcut_jax.models.dit import DEFAULT_LEAN_OPS, LEAN_OPS

    assert config_lib.LEAN_OPS == LEAN_OPS
    assert (
        config_lib.DEFAULT_LEAN_OPS
        == DEFAULT_LEAN_OPS
        == DiT().lean_ops
        == tuple(config_lib.default_config().model.lean_ops)
    )
    assert set(DEFAULT_LEAN_OPS) < set(LEAN_OPS)
    for bad in (("qkv",), ("norm", "norm")):
        with pytest.raises(config_lib.ConfigError, match="model.lean_ops"):
            config_lib.check_lean_ops(bad)
    cfg = config_lib.default_config()
    cfg.model.variant, cfg.model.lean_ops = "S", ("gelu",)
    assert build_model(cfg.model, num_classes=3).lean_ops == ("gelu",)
    cfg.model.lean_ops = ("gelu", "norm")  # any order: the model's is LEAN_OPS's
    assert build_model(cfg.model, num_classes=3).lean_ops == ("norm", "gelu")
    cfg.model.lean_ops = ()
    assert build_model(cfg.model, num_classes=3).lean_ops == ()


def test_plain_ops_keep_forward_mode_derivatives():
    model = DiT(patch_size=2, width=32, depth=1, num_heads=2, num_classes=3, lean_ops=())
    params, _, (x, t, level, label) = _regression_problem(model, seed=2, move=0.05)
    f = lambda v: model.apply({"params": params}, v, t, level, label)  # noqa: E731
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    eps = 1e-3
    np.testing.assert_allclose(tangent, (f(x + eps) - f(x - eps)) / (2 * eps), rtol=2e-2, atol=2e-3)
