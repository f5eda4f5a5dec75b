"""Samples as the 8-bit images a user would see: the one quantisation every evaluator here uses.

Models produce floats in [-1, 1]; the data readers map uint8 pixels ``u`` to ``u / 127.5 - 1``.
Every image metric (CFD, FID), every sample file (the ADM ``.npz``) and every PNG therefore
goes through :func:`to_uint8`, the inverse of that map, so that a data image survives the round
trip unchanged and a model is scored on exactly the bytes it would be saved as. The rule itself
is ``infra.images.to_uint8`` (shared with the picture writers); this module adds the checks.
"""

from __future__ import annotations

import numpy as np

from shortcut_jax.infra import images as images_lib

__all__ = ["grey_to_rgb", "grey_to_rgb_on_device", "to_uint8", "to_uint8_on_device"]


def to_uint8(images, image_size: int | None = None) -> np.ndarray:
    """``[N, H, W, 3]`` uint8, or float in [-1, 1] -> uint8 (clipped, rounded to the 8-bit grid).

    ``image_size``: refuse images that are not ``image_size x image_size`` (a network with a
    fixed input size). Non-finite floats are refused: there is no image they stand for.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {x.shape}")
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {x.shape[1]}x{x.shape[2]}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain non-finite values")
    # Inverse of the readers' u / 127.5 - 1: data images come back as the same bytes.
    return images_lib.to_uint8(x)


def to_uint8_on_device(images):
    """:func:`to_uint8`'s rule as a JAX function (traceable, for images that stay on the devices):
    the same float32 clip, the same two roundings of ``+ 1`` and ``* 127.5`` and the same
    round-half-to-even, so the bytes equal the host's (``tests/test_fid_on_device.py``).

    Non-finite values are not refused here (a traced function cannot raise on data): callers
    check ``jnp.isfinite`` themselves and discard the result when it fails.
    """
    import jax.numpy as jnp

    if images.dtype == jnp.uint8:
        return images
    # Written as the host rule is (add, then multiply): no fused multiply-add can form, and
    # x * 127.5 + 127.5 would round differently at the .5 boundaries.
    return jnp.round((jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def grey_to_rgb(images) -> np.ndarray:
    """``[N, H, W, 1]`` -> ``[N, H, W, 3]`` by repeating the channel (how pytorch-fid's and the
    ADM evaluator's image loaders read greyscale files); RGB images are returned as they are."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    return x


def grey_to_rgb_on_device(images):
    """:func:`grey_to_rgb` as a JAX function (traceable)."""
    import jax.numpy as jnp

    if images.ndim == 4 and images.shape[-1] == 1:
        return jnp.repeat(images, 3, axis=-1)
    return images
