"""The pixel preprocessing every image reader shares: centre crop and antialiased resize.

One function, so that the same decoded image gives the same pixels whichever reader (image
folder, TFDS) loaded it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def centre_crop_resize(image: Image.Image, image_size: int) -> np.ndarray:
    """The largest centred square of ``image``, resized to ``image_size`` x ``image_size``.

    Resizing uses Pillow's bicubic filter, which antialiases when shrinking (its support widens
    with the scale factor). ``image_size`` 0 returns the image as it is. Returns uint8
    ``[H, W, C]`` for multi-band images and ``[H, W]`` for single-band ('L') ones.
    """
    if image_size:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        if width != height:
            # Cropping first, rather than resize(box=...), keeps the filter from reaching into
            # pixels outside the square.
            image = image.crop((left, top, left + side, top + side))
        if side != image_size:
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image)
