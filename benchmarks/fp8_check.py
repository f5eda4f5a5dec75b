"""Do the FP8 train step's matmuls really run as FP8 GEMMs, and how fast is one FP8 matmul?

    python -m benchmarks.fp8_check --out=fp8_check                      # GPU: DiT-B/2 step, fc1 shape
    python -m benchmarks.fp8_check --row=tiny-shortcut --matmul_shape=256,64,128 --warm_s=0   # CPU

Step section: the train step of a ``benchmarks.train_step`` row (default ``B2-shortcut``: DiT-B/2,
batch 256, 32x32x4, shortcut at 1/8), once with bf16 matmuls and once per FP8 dot form
(``models.fp8.FORMS``), lowered and compiled as training compiles it (state donated), not run.
For each it prints the dot_generals of the lowered program by operand and result element types
(with FP8: e4m3 x e4m3 forward, e5m2 x e4m3 input gradient, e4m3 x e5m2 kernel gradient; the
'dequant' form's dots read float32 operands converted from FP8, counted as such) and the matmuls
of the optimised program by kind: custom calls by target (``__cublas$lt$matmul$f8`` is cuBLASLt's
FP8 GEMM; ``__cublas$gemm`` and ``__cublas$lt$matmul`` the others), Triton GEMM fusions,
convolutions and plain ``dot`` instructions (on CPU every matmul; on a GPU those inside Triton
fusions or left to XLA's own emitters), each with its operand and output element types. XLA
turns an FP8 dot it cannot map to cuBLASLt into an f16 GEMM without an error, so the line to
read is ``FP8 GEMMs: <compiled> of <lowered> FP8 dots``. With ``--out``, the optimised HLO of
each program is written there, gzipped, beside ``fp8_check.json``.

Matmul section: one ``[M, K] x [K, N]`` matmul (default DiT-B/2's fc1 at batch 256: 65536 x 768
by 768 x 3072; several shapes with '/'), bf16 activations and a float32 kernel as a layer sees
them, with bf16 matmuls, in each FP8 form, and as a quantize-dequantize-to-bf16 control (the
pattern that stayed a bf16 GEMM in a probe on an H200), three ways: the GEMM alone on operands
quantized beforehand; the forward (current scales of both operands, quantization, GEMM,
scaling); forward and backward (the three GEMMs and the gradient's quantization). Each is the
median of ``--repeats`` timings of ``--calls`` back-to-back calls after ``--warm_s`` seconds of
warm-up, as TFLOP/s of 2MNK (three times that with the backward), with the matmuls of its program.

On CPU both sections run (XLA's CPU backend converts FP8 operands to a wider type), which is how
the script is tested; the figures mean something on a GPU with FP8 tensor cores.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import train_step
from shortcut_jax.infra import sharding
from shortcut_jax.models import fp8

F8_GEMM_TARGET = "__cublas$lt$matmul$f8"
CONTROL = "qdq_bf16"  # quantize, dequantize to bf16, bf16 dot: the form the probe saw stay a bf16 GEMM
VARIANTS = ("bf16", *fp8.FORMS, CONTROL)

# ----------------------------------------------------------------------------- reading programs

_STABLEHLO_DOT = re.compile(
    r"stablehlo\.dot_general\b.*?:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>"
)
_STABLEHLO_CONVERT = re.compile(r"stablehlo\.convert\b.*?:\s*\(tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>")
# an HLO instruction: name = shape op(operands), attributes; the shape may be a tuple
_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|[a-z][a-z0-9]*\[[^\]]*\]\S*)\s+"
    r"([a-z][\w\-]*)\(([^)]*)\)(.*)$"
)
_ELEMENT_TYPE = re.compile(r"([a-z][a-z0-9]*)\[")


def _tensor_type(text: str) -> str:
    """``'64x32xf8E4M3FN'`` -> ``'f8E4M3FN'`` (the element type of a StableHLO tensor type)."""
    return text.split("x")[-1]


def lowered_dots(text: str) -> dict:
    """Counts of the lowered (StableHLO) program's dot_generals by ``lhs x rhs -> result`` type,
    and under ``'dequantized FP8 operands'`` the converts from FP8 to a wider type: the operands
    of the ``'dequant'`` form's dots (two per dot)."""
    counts = collections.Counter(
        f"{_tensor_type(a)} x {_tensor_type(b)} -> {_tensor_type(c)}" for a, b, c in _STABLEHLO_DOT.findall(text)
    )
    dequantized = sum(
        1
        for a, b in _STABLEHLO_CONVERT.findall(text)
        if _tensor_type(a).startswith("f8") and not _tensor_type(b).startswith("f8")
    )
    if dequantized:
        counts["dequantized FP8 operands"] = dequantized
    return dict(counts)


