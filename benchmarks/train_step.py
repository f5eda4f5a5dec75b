"""Speed of the real train step (and of the sampler) on synthetic data, with MFU figures.

    python -m benchmarks.train_step --rows=default --out=results.json
    python -m benchmarks.train_step --rows=B2-shortcut,B2-flow --steps=50 --remat=dots
    python -m benchmarks.train_step --rows=B2-flow,B2-shortcut,torch-B2-flow,torch-B2-shortcut --sections=train

The ``torch-*`` rows are the anchor: the same DiT and objectives as a PyTorch step
(``benchmarks.torch_dit``: bf16 autocast, fused AdamW, EMA, ``torch.compile`` unless ``-eager``),
timed in the same call on the same card and printed in the same table. torch is imported only
in those rows' processes, which leave JAX's backend unstarted.

What is timed is the program training runs: ``Experiment``'s ``init_state`` and
``compile_step`` (the same step function, donated state and shardings; ``--donate=off`` measures
the step without donation), fed one synthetic batch of 1000-class data placed with
``sharding.global_batch``. Reading data and copying it to the device are not part of the
figures. Each row reports, after ``--warmup`` untimed steps, the median of ``--steps`` step
times (each step waited for), images/s, the ahead-of-time compile time, the time ``init_state``
takes (compiling the initialisation included; ``--scan_blocks=on|off`` compares both with the
blocks scanned and unrolled), peak device memory, the analytic TFLOP of a step
(``benchmarks.flops``) beside two checks of it (the matmuls of the traced step, and XLA's count
of the compiled step), the achieved TFLOP/s and the MFU against two denominators: the dense bf16 matmul rate this script measures first (an 8192^3 ``jnp.dot``) and
the H100 SXM datasheet's 989 TFLOP/s.
A row that runs out of device memory prints OOM, with the compiler's footprint of the step;
a row with several batch sizes tries them in order and keeps the first that fits. The memory
limit is the allocator's: 75% of the GPU unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says
otherwise, as in training.

Each row costs about a minute and a half on an H100, mostly compiling (the step, then the
state's initialisation): select rows with ``--rows`` to stay inside a time limit.

The sampling section times ``Sampler`` (Euler, labels, no guidance) at a few step budgets on
device-resident noise, after one untimed call per budget.

Unless ``--in_process`` is given, the matmul probe, each row and the sampling section run in a
child process of their own: the allocator's ``peak_bytes_in_use`` only grows during a process's
life, and a row that ran out of memory must not leave the next one a fragmented heap.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, trace_summary
from shortcut_jax import config_lib
from shortcut_jax.infra import sharding
from shortcut_jax.data import DataSpec
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.models.fp8 import FORMS as FP8_FORMS

H100_SXM_BF16_TFLOPS = 989.0  # datasheet dense bf16 (without sparsity)
NUM_CLASSES = 1000
LATENTS = (32, 32, 4)  # 256x256 images through the SD VAE
PIXELS = (32, 32, 3)
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    objective: str  # 'shortcut', 'flow_matching', 'meanflow' or 'meanflow_v'
    variant: str  # DiT variant; '' takes ``dims``
    shape: tuple[int, int, int]
    batches: tuple[int, ...]  # tried in order until one fits in memory
    sc_fraction: float = 0.125
    dims: tuple[int, int, int] = (0, 0, 0)  # width, depth, heads when variant == ''
    # 'jax': the project's step; 'torch': the PyTorch port's (benchmarks.torch_dit), the anchor
    framework: str = "jax"
    torch_compile: bool = True  # torch rows: torch.compile the step's functions
    objective_options: tuple = ()  # (key, value) pairs of config.objective set on top of the defaults


ROWS = {
    row.name: row
    for row in (
        Row("S2-shortcut", "shortcut", "S", LATENTS, (256,)),
        Row("S2-flow", "flow_matching", "S", LATENTS, (256,)),
        Row("B2-shortcut", "shortcut", "B", LATENTS, (256,)),
        Row("B2-flow", "flow_matching", "B", LATENTS, (256,)),
        Row("B2-shortcut-sc0.25", "shortcut", "B", LATENTS, (256,), sc_fraction=0.25),
        # MeanFlow's jvp through the whole network (XLA attention and plain ops, as the method needs)
        Row("B2-meanflow", "meanflow", "B", LATENTS, (256,)),
        Row("B2-meanflow_v", "meanflow_v", "B", LATENTS, (256,)),
        # with the guidance imagenet.py folds into MeanFlow's target (omega 1, kappa 0.5)
        Row(
            "B2-meanflow-cfg",
            "meanflow",
            "B",
            LATENTS,
            (256,),
            objective_options=(("meanflow_cfg_omega", 1.0), ("meanflow_cfg_kappa", 0.5)),
        ),
        Row("XL2-shortcut", "shortcut", "XL", LATENTS, (256,)),
        Row("XL2-flow", "flow_matching", "XL", LATENTS, (256,)),
        Row("XL2-shortcut-max", "shortcut", "XL", LATENTS, (512, 384)),
        Row("S2-shortcut-pixels", "shortcut", "S", PIXELS, (256,)),
        # CPU-sized rows for smoke tests; not part of 'default'.
        Row("tiny-shortcut", "shortcut", "", (8, 8, 4), (16,), sc_fraction=0.5, dims=(32, 1, 2)),
        Row("tiny-flow", "flow_matching", "", (8, 8, 4), (16,), dims=(32, 1, 2)),
        Row("tiny-meanflow", "meanflow", "", (8, 8, 4), (16,), dims=(32, 1, 2)),
        # CPU-sized but as deep as DiT-S/B and DiT-XL: compile and initialisation time against
        # model.scan_blocks
        Row("small-d12-shortcut", "shortcut", "", (8, 8, 4), (16,), sc_fraction=0.5, dims=(64, 12, 2)),
        Row("small-d28-shortcut", "shortcut", "", (8, 8, 4), (16,), sc_fraction=0.5, dims=(64, 28, 2)),
        # The anchor: the same model and objectives as a PyTorch step (benchmarks.torch_dit), bf16
        # autocast, fused AdamW, torch.compile unless '-eager'; not part of 'default'.
        Row("torch-B2-flow", "flow_matching", "B", LATENTS, (256,), framework="torch"),
        Row("torch-B2-shortcut", "shortcut", "B", LATENTS, (256,), framework="torch"),
        Row("torch-B2-flow-eager", "flow_matching", "B", LATENTS, (256,), framework="torch", torch_compile=False),
        Row("torch-B2-shortcut-eager", "shortcut", "B", LATENTS, (256,), framework="torch", torch_compile=False),
        Row("torch-XL2-shortcut", "shortcut", "XL", LATENTS, (256,), framework="torch"),
        Row(
            "torch-tiny-flow",
            "flow_matching",
            "",
            (8, 8, 4),
            (16,),
            dims=(32, 1, 2),
            framework="torch",
            torch_compile=False,
        ),
        Row(
            "torch-tiny-shortcut",
            "shortcut",
            "",
            (8, 8, 4),
            (16,),
            sc_fraction=0.5,
            dims=(32, 1, 2),
            framework="torch",
            torch_compile=False,
        ),
    )
}
DEFAULT_ROWS = (
    "S2-shortcut",
    "S2-flow",
    "B2-shortcut",
    "B2-flow",
    "B2-shortcut-sc0.25",
    "XL2-shortcut",
    "XL2-flow",
    "XL2-shortcut-max",
    "S2-shortcut-pixels",
)
SECTIONS = ("matmul", "train", "sampling")


# ----------------------------------------------------------------------------- building a row


# flags that set the config key model.<flag> of every row
MODEL_FLAGS = (
    "dtype",
    "remat",
    "remat_blocks",
    "attention_impl",
    "residual_dtype",
    "lean_ops",
    "matmul_precision",
    "fp8_amax_history",
    "qkv_gemms",
    "scan_blocks",
)


def lean_ops(text: str) -> tuple:
    """--lean_ops 'default', 'all', 'none' or 'norm,gelu' -> model.lean_ops."""
    if text == "default":
        return config_lib.DEFAULT_LEAN_OPS
    if text == "all":
        return config_lib.LEAN_OPS
    return () if text in ("none", "") else tuple(p.strip() for p in text.split(","))


def row_config(row: Row, batch: int, opts: argparse.Namespace):
    c = config_lib.default_config()
    c.model.variant = row.variant
    c.model.width, c.model.depth, c.model.num_heads = row.dims
    # flags whose command-line form is not the config value: lean_ops 'default'/'all'/'none', scan_blocks 'on'/'off'
    special = {"lean_ops": lean_ops, "scan_blocks": lambda text: text == "on"}
    for key in MODEL_FLAGS:
        c.model[key] = special.get(key, lambda value: value)(getattr(opts, key))
    c.objective.name = row.objective
    c.objective.sc_fraction = opts.sc_fraction or row.sc_fraction
    for key, value in row.objective_options:
        c.objective[key] = value
    c.train.batch_size = batch
    c.train.init_on = opts.init_on
    return c


def experiment_for(config, row: Row, opts: argparse.Namespace) -> Experiment:
    """The row's ``Experiment`` on synthetic data; ``--fp8_form`` (how the FP8 dots are written, a
    measurement switch of the model rather than a config key) replaces the built model's, which
    the experiment's apply function reads when the step is traced."""
    exp = Experiment(config, None, spec=DataSpec(row.shape, NUM_CLASSES, "images"))
    if getattr(opts, "fp8_form", None) and config.model.matmul_precision == "fp8":
        exp.model = exp.model.clone(fp8_form=opts.fp8_form)
    return exp


