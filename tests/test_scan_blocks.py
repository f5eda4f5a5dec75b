"""model.scan_blocks: the DiT's blocks as one scan over stacked parameters compute the unrolled
network (outputs, gradients, a train step, FP8, remat of all or some blocks), start from the same
distribution per layer, convert exactly between the two layouts (a reference checkpoint included),
and keep the layer axis whole under the fsdp rules (a sharded step equals one device)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import SHARED_DATA
from shortcut_jax import config_lib
from shortcut_jax.infra import sharding
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.models import DiT, convert
from test_train import digits_config, params_of

WIDTH, DEPTH, HEADS, CLASSES = 32, 3, 2, 5
# (remat, remat_blocks): no remat; one policy for every layer (nn.remat inside nn.scan); the
# first block only, which runs as two scans over slices of the one stack
REMATS = [("none", -1), ("dots", -1), ("full", 1)]


def dit(scan: bool, **fields) -> DiT:
    return DiT(patch_size=2, width=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, scan_blocks=scan, **fields)


def inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((batch, 8, 8, 3)), jnp.float32),
        jnp.asarray(rng.uniform(size=batch), jnp.float32),
        jnp.asarray(rng.integers(0, 7, batch), jnp.int32),
        jnp.asarray(rng.integers(0, CLASSES + 1, batch), jnp.int32),
    )


def random_params(model, rng):
    """Every parameter drawn in NumPy (biases and the zero-initialised final layer too, so that
    each one reaches the output): weights at 1/sqrt(fan-in), vectors at 0.1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs())["params"]

    def draw(s):
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.1
        return jnp.asarray(rng.standard_normal(s.shape) * scale, jnp.float32)

    return jax.tree.map(draw, shapes)


def output_and_grads(model, params, args):
    """The network's output and the gradient of a fixed random projection of it."""
    weight = jnp.asarray(np.random.default_rng(1).standard_normal(args[0].shape), jnp.float32)

    def loss(p):
        out = model.apply({"params": p}, *args)
        return jnp.sum(out * weight), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(out), jax.tree.map(np.asarray, grads)


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def network():
    """Random parameters (unrolled layout), inputs, and the unrolled network's output and
    gradients: remat changes neither, so one unrolled run serves every remat setting."""
    params = random_params(dit(False), np.random.default_rng(0))
    args = inputs()
    return params, args, output_and_grads(dit(False), params, args)


@pytest.fixture(scope="module")
def scan_and_unrolled(network):
    """For each remat setting: (output, grads) of the unrolled network and of the scanned one,
    the latter given the unrolled parameters stacked, its gradients unstacked."""
    params, args, unrolled = network
    stacked = convert.to_layout(params, stacked=True)
    results = {}
    for remat, blocks in REMATS:
        out, grads = output_and_grads(dit(True, remat=remat, remat_blocks=blocks), stacked, args)
        results[remat, blocks] = unrolled, (out, convert.to_layout(grads, stacked=False))
    return results


@pytest.mark.parametrize("remat", REMATS, ids=[f"{r}-{b}" for r, b in REMATS])
def test_scanned_forward_equals_unrolled_given_stacked_params(scan_and_unrolled, remat):
    (want, _), (got, _) = scan_and_unrolled[remat]
    assert float(np.abs(want).max()) > 0.1  # every layer, the final one included, is non-zero
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", REMATS, ids=[f"{r}-{b}" for r, b in REMATS])
def test_scanned_gradients_equal_unrolled(scan_and_unrolled, remat):
    (_, want), (_, got) = scan_and_unrolled[remat]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in convert.flatten(got).items():
        w = convert.flatten(want)[path]
        assert np.abs(w).max() > 0, path  # the gradient reaches every parameter
        assert rel_err(g, w) <= 1e-5, path


def test_every_lean_part_under_a_rematerialised_scan_equals_the_unrolled_network(network):
    # the hand-written backward passes ('gate' included) inside nn.remat inside nn.scan
    params, args, (want_out, want_grads) = network
    model = dit(True, remat="dots", lean_ops=config_lib.LEAN_OPS)
    out, grads = output_and_grads(model, convert.to_layout(params, True), args)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for path, g in convert.flatten(convert.to_layout(grads, False)).items():
        assert rel_err(g, convert.flatten(want_grads)[path]) <= 1e-5, path


