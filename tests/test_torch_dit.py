"""The PyTorch port of the DiT (benchmarks/torch_dit.py) computes the JAX model's function, and its
train steps run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_dit  # noqa: E402
from shortcut_jax.models.dit import DiT  # noqa: E402

TINY = dict(patch_size=2, width=32, depth=2, num_heads=2, num_classes=3)


def noisy_flax_params(seed: int = 0):
    """A tiny DiT's initial parameters with noise added to every one: the final layer starts at
    zero, and zero weights would hide a wrong layout."""
    model = DiT(**TINY, dtype=jnp.float32)
    x = jnp.zeros((2, 8, 8, 4))
    ints = jnp.zeros((2,), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), x, jnp.zeros((2,)), ints, ints)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


def inputs(batch: int = 5, seed: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    level = rng.integers(0, 8, batch).astype(np.int32)
    label = rng.integers(0, 4, batch).astype(np.int32)  # 3 is the null class
    return x, t, level, label


def torch_output(flax_params, x, t, level, label, **overrides) -> np.ndarray:
    model = torch_dit.DiT(input_size=8, in_channels=4, **{**TINY, **overrides})
    model.load_state_dict(torch_dit.flax_to_state_dict(flax_params), strict=True)
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t),
            torch.from_numpy(level).long(),
            torch.from_numpy(label).long(),
        )
    return out.permute(0, 2, 3, 1).numpy()


def relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_torch_port_computes_the_flax_dit_with_converted_weights():
    model, params = noisy_flax_params()
    x, t, level, label = inputs()
    want = np.asarray(model.apply(params, x, t, level, label))
    got = torch_output(params, x, t, level, label)
    assert got.shape == want.shape == (5, 8, 8, 4)
    assert np.max(np.abs(want)) > 0.1  # a real output, not the zero-initialised one
    assert relative_error(got, want) < 1e-5


def test_parity_check_sees_a_wrong_attention_scale():
    model, params = noisy_flax_params()
    x, t, level, label = inputs()
    want = np.asarray(model.apply(params, x, t, level, label))
    got = torch_output(params, x, t, level, label, attention_scale="sqrt_head_dim")
    assert relative_error(got, want) > 1e-3


def test_converter_names_every_parameter_of_the_torch_module_once():
    _, params = noisy_flax_params()
    state = torch_dit.flax_to_state_dict(params)
    model = torch_dit.DiT(input_size=8, in_channels=4, **TINY)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_flax = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert sum(p.numel() for p in model.parameters()) == n_flax
    with pytest.raises(ValueError, match="scan_blocks"):
        torch_dit.flax_to_state_dict({"params": {"blocks": {}}})


@pytest.mark.parametrize("objective", ["flow_matching", "shortcut"])
def test_train_steps_run_on_cpu_with_finite_losses(objective):
    cfg = torch_dit.StepConfig(objective, num_classes=3, sc_fraction=0.5)
    out = torch_dit.time_train_step(
        dict(patch_size=2, width=32, depth=1, num_heads=2),
        cfg,
        batch=16,
        shape=(8, 8, 4),
        warmup=1,
        steps=2,
        compile=False,
        device="cpu",
    )
    assert len(out["losses"]) == 3 and all(math.isfinite(v) and v > 0 for v in out["losses"])
    assert out["step_ms"] > 0 and out["images_per_s"] == pytest.approx(16 / out["step_ms"] * 1e3)
    assert out["peak_gib"] is None and out["amp"] == "float32"


def test_shortcut_rows_follow_the_official_level_assignment():
    assert list(torch_dit.official_levels(32, 7)) == [0] * 8 + [k for k in range(1, 7) for _ in range(4)]
    from shortcut_jax.objectives.shortcut import assign_levels

    np.testing.assert_array_equal(
        torch_dit.official_levels(32, 7), np.asarray(assign_levels(jax.random.PRNGKey(0), 32, 7, "official"))
    )


def test_torch_tiny_row_of_the_train_step_benchmark_runs_on_cpu(tmp_path, capsys):
    from benchmarks import flops
    from benchmarks import train_step as bench

    row = bench.ROWS["torch-tiny-flow"]
    assert row.framework == "torch" and not row.torch_compile and row.dims == (32, 1, 2)
    out = tmp_path / "results.json"
    code = bench.main(
        ["--rows=torch-tiny-flow", "--in_process", "--sections=train", "--steps=2", "--warmup=1", f"--out={out}"]
    )
    assert code == 0
    report = json.loads(out.read_text())
    (result,) = report["rows"]
    assert result["status"] == "ok" and result["framework"] == "torch" and result["batch"] == 16
    assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in result["losses"])
    assert result["step_ms"] > 0 and result["images_per_s"] == pytest.approx(16 / result["step_ms"] * 1e3)
    dims = dict(width=32, depth=1, heads=2, mlp_ratio=4.0, tokens=16, in_channels=4, patch=2)
    assert result["tflop_per_step"] * 1e12 == pytest.approx(flops.train_step_flops("flow_matching", 16, **dims))
    assert report["environment"] is None  # the JAX backend was not started for a torch row
    assert report["torch_environment"]["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert "torch-tiny-flow" in printed and "torch rows: torch" in printed


def test_teacher_targets_are_the_shortcut_objectives():
    from shortcut_jax.objectives import common, shortcut

    model, params = noisy_flax_params()
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    step = torch_dit.TrainStep(
        dict(kwargs, input_size=8, in_channels=4),
        torch_dit.StepConfig("shortcut", num_classes=3, clip=1.0),
        "cpu",
        amp=False,
        compile=False,
    )
    step.ema.load_state_dict(torch_dit.flax_to_state_dict(params), strict=True)
    x, _, _, label = inputs(batch=7)
    level = torch_dit.official_levels(7, 7).astype(np.int32)
    t = (np.arange(7) % 2**level / 2**level).astype(np.float32)
    cfg = common.ObjectiveConfig(apply_fn=model.apply, num_classes=3, clip=1.0)
    want = shortcut.self_consistency_targets(model.apply, params, x, t, level, label, cfg)
    with torch.no_grad():
        got = step.teacher(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t),
            torch.from_numpy(level).long(),
            torch.from_numpy(label).long(),
        )
    got = got.permute(0, 2, 3, 1).numpy()
    assert np.max(np.abs(np.asarray(want))) == pytest.approx(1.0)  # the clip is reached
    assert relative_error(got, np.asarray(want)) < 1e-5
