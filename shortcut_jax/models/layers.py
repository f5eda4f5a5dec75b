"""Building blocks shared by the DiT and the MLP network.

Precision policy, applied here once so that both networks follow it:
- parameters are created in float32 (``param_dtype``);
- matrix work (Dense, Conv, attention products) runs in ``dtype`` (bf16 on accelerators);
- LayerNorm statistics, the modulation that follows it, softmax and the sinusoidal
  embeddings (and GELU, through ``gelu_tanh``) are computed in float32 and cast to ``dtype``
  only when they feed a matmul;
- optionally, the DiT's large dense layers multiply in FP8 (``fp8.py``; ``Mlp(fp8_form=...)``);
- q, k and v as three GEMMs over one kernel (``SplitDense``, ``model.qkv_gemms=3``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from shortcut_jax.models import fp8

Dtype = Any


def xavier_uniform_fan(fan_in: int, fan_out: int) -> Callable:
    """Glorot-uniform with explicit fans.

    ``jax.nn.initializers.xavier_uniform`` multiplies both fans by the receptive field of a
    conv kernel; the reference network counts the receptive field only in fan-in (the patch
    embedding is a linear map of a flattened patch), so the fans are passed explicitly.
    """

    def init(key, shape, dtype=jnp.float32):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def xavier_uniform() -> Callable:
    """Glorot-uniform for a 2-D ``[in, out]`` kernel."""

    def init(key, shape, dtype=jnp.float32):
        return xavier_uniform_fan(shape[0], shape[-1])(key, shape, dtype)

    return init


def xavier_uniform_stacked(parts: int) -> Callable:
    """Glorot-uniform for ``parts`` projections fused into one ``[in, parts * out]`` kernel.

    Each part gets the distribution it would have as a separate ``[in, out]`` Dense, so fusing
    q, k and v into one matmul does not change the initial network.
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in, total = shape
        out = total // parts
        keys = jax.random.split(key, parts)
        return jnp.concatenate([xavier_uniform_fan(fan_in, out)(k, (fan_in, out), dtype) for k in keys], axis=-1)

    return init


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without scale or bias, statistics in float32; returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Adaptive-norm modulation; ``shift``/``scale`` are per example ``[batch, width]``."""
    # x: [batch, tokens, width] or [batch, width]
    expand = (slice(None),) + (None,) * (x.ndim - 2)
    return x * (1.0 + scale[expand]) + shift[expand]


# Hand-written backward passes for the two memory-bound ops of every block ('lean' ops).
# Autodiff of the plain expressions above keeps (or recomputes) more than it needs: XLA saves
# GELU's tanh beside its output, and LayerNorm's scale gradient (a sum over tokens) cannot share
# a kernel with the row statistics it depends on, so a float32 token-sized product is written and
# read back. These versions keep only their inputs (plus LayerNorm's per-token mean and inverse
# standard deviation) and compute the same values; tests compare both against the plain ones.


def _expand(v: jax.Array, ndim: int) -> jax.Array:
    """``[batch, width]`` -> ``[batch, 1, ..., width]`` for an ``ndim``-dimensional input."""
    return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def _norm_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)


def _norm_apply(x, mean, rstd, shift, scale, out_dtype):
    out = (x.astype(jnp.float32) - mean) * rstd * (1.0 + _expand(scale, x.ndim)) + _expand(shift, x.ndim)
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm_modulate(
    x: jax.Array, shift: jax.Array, scale: jax.Array, out_dtype: Dtype = jnp.float32, eps: float = 1e-6
) -> jax.Array:
    """``modulate(layer_norm(x), shift, scale)`` in float32, cast to ``out_dtype``."""
    return _norm_apply(x, *_norm_stats(x, eps), shift, scale, out_dtype)


def _norm_modulate_fwd(x, shift, scale, out_dtype, eps):
    # The barrier makes the statistics a stored [batch, tokens] result: left to itself XLA
    # recomputes them inside the backward kernels, and a kernel that reduces rows cannot also
    # reduce over tokens, so the scale gradient's product went through memory in float32.
    mean, rstd = jax.lax.optimization_barrier(_norm_stats(x, eps))
    return _norm_apply(x, mean, rstd, shift, scale, out_dtype), (x, mean, rstd, shift, scale)


def _norm_modulate_bwd(out_dtype, eps, residuals, g):
    x, mean, rstd, shift, scale = residuals
    g = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    tokens = tuple(range(1, x.ndim - 1))  # the per-example modulation is shared by these axes
    d_shift = jnp.sum(g, axis=tokens) if tokens else g
    d_scale = jnp.sum(g * xhat, axis=tokens) if tokens else g * xhat
    gx = g * (1.0 + _expand(scale, x.ndim))  # gradient of the normalised x
    dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True) - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_shift.astype(shift.dtype), d_scale.astype(scale.dtype)


norm_modulate.defvjp(_norm_modulate_fwd, _norm_modulate_bwd)

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """``nn.gelu(x, approximate=True)`` computed in float32, returned in ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jnp.tanh(_GELU_C * (xf + _GELU_A * xf * xf * xf)))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu_tanh(x), x