def test_fp8_blocks_under_scan_equal_unrolled_fp8(network):
    # The FP8 layers keep no state (per-tensor scales of the current step, models/fp8.py): under
    # the scan each layer quantizes its own slice of the stack with its own scales.
    params, args, (plain_out, _) = network
    want_out, want_grads = output_and_grads(dit(False, matmul_precision="fp8"), params, args)
    out, grads = output_and_grads(dit(True, matmul_precision="fp8"), convert.to_layout(params, True), args)
    assert rel_err(want_out, plain_out) > 1e-3  # the FP8 path is taken (its rounding shows)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for path, g in convert.flatten(convert.to_layout(grads, False)).items():
        assert rel_err(g, convert.flatten(want_grads)[path]) <= 1e-5, path


def test_each_scanned_layer_starts_from_the_unrolled_distribution():
    args = inputs(batch=1)
    unrolled = jax.jit(dit(False).init)(jax.random.key(0), *args)["params"]
    scanned = jax.jit(dit(True).init)(jax.random.key(0), *args)["params"]
    assert set(scanned) - {convert.STACKED_BLOCKS} == set(unrolled) - {f"block_{i}" for i in range(DEPTH)}
    stack = convert.flatten(scanned[convert.STACKED_BLOCKS])
    for path, layers in stack.items():
        assert layers.shape[0] == DEPTH, path
        for i in range(DEPTH):
            mine, theirs = np.asarray(layers[i]), np.asarray(convert.flatten(unrolled[f"block_{i}"])[path])
            assert mine.shape == theirs.shape, path
            if not theirs.any():  # biases start at zero in both
                assert not mine.any(), path
                continue
            # Glorot-uniform draws of 1k-6k values: the largest magnitude sits within 1% of the
            # bound, the standard deviation within a few percent of bound / sqrt(3)
            np.testing.assert_allclose(np.abs(mine).max(), np.abs(theirs).max(), rtol=0.02, err_msg=str(path))
            np.testing.assert_allclose(mine.std(), theirs.std(), rtol=0.06, err_msg=str(path))
            if path == ("qkv", "kernel"):  # q, k and v each at their own Glorot bound
                for part_mine, part_theirs in zip(np.split(mine, 3, -1), np.split(theirs, 3, -1)):
                    np.testing.assert_allclose(np.abs(part_mine).max(), np.abs(part_theirs).max(), rtol=0.02)
        assert not np.array_equal(layers[0], layers[1]) or not np.asarray(layers).any(), path  # own keys
    # the DiT paper's adaLN-zero: every layer's modulation starts at zero under the scan too
    adaln = jax.jit(dit(True, zero_init="adaln").init)(jax.random.key(0), *args)["params"]
    assert adaln[convert.STACKED_BLOCKS]["adaln"]["kernel"].shape == (DEPTH, WIDTH, 6 * WIDTH)
    assert not np.asarray(adaln[convert.STACKED_BLOCKS]["adaln"]["kernel"]).any()
    assert np.asarray(adaln[convert.STACKED_BLOCKS]["qkv"]["kernel"]).any()


# ----------------------------------------------------------------------------- conversion


def adam_like_state(params):
    """A train-state-shaped tree: parameters, EMA trees and Adam's moments beside plain leaves."""
    moments = optax.ScaleByAdamState(
        count=jnp.asarray(3), mu=jax.tree.map(lambda a: a * 2, params), nu=jax.tree.map(lambda a: a * a, params)
    )
    return {
        "params": params,
        "ema": (jax.tree.map(lambda a: a + 1, params),),
        "opt": (moments, optax.EmptyState()),
        "step": np.int32(7),
    }


def test_layout_conversion_round_trips_exactly():
    params = jax.tree.map(np.asarray, random_params(dit(False), np.random.default_rng(3)))
    state = adam_like_state(params)
    stacked = convert.to_layout(state, stacked=True)
    # the stacked trees have exactly the scanned model's structure and shapes, layer i at index i
    want = jax.eval_shape(dit(True).init, jax.random.key(0), *inputs())["params"]
    for tree in (stacked["params"], stacked["ema"][0], stacked["opt"][0].mu, stacked["opt"][0].nu):
        assert jax.tree.structure(tree) == jax.tree.structure(want)
        assert [np.shape(a) for a in jax.tree.leaves(tree)] == [a.shape for a in jax.tree.leaves(want)]
    np.testing.assert_array_equal(
        stacked["params"]["blocks"]["mlp"]["fc1"]["kernel"][2], params["block_2"]["mlp"]["fc1"]["kernel"]
    )
    assert convert.is_stacked(stacked) and not convert.is_stacked(state)
    back = convert.to_layout(stacked, stacked=False)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    # converting to the layout a tree already has leaves it as it is
    again = convert.to_layout(stacked, stacked=True)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)


