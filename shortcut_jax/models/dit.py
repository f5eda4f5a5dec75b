"""Diffusion Transformer conditioned on noise level t, step-size level and class label.

``DiT(x, t, level, label) -> output shaped like x``:
- ``x``: ``[batch, H, W, C]`` images (or latents);
- ``t``: ``[batch]`` float noise level in [0, 1] (0 = noise, 1 = data);
- ``level``: ``[batch]`` integer ``k`` = log2 of the step count (step size ``d = 2^-k``); the
  finest level doubles as the flow-matching level;
- ``label``: ``[batch]`` integer class, ``num_classes`` is the null class (classifier-free
  guidance and unconditional models).

The conditioning vector is ``emb(t) + emb(level) + emb(label)``; every block reads it through
adaptive LayerNorm (shift, scale, gate for attention and for the MLP).

Options that differ between the DiT paper and the shortcut models' reference network
(``attention_scale``, ``t_input_scale``, ``zero_init``) are fields; the presets in
``config_lib`` use the reference network's choices so that its checkpoints and published numbers
carry over, and say so.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax.models import fp8, layers
from shortcut_jax.models.options import DEFAULT_LEAN_OPS, LEAN_OPS, MATMUL_PRECISIONS, QKV_GEMMS  # noqa: F401
from shortcut_jax.models.convert import STACKED_BLOCKS

Dtype = Any


def attention_scale_value(kind: str, head_dim: int) -> float:
    if kind == "head_dim":  # reference shortcut network: logits / head_dim
        return 1.0 / head_dim
    if kind == "sqrt_head_dim":  # standard transformer / DiT paper
        return 1.0 / math.sqrt(head_dim)
    raise ValueError(f"attention_scale must be 'head_dim' or 'sqrt_head_dim', got {kind!r}")


class DiTBlock(nn.Module):
    width: int
    num_heads: int
    mlp_ratio: float
    attention_scale: str
    attention_impl: Optional[str]
    zero_init_adaln: bool
    dtype: Dtype
    lean_ops: tuple = ()
    fp8_form: Optional[str] = None  # None: qkv, proj and the MLP in ``dtype``; else FP8 in that form
    fp8_amax_history: int = 0  # FP8 scaling: 0 current, N delayed over N steps (fp8.py)
    qkv_gemms: int = 1  # QKV_GEMMS: 1 GEMM for q, k and v (split after it) or 3 over one kernel

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        # x: [batch, tokens, width] (compute dtype); cond: [batch, width]
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        adaln_init = nn.initializers.zeros if self.zero_init_adaln else layers.xavier_uniform()
        mod = nn.Dense(6 * width, kernel_init=adaln_init, dtype=self.dtype, name="adaln")(nn.silu(cond))
        mod = mod.astype(jnp.float32)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)

        h = self.norm(x, shift_a, scale_a)
        if self.qkv_gemms == 3:  # the same parameters, each of q, k, v written by its own GEMM
            parts = layers.SplitDense(
                width, 3, kernel_init=layers.xavier_uniform_stacked(3), dtype=self.dtype, name="qkv"
            )(h)
            q, k, v = (part.reshape(batch, tokens, self.num_heads, head_dim) for part in parts)
        else:
            qkv = fp8.dense(
                3 * width,
                kernel_init=layers.xavier_uniform_stacked(3),
                dtype=self.dtype,
                fp8_form=self.fp8_form,
                amax_history=self.fp8_amax_history,
                name="qkv",
            )(h)
            q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.num_heads, head_dim), 3, axis=2)
        attn = jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=attention_scale_value(self.attention_scale, head_dim),
            implementation=self.attention_impl,
        )  # [batch, tokens, heads, head_dim]
        attn = fp8.dense(
            width,
            kernel_init=layers.xavier_uniform(),
            dtype=self.dtype,
            fp8_form=self.fp8_form,
            amax_history=self.fp8_amax_history,
            name="proj",
        )(attn.reshape(batch, tokens, width))
        x = self.gated_add(x, gate_a, attn)

        h = self.norm(x, shift_m, scale_m)
        h = layers.Mlp(
            int(width * self.mlp_ratio),
            dtype=self.dtype,
            lean_gelu="gelu" in self.lean_ops,
            fp8_form=self.fp8_form,
            fp8_amax_history=self.fp8_amax_history,
            name="mlp",
        )(h)
        return self.gated_add(x, gate_m, h)

    def norm(self, x, shift, scale):
        return modulated_norm(x, shift, scale, self.dtype, "norm" in self.lean_ops)

    def gated_add(self, x, gate, branch):
        return (layers.gated_add if "gate" in self.lean_ops else layers.gated_add_plain)(x, gate, branch)


class ScanStep(DiTBlock):
    """One ``DiTBlock`` as the step of a scan: carries the tokens and emits nothing per layer.

    A subclass rather than a wrapper module so that the parameter names inside the stack are the
    block's own (``blocks/qkv/kernel``, not ``blocks/block/qkv/kernel``)."""

    def __call__(self, x: jax.Array, cond: jax.Array):
        return DiTBlock.__call__(self, x, cond), None


