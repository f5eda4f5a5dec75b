"""Can a hand-written GEMM with a fused epilogue beat XLA here? The MLP's input gradient as a test.

Autodiff of ``gelu(h) @ w + b`` computes the input gradient in two passes over the
``[tokens, hidden]`` activations: cuBLAS writes ``dy @ w.T``, then one XLA kernel reads it back
with ``h`` and writes ``(dy @ w.T) * gelu'(h)`` (400 MB each at DiT-B/2, batch 256). The kernel
here (Pallas, Triton backend) computes the same product in one pass: a GEMM over the width whose
float32 accumulator is multiplied by GELU's derivative before it is stored. This script times
it, for several tile configurations, against XLA's two kernels and against the GEMM alone:

    python -m benchmarks.fused_mlp_kernel                     # DiT-B/2 and XL/2, batch 256
    python -m benchmarks.fused_mlp_kernel --shapes=65536x768x3072 --tiles="128,128,64,4,3,1" \\
        --gemm_alone --mosaic

Each row prints the time of one call (``--iters`` calls back to back, the best of three runs), the
GEMM's rate (2 x rows x width x hidden FLOPs over that time) and the largest difference from a
float32 reference relative to the reference's largest value. ``xla gemm`` is cuBLAS's matmul
alone (its bf16 output written to memory), ``xla gemm+gelu'`` the two kernels autodiff makes,
``pallas gemm`` this kernel without the derivative, ``mosaic gemm`` jax's example Hopper matmul
(Pallas' Mosaic GPU backend) for what a Pallas GEMM can reach. On one H100 with jax 0.11.2 the
Pallas GEMMs ran at 550-650 TFLOP/s against cuBLAS's 760 on this shape, which costs more than the
fused epilogue saves; the model therefore keeps XLA's kernels (``throughput_levers.md``). Needs a
GPU for figures; on CPU the kernel runs in Pallas' interpreter (use tiny ``--shapes``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.models import layers

DEFAULT_SHAPES = "65536x768x3072,65536x1152x4608"  # tokens of 256 images at 32x32 latents / patch 2
DEFAULT_TILE_LIST = "128,128,64,4,3,1;128,128,64,8,3,1;128,256,64,8,3,1;64,128,64,4,3,1;128,64,64,4,4,1;128,128,64,8,3"


class TileConfig(NamedTuple):
    """Tiles of the GEMM ``[rows, hidden] = [rows, width] @ [width, hidden]``."""

    rows: int = 128  # output rows (tokens) per program
    cols: int = 128  # output columns (hidden units) per program
    depth: int = 64  # slice of the width summed per loop step
    num_warps: int = 4
    num_stages: int = 3
    fast_tanh: int = 1  # 1: the derivative's tanh by the GPU's approximate instruction (tanh.approx.f32)


def _fit(size: int, preferred: int) -> int | None:
    """The largest power of two <= ``preferred`` and >= 16 that divides ``size``."""
    tile = preferred
    while tile >= 16:
        if size % tile == 0:
            return tile
        tile //= 2
    return None


def fits(rows: int, width: int, hidden: int, tiles: TileConfig) -> bool:
    """Whether the kernel can tile these shapes."""
    return None not in (_fit(rows, tiles.rows), _fit(hidden, tiles.cols), _fit(width, tiles.depth))


def gelu_grad_matmul(
    dy: jax.Array,
    w: jax.Array,
    h: jax.Array,
    tiles: TileConfig = TileConfig(),
    interpret: bool | None = None,
    derivative: bool = True,
) -> jax.Array:
    """``(dy @ w.T) * gelu'(h)`` in one kernel, accumulated in float32, returned in ``h``'s dtype.

    dy: ``[rows, width]``; w: ``[hidden, width]`` (fc2's kernel); h: ``[rows, hidden]``.
    ``derivative=False`` stores ``dy @ w.T`` alone (the GEMM's own speed).
    """
    from jax.experimental import pallas as pl

    rows, width = dy.shape
    hidden = w.shape[0]
    if w.shape != (hidden, width) or h.shape != (rows, hidden):
        raise ValueError(f"gelu_grad_matmul: shapes dy{dy.shape}, w{w.shape}, h{h.shape} do not chain")
    bm, bn, bk = _fit(rows, tiles.rows), _fit(hidden, tiles.cols), _fit(width, tiles.depth)
    if None in (bm, bn, bk):
        raise ValueError(
            f"gelu_grad_matmul: rows={rows}, hidden={hidden}, width={width} need a power-of-two"
            " tile of at least 16 dividing each; check fits() first"
        )
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda")
    steps = width // bk
    w_t = w.T  # [width, hidden]: the usual row-major right operand (a few MB, transposed by XLA)
    tanh = jnp.tanh
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        if tiles.fast_tanh:
            tanh = pl_triton.approx_tanh

    def kernel(dy_ref, w_ref, h_ref, out_ref):
        # grid axis 0 walks the hidden columns fastest, so the programs that run together share
        # their dy rows in L2; fc2's kernel (hidden x width) stays in L2 throughout
        row_block = pl.ds(pl.program_id(1) * bm, bm)
        col_block = pl.ds(pl.program_id(0) * bn, bn)

        def body(step, acc):
            depth = pl.ds(pl.multiple_of(step * bk, bk), bk)
            return acc + jnp.dot(dy_ref[row_block, depth], w_ref[depth, col_block], preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
        if derivative:
            acc = acc * layers.gelu_tanh_slope(h_ref[row_block, col_block].astype(jnp.float32), tanh)
        out_ref[row_block, col_block] = acc.astype(out_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, hidden), h.dtype),
        grid=(hidden // bn, rows // bm),
        interpret=interpret,
        name="gelu_grad_matmul",
        **params,
    )(dy, w_t, h)


def parse_tiles(spec: str) -> list[TileConfig]:
    out = []
    for part in filter(None, spec.split(";")):
        values = part.split(",")
        if len(values) not in (5, 6) or not all(v.strip().isdigit() for v in values):
            raise ValueError(f"--tiles entry {part!r}: write rows,cols,depth,num_warps,num_stages[,fast_tanh]")
        tiles = TileConfig(*(int(v) for v in values))
        if any(v < 16 or v & (v - 1) for v in tiles[:3]) or tiles.fast_tanh not in (0, 1):
            raise ValueError(
                f"--tiles entry {part!r}: rows, cols and depth must be powers of two >= 16, fast_tanh 0 or 1"
            )
        out.append(tiles)
    return out


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for part in filter(None, spec.split(",")):
        dims = part.split("x")
        if len(dims) != 3 or not all(d.isdigit() for d in dims):
            raise ValueError(f"--shapes entry {part!r}: write ROWSxWIDTHxHIDDEN, e.g. 65536x768x3072")
        out.append(tuple(int(d) for d in dims))
    return out


def time_call(fn, args, iters: int, repeats: int = 3) -> float:
    """Milliseconds per call: ``iters`` calls dispatched back to back (so the host's dispatch
    overlaps the device's work), the best of ``repeats`` such runs, after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) * 1e3 / iters)
    return best


def _mosaic_matmul():
    """jax's own Hopper matmul written with Pallas' Mosaic GPU backend (an example kernel shipped
    with jax, warp-specialised with TMA loads): what a Pallas GEMM can reach on these shapes."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu

    return hopper_matmul_mgpu.matmul


def mosaic_configs() -> list:
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except Exception:  # not shipped with this jax
        return []
    return [
        hm.TuningConfig(
            tile_m=tm,
            tile_n=tn,
            tile_k=64,
            max_concurrent_steps=4,
            grid_minor_dim=hm.MatmulDimension.N,
            grid_tile_width=4,
            wg_dimension=hm.MatmulDimension.N,
        )
        for tm, tn in ((128, 64), (128, 128), (64, 128))
    ]


def run_shape(
    rows: int, width: int, hidden: int, tiles: list, iters: int, dtype, gemm_alone: bool = False, mosaic: bool = False
) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), 3)
    dy = jax.random.normal(keys[0], (rows, width), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (hidden, width), jnp.float32) / np.sqrt(width)).astype(dtype)
    h = jax.random.normal(keys[2], (rows, hidden), jnp.float32).astype(dtype)
    ref = jax.jit(
        lambda dy, w, h: (
            jnp.dot(dy.astype(jnp.float32), w.astype(jnp.float32).T, precision="highest")
            * layers.gelu_tanh_slope(h.astype(jnp.float32))
        )
    )
    expected = ref(dy, w, h)
    scale = float(jnp.max(jnp.abs(expected)))
    flop = 2.0 * rows * width * hidden
    gemm = jax.jit(lambda dy, w: jnp.dot(dy, w.T))
    xla = jax.jit(
        lambda dy, w, h: (jnp.dot(dy, w.T).astype(jnp.float32) * layers.gelu_tanh_slope(h.astype(jnp.float32))).astype(
            h.dtype
        )
    )
    candidates = [("xla gemm", gemm, (dy, w), False), ("xla gemm+gelu'", xla, (dy, w, h), True)]
    for t in tiles:
        if not fits(rows, width, hidden, t):
            continue
        label = ",".join(map(str, t))
        fn = jax.jit(lambda dy, w, h, t=t: gelu_grad_matmul(dy, w, h, t))
        candidates.append((f"fused {label}", fn, (dy, w, h), True))
        if gemm_alone:
            fn = jax.jit(lambda dy, w, h, t=t: gelu_grad_matmul(dy, w, h, t, derivative=False))
            candidates.append((f"pallas gemm {label}", fn, (dy, w, h), False))
    for cfg in mosaic_configs() if mosaic else ():
        fn = jax.jit(lambda dy, w, cfg=cfg: _mosaic_matmul()(dy, w.T, None, cfg))
        candidates.append((f"mosaic gemm {cfg.tile_m},{cfg.tile_n},{cfg.tile_k}", fn, (dy, w), False))
    results = []
    for name, fn, args, check in candidates:
        row = {"shape": f"{rows}x{width}x{hidden}", "name": name}
        try:
            ms = time_call(fn, args, iters)
        except Exception as err:  # a configuration that does not compile (shared memory, registers, backend)
            row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
            results.append(row)
            print(row, flush=True)
            continue
        row.update(ms=ms, tflops=flop / ms / 1e9)
        if check:
            row["rel_err"] = float(jnp.max(jnp.abs(fn(*args).astype(jnp.float32) - expected))) / scale
        results.append(row)
        print(row, flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxWIDTHxHIDDEN")
    p.add_argument(
        "--tiles",
        default=DEFAULT_TILE_LIST,
        help="';'-separated rows,cols,depth,num_warps,num_stages[,fast_tanh] (fast_tanh defaults to 1)",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument(
        "--gemm_alone", action="store_true", help="also time each tile configuration's GEMM without the derivative"
    )
    p.add_argument("--mosaic", action="store_true", help="also time jax's example Mosaic GPU matmul (Hopper)")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    opts = p.parse_args(argv)
    try:
        shapes, tiles = parse_shapes(opts.shapes), parse_tiles(opts.tiles)
    except ValueError as err:
        p.error(str(err))
    if opts.iters < 1:
        p.error("--iters must be >= 1")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results = []
    for rows, width, hidden in shapes:
        results += run_shape(
            rows, width, hidden, tiles, opts.iters, jnp.dtype(opts.dtype), opts.gemm_alone, opts.mosaic
        )
    print("\n| shape | variant | ms | GEMM TFLOP/s | max rel. error |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | {r['name']} | - | - | {r['error']} |")
        else:
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
            print(f"| {r['shape']} | {r['name']} | {r['ms']:.3f} | {r['tflops']:.0f} | {err} |")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
