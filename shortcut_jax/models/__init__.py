"""Networks: a DiT for images/latents and a residual MLP for points, one call signature.

``build_model(model_cfg, spec, ignore_level)`` turns ``config.model`` into a flax module;
``resolve_dtype`` applies the precision policy's default (bf16 matmuls on accelerators);
``model.matmul_precision='fp8'`` moves the DiT blocks' large dense layers to FP8 (``fp8.py``),
with delayed scaling where ``model.fp8_amax_history > 0``;
``model.scan_blocks`` runs the DiT's blocks as one scan over stacked parameters (``convert.py``
converts between the two parameter layouts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.models.dit import DiT
from shortcut_jax.models.mlp import MLPNet
from shortcut_jax.models.options import LEAN_OPS, mlp_dims, model_dims


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    if name in ("bfloat16", "bf16"):
        return jnp.bfloat16
    if name in ("float32", "f32"):
        return jnp.float32
    raise ValueError(f"model.dtype must be 'auto', 'bfloat16' or 'float32', got {name!r}")


def resolve_attention_impl(
    name: str,
    *,
    dtype=jnp.bfloat16,
    head_dim: int = 64,
    backend: str | None = None,
    compute_capability: str | None = None,
):
    """The ``implementation`` argument of ``jax.nn.dot_product_attention``.

    'auto' picks the fused cuDNN kernel where it applies: an NVIDIA GPU of compute capability
    8.0 or newer, bf16/fp16 inputs and a head size that is a multiple of 8 up to 128 (DiT-S/B/L/XL
    all qualify); it never stores the attention scores (docs/results.md's train-step table measures it).
    Elsewhere 'auto' leaves the choice
    to XLA (``None``). The cuDNN kernel has no forward-mode derivative (``jax.jvp``): ``build_model``
    picks XLA's for the network given to a jvp (MeanFlow's derivative), and ``'xla'`` forces it
    anywhere.
    """
    if name not in ("auto", "", None):
        return name
    backend = backend or jax.default_backend()
    if backend not in ("gpu", "cuda"):
        return None
    if compute_capability is None:
        compute_capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(compute_capability).split(".")[0])
    except ValueError:
        return None
    eligible = (
        major >= 8
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
    )
    return "cudnn" if eligible else None


def build_model(
    model_cfg,
    *,
    num_classes: int,
    ignore_level: bool = False,
    forward_mode: bool = False,
    guidance_input: bool = False,
    guidance_interval_input: bool = False,
):
    """The network ``config.model`` describes. ``forward_mode``: the same network (the same
    parameters) for ``jax.jvp`` (MeanFlow's derivative): the hand-written backward passes
    (``lean_ops``), the cuDNN attention kernel and the FP8 dense layers, which have no
    forward-mode rule, are left out (XLA's attention, bf16 matmuls); a method that takes a jvp
    trains through the network built without ``forward_mode`` and gives this one only to the jvp
    (``ObjectiveConfig.jvp_apply_fn``). ``guidance_input``
    (and ``guidance_interval_input``): the network reads the guidance scale (and the guidance
    interval) as conditioning inputs, improved MeanFlow's."""
    dtype = resolve_dtype(model_cfg.dtype)
    if model_cfg.name == "mlp":
        return MLPNet(
            width=mlp_dims(model_cfg)[0],
            depth=mlp_dims(model_cfg)[1],
            mlp_ratio=model_cfg.mlp_ratio,
            num_classes=num_classes,
            t_input_scale=model_cfg.t_input_scale,
            ignore_level=ignore_level,
            guidance_input=guidance_input,
            guidance_interval_input=guidance_interval_input,
            dtype=dtype,
        )
    if model_cfg.name == "dit":
        width, depth, heads = model_dims(model_cfg)
        return DiT(
            patch_size=model_cfg.patch_size,
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=model_cfg.mlp_ratio,
            num_classes=num_classes,
            attention_scale=model_cfg.attention_scale,
            attention_impl=(
                None
                if forward_mode
                else resolve_attention_impl(model_cfg.attention_impl, dtype=dtype, head_dim=width // heads)
            ),
            t_input_scale=model_cfg.t_input_scale,
            zero_init=model_cfg.zero_init,
            ignore_level=ignore_level,
            guidance_input=guidance_input,
            guidance_interval_input=guidance_interval_input,
            remat=model_cfg.remat,
            remat_blocks=model_cfg.remat_blocks,
            residual_dtype=jnp.float32 if model_cfg.residual_dtype == "float32" else dtype,
            lean_ops=() if forward_mode else tuple(op for op in LEAN_OPS if op in tuple(model_cfg.lean_ops)),
            matmul_precision="bf16" if forward_mode else model_cfg.matmul_precision,
            fp8_amax_history=0 if forward_mode else int(model_cfg.get("fp8_amax_history", 0)),
            qkv_gemms=int(model_cfg.get("qkv_gemms", 1)),
            scan_blocks=model_cfg.scan_blocks,
            dtype=dtype,
        )
    raise ValueError(f"model.name must be 'dit' or 'mlp', got {model_cfg.name!r}")


__all__ = ["DiT", "MLPNet", "build_model", "resolve_dtype", "resolve_attention_impl"]
