"""Analytic FLOP counts against XLA's own, and the train-step benchmark on a tiny model (CPU)."""

import gzip
import json
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from shortcut_jax import config_lib
from shortcut_jax.training import experiment
from benchmarks import flops
from benchmarks import lever_sweep, trace_summary
from benchmarks import train_step as bench
from shortcut_jax.models import DiT
from shortcut_jax.objectives import METHODS, make_objective_config

# Tiny DiT whose matmuls still dominate its elementwise work, so XLA's count (which includes
# the elementwise ops) is within a few percent of the matmul-only count.
TINY = dict(width=128, depth=2, heads=4, mlp_ratio=4.0, image=16, channels=4, patch=2, batch=4)


def xla_flops(fn, *args) -> float:
    return experiment.compiled_stats(jax.jit(fn).lower(*args).compile())["compiler_flops"]


def tiny_dit():
    model = DiT(
        patch_size=TINY["patch"],
        width=TINY["width"],
        depth=TINY["depth"],
        num_heads=TINY["heads"],
        mlp_ratio=TINY["mlp_ratio"],
        num_classes=10,
    )
    b, s = TINY["batch"], TINY["image"]
    x = jnp.zeros((b, s, s, TINY["channels"]))
    t, level, label = jnp.zeros((b,)), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)
    params = model.init(jax.random.key(0), x, t, level, label)
    return model, params, (x, t, level, label)


