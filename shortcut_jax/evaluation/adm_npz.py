"""Samples as the ADM evaluator's ``.npz``: ``arr_0`` uint8 ``[N, H, W, 3]``, optional ``arr_1``
int labels ``[N]``.

This is the file format of the reference evaluator of Dhariwal & Nichol (``evaluator.py`` of
guided-diffusion reads ``arr_0``), of its reference batches (``VIRTUAL_imagenet256_labeled.npz``
holds the reference images in ``arr_0`` beside their statistics), and of the sample files most
diffusion papers publish, so samples written here can be scored by any external evaluator, and
sample files from elsewhere can be scored here.

50,000 samples at 256x256 are 9.8 GB: :class:`ADMSampleWriter` streams batches into the file
(uncompressed, as ``np.savez`` writes it) without holding them all in memory; :func:`write_adm_npz`
writes an array in one go. Both write to a temporary name and rename at the end, so a file with
the final name is always complete.
"""

from __future__ import annotations

import os
import zipfile
from typing import Sequence

import numpy as np

from shortcut_jax.evaluation.pixels import to_uint8
from shortcut_jax.infra import files

__all__ = ["ADMSampleWriter", "adm_npz_image_shape", "read_adm_npz", "write_adm_npz"]

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


class ADMSampleWriter:
    """Streams ``num_images`` images (and optionally their labels) into an ADM ``.npz``.

    Usage::

        with ADMSampleWriter('samples.npz', num_images=50000, image_shape=(256, 256, 3),
                             with_labels=True) as writer:
            for images, labels in batches:   # images uint8, or float in [-1, 1]
                writer.add(images, labels)

    Float images are clipped and rounded to uint8 (``pixels.to_uint8``). Leaving the
    ``with`` block before ``num_images`` were added removes the partial file and raises.
    """

    def __init__(self, path: str, *, num_images: int, image_shape: Sequence[int], with_labels: bool = False):
        image_shape = tuple(int(s) for s in image_shape)
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if len(image_shape) != 3 or image_shape[-1] != 3:
            raise ValueError(f"image_shape must be (H, W, 3), got {image_shape}")
        self.path = os.fspath(path)
        self.num_images = int(num_images)
        self.image_shape = image_shape
        self.with_labels = with_labels
        self.count = 0
        self._labels: list[np.ndarray] = []
        self._file = files.AtomicFile(self.path)
        self._zip = zipfile.ZipFile(self._file.partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        # force_zip64: the member's size is not known when it is opened and may exceed 4 GiB.
        self._member = self._zip.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": (self.num_images, *image_shape),
        }
        np.lib.format.write_array_header_1_0(self._member, header)

    def add(self, images, labels=None) -> None:
        x = to_uint8(images)
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"images have shape {x.shape[1:]}, this file holds {self.image_shape}")
        if self.count + len(x) > self.num_images:
            raise ValueError(f"adding {len(x)} images to {self.count} exceeds num_images={self.num_images}")
        if self.with_labels:
            if labels is None:
                raise ValueError("this writer stores labels (with_labels=True); pass them")
            labels = np.asarray(labels)
            if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers of shape ({len(x)},), got {labels.dtype} {labels.shape}")
            self._labels.append(labels.astype(np.int64))
        elif labels is not None:
            raise ValueError("labels given to a writer made with with_labels=False")
        self._member.write(np.ascontiguousarray(x).tobytes())
        self.count += len(x)

    def close(self) -> str:
        """Finishes the file (refusing an incomplete one) and returns its path."""
        if self._zip is None:
            return self.path
        complete = self.count == self.num_images
        self._member.close()
        if complete and self.with_labels:
            with self._zip.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.concatenate(self._labels))
        self._zip.close()
        self._zip = None
        if not complete:
            self._file.discard()
            raise ValueError(f"{self.path}: {self.count} of {self.num_images} images were added; no file was written")
        return self._file.commit()

    def abort(self) -> None:
        if self._zip is not None:
            self._member.close()
            self._zip.close()
            self._zip = None
            self._file.discard()

    def __enter__(self) -> "ADMSampleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_adm_npz(path: str, images, labels=None) -> str:
    """Writes ``images`` ([N, H, W, 3] uint8, or float in [-1, 1]) and optional labels [N]."""
    x = to_uint8(images)
    with ADMSampleWriter(path, num_images=len(x), image_shape=x.shape[1:], with_labels=labels is not None) as writer:
        writer.add(x, labels)
    return os.fspath(path)


def adm_npz_image_shape(path: str) -> tuple[int, ...] | None:
    """Shape of ``arr_0`` read from its header alone (no image data loaded), or None if the file
    has no ``arr_0``. Reference batches use it to tell their resolution."""
    with zipfile.ZipFile(path) as archive:
        name = f"{IMAGES_KEY}.npy"
        if name not in archive.namelist():
            return None
        with archive.open(name) as member:
            version = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(member)
    return tuple(int(s) for s in shape)


def read_adm_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 [N, H, W, 3], labels [N] or None)`` from an ADM ``.npz``."""
    with np.load(path) as f:
        if IMAGES_KEY not in f.files:
            raise ValueError(
                f"{path!r} has no {IMAGES_KEY!r} (keys: {sorted(f.files)}); an ADM "
                "sample file holds the images as arr_0"
            )
        images = f[IMAGES_KEY]
        labels = f[LABELS_KEY] if LABELS_KEY in f.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path!r}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"{path!r}: arr_1 (labels) has shape {labels.shape}, expected ({len(images)},)")
    return images, labels
