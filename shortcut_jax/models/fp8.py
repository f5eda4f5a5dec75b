"""FP8 matmuls for the DiT's large dense layers (``model.matmul_precision='fp8'``).

Hopper-class GPUs multiply FP8 matrices at up to twice the bf16 rate. A layer here computes
``x @ kernel`` with both operands quantized to ``float8_e4m3fn`` and, in the backward pass, the
incoming gradient quantized to ``float8_e5m2`` (more range, less precision: gradients span more
orders of magnitude than activations and weights), so that all three GEMMs of a dense layer
(forward, input gradient, kernel gradient) run in FP8:

    y  = (Q4(x) @ Q4(W))    * s_x * s_W          forward, e4m3 x e4m3
    dx = (Q5(g) @ Q4(W)^T)  * s_g * s_W          e5m2 x e4m3
    dW = (Q4(x)^T @ Q5(g))  * s_x * s_g          e4m3 x e5m2

with per-tensor *current* scaling by default: ``s = amax(|t|) / max(format)`` of the tensor being
quantized, computed in the same step (no amax history, no state in the train state or the
checkpoint; delayed scaling, below, keeps one), and
``Q(t) = round(clip(t / s, -max, max))`` to the format. The scales are float32 scalars; the
products are accumulated in float32 by the GEMM and the scales applied to its output in float32.

How the dot is written decides whether XLA's GPU backend emits an FP8 GEMM at all: its GEMM
rewriter turns a dot into the cuBLASLt FP8 call (``__cublas$lt$matmul$f8``) only when each operand
is FP8 itself, or an FP8 array converted to a wider type and multiplied by a broadcast scalar (a
"scaled FP8 dot", optionally through reshapes and transposes), and it turns an FP8 dot it cannot
map into an f16 GEMM without an error; a quantize-dequantize round trip into bf16 feeding a bf16
dot stayed a bf16 GEMM in a probe on an H200 (jax 0.11.2). Two forms are written here (``FORMS``)
so that one GPU run can compare them:

- ``'direct'``: ``dot_general`` on the FP8 arrays with ``preferred_element_type`` the compute dtype
  (bf16 on GPUs), the scales multiplied into the output afterwards (fused by XLA with the bias
  add that follows every dense layer);
- ``'dequant'``: the scaled-FP8-dot pattern XLA documents: ``convert(q) * s`` in float32 for each
  operand feeding a float32 dot, which the rewriter folds into the FP8 call with the scales as
  its operand scales; its output is float32 (cuBLASLt writes twice the bytes of a bf16 output).

cuBLASLt's FP8 kernels want the first operand row-major and the second column-major ("TN") and
every non-batch dimension a multiple of 16; XLA inserts the transposes (in FP8, one byte per
element) and pads other sizes itself. ``benchmarks/fp8_check.py`` counts the GEMM kinds of a
compiled step, since a pattern that does not match falls back silently.

Delayed scaling (``model.fp8_amax_history = N > 0``). With current scaling the amax of an
activation is a reduction over the whole tensor that must finish before its quantization starts,
so the producer (LayerNorm-modulate, GELU, attention) writes the bf16 tensor, one pass reads it
for the amax and another reads it again to write the FP8 copy. With delayed scaling the scale of
the layer's input and of its incoming gradient come from the largest amax of the last ``N``
steps, known before the step runs: the quantization is an elementwise function of the producer's
output and the amax that feeds the history is a reduction beside it, so both can fuse into the
producer's kernel, which then writes one byte per element instead of two, read once. The kernel
keeps its current scale (a parameter, small beside the activations).

The history is a parameter of the layer, ``amax_history [N, 2]`` (column 0 the input's amax,
column 1 the incoming gradient's, newest first, float32), so it is saved, restored, sharded and
read at sampling time like every other weight; the EMA trees get a copy of it, not an average
(``histories_from``). It is not trained: the layer's backward pass returns as the history's
"gradient" a tensor whose first row holds this step's two amaxes (zeros elsewhere), and the train
step takes it out of the gradient before the optimiser sees it (``split_observations``) and
writes the history itself (``record_observations``): the rows move down by one and the new
amaxes enter at the top. A layer
called twice with gradient in one step returns the sum of its calls' amaxes, an upper bound of
their maximum (no value is clipped on that account; the methods here differentiate one call per
step); calls without gradient (teacher passes, sampling) record nothing. A history of zeros (the
first step) gives scale 1, as in Transformer Engine; the true amaxes enter the history from that
step on.

On CPU, XLA computes FP8 dots by converting the operands to a wider type: the values are the
FP8 model's, the speed is not, which is what lets the tests run there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

FORWARD_FORMAT = jnp.float8_e4m3fn  # activations and kernels: 3 mantissa bits, max 448
GRADIENT_FORMAT = jnp.float8_e5m2  # incoming gradients: 2 mantissa bits, max 57344
FORMS = ("direct", "dequant")
HISTORY = "amax_history"  # the parameter of an FP8 layer under delayed scaling: [N, 2]


def format_max(fmt) -> float:
    return float(jnp.finfo(fmt).max)


def current_scale(x: jax.Array, fmt) -> jax.Array:
    """Per-tensor scale of ``x`` for ``fmt``: ``amax(|x|) / max(fmt)``, float32 scalar.

    An all-zero tensor (e.g. the gradient reaching the blocks while the zero-initialised final
    layer is still zero) gets scale 1, so that quantizing it gives zeros rather than 0/0. A tensor
    holding inf or NaN stays non-finite through the quantization and the GEMM, so the loss or the
    update turns non-finite and training stops on it as it would without FP8.

    On a mesh, the amax of a sharded tensor is a global reduction: one scalar all-reduce per
    quantized tensor."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.where(amax > 0, amax / format_max(fmt), jnp.float32(1.0))