def test_layout_conversion_runs_under_jit_onto_the_stacked_shardings():
    # how a state restored in one layout becomes the other on the mesh, without a host copy
    model = DiT(patch_size=2, width=64, depth=3, num_heads=2, num_classes=CLASSES)
    params = random_params(model, np.random.default_rng(6))
    mesh = sharding.make_mesh(digits_config(**{"mesh.data": 1, "mesh.fsdp": 8}).mesh)
    abstract = jax.eval_shape(lambda p: convert.to_layout(p, True), params)
    assert abstract["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 64, 256)
    shardings = sharding.state_shardings(abstract, mesh, layer_axis=convert.in_stacked_blocks)
    stacked = jax.jit(lambda p: convert.to_layout(p, True), out_shardings=shardings)(params)
    assert stacked["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, None, "fsdp")
    on_host = convert.to_layout(jax.tree.map(np.asarray, params), True)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(on_host)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_conversion_refuses_trees_that_are_neither_layout():
    params = jax.tree.map(np.asarray, random_params(dit(False), np.random.default_rng(4)))
    gap = {k: v for k, v in params.items() if k != "block_1"}
    with pytest.raises(ValueError, match="without gaps"):
        convert.stack_blocks(gap)
    odd = dict(params, block_2={**params["block_2"], "extra": {"kernel": np.zeros(3)}})
    with pytest.raises(ValueError, match="block_2 has other parameters"):
        convert.stack_blocks(odd)
    with pytest.raises(ValueError, match="neither layout"):
        convert.stack_blocks(dict(convert.stack_blocks(params), block_0=params["block_0"]))


def test_reference_checkpoint_fills_the_scanned_model_with_golden_outputs():
    g = np.load(os.path.join(SHARED_DATA, "official_dit_golden.npz"))
    official = convert.from_slash_names({k[len("param/") :]: g[k] for k in g.files if k.startswith("param/")})
    model = DiT(patch_size=2, width=64, depth=2, num_heads=4, mlp_ratio=4, num_classes=10, scan_blocks=True)
    abstract = jax.eval_shape(model.init, jax.random.key(0), g["x"], g["t"], g["level"], g["label"])["params"]
    params = convert.match_layout(convert.official_to_project(official), abstract)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    out = model.apply({"params": params}, g["x"], g["t"], g["level"], g["label"])
    assert rel_err(out, g["out"]) <= 1e-5


def test_weight_decay_mask_marks_the_same_parameters_in_both_layouts():
    params = jax.tree.map(np.asarray, random_params(dit(False), np.random.default_rng(5)))
    unrolled = convert.weight_matrix_mask(params)
    stacked = convert.weight_matrix_mask(convert.to_layout(params, True))
    assert stacked["blocks"]["qkv"] == {"kernel": True, "bias": False}  # a stacked bias is 2-D, not a matrix
    assert convert.flatten(stacked["blocks"]) == convert.flatten(unrolled["block_0"])
    assert {k: v for k, v in stacked.items() if k != "blocks"} == {
        k: v for k, v in unrolled.items() if not k.startswith("block_")
    }


# ----------------------------------------------------------------------------- sharding, train step


def test_fsdp_rules_never_shard_the_layer_axis():
    # a 16-layer stack of 6-wide vectors: the layer axis is the only one 8 divides
    assert sharding._fsdp_spec((16, 6), 8, 0) == P("fsdp", None)
    assert sharding._fsdp_spec((16, 6), 8, 0, layer_axis=True) == P()
    assert sharding._fsdp_spec((16, 64, 256), 8, 0, layer_axis=True) == P(None, None, "fsdp")
    # the size threshold is one layer's: a stack of small layers stays replicated like each layer
    assert sharding._fsdp_spec((28, 1152), 8, 2**14, layer_axis=True) == P()
    mesh = sharding.make_mesh(digits_config(**{"mesh.data": 1, "mesh.fsdp": 8}).mesh)
    model = DiT(patch_size=2, width=64, depth=3, num_heads=2, num_classes=CLASSES)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs())["params"]
    unrolled = sharding.state_shardings(shapes, mesh, layer_axis=convert.in_stacked_blocks)
    stacked_shapes = jax.eval_shape(model.clone(scan_blocks=True).init, jax.random.key(0), *inputs())["params"]
    stacked = sharding.state_shardings(stacked_shapes, mesh, layer_axis=convert.in_stacked_blocks)
    for path, sh in convert.flatten(stacked["blocks"]).items():
        layer_spec = tuple(convert.flatten(unrolled["block_0"])[path].spec)
        assert tuple(sh.spec)[:1] in ((), (None,)), path
        assert tuple(sh.spec)[1:] == layer_spec or (tuple(sh.spec) == () and layer_spec == ()), path
    assert any("fsdp" in str(sh.spec) for sh in jax.tree.leaves(stacked["blocks"]))


def run_steps(config, batches, state=None):
    """Steps of the real compiled train step, from ``state`` (a host tree) or the experiment's own."""
    exp = Experiment(config, "/nonexistent-workdir-for-test")
    if state is None:
        state = exp.init_state()
    else:
        state = jax.device_put(state, exp.state_shardings)
    compiled, _ = exp.compile_step()
    losses = []
    for b in batches:
        state, m = compiled(state, sharding.global_batch(b, exp.mesh))
        losses.append(float(m["loss"]))
    exp.source.close()
    return exp, np.array(losses), state


@pytest.fixture(scope="module")
def train_steps():
    """Two steps of the digits DiT (width 64, depth 2): unrolled on one device, scanned on one
    device from the same initial state, scanned on a 4 x 2 (data x fsdp) mesh from it too."""
    common = {"model.width": 64}
    one = digits_config(**common, **{"mesh.data": 1})
    exp = Experiment(one, "/nonexistent-workdir-for-test")
    batches = [exp.source.next_batch() for _ in range(2)]
    exp.source.close()
    start = jax.device_get(exp.init_state())
    _, loss_u, state_u = run_steps(one, batches, start)
    stacked_start = convert.to_layout(start, stacked=True)
    scan_one = digits_config(**common, **{"mesh.data": 1, "model.scan_blocks": True})
    exp_s, loss_s, state_s = run_steps(scan_one, batches, stacked_start)
    scan_fsdp = digits_config(**common, **{"mesh.data": 4, "mesh.fsdp": 2, "model.scan_blocks": True})
    exp_f, loss_f, state_f = run_steps(scan_fsdp, batches, stacked_start)
    return {
        "unrolled": (loss_u, params_of(state_u)),
        "scan": (loss_s, params_of(state_s), exp_s),
        "scan_fsdp": (loss_f, params_of(state_f), exp_f, state_f),
    }


def flat_params(params):
    return np.concatenate([a.ravel() for a in jax.tree.leaves(params)])


def test_scanned_train_step_equals_unrolled(train_steps):
    loss_u, params_u = train_steps["unrolled"]
    loss_s, params_s, exp_s = train_steps["scan"]
    assert exp_s.model.scan_blocks  # the config key reaches the model
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    params_s = convert.to_layout(params_s, stacked=False)
    assert jax.tree.structure(params_s) == jax.tree.structure(params_u)
    assert rel_err(flat_params(params_s), flat_params(params_u)) <= 1e-5


def test_fsdp_sharded_scanned_step_equals_one_device(train_steps):
    loss_s, params_s, _ = train_steps["scan"]
    loss_f, params_f, exp_f, state_f = train_steps["scan_fsdp"]
    stacked_specs = [s.spec for s in jax.tree.leaves(exp_f.state_shardings.params["blocks"])]
    assert any("fsdp" in str(spec) for spec in stacked_specs)  # the stack is split, along a layer's axes
    assert all(len(spec) == 0 or spec[0] is None for spec in stacked_specs)
    assert state_f.params["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, None, "fsdp")
    np.testing.assert_allclose(loss_f, loss_s, rtol=1e-5)
    assert rel_err(flat_params(params_f), flat_params(params_s)) <= 1e-5


def test_checkpoint_of_the_scanned_run_restores_into_the_unrolled_layout(train_steps, tmp_path):
    """A run saved with model.scan_blocks=True is read by a config with it off (evaluation,
    sampling or a resume): parameters, EMA trees and Adam's moments arrive unstacked, exactly."""
    from shortcut_jax.infra import checkpoint

    _, _, exp_f, state_f = train_steps["scan_fsdp"]
    workdir = tmp_path / "run"
    with checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False) as ckpt:
        ckpt.save(2, state_f, data_state={}, meta=exp_f.meta, force=True)
    unrolled = Experiment(digits_config(**{"model.width": 64, "mesh.data": 2}), str(workdir))
    try:
        with checkpoint.Checkpointer(unrolled.ckpt_dir, async_save=False) as ckpt:
            state, _, _ = unrolled.restore(ckpt, None)
    finally:
        unrolled.close()
    assert not convert.is_stacked(state.params) and convert.is_stacked(state_f.params)
    want = jax.device_get(convert.to_layout(jax.device_get(state_f), stacked=False))
    got = jax.device_get(state)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # placed on the unrolled run's shardings
    assert jax.tree.leaves(state.params)[0].sharding.mesh.shape == unrolled.mesh.shape
