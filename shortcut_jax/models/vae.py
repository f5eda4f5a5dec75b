"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax: images <-> latents.

The paper's CelebA-HQ and ImageNet runs train in the latent space of ``sd-vae-ft-mse``: a
256x256x3 image becomes a 32x32x4 latent, sampled from a diagonal Gaussian posterior and
multiplied by a scaling factor (0.18215). This module is the network, written to reproduce
diffusers' PyTorch modules exactly, so that their published weights load unchanged
(``vae_weights`` converts them; a golden test against diffusers holds the two to 1e-5).

Structure, for ``block_out_channels = (c_0, ..., c_{n-1})`` (the SD VAE: 128, 256, 512, 512)::

  encoder: conv_in 3x3 -> c_0
           down block i (i < n): `layers_per_block` residual blocks -> c_i, then, except in the
               last block, a 3x3 stride-2 conv after padding one zero row/column at the bottom
               and right only (diffusers' ``padding=0`` downsampler)
           mid block: residual, single-head self-attention, residual (at c_{n-1})
           GroupNorm, SiLU, conv_out 3x3 -> 2 * latent_channels (mean, log-variance)
  quant_conv 1x1 (2 * latent -> 2 * latent)
  decoder: post_quant_conv 1x1, conv_in 3x3 -> c_{n-1}, mid block,
           up block i over the reversed channels: `layers_per_block + 1` residual blocks, then,
               except in the last block, nearest-neighbour 2x upsampling and a 3x3 conv
           GroupNorm, SiLU, conv_out 3x3 -> 3

A residual block is GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, added to its
input (through a 1x1 ``conv_shortcut`` when the channel count changes). The attention block is
GroupNorm, q/k/v linear maps over the channels of every pixel, softmax(q k^T / sqrt(C)) v, an
output linear map, plus the input. Every GroupNorm has ``norm_num_groups`` groups and eps 1e-6.
The posterior's log-variance is clipped to [-30, 20] before ``std = exp(logvar / 2)``.

Layout and precision: images and latents are NHWC (diffusers is NCHW; the converter transposes
the weights, not the data). Parameters are float32. ``dtype`` is the compute dtype: float32
(default) runs convolutions and matmuls at full float32 precision (``Precision.HIGHEST``, so a
GPU does not silently use TF32), bfloat16 runs them in bf16; GroupNorm statistics, the softmax
and the posterior are float32 in both.

Module names follow diffusers' attribute names (``down_blocks_0/resnets_1/conv2``), so the
PyTorch state-dict name of every parameter follows from its path here (see ``vae_weights``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6
# diffusers' default when a config.json predates the `scaling_factor` key (sd-vae-ft-mse's does).
SD_SCALING_FACTOR = 0.18215

# config.json keys that do not change the network: bookkeeping, the tile size used by
# diffusers' tiled decoding, and a hint to pipelines to run the VAE in float32.
_IGNORED_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "force_upcast"}
)


class VAEConfigError(ValueError):
    """A config.json this implementation cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json that shape the network.

    ``from_diffusers`` reads a config.json dict; ``to_diffusers`` writes one that diffusers'
    ``AutoencoderKL(**config)`` accepts. ``sd_vae_ft_mse()`` is the paper's VAE, ``tiny()`` a
    small one for tests on CPU.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise VAEConfigError(f"block_out_channels must be positive, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise VAEConfigError(
                f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"block_out_channels={self.block_out_channels} (not {bad})"
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise VAEConfigError("layers_per_block and latent_channels must be >= 1")
        if not self.scaling_factor > 0:
            raise VAEConfigError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.downsample_factor
        return (side, side, self.latent_channels)

    @classmethod
    def sd_vae_ft_mse(cls) -> "VAEConfig":
        """stabilityai/sd-vae-ft-mse (and -ema): the defaults."""
        return cls()

    @classmethod
    def tiny(cls, groups: int = 8) -> "VAEConfig":
        """Two blocks of 16 and 32 channels: the same structure, fast on CPU (downsample 2)."""
        return cls(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=groups)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Reads a diffusers ``AutoencoderKL`` config.json dict.

        Raises VAEConfigError naming the key when the config asks for something this module
        does not implement (other block types or activations, latent normalisation statistics),
        rather than building a network that would not match the weights.
        """
        config = dict(config)
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise VAEConfigError(f"config.json describes a {class_name!r}; only 'AutoencoderKL' is supported")
        if config.get("act_fn", "silu") != "silu":
            raise VAEConfigError(f"act_fn={config['act_fn']!r} is not supported (only 'silu')")
        channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.get(key, (block,) * len(channels)))
            if types != (block,) * len(channels):
                raise VAEConfigError(
                    f"{key}={list(types)} is not supported: this implementation needs "
                    f"{len(channels)} x {block!r} (one per block_out_channels entry)"
                )
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise VAEConfigError(f"{key} is set in config.json; per-channel latent statistics are not supported")
        fields = {
            "block_out_channels": channels,
            "layers_per_block": int(config.get("layers_per_block", 1)),
            "latent_channels": int(config.get("latent_channels", 4)),
            "norm_num_groups": int(config.get("norm_num_groups", 32)),
            "in_channels": int(config.get("in_channels", 3)),
            "out_channels": int(config.get("out_channels", 3)),
            "scaling_factor": float(config.get("scaling_factor") or SD_SCALING_FACTOR),
            "shift_factor": float(config.get("shift_factor") or 0.0),
            "use_quant_conv": bool(config.get("use_quant_conv", True)),
            "use_post_quant_conv": bool(config.get("use_post_quant_conv", True)),
            "mid_block_add_attention": bool(config.get("mid_block_add_attention", True)),
        }
        handled = {"act_fn", "down_block_types", "up_block_types", "latents_mean", "latents_std"}
        unknown = sorted(set(config) - set(fields) - handled - _IGNORED_KEYS)
        if unknown:
            raise VAEConfigError(
                f"config.json has keys {unknown} that this implementation does not know; "
                "they may change the network, so it refuses rather than guess"
            )
        return cls(**fields)

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json dict for diffusers' ``AutoencoderKL``."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