def compiled_matmuls(text: str) -> dict:
    """Counts of the optimised HLO's matmul-like instructions by kind and element types.

    Operands are printed by name only in recent HLO text, so their element types are looked up
    in the definitions (instruction names are unique within a module)."""
    types, instructions = {}, []
    for line in text.splitlines():
        m = _HLO_INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op, operands, rest = m.groups()
        element = _ELEMENT_TYPE.search(shape)
        types[name] = element.group(1) if element else "?"
        instructions.append((name, op, re.findall(r"%([\w.\-]+)", operands), rest))
    counts = collections.Counter()
    for name, op, operands, rest in instructions:
        operand_types = [types.get(o, "?") for o in operands[:2]]
        signature = f"{' x '.join(operand_types)} -> {types[name]}"
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            target = target.group(1) if target else "?"
            is_matmul = "matmul" in target or "gemm" in target
            counts[f"{target} {signature}" if is_matmul else target] += 1
        elif op in ("dot", "convolution"):
            counts[f"{op} {signature}"] += 1
        elif op == "fusion" and "__triton_gemm" in rest:
            counts[f"triton_gemm fusion -> {types[name]}"] += 1
    return dict(sorted(counts.items()))


def f8_summary(lowered: dict, compiled: dict) -> dict:
    f8_lowered = (
        sum(n for k, n in lowered.items() if k.count("f8") >= 2) + lowered.get("dequantized FP8 operands", 0) // 2
    )
    f8_compiled = sum(n for k, n in compiled.items() if k.startswith(F8_GEMM_TARGET + " "))
    other = sum(n for k, n in compiled.items() if k.startswith("__cublas") and not k.startswith(F8_GEMM_TARGET + " "))
    return {"lowered_f8_dots": f8_lowered, "compiled_f8_gemms": f8_compiled, "compiled_other_cublas_gemms": other}


# ----------------------------------------------------------------------------- the step


def step_programs(row: train_step.Row, batch: int, opts: argparse.Namespace):
    """The row's train step as training compiles it (``Experiment.compile_step``): lowered, compiled."""
    config = train_step.row_config(row, batch, opts)
    exp = train_step.experiment_for(config, row, opts)
    jitted = jax.jit(
        exp.train_step_fn(), donate_argnums=(0,), out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh))
    )
    lowered = jitted.lower(exp.abstract_state, exp.abstract_batch())
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered.as_text(), compiled.as_text(), time.perf_counter() - start


def check_step(args, variants: list[str]) -> dict:
    row = train_step.ROWS[args.row]
    batch = args.batch or row.batches[0]
    out = {"row": row.name, "batch": batch, "train_step_args": args.train_step_args, "variants": {}}
    for variant in variants:
        precision, form = ("bf16", "") if variant == "bf16" else ("fp8", variant)
        opts = train_step.parse_args(
            shlex.split(args.train_step_args) + [f"--matmul_precision={precision}", f"--fp8_form={form}"]
        )
        start = time.perf_counter()
        lowered_text, compiled_text, compile_s = step_programs(row, batch, opts)
        lowered, compiled = lowered_dots(lowered_text), compiled_matmuls(compiled_text)
        result = {
            "lowered_dots": lowered,
            "compiled_matmuls": compiled,
            "compile_s": compile_s,
            **f8_summary(lowered, compiled),
        }
        if args.out:
            path = os.path.join(args.out, f"step_{variant}.hlo.txt.gz")
            with gzip.open(path, "wt") as f:
                f.write(compiled_text)
            result["hlo"] = path
        out["variants"][variant] = result
        log(args, f"  step {variant}: {time.perf_counter() - start:.1f} s")
    return out


# ----------------------------------------------------------------------------- one matmul


