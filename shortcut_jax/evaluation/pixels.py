"""Samples as the 8-bit images a user would see: the one quantisation every evaluator here uses.

Models produce floats in [-1, 1]; the data readers map uint8 pixels ``u`` to ``u / 127.5 - 1``.
Every image metric (CFD, FID), every sample file (the ADM ``.npz``) and every PNG therefore
goes through :func:`to_uint8`, the inverse of that map, so that a data image survives the round
trip unchanged and a model is scored on exactly the bytes it would be saved as.
"""
from __future__ import annotations

import numpy as np

__all__ = ["grey_to_rgb", "to_uint8"]


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
    return np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def grey_to_rgb(images) -> np.ndarray:
    """``[N, H, W, 1]`` -> ``[N, H, W, 3]`` by repeating the channel (how pytorch-fid's and the
    ADM evaluator's image loaders read greyscale files); RGB images are returned as they are."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    return x
