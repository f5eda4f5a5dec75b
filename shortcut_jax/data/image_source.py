"""Finite, ordered image sets read as uint8 batches: what ``shortcut_jax.encode`` consumes.

The seam between a data set and the encoder is ``ImageBatches``: a count, a class count, a
JSON description for the latent set's manifest, and ``batches(start, stop, batch_size)``, which
yields consecutive ``(uint8 [b, S, S, 3], int labels [b])`` for examples ``[start, stop)`` of a
fixed order (the same on every call and machine), every image already cropped and resized to
``S = image_size``. Reading from ``start`` is what lets an interrupted encode resume at a shard
boundary. A new kind of source (a TFDS data set, say) is one function
``open(source: str, image_size: int, num_workers: int) -> ImageBatches`` added to
``IMAGE_SOURCES``; the encoder needs nothing else from it.

Image folders
-------------
The layout and file order of ``image_folder`` (class sub-folders or a flat folder, sorted
paths), and its pixels: ``image_folder.load_image`` crops the largest centred square and resizes
it to ``S`` with Pillow's bicubic filter, which antialiases when shrinking. Cropping before
resizing keeps the filter from reaching outside the square; and sharing the function means that
a folder gives the same pixels whether a run reads it directly or through its latents. (ADM's
``center_crop_arr``, used by DiT, resizes the short side first and then crops: the same square
of the image, filtered slightly differently at its border.) Images smaller than ``S`` are
upsampled by the same filter; how many is recorded (``num_upscaled``) and logged.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from shortcut_jax.data import image_folder

CROP = ("largest centred square, then Pillow bicubic resize (antialiased when shrinking); "
        "smaller images upsampled")
# Batches decoded ahead of the one being consumed.
PREFETCH = 2

log = logging.getLogger(__name__)


class ImageBatches(Protocol):
    num_examples: int
    num_classes: int
    image_size: int

    def describe(self) -> dict[str, Any]:
        """JSON-able facts that identify the images (kept in the manifest; a resumed encode
        compares ``fingerprint`` to refuse a changed source)."""

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive (uint8 [b, S, S, 3], labels [b]) for examples [start, stop), b <= batch_size."""

    def close(self) -> None:
        ...


class FolderImages:
    """An image folder as ``ImageBatches``, decoded by a thread pool a few batches ahead."""

    def __init__(self, root: str, image_size: int, num_workers: int = 8):
        if not os.path.isdir(root):
            raise ValueError(f"--source={root!r} is not a folder of images (class sub-folders or a flat folder)")
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0 to encode a folder, got {image_size}")
        self._index = image_folder.scan_image_folder(root, image_size, num_workers)
        self.root = self._index.root
        self.image_size = image_size
        self.num_examples = len(self._index.files)
        self.num_classes = len(self._index.class_names)
        self._labels = self._index.labels
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="encode_decode")
        self._num_workers = num_workers
        # the scan's cached headers give every image's size at the cost of one stat() per file
        headers = image_folder._cached_headers(self.root, self._index.files, num_workers)  # noqa: SLF001
        small = [path for path, (width, height) in headers if min(width, height) < image_size]
        self.num_upscaled = len(small)
        if small:
            log.warning("%d of %d images are smaller than %d on their short side and will be upsampled, "
                        "e.g. %s", len(small), self.num_examples, image_size,
                        [os.path.relpath(p, self.root) for p in small[:5]])

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, renamed, relabelled or changes size; not when
        the folder is moved or copied (paths are relative, times are left out)."""
        digest = hashlib.blake2b(digest_size=16)
        for path, label in zip(self._index.files, self._labels):
            digest.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"type": "image_folder", "path": self.root, "num_examples": self.num_examples,
                "class_names": list(self._index.class_names), "fingerprint": self.fingerprint(),
                "crop": CROP, "num_upscaled": self.num_upscaled}

    def _decode(self, start: int, stop: int) -> np.ndarray:
        shape = (self.image_size, self.image_size, 3)
        return image_folder.decode_files(self._index.files[start:stop], self.image_size, shape)

    def _submit(self, start: int, stop: int) -> list:
        step = -(-(stop - start) // self._num_workers)
        return [self._pool.submit(self._decode, a, min(a + step, stop)) for a in range(start, stop, step)]

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not 0 <= start <= stop <= self.num_examples:
            raise ValueError(f"examples [{start}, {stop}) are outside [0, {self.num_examples})")
        bounds = [(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
        pending = [self._submit(a, b) for a, b in bounds[:PREFETCH]]
        try:
            for k, (a, b) in enumerate(bounds):
                if k + PREFETCH < len(bounds):
                    pending.append(self._submit(*bounds[k + PREFETCH]))
                pixels = np.concatenate([future.result() for future in pending.pop(0)])
                yield pixels, self._labels[a:b]
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def open_image_folder(source: str, image_size: int, num_workers: int) -> FolderImages:
    return FolderImages(source, image_size, num_workers)


# name -> open(source, image_size, num_workers); ``python -m shortcut_jax.encode --source_type``.
IMAGE_SOURCES: dict[str, Callable[[str, int, int], ImageBatches]] = {
    "image_folder": open_image_folder,
}