def history_scale(history: jax.Array, fmt) -> jax.Array:
    """Delayed scale for ``fmt``: the largest amax of ``history`` (``[N]``) over ``max(fmt)``; 1 for
    a history of zeros (the first step), as ``current_scale`` gives for a zero tensor."""
    amax = jnp.max(history).astype(jnp.float32)
    return jnp.where(amax > 0, amax / format_max(fmt), jnp.float32(1.0))


def quantize(x: jax.Array, scale: jax.Array, fmt) -> jax.Array:
    """``x / scale`` clipped to the format's finite range (float8_e4m3fn has no infinity: an
    overflow would become NaN) and rounded to nearest-even in ``fmt``."""
    limit = format_max(fmt)
    return jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(fmt)


def scaled_dot(
    a_q: jax.Array,
    a_scale: jax.Array,
    b_q: jax.Array,
    b_scale: jax.Array,
    contracting: tuple,
    out_dtype: Dtype,
    form: str,
) -> jax.Array:
    """``(a_q * a_scale) . (b_q * b_scale)`` contracted over ``contracting``
    (``((a_dims), (b_dims))``), float32, written in the form ``form`` (module docstring)."""
    dims = (contracting, ((), ()))
    if form == "direct":
        out = jax.lax.dot_general(a_q, b_q, dims, preferred_element_type=out_dtype)
        return out.astype(jnp.float32) * (a_scale * b_scale)
    if form == "dequant":
        a = a_q.astype(jnp.float32) * a_scale
        b = b_q.astype(jnp.float32) * b_scale
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    raise ValueError(f"FP8 dot form must be one of {FORMS}, got {form!r}")


def fp8_matmul(x: jax.Array, kernel: jax.Array, *, out_dtype: Dtype = jnp.bfloat16, form: str = "direct") -> jax.Array:
    """``x @ kernel`` for ``x [M, K]``, ``kernel [K, N]`` through FP8 GEMMs; float32 ``[M, N]``.

    ``out_dtype`` is what the forward GEMM and the input-gradient GEMM write (the compute dtype;
    the kernel-gradient GEMM writes float32). Gradients come back in the dtypes of ``x`` and
    ``kernel``."""
    if form not in FORMS:
        raise ValueError(f"FP8 dot form must be one of {FORMS}, got {form!r}")
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"fp8_matmul needs x [M, K] and kernel [K, N], got {x.shape} and {kernel.shape}")
    return _fp8_matmul(x, kernel, jnp.dtype(x.dtype), jnp.dtype(kernel.dtype), jnp.dtype(out_dtype), form)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fp8_matmul(x, kernel, x_dtype, kernel_dtype, out_dtype, form):
    return _fp8_matmul_fwd(x, kernel, x_dtype, kernel_dtype, out_dtype, form)[0]


