"""Times the MLP's input gradient, ``(dy @ w.T) * gelu'(h)``, as XLA computes it and as the fused
kernel of ``models/fused_mlp.py`` does, for several tile configurations.

    python -m shortcut_jax.benchmarks.fused_mlp_kernel                     # DiT-B/2 and XL/2, batch 256
    python -m shortcut_jax.benchmarks.fused_mlp_kernel --shapes=65536x768x3072 --tiles=128,128,64,8,3

Each row prints the time of one call (``--iters`` calls back to back, the best of three runs), the
GEMM's rate (2 x rows x width x hidden FLOPs over that time) and the largest difference from a
float32 reference relative to the reference's largest value. ``xla gemm`` is the matmul alone
(its bf16 output written to memory), ``xla gemm+gelu'`` the two kernels autodiff makes; the
fused kernel replaces both. Needs a GPU (on CPU the kernel runs in Pallas' interpreter: use
tiny ``--shapes`` to check it runs).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.models import fused_mlp

DEFAULT_SHAPES = "65536x768x3072,65536x1152x4608"  # tokens of 256 images at 32x32 latents / patch 2
DEFAULT_TILES = ("128,128,64,8,3;128,128,64,4,3;128,256,64,8,3;128,128,32,4,4;"
                 "64,128,64,4,3;256,128,64,8,3;128,64,64,4,4")


def parse_tiles(spec: str) -> list[fused_mlp.TileConfig]:
    out = []
    for part in filter(None, spec.split(";")):
        try:
            out.append(fused_mlp.TileConfig(*(int(v) for v in part.split(","))))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--tiles entry {part!r}: write rows,cols,depth,num_warps,num_stages ({err})") from None
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


def mosaic_configs(rows: int, width: int, hidden: int) -> list:
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except Exception:  # not shipped with this jax
        return []
    out = []
    for tm, tn in ((128, 128), (128, 256), (64, 256)):
        out.append(hm.TuningConfig(tile_m=tm, tile_n=tn // 2, tile_k=64, max_concurrent_steps=4,
                                   grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=4,
                                   wg_dimension=hm.MatmulDimension.N))
    return out


def run_shape(rows: int, width: int, hidden: int, tiles: list, iters: int, dtype, gemm_alone: bool = False,
              mosaic: bool = False) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), 3)
    dy = jax.random.normal(keys[0], (rows, width), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (hidden, width), jnp.float32) / np.sqrt(width)).astype(dtype)
    h = jax.random.normal(keys[2], (rows, hidden), jnp.float32).astype(dtype)
    ref = jax.jit(lambda dy, w, h: jnp.dot(dy.astype(jnp.float32), w.astype(jnp.float32).T,
                                           precision="highest") * fused_mlp._gelu_slope(h.astype(jnp.float32)))
    expected = ref(dy, w, h)
    scale = float(jnp.max(jnp.abs(expected)))
    flop = 2.0 * rows * width * hidden
    gemm = jax.jit(lambda dy, w: jnp.dot(dy, w.T))
    xla = jax.jit(lambda dy, w, h: (jnp.dot(dy, w.T).astype(jnp.float32)
                                    * fused_mlp._gelu_slope(h.astype(jnp.float32))).astype(h.dtype))
    candidates = [("xla gemm", gemm, (dy, w), None), ("xla gemm+gelu'", xla, (dy, w, h), True)]
    for t in tiles:
        if not fused_mlp.fits(rows, width, hidden, t):
            continue
        fn = jax.jit(lambda dy, w, h, t=t: fused_mlp.gelu_grad_matmul(dy, w, h, t))
        candidates.append((f"fused {','.join(map(str, t))}", fn, (dy, w, h), True))
        if gemm_alone:
            fn = jax.jit(lambda dy, w, h, t=t: fused_mlp.gelu_grad_matmul(dy, w, h, t, derivative=False))
            candidates.append((f"pallas gemm {','.join(map(str, t))}", fn, (dy, w, h), None))
    for cfg in mosaic_configs(rows, width, hidden) if mosaic else ():
        fn = jax.jit(lambda dy, w, cfg=cfg: _mosaic_matmul()(dy, w.T, None, cfg))
        candidates.append((f"mosaic gemm {cfg.tile_m},{cfg.tile_n},{cfg.tile_k}", fn, (dy, w), None))
    results = []
    for name, fn, args, check in candidates:
        row = {"shape": f"{rows}x{width}x{hidden}", "name": name}
        try:
            ms = time_call(fn, args, iters)
        except Exception as err:  # a tile configuration that does not compile (shared memory, registers)
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
    p.add_argument("--tiles", default=DEFAULT_TILES, help="';'-separated rows,cols,depth,num_warps,num_stages")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--gemm_alone", action="store_true", help="also time each tile configuration's GEMM without"
                   " the derivative")
    p.add_argument("--mosaic", action="store_true", help="also time jax's example Mosaic GPU matmul (Hopper)")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    opts = p.parse_args(argv)
    try:
        shapes, tiles = parse_shapes(opts.shapes), parse_tiles(opts.tiles)
    except ValueError as err:
        p.error(str(err))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results = []
    for rows, width, hidden in shapes:
        results += run_shape(rows, width, hidden, tiles, opts.iters, jnp.dtype(opts.dtype), opts.gemm_alone,
                             opts.mosaic)
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