def model_name(row: Row) -> str:
    width, depth, heads = row.dims
    return f"DiT-{row.variant}/2" if row.variant else f"DiT-w{width}d{depth}h{heads}/2"


def synthetic_batch(spec: DataSpec, batch: int, mesh, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    host = {
        "x": rng.standard_normal((batch, *spec.shape), dtype=np.float32),
        "label": rng.integers(0, spec.num_classes, batch, dtype=np.int32),
    }
    return sharding.global_batch(host, mesh)


def is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def compiler_memory_bytes(compiled) -> Optional[int]:
    """The compiler's footprint of one step; donated arguments count once (they alias outputs)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def peak_memory(compiled) -> tuple[Optional[float], str]:
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / GIB, "allocator"
    estimate = compiler_memory_bytes(compiled)
    return (None, "") if estimate is None else (estimate / GIB, "compiler")


def traced_step_flops(exp: Experiment) -> float:
    """Matmul FLOPs of the step as traced: a check of the analytic count that, unlike XLA's count
    of the compiled step, sees the matmuls that became cuBLAS calls on GPU (jax-ml/jax#22249)."""
    return flops.traced_matmul_flops(exp.train_step_fn(), exp.abstract_state, exp.abstract_batch())


def time_steps(compiled, state, batch, *, warmup: int, steps: int):
    metrics = None
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        # All outputs of one execution become ready together; one scalar is the cheapest wait.
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    return state, metrics, times


def profile_steps(compiled, state, batch, trace_dir: str, steps: int) -> dict:
    """Trace ``steps`` more steps into ``trace_dir``; the trace's summary (``trace_summary``)."""
    trace_summary.write_hlo(compiled, trace_dir)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        metrics["loss"].block_until_ready()
    summary = trace_summary.summarize_path(trace_dir, top=10)
    summary["lanes"] = summary["lanes"][:4]
    summary["steps"] = steps
    return summary


def run_row(row: Row, batch: int, opts: argparse.Namespace) -> dict:
    config = row_config(row, batch, opts)
    shortcut = row.objective == "shortcut"
    result = {
        "name": row.name,
        "objective": row.objective,
        "model": model_name(row),
        "input": "x".join(map(str, row.shape)),
        "batch": batch,
        "sc_fraction": config.objective.sc_fraction if shortcut else None,
        **{key: getattr(opts, key) for key in MODEL_FLAGS + ("donate",)},
    }
    exp = experiment_for(config, row, opts)
    result["fp8_form"] = getattr(exp.model, "fp8_form", None) if config.model.matmul_precision == "fp8" else None
    result["attention_kernel"] = getattr(exp.model, "attention_impl", None) or "xla-chosen"
    result["tflop_per_step"] = (
        flops.train_step_flops(
            row.objective,
            batch,
            sc_fraction=config.objective.sc_fraction,
            bootstrap_cfg=config.objective.bootstrap_cfg,
            num_levels=config.objective.num_levels,
            **flops.dit_dims(config.model, row.shape),
        )
        / 1e12
    )
    traced = traced_step_flops(exp)
    footprint = None

    def out_of_memory(message: str) -> dict:
        return {
            **result,
            "status": "OOM",
            "error": message[:300],
            "peak_gib": None if footprint is None else footprint / GIB,
            "peak_source": "compiler",
        }

    try:
        # Compiled before the state exists so that a step that cannot fit is known without
        # initialising a state it could never use.
        compiled, info = exp.compile_step(donate=opts.donate == "on")
        result["compile_s"] = info["compile_seconds"]
        footprint = compiler_memory_bytes(compiled)
        limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
        if footprint and limit and footprint > limit:
            return out_of_memory(
                f"the compiler's footprint of the step, {footprint / GIB:.1f} GiB, exceeds the"
                f" allocator's limit of {limit / GIB:.1f} GiB"
            )
        start = time.perf_counter()
        state = jax.block_until_ready(exp.init_state())
        init_s = time.perf_counter() - start
        state, metrics, times = time_steps(
            compiled, state, synthetic_batch(exp.spec, batch, exp.mesh), warmup=opts.warmup, steps=opts.steps
        )
        peak_gib, peak_source = peak_memory(compiled)
        loss = float(metrics["loss"])
        if opts.profile_dir:  # after the timing, so that tracing costs none of the timed steps
            result["profile"] = profile_steps(
                compiled,
                state,
                synthetic_batch(exp.spec, batch, exp.mesh),
                os.path.join(opts.profile_dir, f"{row.name}-b{batch}"),
                opts.profile_steps,
            )
    except Exception as err:  # noqa: BLE001 - only running out of memory is a result
        if not is_oom(err):
            raise
        return out_of_memory(str(err).splitlines()[0])
    step_s = statistics.median(times)
    xla_flops = info.get("compiler_flops")
    if xla_flops is not None:
        xla_flops *= exp.mesh.size  # the compiler counts one device's share of the partitioned step
    return {
        **result,
        "status": "ok",
        "images_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "init_s": init_s,
        "peak_gib": peak_gib,
        "peak_source": peak_source,
        "xla_tflop_per_step": None if xla_flops is None else xla_flops / 1e12,
        "traced_tflop_per_step": traced / 1e12,
        "tflops": result["tflop_per_step"] / step_s,
        "final_loss": loss,
        "compiler": info,
    }


def torch_environment() -> dict:
    """The PyTorch side of a torch row's process (the JAX backend is left uninitialised there)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_torch_row(row: Row, batch: int, opts: argparse.Namespace) -> dict:
    """A PyTorch anchor row (``benchmarks.torch_dit``): the same DiT and objective as the JAX row
    of that name without the ``torch-`` prefix, timed with CUDA events. Its ``compile_s`` is the
    first step's time (``torch.compile`` compiles then), its peak the largest
    ``torch.cuda.max_memory_allocated`` of the run; only ``--dtype``, ``--steps``, ``--warmup``
    and ``--sc_fraction`` apply to it."""
    import torch

    from benchmarks import torch_dit

    config = row_config(row, batch, opts)
    width, depth, heads = config_lib.model_dims(config.model)
    shortcut = row.objective == "shortcut"
    result = {
        "name": row.name,
        "framework": "torch",
        "objective": row.objective,
        "model": model_name(row),
        "input": "x".join(map(str, row.shape)),
        "batch": batch,
        "sc_fraction": config.objective.sc_fraction if shortcut else None,
        "torch_compile": row.torch_compile,
        "attention_kernel": "torch-sdpa",
        "tflop_per_step": flops.train_step_flops(
            row.objective,
            batch,
            sc_fraction=config.objective.sc_fraction,
            num_levels=config.objective.num_levels,
            **flops.dit_dims(config.model, row.shape),
        )
        / 1e12,
    }
    amp = {"auto": None, "bfloat16": True, "float32": False}.get(opts.dtype)
    if opts.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype={opts.dtype!r}: torch rows take auto, bfloat16 or float32")
    step_cfg = torch_dit.StepConfig(
        row.objective,
        num_classes=NUM_CLASSES,
        num_levels=config.objective.num_levels,
        sc_fraction=config.objective.sc_fraction,
        label_dropout=config.objective.label_dropout,
        clip=config.objective.clip,
        noise_floor=config.objective.noise_floor,
        lr=config.optim.lr,
        betas=(config.optim.b1, config.optim.b2),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        ema_decay=config.train.ema_decays[0],
    )
    model_kwargs = dict(
        patch_size=config.model.patch_size,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=config.model.mlp_ratio,
        attention_scale=config.model.attention_scale,
        t_input_scale=config.model.t_input_scale,
    )
    try:
        out = torch_dit.time_train_step(
            model_kwargs,
            step_cfg,
            batch=batch,
            shape=row.shape,
            warmup=max(opts.warmup, 1),
            steps=opts.steps,
            compile=row.torch_compile,
            amp=amp,
        )
    except torch.cuda.OutOfMemoryError as err:
        return {**result, "status": "OOM", "error": str(err).splitlines()[0][:300], "peak_gib": None}
    step_s = out["step_ms"] / 1e3
    return {
        **result,
        "status": "ok",
        "images_per_s": out["images_per_s"],
        "step_ms": out["step_ms"],
        "step_ms_min": out["step_ms_min"],
        "step_ms_max": out["step_ms_max"],
        "compile_s": out["first_step_s"],
        "init_s": out["init_s"],
        "peak_gib": out["peak_gib"],
        "peak_source": "torch" if out["peak_gib"] is not None else "",
        "xla_tflop_per_step": None,
        "traced_tflop_per_step": None,
        "tflops": result["tflop_per_step"] / step_s,
        "final_loss": out["losses"][-1],
        "losses": out["losses"],
        "amp": out["amp"],
        "torch": out["torch"],
        "device": out["device"],
    }


# ----------------------------------------------------------------------------- matmul, sampling


def measure_matmul(size: int, repeats: int = 20, calls: int = 20, warm_s: float = 1.0) -> Optional[dict]:
    """Dense bf16 matmul rate: ``[size, size] @ [size, size]``, bf16 out (the default).

    The card first runs the matmul for ``warm_s`` seconds, so that the rate is taken at the clock
    it holds under sustained load (as during training), not at a short burst's boost clock; then
    ``repeats`` timings of ``calls`` back-to-back calls each. The rate is the median's; the
    spread (slowest and fastest timing) is reported beside it.
    """
    if size <= 0:
        return None
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
    b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        for _ in range(calls):
            out = dot(a, b)
        out.block_until_ready()
    times = []
    for _ in range(repeats):
        # Back-to-back calls keep the dispatch latency of each call out of a ~2 ms kernel.
        start = time.perf_counter()
        for _ in range(calls):
            out = dot(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / calls)
    rate = lambda seconds: 2.0 * size**3 / seconds / 1e12  # noqa: E731
    seconds = statistics.median(times)
    return {
        "size": size,
        "ms": seconds * 1e3,
        "tflops": rate(seconds),
        "tflops_min": rate(max(times)),
        "tflops_max": rate(min(times)),
        "warm_s": warm_s,
        "timings": repeats,
    }


def run_sampling(opts: argparse.Namespace, repeats: int = 3) -> list[dict]:
    row = ROWS[opts.sampling_row]
    batch = opts.sampling_batch
    config = row_config(row, row.batches[0], opts)  # the row's training batch only has to pass validation
    exp = experiment_for(config, row, opts)
    params = exp.eval_params(exp.init_state())
    inputs = synthetic_batch(exp.spec, batch, exp.mesh, seed=1)  # x serves as the noise
    forward_flops = flops.dit_forward_flops(batch=batch, **flops.dit_dims(config.model, row.shape))
    out = []
    for budget in opts.sampling_budgets:
        start = time.perf_counter()
        exp.sampler(params, inputs["x"], inputs["label"], num_steps=budget).block_until_ready()
        first_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            exp.sampler(params, inputs["x"], inputs["label"], num_steps=budget).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out.append(
            {
                "model": model_name(row),
                "objective": row.objective,
                "input": "x".join(map(str, row.shape)),
                "batch": batch,
                "steps": budget,
                "ms": seconds * 1e3,
                "images_per_s": batch / seconds,
                "tflops": budget * forward_flops / seconds / 1e12,
                "first_call_s": first_s,
            }
        )
    return out


# ----------------------------------------------------------------------------- orchestration


def environment() -> dict:
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "(default)"),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "(default)"),
    }


def run_part_here(opts, section: str, row: Optional[Row] = None, batch: int = 0) -> dict:
    """One piece of the benchmark in this process, as a partial report."""
    if section == "train" and row.framework == "torch":
        # JAX's backend stays uninitialised: it would take its share of the GPU's memory
        return {"torch_environment": torch_environment(), "rows": [run_torch_row(row, batch, opts)]}
    part = {"environment": environment()}
    if section == "matmul":
        part["matmul"] = measure_matmul(opts.matmul_size)
    elif section == "train":
        part["rows"] = [run_row(row, batch, opts)]
        gc.collect()  # an OOM row's buffers go before the next row allocates
    else:
        part["sampling"] = run_sampling(opts)
    return part


FORWARDED = (
    "steps",
    "warmup",
    *MODEL_FLAGS,
    "fp8_form",
    "donate",
    "sc_fraction",
    "matmul_size",
    "sampling_row",
    "sampling_batch",
    "sampling_budgets",
    "profile_dir",
    "profile_steps",
    "init_on",
)


def run_part_in_child(opts, section: str, row: Optional[Row] = None, batch: int = 0) -> dict:
    """The same piece in a fresh process (see the module docstring for why)."""
    argv = [
        f"--{key}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for key in FORWARDED
        if (v := getattr(opts, key)) is not None
    ]
    argv += ["--in_process", f"--sections={section}"]
    if row is not None:
        argv += [f"--rows={row.name}", f"--batch={batch}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        env = None
        if row is not None and row.framework == "torch":  # should JAX start in the torch row's process
            env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_step", *argv, f"--out={out}", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    what = section if row is None else f"{row.name} batch {batch}"
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    part = {"errors": [f"{what}: child exited with {proc.returncode}:\n{tail}"]}
    if row is not None:
        part["rows"] = [
            {
                "name": row.name,
                "objective": row.objective,
                "model": model_name(row),
                "input": "x".join(map(str, row.shape)),
                "batch": batch,
                "status": "failed",
            }
        ]
    return part


def benchmark(opts, run_part: Callable[..., dict]) -> dict:
    report = {
        "environment": None,
        "torch_environment": None,
        "matmul": None,
        "rows": [],
        "sampling": [],
        "errors": [],
        "settings": {key: getattr(opts, key) for key in FORWARDED},
    }

    def add(part: dict):
        report["environment"] = report["environment"] or part.get("environment")
        report["torch_environment"] = report["torch_environment"] or part.get("torch_environment")
        report["matmul"] = report["matmul"] or part.get("matmul")
        for key in ("rows", "sampling", "errors"):
            report[key] += part.get(key, [])

    def progress(what: str, start: float):
        if not opts.quiet:
            print(f"  {what}: {time.perf_counter() - start:.1f} s", flush=True)

    if "matmul" in opts.sections:
        start = time.perf_counter()
        add(run_part(opts, "matmul"))
        progress("matmul probe", start)
    if "train" in opts.sections:
        for row in select_rows(opts.rows):
            for batch in (opts.batch,) if opts.batch else row.batches:
                start = time.perf_counter()
                add(run_part(opts, "train", row, batch))
                r = report["rows"][-1]
                status = r["status"]
                if status == "ok":
                    status = (
                        f"{r['images_per_s']:.0f} img/s, {r['step_ms']:.1f} ms/step, {r['tflops']:.0f} TFLOP/s,"
                        f" compile {r['compile_s']:.0f} s, init {r['init_s']:.0f} s"
                    )
                progress(f"{row.name} batch {batch} ({status})", start)
                if status != "OOM":
                    break
    if "sampling" in opts.sections:
        start = time.perf_counter()
        add(run_part(opts, "sampling"))
        progress("sampling", start)

    rate = report["matmul"]["tflops"] if report["matmul"] else None
    for r in report["rows"]:
        if r.get("status") == "ok":
            r["mfu_measured"] = r["tflops"] / rate if rate else None
            r["mfu_datasheet"] = r["tflops"] / H100_SXM_BF16_TFLOPS
    return report


def select_rows(spec: str) -> list[Row]:
    names = DEFAULT_ROWS if spec == "default" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; use 'default' or names from {sorted(ROWS)}")
    return [ROWS[n] for n in names]


# ----------------------------------------------------------------------------- printing


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(header: list[str], lines: list[list[str]], text_columns: int) -> None:
    """Left-aligned text in the first ``text_columns`` columns, right-aligned numbers after them."""
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *lines]:
        print(
            "  ".join(
                cell.ljust(w) if i < text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
            )
        )


def print_report(report: dict) -> None:
    env = report["environment"] or {}
    settings = report["settings"]
    print(
        f"\ndevice: {env.get('device_kind')} x{env.get('device_count')} ({env.get('backend')}), "
        f"jax {env.get('jax')}, XLA_PYTHON_CLIENT_MEM_FRACTION={env.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}"
        if env
        else "\nno JAX row ran (the JAX backend was not started)"
    )
    mm = report["matmul"]
    measured = "not measured"
    if mm:
        spread = f", timings {mm['tflops_min']:.1f}-{mm['tflops_max']:.1f}" if "tflops_min" in mm else ""
        measured = (
            f"{mm['tflops']:.1f} TFLOP/s ({mm['size']}^3 bf16 jnp.dot, median {mm['ms']:.2f} ms after"
            f" {mm.get('warm_s', 0):.0f} s of warm-up{spread})"
        )
    print(
        f"MFU denominators: (a) measured dense bf16 matmul {measured}; "
        f"(b) H100 SXM datasheet dense bf16 {H100_SXM_BF16_TFLOPS:.0f} TFLOP/s"
    )
    print(
        "TFLOP/step: analytic matmul FLOPs (3 x forward + 2 teacher forwards on the self-consistency rows);"
        " traced: dot_general and convolution FLOPs in the step's jaxpr (remat recomputation included);"
        " XLA: compiled.cost_analysis()['flops'] x devices (on GPU without the cuBLAS matmuls)"
    )
    kernels = ",".join(sorted({str(r.get("attention_kernel")) for r in report["rows"]})) or "-"
    precision = settings.get("matmul_precision", "bf16")
    if precision == "fp8":
        history = settings.get("fp8_amax_history") or 0
        scaling = f"delayed over {history} steps" if history else "current scaling"
        precision += f" (form {settings.get('fp8_form') or 'direct'}, {scaling})"
    print(
        f"step: median of {settings['steps']} steps after {settings['warmup']} warm-up steps, synthetic batch"
        f" on device; dtype={settings['dtype']} remat={settings['remat']}"
        f" (blocks: {'all' if settings.get('remat_blocks', -1) < 0 else settings['remat_blocks']})"
        f" attention_impl={settings['attention_impl']} (resolved: {kernels})"
        f" residual_dtype={settings['residual_dtype']} lean_ops={settings['lean_ops']}"
        f" matmul_precision={precision} qkv_gemms={settings.get('qkv_gemms', 1)}"
        f" scan_blocks={settings.get('scan_blocks', 'off')}"
        f" donate={settings.get('donate', 'on')};"
        " peak memory: the allocator's peak_bytes_in_use, or where marked * the compiler's footprint of"
        " the step (temp + arguments + outputs - donated)\n"
    )
    torch_env = report.get("torch_environment")
    if torch_env:
        print(
            f"torch rows: torch {torch_env['torch']} (CUDA {torch_env['cuda']}) on {torch_env['device_kind']}:"
            " the PyTorch port of the same step (benchmarks.torch_dit), bf16 autocast on CUDA, fused AdamW,"
            " torch.compile unless '-eager'; step times from CUDA events; 'compile s' is the first step"
            " (compilation included), 'init s' building the model, EMA and optimiser; peak memory"
            " torch.cuda.max_memory_allocated\n"
        )
    header = [
        "row",
        "objective",
        "model",
        "input",
        "batch",
        "img/s",
        "step ms",
        "compile s",
        "init s",
        "peak GiB",
        "TFLOP/step",
        "traced TFLOP",
        "XLA TFLOP",
        "TFLOP/s",
        "MFU(a)",
        "MFU(b)",
    ]
    lines = []
    for r in report["rows"]:
        line = [r["name"], r["objective"], r["model"], r["input"], str(r["batch"])]
        peak = _fmt(r.get("peak_gib"), ".2f") + ("*" if r.get("peak_source") == "compiler" else "")
        if r["status"] != "ok":
            lines.append(line + [r["status"], "", _fmt(r.get("compile_s"), ".1f"), "", peak] + [""] * 6)
            continue
        lines.append(
            line
            + [
                f"{r['images_per_s']:.0f}",
                f"{r['step_ms']:.2f}",
                f"{r['compile_s']:.1f}",
                f"{r['init_s']:.1f}",
                peak,
                f"{r['tflop_per_step']:.3f}",
                _fmt(r["traced_tflop_per_step"], ".3f"),
                _fmt(r["xla_tflop_per_step"], ".3f"),
                f"{r['tflops']:.1f}",
                _fmt(r["mfu_measured"], ".1%"),
                f"{r['mfu_datasheet']:.1%}",
            ]
        )
    if lines:
        print_table(header, lines, text_columns=4)
    if report["sampling"]:
        print("\nsampling (Euler, labels, no guidance; median of 3 calls after a warm-up call):\n")
        print_table(
            ["model", "objective", "input", "batch", "steps", "img/s", "ms/batch", "TFLOP/s", "first call s"],
            [
                [
                    s["model"],
                    s["objective"],
                    s["input"],
                    str(s["batch"]),
                    str(s["steps"]),
                    f"{s['images_per_s']:.0f}",
                    f"{s['ms']:.1f}",
                    f"{s['tflops']:.1f}",
                    f"{s['first_call_s']:.1f}",
                ]
                for s in report["sampling"]
            ],
            text_columns=3,
        )
    for r in report["rows"]:
        if r.get("profile"):
            print(f"\nprofile of {r['name']} batch {r['batch']} ({r['profile']['steps']} traced steps):")
            trace_summary.print_summary(r["profile"], steps=r["profile"]["steps"], lanes=2)
    for err in report["errors"]:
        print(f"\nerror: {err}")


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="default", help=f"'default' or comma-separated names of {sorted(ROWS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--dtype", default="auto", help="model.dtype: auto, bfloat16, float32")
    p.add_argument("--remat", default="none", choices=config_lib.REMAT_CHOICES, help="model.remat")
    p.add_argument(
        "--remat_blocks", type=int, default=-1, help="model.remat_blocks: how many blocks use --remat (-1: all)"
    )
    p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"), help="model.attention_impl")
    p.add_argument("--residual_dtype", default="float32", choices=("float32", "compute"), help="model.residual_dtype")
    p.add_argument(
        "--lean_ops",
        default="default",
        help="model.lean_ops: 'default' (the config's), 'all', 'none' or a subset of norm,gelu,gate"
        " (the same function, less traffic)",
    )
    p.add_argument(
        "--matmul_precision",
        default="bf16",
        choices=config_lib.MATMUL_PRECISIONS,
        help="model.matmul_precision: 'fp8' runs the DiT blocks' qkv, proj and MLP matmuls in FP8",
    )
    p.add_argument(
        "--fp8_amax_history",
        type=int,
        default=0,
        help="model.fp8_amax_history with --matmul_precision=fp8: 0 current scaling, N delayed scaling"
        " over the last N steps' amaxes",
    )
    p.add_argument(
        "--qkv_gemms",
        type=int,
        default=1,
        choices=config_lib.QKV_GEMMS,
        help="model.qkv_gemms: q, k and v from one GEMM split afterwards (1) or three GEMMs over the same kernel (3)",
    )
    p.add_argument(
        "--fp8_form",
        default="",
        choices=("", *FP8_FORMS),
        help="with --matmul_precision=fp8: how the FP8 dots are written (models.fp8.FORMS;"
        " '' keeps the model's default, 'direct')",
    )
    p.add_argument(
        "--scan_blocks",
        default="off",
        choices=("on", "off"),
        help="model.scan_blocks: the blocks as one scan over stacked parameters (one block compiled)",
    )
    p.add_argument(
        "--donate",
        default="on",
        choices=("on", "off"),
        help="donate the state to the step (as training does); 'off' measures what donation saves",
    )
    p.add_argument("--sc_fraction", type=float, default=None, help="overrides every shortcut row's fraction")
    p.add_argument("--batch", type=int, default=None, help="overrides every row's batch size")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--matmul_size", type=int, default=8192, help="n of the n^3 matmul probe; 0 skips it")
    p.add_argument("--sampling_row", default="B2-shortcut", help="row whose model the sampler runs")
    p.add_argument("--sampling_batch", type=int, default=256)
    p.add_argument("--sampling_budgets", default="1,4,128", help="comma-separated step counts")
    p.add_argument(
        "--in_process",
        action="store_true",
        help="run everything in this process (peak memory then accumulates over rows)",
    )
    p.add_argument("--quiet", action="store_true", help="print no progress or table")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument(
        "--profile_dir",
        default="",
        help="trace --profile_steps more steps of each row into"
        " <dir>/<row>-b<batch> and print where the device time goes (trace_summary)",
    )
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument(
        "--init_on",
        default="device",
        choices=("device", "host"),
        help="train.init_on: where the initial state is computed (its time is the row's init_s)",
    )
    opts = p.parse_args(argv)
    if opts.steps < 1 or opts.warmup < 0 or opts.profile_steps < 1:
        p.error("--steps and --profile_steps must be >= 1 and --warmup >= 0")
    if opts.remat_blocks < -1:
        p.error(f"--remat_blocks={opts.remat_blocks}: use -1 (every block) or a block count")
    try:  # a misspelt part fails here, not in every row's child process
        config_lib.check_lean_ops(lean_ops(opts.lean_ops))
    except config_lib.ConfigError as err:
        p.error(f"--lean_ops: {err}")
    opts.profile_dir = os.path.abspath(opts.profile_dir) if opts.profile_dir else ""
    opts.sections = [s for s in opts.sections.split(",") if s]
    if set(opts.sections) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(opts.sections) - set(SECTIONS))}; use {SECTIONS}")
    opts.sampling_budgets = [int(b) for b in opts.sampling_budgets.split(",") if b]
    if opts.sampling_row not in ROWS:
        p.error(f"--sampling_row={opts.sampling_row!r} is not one of {sorted(ROWS)}")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if "train" in opts.sections:
        select_rows(opts.rows)  # fail on a misspelt row before anything runs
    report = benchmark(opts, run_part_here if opts.in_process else run_part_in_child)
    if not opts.quiet:
        print_report(report)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