def matmul_functions(form: str):
    """(gemm alone on quantized operands, forward, forward + backward) for one form."""
    bf16 = jnp.bfloat16
    if form == "bf16":

        def gemm(x, w):
            return x @ w  # bf16 operands, bf16 out

        def forward(x, w):
            return x @ w.astype(bf16)
    elif form == CONTROL:

        def dequantize(q, scale):
            return q.astype(bf16) * scale.astype(bf16)

        def gemm(xq, sx, wq, sw):
            return dequantize(xq, sx) @ dequantize(wq, sw)

        def forward(x, w):
            sx, sw = fp8.current_scale(x, fp8.FORWARD_FORMAT), fp8.current_scale(w, fp8.FORWARD_FORMAT)
            return gemm(fp8.quantize(x, sx, fp8.FORWARD_FORMAT), sx, fp8.quantize(w, sw, fp8.FORWARD_FORMAT), sw)
    else:

        def gemm(xq, sx, wq, sw):
            return fp8.scaled_dot(xq, sx, wq, sw, ((1,), (0,)), bf16, form).astype(bf16)

        def forward(x, w):
            return fp8.fp8_matmul(x, w, out_dtype=bf16, form=form).astype(bf16)

    def forward_backward(x, w, g):
        y, vjp = jax.vjp(forward, x, w)
        return (y, *vjp(g))

    return gemm, forward, forward_backward


