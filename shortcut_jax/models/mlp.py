"""Residual MLP with the DiT's conditioning, for low-dimensional data (2-D points).

``MLPNet(x, t, level, label) -> [batch, D]``; conditioning is ``emb(t) + emb(level) + emb(label)``
read by every block through adaptive LayerNorm (shift, scale, gate), like a DiT block without
attention. The output layer starts at zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shortcut_jax.models import layers


class MLPBlock(nn.Module):
    mlp_ratio: float
    dtype: Any

    @nn.compact
    def __call__(self, x, cond):
        width = x.shape[-1]
        mod = nn.Dense(3 * width, kernel_init=layers.xavier_uniform(), dtype=self.dtype, name="adaln")(nn.silu(cond))
        shift, scale, gate = jnp.split(mod.astype(jnp.float32), 3, axis=-1)
        h = layers.modulate(layers.layer_norm(x), shift, scale).astype(self.dtype)
        h = layers.Mlp(int(width * self.mlp_ratio), dtype=self.dtype, name="mlp")(h)
        return x + gate * h.astype(jnp.float32)


class MLPNet(nn.Module):
    width: int = 256
    depth: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 0
    t_input_scale: float = 1.0
    ignore_level: bool = False
    guidance_input: bool = False  # a guidance-scale input embedded beside t and level (improved MeanFlow)
    guidance_interval_input: bool = False  # and the guidance interval: ``guidance`` [B, 3]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, level: jax.Array, label: jax.Array, guidance=None) -> jax.Array:
        out_dim = x.shape[-1]
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
                self.width, guidance, x.shape[0], self.dtype, interval=self.guidance_interval_input
            ).astype(jnp.float32)
        h = nn.Dense(self.width, kernel_init=layers.xavier_uniform(), dtype=self.dtype, name="embed")(
            x.astype(self.dtype)
        ).astype(jnp.float32)
        for i in range(self.depth):
            h = MLPBlock(self.mlp_ratio, self.dtype, name=f"block_{i}")(h, cond)
        mod = nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="final_adaln")(
            nn.silu(cond)
        )
        shift, scale = jnp.split(mod.astype(jnp.float32), 2, axis=-1)
        h = layers.modulate(layers.layer_norm(h), shift, scale).astype(self.dtype)
        out = nn.Dense(out_dim, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="out")(h)
        return out.astype(jnp.float32)