def tiny_forward_flops() -> float:
    return flops.dit_forward_flops(
        TINY["width"],
        TINY["depth"],
        TINY["heads"],
        TINY["mlp_ratio"],
        (TINY["image"] // TINY["patch"]) ** 2,
        TINY["channels"],
        TINY["patch"],
        TINY["batch"],
    )


def test_dense_layer_count_is_exactly_xlas():
    x = jnp.ones((24, 40))
    dense = nn.Dense(56, use_bias=False)
    params = dense.init(jax.random.key(0), x)
    assert xla_flops(dense.apply, params, x) == flops.dense_flops(24, 40, 56)
    with_bias = nn.Dense(56)
    params = with_bias.init(jax.random.key(0), x)
    assert xla_flops(with_bias.apply, params, x) == flops.dense_flops(24, 40, 56) + 24 * 56  # + the bias adds


def test_dit_forward_count_is_within_ten_percent_of_xlas():
    model, params, inputs = tiny_dit()
    analytic = tiny_forward_flops()
    compiler = xla_flops(model.apply, params, *inputs)
    # XLA adds LayerNorm, softmax, GELU and the other elementwise work to the same matmuls.
    assert analytic <= compiler <= 1.1 * analytic


def test_backward_pass_costs_two_forwards():
    model, params, (x, t, level, label) = tiny_dit()

    def loss(p, x):
        return jnp.mean(jnp.square(model.apply(p, x, t, level, label)))

    compiler = xla_flops(jax.value_and_grad(loss), params, x)
    assert 3 * tiny_forward_flops() <= compiler <= 1.1 * 3 * tiny_forward_flops()


def test_traced_count_of_the_forward_equals_the_formula():
    model, params, inputs = tiny_dit()
    assert flops.traced_matmul_flops(model.apply, params, *inputs) == tiny_forward_flops()


def test_traced_count_of_the_objectives_gradient_matches_the_step_formula():
    model, params, (x, t, level, label) = tiny_dit()
    dims = dict(
        width=TINY["width"],
        depth=TINY["depth"],
        heads=TINY["heads"],
        mlp_ratio=TINY["mlp_ratio"],
        tokens=(TINY["image"] // TINY["patch"]) ** 2,
        in_channels=TINY["channels"],
        patch=TINY["patch"],
    )
    batch = {"x": jnp.zeros((64, *x.shape[1:])), "label": jnp.zeros((64,), jnp.int32)}

    def apply_fn(p, *a):
        return model.apply(p, *a)

    for name in ("flow_matching", "shortcut"):
        objective = config_lib.default_config().objective
        objective.name = name
        cfg = make_objective_config(objective, apply_fn, num_classes=10)

        def loss(p, cfg=cfg, name=name):
            return METHODS[name].loss(p, p, batch, jax.random.key(0), cfg)[0]

        traced = flops.traced_matmul_flops(jax.grad(loss), params)
        analytic = flops.train_step_flops(name, 64, sc_fraction=objective.sc_fraction, **dims)
        # the gradient skips the input-side products of the first layers, nothing else
        assert 0.99 * analytic <= traced <= analytic


def test_attention_and_per_example_terms_scale_as_documented():
    base = dict(width=64, depth=1, heads=4, mlp_ratio=4.0, in_channels=4, patch=2)
    one, two = (flops.dit_forward_flops(tokens=tk, batch=1, **base) for tk in (16, 32))
    # doubling the tokens doubles every per-token matmul and quadruples the two attention products
    per_example = 2 * (2 * 256 * 64 + 2 * 64 * 64) + 2 * 64 * 6 * 64 + 2 * 64 * 2 * 64
    attention = 4.0 * 16 * 16 * 64
    per_token = one - per_example - attention
    assert two == pytest.approx(per_example + 2 * per_token + 4 * attention)
    # the head count does not change the total
    assert flops.dit_forward_flops(tokens=16, batch=1, **{**base, "heads": 1}) == one


def test_train_step_count_adds_teacher_passes_on_self_consistency_rows_only():
    dims = dict(width=64, depth=2, heads=4, mlp_ratio=4.0, tokens=64, in_channels=4, patch=2)

    def fwd(n):
        return flops.dit_forward_flops(batch=n, **dims)

    assert flops.train_step_flops("flow_matching", 256, **dims) == 3 * fwd(256)
    assert flops.train_step_flops("shortcut", 256, sc_fraction=0.125, **dims) == 3 * fwd(256) + 2 * fwd(32)
    assert flops.train_step_flops("shortcut", 256, sc_fraction=0.25, **dims) == 3 * fwd(256) + 2 * fwd(64)
    assert flops.train_step_flops("shortcut", 256, sc_fraction=0.125, bootstrap_cfg=True, **dims) == 3 * fwd(
        256
    ) + 2 * fwd(32) + 2 * fwd(32 // 7)


def test_tiny_row_times_a_working_train_step_and_sampler_on_cpu(tmp_path, capsys):
    row = bench.ROWS["tiny-shortcut"]
    assert row.dims[:2] == (32, 1) and row.batches == (16,)
    out = tmp_path / "results.json"
    code = bench.main(
        [
            "--rows=tiny-shortcut",
            "--in_process",
            "--sections=train,sampling",
            "--steps=2",
            "--warmup=1",
            "--sampling_row=tiny-shortcut",
            "--sampling_batch=8",
            "--sampling_budgets=1,2",
            f"--out={out}",
            f"--profile_dir={tmp_path / 'prof'}",
            "--profile_steps=2",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    (result,) = report["rows"]
    assert result["status"] == "ok" and result["batch"] == 16
    assert math.isfinite(result["final_loss"])
    assert result["step_ms"] > 0 and result["images_per_s"] == pytest.approx(16 / result["step_ms"] * 1e3)
    assert result["compile_s"] > 0 and result["peak_gib"] > 0 and result["peak_source"] == "compiler"
    dims = dict(width=32, depth=1, heads=2, mlp_ratio=4.0, tokens=16, in_channels=4, patch=2)
    assert result["tflop_per_step"] * 1e12 == pytest.approx(
        flops.train_step_flops("shortcut", 16, sc_fraction=0.5, **dims)
    )
    # on CPU XLA counts the matmuls too, and adds elementwise work and the optimiser
    assert result["xla_tflop_per_step"] >= result["tflop_per_step"]
    # the traced step skips only the input gradients of the first layers (patch and t embedding)
    assert 0.97 * result["tflop_per_step"] <= result["traced_tflop_per_step"] <= result["tflop_per_step"]
    assert result["mfu_measured"] is None  # no matmul probe in this run (sections: train, sampling)
    assert [s["steps"] for s in report["sampling"]] == [1, 2]
    assert all(s["images_per_s"] > 0 for s in report["sampling"])
    printed = capsys.readouterr().out
    assert "989 TFLOP/s" in printed and "tiny-shortcut" in printed and "sampling" in printed
    # two more steps traced after the timing, summarised from the trace the profiler wrote
    profile = result["profile"]
    assert profile["steps"] == 2 and profile["trace"].startswith(str(tmp_path / "prof" / "tiny-shortcut-b16"))
    assert profile["lanes"] and all(lane["busy_ms"] > 0 for lane in profile["lanes"])
    assert "profile of tiny-shortcut batch 16 (2 traced steps)" in printed
    # the compiled step's HLO beside the trace: its op names attribute XLA's kernels to model scopes
    hlo = tmp_path / "prof" / "tiny-shortcut-b16" / trace_summary.HLO_FILE
    assert profile["hlo"] == str(hlo)
    scopes = {trace_summary.scope(op) for op in trace_summary.hlo_op_names(hlo.read_text()).values()}
    assert {"fwd DiT/block_*/mlp", "bwd DiT/block_*/mlp", "fwd DiT/final", "bwd DiT/final"} <= scopes
    assert all("scopes" in lane for lane in profile["lanes"])


def test_out_of_memory_row_prints_oom_and_tries_the_next_batch(capsys):
    calls = []

    def fake_part(opts, section, row=None, batch=0):
        calls.append((section, batch))
        if section == "matmul":
            return {"environment": {"device_kind": "fake"}, "matmul": {"size": 8, "ms": 1.0, "tflops": 500.0}}
        base = {"name": row.name, "objective": row.objective, "model": "m", "input": "i", "batch": batch}
        if batch == 512:
            return {"rows": [{**base, "status": "OOM", "peak_gib": 181.0, "peak_source": "compiler"}]}
        return {
            "rows": [
                {
                    **base,
                    "status": "ok",
                    "images_per_s": 1.0,
                    "step_ms": 1.0,
                    "compile_s": 1.0,
                    "init_s": 1.0,
                    "peak_gib": 1.0,
                    "peak_source": "allocator",
                    "tflop_per_step": 0.25,
                    "traced_tflop_per_step": 0.25,
                    "xla_tflop_per_step": 0.3,
                    "tflops": 250.0,
                }
            ]
        }

    opts = bench.parse_args(["--rows=XL2-shortcut-max", "--sections=matmul,train", "--quiet"])
    report = bench.benchmark(opts, fake_part)
    assert calls == [("matmul", 0), ("train", 512), ("train", 384)]
    assert [r["status"] for r in report["rows"]] == ["OOM", "ok"]
    assert report["rows"][1]["mfu_measured"] == 0.5
    assert report["rows"][1]["mfu_datasheet"] == pytest.approx(250 / 989)
    bench.print_report(report)
    printed = capsys.readouterr().out
    assert "OOM" in printed and "181.00*" in printed


def test_matmul_probe_reports_the_median_timing_and_the_slowest_and_fastest(monkeypatch):
    # A clock that makes the three timed repeats (2 calls each) last 8, 2 and 3 ms: the median call
    # takes 1.5 ms (the mean would be 2.2), the slowest 4 ms, the fastest 1 ms.
    repeats_s = (0.008, 0.002, 0.003)
    readings = [0.0, 0.0]  # the warm-up loop's start and its first check (warm_s=0 ends it)
    for i, seconds in enumerate(repeats_s):
        readings += [10.0 * (i + 1), 10.0 * (i + 1) + seconds]
    clock = iter(readings)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    mm = bench.measure_matmul(64, repeats=3, calls=2, warm_s=0.0)
    assert next(clock, None) is None  # every reading was taken: one start and one stop per repeat
    rate = lambda seconds: 2 * 64**3 / seconds / 1e12  # noqa: E731
    assert mm["timings"] == 3 and mm["size"] == 64
    assert mm["ms"] == pytest.approx(1.5)
    assert mm["tflops"] == pytest.approx(rate(0.0015))
    assert mm["tflops_min"] == pytest.approx(rate(0.004)) and mm["tflops_max"] == pytest.approx(rate(0.001))


def test_misspelt_model_flags_stop_the_benchmark_before_any_row(capsys):
    for bad in ("--lean_ops=qkv", "--remat=dotz", "--residual_dtype=bf16", "--remat_blocks=-2", "--donate=no"):
        with pytest.raises(SystemExit):
            bench.parse_args([bad])
        assert bad.split("=")[0] in capsys.readouterr().err


def test_oom_is_recognised_from_the_runtime_message():
    assert bench.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.5GiB"))
    assert not bench.is_oom(ValueError("shapes do not match"))


def test_budget_study_tables_the_last_eval_and_keeps_one_sample_count_per_curve(tmp_path, monkeypatch, capsys):
    import os
    import sys

    from benchmarks import budget_study

    runs = {}
    for name, scale in (("a", 1.0), ("b", 2.0)):
        workdir = tmp_path / name
        workdir.mkdir()
        rows = [
            {"step": 500, "loss": 1.0, "sc_loss/level_0": 0.3, "sc_loss/level_1": 0.2},
            {"step": 1000, "loss": 0.9, "sc_loss/level_0": 0.25, "sc_loss/level_1": 0.1},
        ]
        for step, samples in ((1000, 1000), (2000, 1000), (3000, 5000)):
            rows.append(
                {
                    "step": step,
                    "eval/num_samples": samples,
                    **{f"eval/cfd_{n}step": scale * (10 + n) / step for n in (1, 4, 128)},
                }
            )
        rows.append({"step": 3000, "eval/cfd_1step": scale * 0.5, "eval/num_samples": 5000})  # a resumed rerun wins
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs[name] = str(workdir)
        for step, budgets in ((2000, (1, 4)), (3000, (1, 4) if name == "a" else (1, 4, 128))):
            folder = workdir / "eval" / f"{step:08d}"
            folder.mkdir(parents=True)
            for n in budgets:  # a 10x12 grid whose red channel says run, green says budget
                Image.fromarray(np.full((10, 12, 3), (int(scale * 50), n, 0), np.uint8)).save(
                    folder / f"samples_{n}step.png"
                )

    samples = {}
    evals = budget_study.read_evals(runs["a"], "cfd", samples)
    assert sorted(evals) == [1000, 2000, 3000] and evals[3000][1] == 0.5
    assert samples == {1000: 1000, 2000: 1000, 3000: 5000}
    assert budget_study.curve_steps(evals, samples) == [1000, 2000]
    assert budget_study.read_level_losses(runs["a"]) == {
        "level 0 (1 step)": {500: 0.3, 1000: 0.25},
        "level 1 (2 steps)": {500: 0.2, 1000: 0.1},
    }

    out = tmp_path / "study"
    monkeypatch.setattr(
        sys,
        "argv",
        ["budget_study", "--runs", f"a={runs['a']}", f"b={runs['b']}", "--metric", "cfd", "--out", str(out)],
    )
    budget_study.main()
    printed = capsys.readouterr().out
    assert "| a | 3000 | 5000 | 0.50 |" in printed and "| b | 3000 | 5000 | 1.00 |" in printed
    saved = json.load(open(out / "cfd_runs.json"))
    assert saved["b"]["1000"]["samples"] == 1000 and saved["b"]["1000"]["4"] == pytest.approx(2 * 14 / 1000)
    assert {
        "cfd_by_budget.png",
        "cfd_1step_vs_training.png",
        "cfd_128step_vs_training.png",
        "sc_loss_by_level_a.png",
    } <= set(os.listdir(out))
    # Grids side by side at the last step both runs saved, in the budgets both saved (1 and 4).
    grid = np.asarray(Image.open(out / "samples_step3000.png").convert("RGB"))
    assert grid.shape == (24 + 2 * (10 + 4), 96 + 2 * (12 + 4), 3)
    for i, red in enumerate((50, 100)):
        for j, green in enumerate((1, 4)):
            top, left = 24 + i * 14, 96 + j * 16
            assert (grid[top : top + 10, left : left + 12] == (red, green, 0)).all()
    assert budget_study.compose_grids(runs, 1000, str(tmp_path / "none.png")) is None


def test_trace_summary_splits_device_time_by_lane_category_and_name(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "python"}},
    ]
    kernels = [
        ("sm90_xmma_gemm_bf16", 0, 40),
        ("loop_add_fusion", 40, 10),
        ("cudnn_flash_fprop", 50, 30),
        ("sm90_xmma_gemm_bf16", 100, 40),
        ("input_reduce_fusion", 140, 10),
        ("memcpy HtoD", 150, 5),
    ]
    events = meta + [{"ph": "X", "pid": 2, "tid": 7, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    # a host event, and two nested host events: the host lane is left out once device lanes exist
    events += [
        {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction(step)", "ts": 0, "dur": 200},
        {"ph": "X", "pid": 1, "tid": 3, "name": "inner", "ts": 10, "dur": 50},
    ]
    path = tmp_path / "plugins" / "profile" / "t0" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = trace_summary.summarize_path(str(tmp_path))
    assert summary["trace"] == str(path) and summary["device_lanes"]
    (lane,) = summary["lanes"]
    assert lane["thread"] == "Stream #7(Compute)" and lane["events"] == 6
    assert lane["busy_ms"] == pytest.approx(0.135) and lane["span_ms"] == pytest.approx(0.155)
    shares = {k: v["share"] for k, v in lane["categories"].items()}
    assert shares == pytest.approx({"matmul": 80 / 135, "attention": 30 / 135, "fusion": 20 / 135, "copy": 5 / 135})
    assert lane["top"][0] == {"name": "sm90_xmma_gemm_bf16", "count": 2, "ms": 0.08, "share": 80 / 135}
    # without device lanes (a CPU trace) the host lanes are summarised; nested events count once as busy
    host = trace_summary.summarize([e for e in events if e.get("pid") == 1])
    assert not host["device_lanes"]
    assert host["lanes"][0]["busy_ms"] == pytest.approx(0.2) and host["lanes"][0]["summed_ms"] == pytest.approx(0.25)
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        trace_summary.find_trace(str(tmp_path / "plugins" / "profile" / "missing"))


def _write_device_trace(tmp_path, kernels, hlo: str):
    """One GPU stream of (name, start, duration) kernels as a profiler would leave it, the HLO beside."""
    meta = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    events = meta + [{"ph": "X", "pid": 2, "tid": 1, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    trace = tmp_path / "plugins" / "profile" / "t0" / "perfetto_trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    (tmp_path / trace_summary.HLO_FILE).write_text(hlo)


def test_trace_summary_attributes_kernels_to_model_scopes_through_the_hlo(tmp_path, capsys):
    hlo = "\n".join(
        [
            "HloModule jit_train_step",
            "%fused_computation.3 (param_0: f32[4]) -> f32[4] {",
            '  %multiply.9 = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(train_step)/jvp(DiT)/x/mul"}',
            "}",
            "ENTRY %main {",
            "  %fusion.12 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.3, metadata={op_name="
            '"jit(train_step)/transpose(jvp(DiT))/block_3/mlp/mul" stack_frame_id=4}',
            '  %loop_add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(DiT)/block_0/add"}',
            "  ROOT %input_reduce_fusion.7 = f32[4]{0} fusion(%p), kind=kInput, metadata={op_name="
            '"jit(train_step)/transpose(jvp(DiT))/block_10/mlp/fc1/reduce_sum"}',
            '  %custom-call.5 = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm"',
            "}",
        ]
    )
    ops = trace_summary.hlo_op_names(hlo)
    assert ops["fusion_12"].endswith("block_3/mlp/mul") and "custom_call_5" not in ops
    assert trace_summary.scope(ops["fusion_12"]) == "bwd DiT/block_*/mlp"
    assert (
        trace_summary.scope("jit(step)/jvp(DiT)/label_embed/jit(_take)/broadcast_in_dim") == "fwd DiT/label_embed/_take"
    )
    assert trace_summary.scope("jit(loss)") == "(top level)"
    assert trace_summary.scope("jit(train_step)/DiT/block_2/mlp/fc1/dot_general") == "DiT/block_*/mlp/fc1"
    kernels = [
        ("fusion_12", 0, 10),
        ("loop_add_fusion_2", 10, 5),
        ("input_reduce_fusion_7", 15, 3),
        ("nvjet_sm90_tst_128x160", 18, 20),
        ("input_reduce_fusion_99", 38, 2),
        ("fusion_12", 40, 10),
    ]
    _write_device_trace(tmp_path, kernels, hlo)
    summary = trace_summary.summarize_path(str(tmp_path))
    assert summary["hlo"] == str(tmp_path / trace_summary.HLO_FILE)
    ms = {k: v["ms"] for k, v in summary["lanes"][0]["scopes"].items()}
    assert ms == pytest.approx(
        {
            "bwd DiT/block_*/mlp": 0.02,
            "(matmul, no scope)": 0.02,
            "fwd DiT/block_*": 0.005,
            "bwd DiT/block_*/mlp/fc1": 0.003,
            "(fusion, no scope)": 0.002,
        }
    )
    trace_summary.main([str(tmp_path), "--steps=2"])
    assert "0.010 ms/step  40.0%  bwd DiT/block_*/mlp" in capsys.readouterr().out
    # without the HLO file the scopes are left out
    (tmp_path / trace_summary.HLO_FILE).unlink()
    assert "scopes" not in trace_summary.summarize_path(str(tmp_path))["lanes"][0]


def test_trace_summary_categories_of_kernel_names_from_an_h100_trace():
    # names as a jax 0.11.2 profile of the DiT-B/2 step on one H100 recorded them
    seen = {
        "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": "matmul",
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_splitK_NTN": "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "matmul",
        "gemm_fusion_dot_67": "matmul",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": "attention",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)": "attention",
        "input_add_reduce_fusion_124": "fusion",
        "loop_convert_multiply_fusion_11": "fusion",
        "fusion_1653": "fusion",
        "wrapped_convert_17": "fusion",
        "memcpy128": "copy",
        "Memset 3": "copy",
    }
    assert {name: trace_summary.category(name) for name in seen} == seen


def test_lever_sweep_compares_variants_with_the_baseline_and_keeps_a_failed_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    out = tmp_path / "sweep.json"
    code = lever_sweep.main(
        [
            "--rows=tiny-shortcut",
            "--common=--steps=2 --warmup=1",
            f"--out={out}",
            "--variants",
            "base||",
            "host||--init_on=host",
            "bad|--xla_no_such_flag_here=1|",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    table = {x["variant"]: x for x in result["table"]}
    assert table["base"]["status"] == table["host"]["status"] == "ok"
    assert table["host"]["vs_base"] == pytest.approx(table["host"]["images_per_s"] / table["base"]["images_per_s"] - 1)
    # the two initialisations give one state, so the same steps give the same loss
    assert table["host"]["final_loss"] == pytest.approx(table["base"]["final_loss"], rel=1e-6)
    assert table["bad"]["status"] != "ok" and "xla_no_such_flag_here" in result["runs"]["bad"][0]["errors"][0]
    printed = capsys.readouterr().out
    assert "vs base" in printed and "failed" in printed
    with pytest.raises(ValueError, match="NAME\\|XLA_FLAGS"):
        lever_sweep.parse_variant("only-a-name")


def test_fused_gelu_grad_kernel_equals_the_gemm_times_geluderivative():
    from benchmarks import fused_mlp_kernel as fk
    from shortcut_jax.models import layers

    # the derivative is the backward pass of the model's GELU
    x = jnp.linspace(-6.0, 6.0, 97, dtype=jnp.float32)
    np.testing.assert_allclose(
        layers.gelu_tanh_slope(x), jax.grad(lambda v: jnp.sum(layers.gelu_tanh(v)))(x), rtol=1e-6
    )
    rng = np.random.default_rng(0)
    rows, width, hidden = 64, 32, 96  # a 2 x 3 grid of 32 x 32 tiles (96 tiles only by 32)
    dy, w, h = (
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((rows, width), (hidden, width), (rows, hidden))
    )
    tiles = fk.TileConfig(32, 128, 16)
    assert fk.fits(rows, width, hidden, tiles) and not fk.fits(rows, 24, hidden, tiles)
    want = (dy @ w.T) * layers.gelu_tanh_slope(h)
    np.testing.assert_allclose(fk.gelu_grad_matmul(dy, w, h, tiles), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fk.gelu_grad_matmul(dy, w, h, tiles, derivative=False), dy @ w.T, rtol=1e-5, atol=1e-5)
    got = fk.gelu_grad_matmul(dy.astype(jnp.bfloat16), w.astype(jnp.bfloat16), h.astype(jnp.bfloat16), tiles)
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.02 * float(jnp.max(jnp.abs(want)))
    with pytest.raises(ValueError, match="do not chain"):
        fk.gelu_grad_matmul(dy, w.T, h, tiles)


def test_fused_kernel_benchmark_runs_and_rejects_malformed_flags(tmp_path, capsys):
    from benchmarks import fused_mlp_kernel as fk

    out = tmp_path / "k.json"
    rows = fk.main(
        [
            "--shapes=32x16x64",
            "--tiles=16,32,16,4,3;16,32,16,4,3,0",
            "--iters=1",
            "--dtype=float32",
            "--gemm_alone",
            f"--out={out}",
        ]
    )
    names = [r["name"] for r in rows]
    assert names == [
        "xla gemm",
        "xla gemm+gelu'",
        "fused 16,32,16,4,3,1",
        "pallas gemm 16,32,16,4,3,1",
        "fused 16,32,16,4,3,0",
        "pallas gemm 16,32,16,4,3,0",
    ]
    assert all(r["rel_err"] < 1e-5 for r in rows if "rel_err" in r) and "rel_err" not in rows[0]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| 32x16x64 | fused 16,32,16,4,3,1 |" in capsys.readouterr().out
    for bad in ("--tiles=24,32,16,4,3", "--tiles=16,32,16", "--tiles=16,32,16,4,3,2", "--shapes=32x16"):
        with pytest.raises(SystemExit):
            fk.main([bad])
        assert "--" in capsys.readouterr().err


def test_trace_summary_memory_rate_of_xla_kernels_from_the_hlo_shapes(tmp_path, capsys):
    hlo = "\n".join(
        [
            "HloModule jit_train_step",
            "%fused_computation.1 (param_0.5: bf16[64,32]) -> bf16[64,32] {",
            "  %param_0.5 = bf16[64,32]{1,0} parameter(0)",
            "  ROOT %negate.1 = bf16[64,32]{1,0} negate(%param_0.5)",
            "}",
            "ENTRY %main (p0: bf16[64,32], p1: f32[32]) -> (bf16[64,32], f32[64]) {",
            "  %p0 = bf16[64,32]{1,0} parameter(0)",
            "  %p1 = f32[32]{0} parameter(1)",
            "  %gte = f32[4,2]{1,0} get-tuple-element(%t), index=0",
            # a tuple output and an operand named twice: 4096 out + 256 + 4096 in, each once
            "  %input_reduce_fusion.3 = (f32[64]{0}, bf16[64,32]{1,0}) fusion(%p0, %p1, %p0), kind=kInput,"
            ' calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(DiT)/norm/reduce_sum"}',
            "  %copy.2 = bf16[64,32]{0,1} copy(%p0)",
            "  %fusion.4 = f32[64]{0} fusion(%undefined), kind=kLoop, calls=%fused_computation.1",
            '  %custom-call.5 = bf16[64,64]{1,0} custom-call(%p0, %p0), custom_call_target="__cublas$gemm"',
            "  ROOT %tuple.6 = (bf16[64,32]{1,0}, f32[64]{0}) tuple(%copy.2, %fusion.4)",
            "}",
        ]
    )
    assert trace_summary.shape_bytes("(bf16[256,3072]{1,0}, f32[256]{0})") == 256 * 3072 * 2 + 256 * 4
    assert trace_summary.shape_bytes("f32[]") == 4 and trace_summary.shape_bytes("token[]") is None
    sizes = trace_summary.hlo_kernel_bytes(hlo)
    # the fusion with an operand the text does not define and the library call are left out
    assert sizes == {"input_reduce_fusion_3": 64 * 4 + 64 * 32 * 2 + 64 * 32 * 2 + 32 * 4, "copy_2": 2 * 64 * 32 * 2}
    kernels = [
        ("input_reduce_fusion_3", 0, 0.004),
        ("input_reduce_fusion_3", 1, 0.004),
        ("copy_2", 2, 0.008),
        ("fusion_4", 3, 1.0),
        ("nvjet_sm90_tst_128x160", 5, 2.0),
    ]
    _write_device_trace(tmp_path, kernels, hlo)
    lane = trace_summary.summarize_path(str(tmp_path))["lanes"][0]
    top = {t["name"]: t for t in lane["top"]}
    fusion_bytes = sizes["input_reduce_fusion_3"]
    assert top["input_reduce_fusion_3"]["tb_per_s"] == pytest.approx(2 * fusion_bytes / 0.008 / 1e6)
    assert top["copy_2"]["gb"] == pytest.approx(8192 / 1e9) and "tb_per_s" not in top["fusion_4"]
    assert lane["xla_kernels"]["kernels"] == 2 and lane["xla_kernels"]["ms"] == pytest.approx(0.016 / 1e3)
    assert lane["xla_kernels"]["tb_per_s"] == pytest.approx((2 * fusion_bytes + 8192) / 0.016 / 1e6)
    trace_summary.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "XLA's kernels with sizes in the HLO (2)" in printed and "input_reduce_fusion_3  " in printed


def test_residuals_lists_what_the_step_stores_per_block_and_what_each_lever_removes(capsys):
    from benchmarks import residuals

    def stored(*flags):
        (report,) = residuals.main(["--rows=tiny-shortcut", *flags])
        (scan,) = report["scans"]
        assert scan["layers"] == report["depth"] == 1 and report["dtype"] == "bfloat16"
        return report, scan

    base, scan = stored()
    assert tuple(base["lean_ops"]) == config_lib.DEFAULT_LEAN_OPS
    assert "stored over all 1 blocks" in capsys.readouterr().out
    batch, tokens, width = 16, (8 // 2) ** 2, 32  # the row: 8x8x4 latents, patch 2, width 32
    token_f32 = [
        line["count"]
        for line in scan["lines"]
        if line["shape"] == [batch, tokens, width] and line["dtype"] == "float32"
    ]
    assert token_f32 == [4]  # block input, attention update, input to the MLP half, MLP update
    mib = batch * tokens * width * 2 / 2**20  # what one token-sized tensor saves going f32 -> bf16
    # 'gate' keeps the two updates' branches in bf16; the bf16 stream, the block's two inputs
    for flags in (("--lean_ops=all",), ("--residual_dtype=compute",)):
        _, lean = stored(*flags)
        assert lean["values_per_block"] == scan["values_per_block"]
        np.testing.assert_allclose(scan["mib_per_block"] - lean["mib_per_block"], 2 * mib, rtol=1e-9)
    _, both = stored("--lean_ops=all", "--residual_dtype=compute")
    assert not [
        line for line in both["lines"] if line["shape"] == [batch, tokens, width] and line["dtype"] == "float32"
    ]
    # rematerialising the whole block stores only its input
    _, full = stored("--remat=full")
    assert full["values_per_block"] < scan["values_per_block"] and full["mib_per_block"] < scan["mib_per_block"] / 4


def test_methods_toy2d_objective_flag_reaches_every_methods_config_and_refuses_unknown_keys(capsys):
    from benchmarks import methods_toy2d

    args, methods = methods_toy2d.parse_args(
        ["--methods=shortcut,meanflow", "--objective=meanflow_t_mean=-2", "--objective=sc_fraction=0.25"]
    )
    overrides = dict(args.objective)
    assert overrides == {"meanflow_t_mean": -2.0, "sc_fraction": 0.25}
    assert type(overrides["meanflow_t_mean"]) is float
    for name in methods:
        cfg = methods_toy2d.objective_config(name, lambda *a: None, 100, overrides)
        # the flag wins over the toy's own shortcut setting (sc_fraction 0.5) too
        assert (cfg.option("meanflow_t_mean"), cfg.option("sc_fraction")) == (-2.0, 0.25), name
    plain = methods_toy2d.objective_config("shortcut", lambda *a: None, 100, {})
    assert plain.option("sc_fraction") == 0.5
    with pytest.raises(SystemExit):
        methods_toy2d.parse_args(["--objective=meanflow_t_meen=-2"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_train_step_model_flags_reach_the_rows_model_and_its_child_process():
    opts = bench.parse_args(["--qkv_gemms=3", "--scan_blocks=on", "--residual_dtype=compute", "--dtype=bfloat16"])
    row = bench.ROWS["tiny-flow"]
    config = bench.row_config(row, row.batches[0], opts)
    model = bench.experiment_for(config, row, opts).model
    assert (model.qkv_gemms, model.scan_blocks, model.residual_dtype) == (3, True, jnp.bfloat16)
    assert {"qkv_gemms", "scan_blocks", "residual_dtype"} <= set(bench.FORWARDED)
    with pytest.raises(SystemExit):
        bench.parse_args(["--qkv_gemms=2"])