def _fp8_matmul_fwd(x, kernel, x_dtype, kernel_dtype, out_dtype, form):
    x_scale, w_scale = current_scale(x, FORWARD_FORMAT), current_scale(kernel, FORWARD_FORMAT)
    x_q, w_q = quantize(x, x_scale, FORWARD_FORMAT), quantize(kernel, w_scale, FORWARD_FORMAT)
    y = scaled_dot(x_q, x_scale, w_q, w_scale, ((1,), (0,)), out_dtype, form)  # [M, N]
    # The backward pass reads the quantized operands (one byte per element, half of bf16) and
    # their scales: what the forward GEMM saw, so the three GEMMs use the same x and W.
    return y, (x_q, x_scale, w_q, w_scale)


def _fp8_matmul_bwd(x_dtype, kernel_dtype, out_dtype, form, residuals, g):
    x_q, x_scale, w_q, w_scale = residuals
    g_scale = current_scale(g, GRADIENT_FORMAT)
    g_q = quantize(g, g_scale, GRADIENT_FORMAT)  # [M, N]
    dx = scaled_dot(g_q, g_scale, w_q, w_scale, ((1,), (1,)), out_dtype, form)  # [M, K]
    # [K, N]: a sum over all M rows, small; written in float32 whatever the compute dtype
    dw = scaled_dot(x_q, x_scale, g_q, g_scale, ((0,), (0,)), jnp.float32, form)
    return dx.astype(x_dtype), dw.astype(kernel_dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul_delayed(
    x: jax.Array, kernel: jax.Array, history: jax.Array, *, out_dtype: Dtype = jnp.bfloat16, form: str = "direct"
) -> jax.Array:
    """``fp8_matmul`` with the input's and the incoming gradient's scales taken from ``history``
    (``[N, 2]``, module docstring); the history's cotangent is ``[N, 2]`` zeros whose first row
    holds the amaxes this call saw (input, incoming gradient)."""
    if form not in FORMS:
        raise ValueError(f"FP8 dot form must be one of {FORMS}, got {form!r}")
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"fp8_matmul needs x [M, K] and kernel [K, N], got {x.shape} and {kernel.shape}")
    if history.ndim != 2 or history.shape[1] != 2 or history.shape[0] < 1:
        raise ValueError(f"an FP8 amax history is [N, 2] with N >= 1, got {history.shape}")
    return _fp8_matmul_delayed(
        x, kernel, history, jnp.dtype(x.dtype), jnp.dtype(kernel.dtype), jnp.dtype(out_dtype), form
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_matmul_delayed(x, kernel, history, x_dtype, kernel_dtype, out_dtype, form):
    return _fp8_matmul_delayed_fwd(x, kernel, history, x_dtype, kernel_dtype, out_dtype, form)[0]


def _fp8_matmul_delayed_fwd(x, kernel, history, x_dtype, kernel_dtype, out_dtype, form):
    history = history.astype(jnp.float32)
    x_scale, w_scale = history_scale(history[:, 0], FORWARD_FORMAT), current_scale(kernel, FORWARD_FORMAT)
    x_q, w_q = quantize(x, x_scale, FORWARD_FORMAT), quantize(kernel, w_scale, FORWARD_FORMAT)
    x_amax = jnp.max(jnp.abs(x)).astype(jnp.float32)  # this step's observation, beside the quantization
    y = scaled_dot(x_q, x_scale, w_q, w_scale, ((1,), (0,)), out_dtype, form)
    return y, (x_q, x_scale, w_q, w_scale, x_amax, history)


def _fp8_matmul_delayed_bwd(x_dtype, kernel_dtype, out_dtype, form, residuals, g):
    x_q, x_scale, w_q, w_scale, x_amax, history = residuals
    g_scale = history_scale(history[:, 1], GRADIENT_FORMAT)
    g_q = quantize(g, g_scale, GRADIENT_FORMAT)
    g_amax = jnp.max(jnp.abs(g)).astype(jnp.float32)
    dx = scaled_dot(g_q, g_scale, w_q, w_scale, ((1,), (1,)), out_dtype, form)
    dw = scaled_dot(x_q, x_scale, g_q, g_scale, ((0,), (0,)), jnp.float32, form)
    observed = jnp.zeros_like(history).at[0].set(jnp.stack([x_amax, g_amax]))
    return dx.astype(x_dtype), dw.astype(kernel_dtype), observed


_fp8_matmul_delayed.defvjp(_fp8_matmul_delayed_fwd, _fp8_matmul_delayed_bwd)


def _is_history(path) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", None) == HISTORY


def split_observations(grads):
    """``(grads, observations)``: the gradient tree with every amax history's entry set to zeros
    (what the optimiser, the gradient norm and clipping see), and a tree of the same structure
    holding the histories' entries (this step's amaxes in their first row) and None elsewhere."""
    trained = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if _is_history(p) else g, grads)
    observed = jax.tree_util.tree_map_with_path(lambda p, g: g if _is_history(p) else None, grads)
    return trained, observed


