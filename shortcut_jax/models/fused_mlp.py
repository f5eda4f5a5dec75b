"""The MLP's second half, GELU then ``fc2``, with its input gradient computed by one fused kernel.

Autodiff of ``gelu(h) @ w + b`` computes the input gradient in two passes over the
``[tokens, hidden]`` activations: a GEMM writes ``dy @ w.T``, then an elementwise kernel reads it
back with ``h`` and writes ``(dy @ w.T) * gelu'(h)``. At DiT-B/2, batch 256, each such tensor is
400 MB per block. ``gelu_linear`` computes the same function with a hand-written backward pass
whose input gradient is one GEMM (Pallas, Triton backend) that multiplies by GELU's derivative
before it stores: ``h`` is read once and the product never goes through memory. The forward
pass, the weight gradient and the bias gradient stay XLA's (cuBLAS on GPU).

On CPU the kernel runs in Pallas' interpreter, so tests compare it with autodiff of the plain
expression. The kernel is not partitioned across devices (``config_lib.validate`` keeps
``model.mlp_impl='pallas'`` to one-device meshes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax.models import layers


class TileConfig(NamedTuple):
    """Tiles of the input-gradient GEMM ``[rows, hidden] = [rows, width] @ [width, hidden]``."""

    rows: int = 128  # output rows (tokens) per program
    cols: int = 128  # output columns (hidden units) per program
    depth: int = 64  # slice of the width summed per loop step
    num_warps: int = 8
    num_stages: int = 3
    fast_tanh: int = 0  # 1: the derivative's tanh by the GPU's approximate instruction (tanh.approx.f32)


DEFAULT_TILES = TileConfig()


def parse_tiles(spec: str) -> TileConfig:
    """``model.mlp_tiles``: '' (DEFAULT_TILES) or 'rows,cols,depth,num_warps,num_stages[,fast_tanh]'."""
    if not spec:
        return DEFAULT_TILES
    parts = spec.split(",")
    if len(parts) not in (5, 6) or not all(p.strip().isdigit() and int(p) > 0 for p in parts[:5]) or (
            len(parts) == 6 and parts[5].strip() not in ("0", "1")):
        raise ValueError(f"mlp_tiles={spec!r}: write five positive integers rows,cols,depth,num_warps,num_stages"
                         " and optionally fast_tanh 0 or 1 (e.g. '128,128,64,8,3') or '' for the default")
    tiles = TileConfig(*(int(p) for p in parts))
    if any(v < 16 or v & (v - 1) for v in tiles[:3]):
        raise ValueError(f"mlp_tiles={spec!r}: rows, cols and depth must be powers of two >= 16")
    return tiles


def _gelu_slope(x, tanh=jnp.tanh):
    """d/dx of the tanh-approximated GELU, float32 (the same expression as ``layers``)."""
    x2 = x * x
    t = tanh(layers._GELU_C * x * (1.0 + layers._GELU_A * x2))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * layers._GELU_C * (1.0 + 3.0 * layers._GELU_A * x2)


def _fit(size: int, preferred: int) -> int | None:
    """The largest power of two <= ``preferred`` and >= 16 that divides ``size``."""
    tile = preferred
    while tile >= 16:
        if size % tile == 0:
            return tile
        tile //= 2
    return None


def fits(rows: int, width: int, hidden: int, tiles: TileConfig = DEFAULT_TILES) -> bool:
    """Whether the kernel tiles these shapes (else ``gelu_linear`` falls back to XLA's passes)."""
    return None not in (_fit(rows, tiles.rows), _fit(hidden, tiles.cols), _fit(width, tiles.depth))


def gelu_grad_matmul(dy: jax.Array, w: jax.Array, h: jax.Array, tiles: TileConfig = DEFAULT_TILES,
                     interpret: bool | None = None, derivative: bool = True) -> jax.Array:
    """``(dy @ w.T) * gelu'(h)`` in one kernel, accumulated in float32, returned in ``h``'s dtype.

    dy: ``[rows, width]``; w: ``[hidden, width]`` (fc2's kernel); h: ``[rows, hidden]``.
    ``derivative=False`` stores ``dy @ w.T`` alone (the GEMM's own speed, for the benchmark).
    """
    from jax.experimental import pallas as pl

    rows, width = dy.shape
    hidden = w.shape[0]
    if w.shape != (hidden, width) or h.shape != (rows, hidden):
        raise ValueError(f"gelu_grad_matmul: shapes dy{dy.shape}, w{w.shape}, h{h.shape} do not chain")
    bm, bn, bk = _fit(rows, tiles.rows), _fit(hidden, tiles.cols), _fit(width, tiles.depth)
    if None in (bm, bn, bk):
        raise ValueError(f"gelu_grad_matmul: rows={rows}, hidden={hidden}, width={width} need a power-of-two"
                         " tile of at least 16 dividing each; check fits() first")
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda")
    steps = width // bk
    tanh = jnp.tanh
    if tiles.fast_tanh and not interpret:
        from jax.experimental.pallas import triton as pl_triton

        tanh = pl_triton.approx_tanh
    w_t = w.T  # [width, hidden]: the usual row-major right operand (a few MB, transposed by XLA)

    def kernel(dy_ref, w_ref, h_ref, out_ref):
        # axis 0 walks the hidden columns fastest, so the programs that run together share
        # their dy rows in L2; fc2's kernel (hidden x width) stays in L2 throughout
        row_block = pl.ds(pl.program_id(1) * bm, bm)
        col_block = pl.ds(pl.program_id(0) * bn, bn)

        def body(step, acc):
            depth = pl.ds(pl.multiple_of(step * bk, bk), bk)
            a = dy_ref[row_block, depth]
            b = w_ref[depth, col_block]
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
        if derivative:
            acc = acc * _gelu_slope(h_ref[row_block, col_block].astype(jnp.float32), tanh)
        out_ref[row_block, col_block] = acc.astype(out_ref.dtype)

    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, hidden), h.dtype),
        grid=(hidden // bn, rows // bm),
        interpret=interpret,
        name="gelu_grad_matmul",
        **params,
    )(dy, w_t, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gelu_linear(h: jax.Array, w: jax.Array, b: jax.Array, tiles: TileConfig = DEFAULT_TILES) -> jax.Array:
    """``gelu(h) @ w + b`` over the last axis of ``h``: GELU as ``layers.gelu_tanh``, the matmul in
    ``h``'s dtype (float32 accumulation), as flax's ``Dense`` computes it for that dtype."""
    return _forward(h, w, b)[0]


def _forward(h, w, b):
    a = layers.gelu_tanh(h)
    out = jax.lax.dot_general(a, w.astype(a.dtype), (((a.ndim - 1,), (0,)), ((), ())))
    return out + b.astype(out.dtype), a


def _gelu_linear_fwd(h, w, b, tiles):
    out, a = _forward(h, w, b)
    return out, (h, a, w, b)


def _gelu_linear_bwd(tiles, residuals, g):
    h, a, w, b = residuals
    hidden = h.shape[-1]
    width = g.shape[-1]
    g2 = g.reshape(-1, width)
    h2 = h.reshape(-1, hidden)
    w_c = w.astype(h.dtype)
    if fits(h2.shape[0], width, hidden, tiles):
        dh = gelu_grad_matmul(g2.astype(h.dtype), w_c, h2, tiles)
    else:  # the same two passes autodiff would make
        dh = (jnp.dot(g2.astype(h.dtype), w_c.T, preferred_element_type=jnp.float32)
              * _gelu_slope(h2.astype(jnp.float32))).astype(h.dtype)
    a2 = a.reshape(-1, hidden)
    dw = jax.lax.dot_general(a2, g2.astype(a.dtype), (((0,), (0,)), ((), ())))
    db = jnp.sum(g2.astype(jnp.float32), axis=0)
    return dh.reshape(h.shape), dw.astype(w.dtype), db.astype(b.dtype)


gelu_linear.defvjp(_gelu_linear_fwd, _gelu_linear_bwd)


class GeluDense(nn.Module):
    """GELU then a dense layer through ``gelu_linear``: the parameters (``kernel``, ``bias``) and
    the function are those of ``gelu_tanh`` followed by ``nn.Dense(features, dtype=h.dtype)``."""

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    tiles: TileConfig = DEFAULT_TILES

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return gelu_linear(h, kernel, bias, self.tiles)