def modulated_norm(x, shift, scale, dtype, lean: bool):
    """LayerNorm then the adaptive modulation, in float32, cast to the matmul dtype."""
    if lean:
        return layers.norm_modulate(x, shift, scale, dtype)
    return layers.modulate(layers.layer_norm(x), shift, scale).astype(dtype)


class FinalLayer(nn.Module):
    out_features: int
    dtype: Dtype
    lean_ops: tuple = ()

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        width = x.shape[-1]
        mod = nn.Dense(2 * width, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="adaln")(nn.silu(cond))
        shift, scale = jnp.split(mod.astype(jnp.float32), 2, axis=-1)
        h = modulated_norm(x, shift, scale, self.dtype, "norm" in self.lean_ops)
        return nn.Dense(self.out_features, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="out")(h)


class DiT(nn.Module):
    patch_size: int = 2
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0
    out_channels: Optional[int] = None  # None: same as the input channels
    attention_scale: str = "head_dim"
    attention_impl: Optional[str] = None  # None (XLA picks), 'xla' or 'cudnn'
    t_input_scale: float = 1.0
    zero_init: str = "final"  # 'final' (reference network) or 'adaln' (DiT paper's adaLN-Zero)
    ignore_level: bool = False  # flow matching: the level input is constant, feed zeros
    # a guidance-scale input (improved MeanFlow): ``guidance`` [B] is embedded beside t and level
    guidance_input: bool = False
    # with guidance_input: the guidance interval too, ``guidance`` [B, 3] (scale, start, end)
    guidance_interval_input: bool = False
    remat: str = "none"  # 'none', 'full', 'dots' (save matmul outputs), 'dots_no_batch'
    # how many blocks (the first ones) use `remat`; the rest keep all their activations. -1: all.
    # Fills the memory left over by a policy instead of recomputing in every block.
    remat_blocks: int = -1
    residual_dtype: Dtype = jnp.float32  # the token stream between blocks; LayerNorm always reads it in f32
    # hand-written backward passes of the same function (LEAN_OPS); () for forward-mode autodiff
    # (jax.jvp), which custom backward passes do not support
    lean_ops: tuple = DEFAULT_LEAN_OPS
    matmul_precision: str = "bf16"  # MATMUL_PRECISIONS; 'fp8': the blocks' large dense layers in FP8
    fp8_form: str = "direct"  # how the FP8 dots are written (models.fp8.FORMS), for measurement
    # FP8 scaling: 0 per-tensor scales of the current step; N > 0 delayed scaling, the scales of
    # the last N steps' amaxes kept in each FP8 layer's ``amax_history`` parameter (fp8.py)
    fp8_amax_history: int = 0
    # q, k and v computed by one GEMM and split (1) or by three GEMMs over column slices of the
    # same kernel (3: no split copies nor concatenated gradients); the same parameters and function
    qkv_gemms: int = 1
    # True: the blocks run as one scan over parameters stacked on a leading layer axis
    # (``blocks/...`` of shape [depth, ...]) instead of ``block_0 .. block_{depth-1}``: XLA compiles
    # the block once instead of depth times. The same function; convert.to_layout moves
    # parameters (or a whole train state) between the two layouts.
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, level: jax.Array, label: jax.Array, guidance=None) -> jax.Array:
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        if self.qkv_gemms not in QKV_GEMMS or (self.qkv_gemms == 3 and self.matmul_precision == "fp8"):
            raise ValueError(f"qkv_gemms must be one of {QKV_GEMMS} (3 with bf16 matmuls only), got {self.qkv_gemms!r}")
        batch, height, width_px, channels = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"image size {height}x{width_px} is not divisible by patch_size {p}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        gh, gw = height // p, width_px // p
        if gh != gw:
            raise ValueError(f"DiT expects square inputs, got {height}x{width_px}")
        out_channels = self.out_channels or channels

        patch = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=layers.xavier_uniform_fan(p * p * channels, self.width),
            dtype=self.dtype,
            name="patch_embed",
        )(x.astype(self.dtype))
        tokens = patch.reshape(batch, gh * gw, self.width).astype(jnp.float32)
        tokens = (tokens + layers.sincos_2d_positions(self.width, gh)[None]).astype(self.residual_dtype)
        # The residual stream defaults to float32, which keeps the gated sums of 28 blocks exact;
        # bf16 halves its memory traffic (model.residual_dtype), the statistics stay float32.
        if self.ignore_level:
            level = jnp.zeros_like(level)
        cond = (
            layers.TimestepEmbedder(self.width, self.t_input_scale, dtype=self.dtype, name="t_embed")(t)
            + layers.TimestepEmbedder(self.width, 1.0, dtype=self.dtype, name="level_embed")(level)
            + nn.Embed(
                self.num_classes + 1, self.width, embedding_init=nn.initializers.normal(0.02), name="label_embed"
            )(label).astype(self.dtype)
        ).astype(jnp.float32)
        if self.guidance_input:
            cond = cond + layers.guidance_embedding(
                self.width, guidance, batch, self.dtype, interval=self.guidance_interval_input
            ).astype(jnp.float32)

        fp8_form = self.fp8_form if self.matmul_precision == "fp8" else None
        block_args = (
            self.width,
            self.num_heads,
            self.mlp_ratio,
            self.attention_scale,
            self.attention_impl,
            self.zero_init == "adaln",
            self.dtype,
            self.lean_ops,
            fp8_form,
            self.fp8_amax_history if fp8_form is not None else 0,
            self.qkv_gemms,
        )
        if self.scan_blocks:
            tokens = self.scanned_blocks(tokens, cond, block_args)
        else:
            remat_cls = remat_block(DiTBlock, self.remat)
            for i in range(self.depth):
                block_cls = remat_cls if self.remat_blocks < 0 or i < self.remat_blocks else DiTBlock
                tokens = block_cls(*block_args, name=f"block_{i}")(tokens, cond)
        out = FinalLayer(p * p * out_channels, self.dtype, self.lean_ops, name="final")(tokens, cond)
        # [batch, gh*gw, p*p*C] -> [batch, gh, p, gw, p, C] -> [batch, H, W, C]
        out = out.astype(jnp.float32).reshape(batch, gh, gw, p, p, out_channels)
        return out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, gh * p, gw * p, out_channels)

    def scanned_blocks(self, tokens: jax.Array, cond: jax.Array, block_args: tuple) -> jax.Array:
        """The blocks as ``nn.scan`` over one ``DiTBlock`` body, parameters under ``blocks`` with a
        leading layer axis; ``remat`` wraps the body, so every layer recomputes alike.

        Every layer's initialisers see the shape of one block's parameter (the layer axis is added
        by the scan) and a key of their own (``split_rngs``), so each layer starts from the
        distribution its unrolled counterpart has.

        ``remat_blocks`` selecting some of the blocks (0 < k < depth) cannot be one scan: a scan
        body stores the same residuals for every layer. Rather than refuse a setting that is the
        memory lever of the largest models, the stack then runs as two scans over slices of the
        one stacked tree: layers [0, k) under the policy, [k, depth) keeping their activations.
        The parameter layout stays one ``blocks`` tree of depth layers, so a checkpoint does not
        depend on this memory setting."""
        groups = remat_groups(self.depth, self.remat, self.remat_blocks)
        if len(groups) == 1 or self.is_initializing():
            # one scan over every layer; at initialisation it also creates the stacked parameters
            # (which policy wraps the body does not change them)
            # prevent_cse=False: inside a scan the loop already keeps XLA from merging the
            # recomputation with the forward pass
            step = remat_block(ScanStep, groups[0][2], prevent_cse=False)
            stack = nn.scan(
                step, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=self.depth
            )
            return stack(*block_args, name=STACKED_BLOCKS)(tokens, cond)[0]
        stacked = self.variables["params"][STACKED_BLOCKS]
        block = DiTBlock(*block_args)  # unbound: applied functionally to each layer's slice

        for start, stop, remat in groups:

            def layer(x, layer_params):
                return block.apply({"params": layer_params}, x, cond), None

            if remat != "none":
                layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
            tokens = jax.lax.scan(layer, tokens, jax.tree.map(lambda a: a[start:stop], stacked))[0]
        return tokens


def remat_groups(depth: int, remat: str, remat_blocks: int) -> list[tuple[int, int, str]]:
    """``[(start, stop, policy)]``: the runs of consecutive blocks that share a remat policy,
    ``'none'`` for blocks that keep their activations (``remat_blocks``: the first k blocks use
    ``remat``; -1: all of them)."""
    remat_block(DiTBlock, remat)  # an unknown policy fails here, with the same message as unrolled
    if remat == "none" or remat_blocks < 0 or remat_blocks >= depth:
        return [(0, depth, remat)]
    if remat_blocks == 0:
        return [(0, depth, "none")]
    return [(0, remat_blocks, remat), (remat_blocks, depth, "none")]


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block_cls, remat: str, prevent_cse: bool = True):
    if remat == "none":
        return block_cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {['none', *REMAT_POLICIES]}, got {remat!r}")
    return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)