def combine_observations(a, b):
    """Two micro-batches' observations of one update combined: their elementwise maximum."""
    return jax.tree.map(jnp.maximum, a, b)


def record_observations(params, previous, observations):
    """``params`` (the optimiser's result) with every amax history replaced by ``previous``'s
    (the state before the update) moved down one row, this step's amaxes (the first row of
    ``observations``) in its first row; every other leaf as it is. A stacked layer axis
    (``model.scan_blocks``: ``[depth, N, 2]``) moves each layer's history alike."""

    def record(path, new, old, obs):
        if not _is_history(path):
            return new
        shifted = jnp.roll(old, 1, axis=-2)
        return shifted.at[..., 0, :].set(obs[..., 0, :].astype(old.dtype))

    return jax.tree_util.tree_map_with_path(record, params, previous, observations)


def histories_from(tree, source):
    """``tree`` (an EMA tree) with every amax history replaced by ``source``'s (the online
    parameters'): an average of histories would mix in the zeros of the first steps and clip
    the activations of the averaged network, whose values have the online network's range."""
    return jax.tree_util.tree_map_with_path(lambda p, t, s: s if _is_history(p) else t, tree, source)


def without_histories(params):
    """``params`` with the amax histories taken out (``None`` in their place), e.g. for norms."""
    return jax.tree_util.tree_map_with_path(lambda p, v: None if _is_history(p) else v, params)


class Fp8Dense(nn.Module):
    """``nn.Dense`` whose matmul runs in FP8 (``fp8_matmul``); the same parameters (``kernel``
    ``[in, features]`` and ``bias``, float32, same initialisers and names), so a checkpoint moves
    between the bf16 and the FP8 network unchanged, except under delayed scaling
    (``amax_history > 0``), which adds the layer's ``amax_history`` (module docstring;
    ``without_histories`` takes it out again). The bias is added in float32 to the scaled GEMM
    output, then the sum is cast to ``dtype``."""

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype = jnp.bfloat16  # what the GEMMs write and the layer returns
    form: str = "direct"
    amax_history: int = 0  # 0: current scaling; N: delayed scaling over the last N steps' amaxes

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        # [..., in] -> [M, in]: one contracting and one free dimension per operand, the shape
        # cuBLASLt's FP8 GEMM takes without batch dimensions
        x2 = x.reshape(-1, x.shape[-1])
        if self.amax_history > 0:
            history = self.param(HISTORY, nn.initializers.zeros, (self.amax_history, 2), jnp.float32)
            y = fp8_matmul_delayed(x2, kernel, history, out_dtype=self.dtype, form=self.form)
        else:
            y = fp8_matmul(x2, kernel, out_dtype=self.dtype, form=self.form)
        return (y + bias).astype(self.dtype).reshape(*x.shape[:-1], self.features)


def dense(
    features: int, *, kernel_init: Callable, dtype: Dtype, fp8_form: Optional[str], name: str, amax_history: int = 0
) -> nn.Module:
    """A dense layer in the compute dtype (``fp8_form=None``) or in FP8 with that dot form, current
    scaling (``amax_history=0``) or delayed over that many steps."""
    if fp8_form is None:
        return nn.Dense(features, kernel_init=kernel_init, dtype=dtype, name=name)
    return Fp8Dense(features, kernel_init=kernel_init, dtype=dtype, form=fp8_form, amax_history=amax_history, name=name)
