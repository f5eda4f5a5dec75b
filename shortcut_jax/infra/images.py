"""Float images as 8-bit pixels, and PNG files of them: the one quantisation and the one PNG writer.

Models produce floats in [-1, 1]; the data readers map uint8 pixels ``u`` to ``u / 127.5 - 1``.
:func:`to_uint8` is the inverse of that map, so a data image survives the round trip unchanged;
every metric, sample file and picture goes through it (``evaluation/pixels.py`` adds the checks
the evaluators want, ``plots`` other value ranges for pictures of latents).
"""

from __future__ import annotations

import io

import numpy as np
from etils import epath

__all__ = ["to_uint8", "write_png"]


def to_uint8(images, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Floats in ``value_range`` -> uint8 in [0, 255]: clipped to the range, scaled as
    ``(x - low) * (255 / (high - low))`` in float32 and rounded half to even; NaN becomes the low
    end. uint8 input is returned as it is."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = np.nan_to_num(x.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    # For (-1, 1) this is (x + 1) * 127.5, the inverse of the readers' u / 127.5 - 1.
    return np.round((np.clip(x, lo, hi) - np.float32(lo)) * np.float32(255.0 / (hi - lo))).astype(np.uint8)


def write_png(image: np.ndarray, path) -> None:
    """Writes a uint8 ``[H, W]`` or ``[H, W, C]`` image (C in 1, 3, 4) as PNG; parent folders are
    created. Any path ``etils.epath`` opens (``gs://...``) works."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
