"""Networks: a DiT for images/latents and a residual MLP for points, one call signature.

``build_model(model_cfg, spec, ignore_level)`` turns ``config.model`` into a flax module;
``resolve_dtype`` applies the precision policy's default (bf16 matmuls on accelerators).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax.models.dit import DiT
from shortcut_jax.models.mlp import MLPNet


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    if name in ("bfloat16", "bf16"):
        return jnp.bfloat16
    if name in ("float32", "f32"):
        return jnp.float32
    raise ValueError(f"model.dtype must be 'auto', 'bfloat16' or 'float32', got {name!r}")


def resolve_attention_impl(name: str):
    """'auto' lets XLA choose (never the cuDNN kernel, which has no forward-mode autodiff)."""
    return None if name in ("auto", "", None) else name


def build_model(model_cfg, *, num_classes: int, ignore_level: bool = False):
    from shortcut_jax.config_lib import model_dims

    dtype = resolve_dtype(model_cfg.dtype)
    if model_cfg.name == "mlp":
        return MLPNet(
            width=model_cfg.width or 256,
            depth=model_cfg.depth or 4,
            mlp_ratio=model_cfg.mlp_ratio,
            num_classes=num_classes,
            t_input_scale=model_cfg.t_input_scale,
            ignore_level=ignore_level,
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
            attention_impl=resolve_attention_impl(model_cfg.attention_impl),
            t_input_scale=model_cfg.t_input_scale,
            zero_init=model_cfg.zero_init,
            ignore_level=ignore_level,
            remat=model_cfg.remat,
            residual_dtype=jnp.float32 if model_cfg.residual_dtype == "float32" else dtype,
            dtype=dtype,
        )
    raise ValueError(f"model.name must be 'dit' or 'mlp', got {model_cfg.name!r}")


__all__ = ["DiT", "MLPNet", "build_model", "resolve_dtype", "resolve_attention_impl"]