def _precision(dtype: Dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class GroupNorm(nn.Module):
    """GroupNorm over NHWC with float32 statistics; params ``scale``/``bias`` as in PyTorch."""

    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        # [B, H, W, groups, channels per group]; statistics over H, W and the group's channels
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = (1, 2, 4)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        centred = grouped - mean
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)  # biased, as torch
        normed = (centred * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (normed * scale + bias).astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=_precision(dtype),
        name=name,
    )


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(self.groups, self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.silu(GroupNorm(self.groups, self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(self.groups, self.dtype, name="group_norm")(x).reshape(batch, height * width, channels)
        dense = lambda name: nn.Dense(
            channels,
            dtype=self.dtype,
            param_dtype=jnp.float32,  # noqa: E731
            precision=_precision(self.dtype),
            name=name,
        )
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)  # [B, T, C]
        logits = jnp.einsum(
            "bqc,bkc->bqk", q, k, precision=_precision(self.dtype), preferred_element_type=jnp.float32
        ) / math.sqrt(channels)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, T, T], float32 softmax
        out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=_precision(self.dtype))
        out = dense("to_out")(out).reshape(batch, height, width, channels)
        return out + x.astype(self.dtype)


class MidBlock(nn.Module):
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Halves H and W: one zero row and column added at the bottom and right, then a 3x3
    stride-2 convolution without padding (diffusers' encoder downsampler)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition, then a 3x3 convolution."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype)(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        groups = c.norm_num_groups
        h = _conv(c.block_out_channels[0], 3, "conv_in", self.dtype)(images.astype(self.dtype))
        last = len(c.block_out_channels) - 1
        for i, channels in enumerate(c.block_out_channels):
            for j in range(c.layers_per_block):
                h = ResnetBlock(channels, groups, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i < last:
                h = Downsample(channels, self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
        h = MidBlock(groups, c.mid_block_add_attention, self.dtype, name="mid_block")(h)
        h = nn.silu(GroupNorm(groups, self.dtype, name="conv_norm_out")(h))
        return _conv(2 * c.latent_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        groups = c.norm_num_groups
        reversed_channels = tuple(reversed(c.block_out_channels))
        h = _conv(reversed_channels[0], 3, "conv_in", self.dtype)(z.astype(self.dtype))
        h = MidBlock(groups, c.mid_block_add_attention, self.dtype, name="mid_block")(h)
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            for j in range(c.layers_per_block + 1):
                h = ResnetBlock(channels, groups, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i < last:
                h = Upsample(channels, self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = nn.silu(GroupNorm(groups, self.dtype, name="conv_norm_out")(h))
        return _conv(c.out_channels, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """``encode(images) -> (mean, std)``, ``decode(latents) -> images``.

    Images are NHWC in [-1, 1]; latents are the posterior's space before scaling (use
    ``scale_latents`` / ``unscale_latents`` for the space a generative model trains in).
    Outputs are float32 whatever the compute dtype.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        self.quant_conv = _conv(2 * c.latent_channels, 1, "quant_conv", self.dtype) if c.use_quant_conv else None
        self.post_quant_conv = (
            _conv(c.latent_channels, 1, "post_quant_conv", self.dtype) if c.use_post_quant_conv else None
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior mean and standard deviation, float32 [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        std = jnp.exp(0.5 * jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
        return mean, std

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images, float32 [B, H*f, W*f, out_channels], nominally in [-1, 1] (not clipped)."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean; used to create every parameter at init."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_posterior(key: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """One draw ``mean + std * eps`` from the diagonal Gaussian posterior."""
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def scale_latents(z, config: VAEConfig):
    """Posterior latents -> the space a generative model is trained in: ``(z - shift) * scale``."""
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(x, config: VAEConfig):
    """Inverse of ``scale_latents``: what ``decode`` takes."""
    return x / config.scaling_factor + config.shift_factor
