"""Finite, ordered image sets read as uint8 batches: what ``shortcut_jax.encode`` consumes.

The seam between a data set and the encoder is ``ImageBatches``: a count, a class count, a
JSON description for the latent set's manifest, and ``batches(start, stop, batch_size)``, which
yields consecutive ``(uint8 [b, S, S, 3], int labels [b])`` for examples ``[start, stop)`` of a
fixed order (the same on every call and machine), every image already cropped and resized to
``S = image_size``. Reading from ``start`` is what lets an interrupted encode resume at a shard
boundary. ``IMAGE_SOURCES`` maps ``--source_type`` to a function
``open(source, image_size, num_workers, **options) -> ImageBatches``.

- ``image_folder`` (``FolderImages``): the layout and file order of the image-folder reader
  (class sub-folders or a flat folder, sorted paths), decoded by a thread pool a few batches
  ahead; it also counts the images smaller than ``S``.
- ``tfds`` (``ReaderImages``): any data set the TFDS reader reads (``source`` is its TFDS name,
  options ``split`` and ``data_dir``), in stored order. ``ReaderImages`` turns any reader of
  ``shortcut_jax.data`` into ``ImageBatches`` through its ``Source`` interface alone: built with
  shuffling and flips off, a reader's stream position ``q`` is example ``q`` of its stored order,
  so the encoder seeks with ``set_state`` and reads batches, knowing nothing of the reader.

Pixels
------
Both read pixels through ``preprocess.centre_crop_resize``, the readers' shared preprocessing:
the largest centred square, resized to ``S`` with Pillow's bicubic filter, which antialiases when
shrinking. Cropping before resizing keeps the filter from reaching outside the square; and sharing
the function means that an image gives the same pixels whether a run reads it directly or
through its latents. (ADM's ``center_crop_arr``, used by DiT, resizes the short side first and
then crops: the same square of the image, filtered slightly differently at its border.) Images
smaller than ``S`` are upsampled by the same filter (image folders: counted as ``num_upscaled``
in the manifest, and logged).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from shortcut_jax.data import image_folder
from shortcut_jax.infra.images import to_uint8

CROP = (
    "largest centred square, then Pillow bicubic resize (antialiased when shrinking); "
    "smaller images upsampled (preprocess.centre_crop_resize)"
)
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

    def close(self) -> None: ...


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
            log.warning(
                "%d of %d images are smaller than %d on their short side and will be upsampled, e.g. %s",
                len(small),
                self.num_examples,
                image_size,
                [os.path.relpath(p, self.root) for p in small[:5]],
            )

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, renamed, relabelled or changes size; not when
        the folder is moved or copied (paths are relative, times are left out)."""
        digest = hashlib.blake2b(digest_size=16)
        for path, label in zip(self._index.files, self._labels):
            digest.update(f"{os.path.relpath(path, self.root)}\0{os.path.getsize(path)}\0{label}\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "image_folder",
            "path": self.root,
            "num_examples": self.num_examples,
            "class_names": list(self._index.class_names),
            "fingerprint": self.fingerprint(),
            "crop": CROP,
            "num_upscaled": self.num_upscaled,
        }

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


class ReaderImages:
    """The images of any ``shortcut_jax.data`` reader, in its stored order, as ``ImageBatches``.

    ``data_config`` selects the reader as for training; shuffling and flips are turned off here.
    Only the ``Source`` interface is used: ``set_state`` with the position of the first example
    wanted, then ``next_batch`` (rows past ``stop`` are dropped).
    """

    def __init__(self, data_config, image_size: int):
        from shortcut_jax.data import make_dataset

        config = (
            data_config.copy_and_resolve_references()
            if hasattr(data_config, "copy_and_resolve_references")
            else dict(data_config)
        )
        config["shuffle"], config["random_flip"], config["image_size"] = False, False, image_size
        self._config = config
        self._make_dataset = make_dataset
        self._sources: dict[int, Any] = {}
        probe = self._source(1)
        if probe.spec.kind != "images" or tuple(probe.spec.shape) != (image_size, image_size, 3):
            raise ValueError(
                f"data.name={config['name']!r} gives examples of shape {probe.spec.shape}; encoding "
                f"needs RGB images of {image_size}x{image_size}x3"
            )
        self.image_size = image_size
        self.num_examples = int(probe.num_examples)
        self.num_classes = int(probe.spec.num_classes)
        self._state = {k: v for k, v in probe.get_state().items() if k != "position"}

    def _source(self, batch_size: int):
        if batch_size not in self._sources:
            self._sources[batch_size] = self._make_dataset(self._config, batch_size=batch_size, seed=0)
        return self._sources[batch_size]

    def describe(self) -> dict[str, Any]:
        keys = {"tfds": ("tfds_name", "split", "data_dir", "image_key", "label_key")}.get(
            self._config["name"], ("path",)
        )
        fields = {key: self._config[key] for key in keys}
        identity = json.dumps(
            {"reader": self._config["name"], **fields, "state": self._state}, sort_keys=True, default=str
        )
        return {
            "type": self._config["name"],
            **fields,
            "num_examples": self.num_examples,
            "crop": CROP,
            "fingerprint": hashlib.blake2b(identity.encode(), digest_size=16).hexdigest(),
        }

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not 0 <= start <= stop <= self.num_examples:
            raise ValueError(f"examples [{start}, {stop}) are outside [0, {self.num_examples})")
        source = self._source(batch_size)
        source.set_state({**source.get_state(), "position": start})
        position = start
        while position < stop:
            batch = source.next_batch()
            keep = min(batch_size, stop - position)
            yield to_uint8(batch["x"][:keep]), batch["label"][:keep]  # to_uint8: the inverse of core.uint8_to_float
            position += keep

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


def open_image_folder(source: str, image_size: int, num_workers: int) -> FolderImages:
    return FolderImages(source, image_size, num_workers)


def open_tfds(source: str, image_size: int, num_workers: int, split: str = "train", data_dir: str = "") -> ReaderImages:
    """``source`` is the TFDS name (``'celeb_a_hq/256'``, ``'imagenet2012'``), prepared in ArrayRecord."""
    from shortcut_jax.data import default_data_config

    config = default_data_config()
    config.name, config.tfds_name, config.split, config.data_dir = "tfds", source, split, data_dir
    config.num_workers = num_workers
    return ReaderImages(config, image_size)


# name -> open(source, image_size, num_workers, **options); ``python -m shortcut_jax.encode --source_type``.
IMAGE_SOURCES: dict[str, Callable[..., ImageBatches]] = {
    "image_folder": open_image_folder,
    "tfds": open_tfds,
}
