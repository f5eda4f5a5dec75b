"""Analytic FLOP counts of the DiT and of one training step, for throughput and MFU figures.

Counting rules
--------------
- Only matrix products are counted, each as ``2 * m * n * k`` (one multiply and one add per
  term). Elementwise work (LayerNorm, modulation, softmax, GELU, residual sums, biases, the
  optimiser update, the EMA) is left out: it is small next to the matmuls and is not what a
  matmul-rate denominator measures. XLA's own count (``compiled.cost_analysis()['flops']``)
  includes it, so it comes out somewhat higher.
- One DiT forward over ``B`` examples of ``T`` tokens, width ``D``, MLP hidden ``M``, patch
  ``p``, ``C`` input and output channels, ``F = 256`` sinusoid frequencies:

  ===========================  ==========================================
  patch embedding              ``2 B T (p^2 C) D``
  per block: adaLN modulation  ``2 B D 6D``  (on the conditioning vector: once per example)
  per block: qkv projection    ``2 B T D 3D``
  per block: scores ``QK^T``   ``2 B T T D``  (summed over heads: ``h * head_dim = D``)
  per block: ``softmax V``     ``2 B T T D``
  per block: out projection    ``2 B T D D``
  per block: MLP               ``2 B T D M * 2``
  final layer                  ``2 B D 2D`` (adaLN) ``+ 2 B T D (p^2 C)``
  t and level embedders        ``2 * 2 B (F D + D D)``
  ===========================  ==========================================

  The label embedding is a table lookup (no FLOPs). The head count does not change the total.
- One training step counts useful work only: the student's forward and backward over the whole
  batch, ``3 x forward(B)`` (the backward pass costs two forwards: gradients with respect to the
  activations and to the weights), plus for the shortcut objective the teacher's two forward
  passes over the ``n_sc = round(B * sc_fraction)`` self-consistency rows; bootstrap CFG adds a
  null-class pass to each half step for the rows of the smallest level, ``n_sc // num_levels``
  rows under the official assignment. Activations recomputed by
  rematerialisation are not counted, so the resulting utilisation is model-FLOP utilisation.

``traced_matmul_flops`` counts the same way on a traced program instead of a formula: every
``dot_general`` and convolution in its jaxpr, so it follows the code as written (what the
backward pass really computes, rematerialised passes included). Matmuls inside a library call
(the cuDNN attention kernel) are invisible to it.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jax_core

from shortcut_jax import config_lib
from shortcut_jax.objectives.shortcut import num_sc_rows

# Sinusoid size of the t and level embedders (layers.TimestepEmbedder's default).
FREQUENCY_DIM = 256


def dense_flops(rows: int, fan_in: int, fan_out: int) -> float:
    """A ``[rows, fan_in] @ [fan_in, fan_out]`` product."""
    return 2.0 * rows * fan_in * fan_out


def dit_forward_flops(
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    tokens: int,
    in_channels: int,
    patch: int,
    batch: int,
    *,
    out_channels: int | None = None,
    frequency_dim: int = FREQUENCY_DIM,
) -> float:
    """Matmul FLOPs of one DiT forward pass over ``batch`` examples of ``tokens`` tokens each."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    out_channels = in_channels if out_channels is None else out_channels
    d = width
    hidden = int(d * mlp_ratio)
    rows = batch * tokens  # token rows

    embed = dense_flops(rows, patch * patch * in_channels, d)
    embed += 2 * (dense_flops(batch, frequency_dim, d) + dense_flops(batch, d, d))  # t and level

    block = (
        dense_flops(batch, d, 6 * d)  # adaLN
        + dense_flops(rows, d, 3 * d)  # qkv
        + 2 * (2.0 * batch * tokens * tokens * d)  # QK^T and softmax @ V
        + dense_flops(rows, d, d)  # output projection
        + dense_flops(rows, d, hidden)
        + dense_flops(rows, hidden, d)  # MLP
    )
    final = dense_flops(batch, d, 2 * d) + dense_flops(rows, d, patch * patch * out_channels)
    return embed + depth * block + final


def dit_dims(model_cfg, shape: tuple[int, ...]) -> dict:
    """Keyword arguments of ``dit_forward_flops`` (all but ``batch``) for ``config.model`` and an
    example shape ``(H, W, C)``."""
    width, depth, heads = config_lib.model_dims(model_cfg)
    height, width_px, channels = shape
    p = model_cfg.patch_size
    return dict(
        width=width,
        depth=depth,
        heads=heads,
        mlp_ratio=model_cfg.mlp_ratio,
        tokens=(height // p) * (width_px // p),
        in_channels=channels,
        patch=p,
    )


def train_step_flops(
    objective: str, batch: int, *, sc_fraction: float = 0.125, bootstrap_cfg: bool = False, num_levels: int = 7, **dims
) -> float:
    """Useful matmul FLOPs of one optimiser step; ``dims`` as ``dit_dims`` returns them."""
    total = 3 * dit_forward_flops(batch=batch, **dims)
    if objective == "shortcut":
        n_sc = num_sc_rows(batch, sc_fraction)
        total += 2 * dit_forward_flops(batch=n_sc, **dims)
        if bootstrap_cfg and n_sc // num_levels:
            total += 2 * dit_forward_flops(batch=n_sc // num_levels, **dims)
    elif objective in ("meanflow", "meanflow_v"):
        # the jvp's tangent pass (about one forward); its output is under stop_gradient, so the
        # backward pass is the primal's; improved MeanFlow adds the no-gradient pass giving its tangent
        total += dit_forward_flops(batch=batch, **dims)
        if objective == "meanflow_v":
            total += dit_forward_flops(batch=batch, **dims)
    elif objective != "flow_matching":
        raise ValueError(f"no FLOP count for objective {objective!r}")
    return total


def traced_matmul_flops(fn, *args) -> float:
    """FLOPs of the matrix products in ``fn``'s jaxpr at ``args`` (arrays or ShapeDtypeStructs)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
            total += 2.0 * math.prod(lhs) * rhs_free
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            # each output element takes one multiply-add per kernel element of its output feature
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
        inner = [_jaxpr_flops(j) for value in eqn.params.values() for j in _jaxprs_in(value)]
        if name == "cond":  # one branch runs
            total += max(inner, default=0.0)
        else:  # a while loop's body is counted once: its trip count is not known from the trace
            total += eqn.params.get("length", 1) * sum(inner) if name == "scan" else sum(inner)
    return total


def _jaxprs_in(value) -> list:
    if isinstance(value, jax_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _jaxprs_in(v)]
    return []