def gelu_tanh_slope(x: jax.Array, tanh: Callable = jnp.tanh) -> jax.Array:
    """d/dx of the tanh-approximated GELU for float32 ``x`` (``tanh``: another implementation of
    it, e.g. a kernel's approximate instruction)."""
    x2 = x * x
    t = tanh(_GELU_C * x * (1.0 + _GELU_A * x2))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x2)


def _gelu_bwd(x, g):
    return ((g.astype(jnp.float32) * gelu_tanh_slope(x.astype(jnp.float32))).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def gated_add_plain(x, gate, branch):
    """``x + gate * branch`` as the plain expression (autodiff's stored values)."""
    return x + (_expand(gate, branch.ndim) * branch.astype(jnp.float32)).astype(x.dtype)


@jax.custom_vjp
def gated_add(x: jax.Array, gate: jax.Array, branch: jax.Array) -> jax.Array:
    """``x + gate * branch``: a block's gated residual update, the product in float32 and the sum
    in ``x``'s dtype (``gate``: ``[batch, width]``, shared by the tokens of ``branch``).

    Autodiff of this expression keeps ``branch`` converted to float32 for the gate's gradient:
    a token-sized float32 tensor per update (two per DiT block). This version keeps ``branch`` as
    it came (the bf16 output of the layer before, on accelerators) and converts it again in the
    backward pass; the values are those of the plain expression."""
    return gated_add_plain(x, gate, branch)


def _gated_add_fwd(x, gate, branch):
    return gated_add_plain(x, gate, branch), (gate, branch)


def _gated_add_bwd(residuals, g):
    gate, branch = residuals
    gf = g.astype(jnp.float32)
    tokens = tuple(range(1, branch.ndim - 1))
    d_gate = jnp.sum(gf * branch.astype(jnp.float32), axis=tokens) if tokens else gf * branch.astype(jnp.float32)
    d_branch = gf * _expand(gate, branch.ndim)
    return g, d_gate.astype(gate.dtype), d_branch.astype(branch.dtype)


gated_add.defvjp(_gated_add_fwd, _gated_add_bwd)


def sinusoidal_embedding(values: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """[cos, sin] of ``values`` times geometric frequencies ``exp(-ln(max_period) i / (dim/2))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = values.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d_positions(width: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table, ``[grid_size**2, width]``, float32.

    Tokens are in row-major order (row i, column j -> index i * grid + j). The first half of
    the channels encodes the column index and the second half the row index, each as
    [sin, cos] with frequencies ``10000^(-2k / (width/2))``: the convention of the reference
    network (MAE's table), which a converted checkpoint relies on.
    """
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for the 2-D sin-cos table")

    def one_axis(pos: np.ndarray, dim: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([one_axis(cols, width // 2), one_axis(rows, width // 2)], axis=1)
    return table.astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid (float32) -> Dense -> SiLU -> Dense."""

    width: int
    input_scale: float = 1.0
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, values: jax.Array) -> jax.Array:
        emb = sinusoidal_embedding(values * self.input_scale, self.frequency_dim)
        init = nn.initializers.normal(0.02)
        emb = nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="hidden")(emb.astype(self.dtype))
        emb = nn.silu(emb)
        return nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="out")(emb)


def guidance_embedding(width: int, guidance, batch: int, dtype, *, interval: bool = False) -> jax.Array:
    """The embedding of a per-row guidance scale (a conditioning input, as improved MeanFlow
    uses it); ``guidance`` None stands for scale 1 (no guidance). ``interval``: the network also
    reads the guidance interval, the papers' ``t`` range where the scale applies, and ``guidance``
    is ``[B, 3]`` (scale, interval start, interval end; None: ``(1, 0, 1)``), each column embedded
    on its own and the three summed."""
    columns = 3 if interval else 1
    if guidance is None:
        guidance = jnp.array([1.0, 0.0, 1.0][:columns], jnp.float32)
    guidance = jnp.asarray(guidance, jnp.float32)
    if interval:
        guidance = jnp.broadcast_to(guidance, (batch, 3))
        return (
            TimestepEmbedder(width, 1.0, dtype=dtype, name="guidance_embed")(guidance[:, 0])
            + TimestepEmbedder(width, 1.0, dtype=dtype, name="guidance_start_embed")(guidance[:, 1])
            + TimestepEmbedder(width, 1.0, dtype=dtype, name="guidance_end_embed")(guidance[:, 2])
        )
    guidance = jnp.broadcast_to(guidance.reshape(-1) if guidance.ndim else guidance, (batch,))
    return TimestepEmbedder(width, 1.0, dtype=dtype, name="guidance_embed")(guidance)


class SplitDense(nn.Module):
    """``nn.Dense(parts * features)`` computed as ``parts`` GEMMs over column slices of its one
    kernel, returning the parts separately: the same parameters (``kernel [in, parts *
    features]``, ``bias``, float32, the same names) and the same function (values equal to
    rounding; with bf16 outputs the parts' input gradients are rounded before their sum, where
    the fused GEMM rounds once).

    For q, k and v (``model.qkv_gemms=3``): one GEMM writes ``[..., 3 * width]`` whose thirds the
    attention kernel needs as separate arrays, so XLA copies them out (and concatenates their
    gradients in the backward pass); three GEMMs each write their own contiguous part, and each
    part's gradient feeds its own two GEMMs."""

    features: int  # per part
    parts: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.parts * self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.parts * self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)  # as nn.Dense does
        outs = []
        for i in range(self.parts):
            part = slice(i * self.features, (i + 1) * self.features)
            y = jax.lax.dot_general(x, kernel[:, part], (((x.ndim - 1,), (0,)), ((), ())))
            outs.append(y + bias[part])
        return tuple(outs)


class Mlp(nn.Module):
    """Transformer feed-forward block (tanh-approximated GELU, as the reference network)."""

    hidden: int
    dtype: Dtype = jnp.float32
    lean_gelu: bool = False  # gelu_tanh (float32, backward keeps only its input) instead of nn.gelu
    fp8_form: Optional[str] = None  # None: matmuls in ``dtype``; else FP8 in that form (fp8.FORMS)
    fp8_amax_history: int = 0  # FP8 scaling: 0 current, N delayed over N steps (fp8.py)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        kw = dict(kernel_init=xavier_uniform(), dtype=self.dtype, fp8_form=self.fp8_form)
        x = fp8.dense(self.hidden, amax_history=self.fp8_amax_history, name="fc1", **kw)(x)
        x = gelu_tanh(x) if self.lean_gelu else nn.gelu(x, approximate=True)
        return fp8.dense(width, amax_history=self.fp8_amax_history, name="fc2", **kw)(x)