def time_calls(fn, args, *, warm_s: float, repeats: int, calls: int) -> list[float]:
    """Seconds per call: ``repeats`` timings of ``calls`` back-to-back calls, after ``warm_s`` s."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        jax.block_until_ready([fn(*args) for _ in range(calls)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
    return times


def check_matmul(args, variants: list[str]) -> dict:
    rows = []
    for shape in args.matmul_shape:
        rows += matmul_rows(args, shape, variants)
    for r in rows:
        base = next(
            (b for b in rows if b["variant"] == "bf16" and b["mode"] == r["mode"] and b["shape"] == r["shape"]), None
        )
        r["vs_bf16"] = r["tflops"] / base["tflops"] if base else None
    return {"warm_s": args.warm_s, "repeats": args.repeats, "calls": args.calls, "rows": rows}


def matmul_rows(args, shape: tuple, variants: list[str]) -> list[dict]:
    m, k, n = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.float32) / k**0.5
    g = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    sx, sw = fp8.current_scale(x, fp8.FORWARD_FORMAT), fp8.current_scale(w, fp8.FORWARD_FORMAT)
    quantized = (fp8.quantize(x, sx, fp8.FORWARD_FORMAT), sx, fp8.quantize(w, sw, fp8.FORWARD_FORMAT), sw)
    flop = 2.0 * m * k * n
    rows = []
    for variant in variants:
        gemm, forward, forward_backward = matmul_functions(variant)
        gemm_args = (x, w.astype(jnp.bfloat16)) if variant == "bf16" else quantized
        for mode, fn, fn_args, flops in (
            ("gemm", gemm, gemm_args, flop),
            ("forward", forward, (x, w), flop),
            ("forward_backward", forward_backward, (x, w, g), 3 * flop),
        ):
            compiled = jax.jit(fn).lower(*fn_args).compile()
            times = time_calls(compiled, fn_args, warm_s=args.warm_s, repeats=args.repeats, calls=args.calls)
            seconds = statistics.median(times)
            rows.append(
                {
                    "shape": [m, k, n],
                    "variant": variant,
                    "mode": mode,
                    "ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12,
                    "tflops_min": flops / max(times) / 1e12,
                    "tflops_max": flops / min(times) / 1e12,
                    "matmuls": compiled_matmuls(compiled.as_text()),
                }
            )
        log(
            args,
            f"  matmul {m}x{k}x{n} {variant}: "
            + ", ".join(f"{r['mode']} {r['tflops']:.1f}" for r in rows[-3:])
            + " TFLOP/s",
        )
    return rows


# ----------------------------------------------------------------------------- report


def log(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _rate(tflops: float) -> str:
    return f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.2g}"  # CPU-sized runs stay readable


def print_report(report: dict) -> None:
    env = report["environment"]
    print(f"\ndevice: {env['device_kind']} x{env['device_count']} ({env['backend']}), jax {env['jax']}")
    step = report.get("step")
    if step:
        print(
            f"\ntrain step of {step['row']} at batch {step['batch']} (train_step args:"
            f" {step['train_step_args'] or 'none'}), compiled, not run:"
        )
        for variant, r in step["variants"].items():
            print(
                f"\n  {variant}: compile {r['compile_s']:.1f} s; FP8 GEMMs: {r['compiled_f8_gemms']} of"
                f" {r['lowered_f8_dots']} FP8 dots; other cuBLAS GEMMs: {r['compiled_other_cublas_gemms']}"
            )
            print("    lowered dot_generals:")
            for key, count in r["lowered_dots"].items():
                print(f"      {count:5d}  {key}")
            print("    optimised matmuls:")
            for key, count in r["compiled_matmuls"].items():
                print(f"      {count:5d}  {key}")
            if r["lowered_f8_dots"] and env["backend"] == "gpu" and r["compiled_f8_gemms"] < r["lowered_f8_dots"]:
                print(
                    f"    ** {r['lowered_f8_dots'] - r['compiled_f8_gemms']} FP8 dots did not become {F8_GEMM_TARGET}"
                )
    mm = report.get("matmul")
    if mm:
        print(
            f"\nmatmul [M, K] x [K, N], bf16 activations, float32 kernel (median of {mm['repeats']} x"
            f" {mm['calls']} calls after {mm['warm_s']:.0f} s of warm-up):\n"
        )
        header = ["M,K,N", "variant", "mode", "ms", "TFLOP/s", "min-max", "vs bf16", "matmuls in the program"]
        lines = [
            [
                ",".join(map(str, r["shape"])),
                r["variant"],
                r["mode"],
                f"{r['ms']:.3f}",
                _rate(r["tflops"]),
                f"{_rate(r['tflops_min'])}-{_rate(r['tflops_max'])}",
                "-" if r["vs_bf16"] is None else f"{r['vs_bf16']:.2f}x",
                "; ".join(f"{c} {key}" for key, c in r["matmuls"].items()),
            ]
            for r in mm["rows"]
        ]
        train_step.print_table(header, lines, text_columns=3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="step,matmul", help="comma-separated subset of step,matmul")
    p.add_argument(
        "--row", default="B2-shortcut", help=f"train_step row of the step section, one of {sorted(train_step.ROWS)}"
    )
    p.add_argument("--batch", type=int, default=0, help="the row's batch (0: its first)")
    p.add_argument(
        "--train_step_args",
        default="",
        help="train_step flags for the step's model, e.g. '--residual_dtype=compute --remat=dots'",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"subset of {VARIANTS}: bf16 matmuls, the FP8 dot forms, and the quantize-dequantize"
        f" control ({CONTROL}, matmul section only)",
    )
    p.add_argument(
        "--matmul_shape",
        default="65536,768,3072",
        help="M,K,N of the timed matmul; several separated by '/', e.g. DiT-B/2's four layers at batch"
        " 256: 65536,768,2304/65536,768,768/65536,768,3072/65536,3072,768",
    )
    p.add_argument("--warm_s", type=float, default=1.0, help="seconds of warm-up before each matmul's timings")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default="", help="folder for fp8_check.json and the compiled steps' HLO")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if set(args.sections) - {"step", "matmul"} or not args.sections:
        p.error(f"--sections={','.join(args.sections)}: use step, matmul or both")
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS) or not args.variants:
        p.error(f"--variants={','.join(args.variants)}: use a subset of {VARIANTS}")
    if args.row not in train_step.ROWS:
        p.error(f"--row={args.row!r} is not one of {sorted(train_step.ROWS)}")
    try:
        args.matmul_shape = [tuple(int(v) for v in shape.split(",")) for shape in args.matmul_shape.split("/")]
    except ValueError:
        args.matmul_shape = [()]
    if any(len(shape) != 3 or min(shape) < 1 for shape in args.matmul_shape):
        p.error(
            "--matmul_shape needs M,K,N (three positive integers), several separated by '/',"
            " e.g. 65536,768,3072/65536,3072,768"
        )
    if args.repeats < 1 or args.calls < 1:
        p.error("--repeats and --calls must be >= 1")
    try:  # a misspelt train_step flag fails here, before anything compiles
        train_step.parse_args(shlex.split(args.train_step_args))
    except SystemExit:
        p.error(f"--train_step_args={args.train_step_args!r} is not a valid set of train_step flags")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    report = {"environment": train_step.environment()}
    if "step" in args.sections:
        report["step"] = check_step(args, [v for v in args.variants if v != CONTROL])
    if "matmul" in args.sections:
        report["matmul"] = check_matmul(args, args.variants)
    if not args.quiet:
        print_report(report)
    if args.out:
        with open(os.path.join(args.out, "fp8_check.json"), "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
