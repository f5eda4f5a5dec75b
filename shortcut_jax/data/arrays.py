"""In-memory data sets: user arrays from ``.npy``/``.npz`` files and scikit-learn's digits.

Array files
-----------
- ``.npy`` holds ``x`` only (unlabelled).
- ``.npz`` holds ``x`` (or ``images`` / ``points``) and optionally integer labels under
  ``labels`` (or ``label`` / ``y``).
- uint8 ``x`` are images and are scaled to [-1, 1] with ``x / 127.5 - 1``; float ``x`` are used
  as stored (cast to float32).
- rank 2 ``[N, D]`` is points, rank 4 ``[N, H, W, C]`` is images, and rank 3 ``[N, H, W]`` is
  images that get a channel axis.
- ``num_classes`` is ``max(label) + 1``.

Digits
------
scikit-learn's ``load_digits`` (1,797 images of 8x8 pixels, values 0..16, 10 labels, shipped with
the package): shape (8, 8, 1), scaled linearly from [0, 16] to [-1, 1].

Both stream through ``ExampleOrder`` (see ``core``), so batches may span epochs.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import (
    BatchLayout,
    DataSpec,
    ExampleOrder,
    FiniteStreamMixin,
    Source,
    draw_reference_indices,
    flip_rows,
    uint8_to_float,
)

X_KEYS = ("x", "images", "points")
LABEL_KEYS = ("labels", "label", "y")


class ArraySource(FiniteStreamMixin, Source):
    """Streams rows of an array held in memory.

    ``x`` is kept in its stored dtype (uint8 images stay uint8) and converted batch by batch,
    which keeps memory at a quarter of a float32 copy for image data.
    """

    def __init__(
        self,
        x: np.ndarray,
        labels: np.ndarray | None,
        *,
        kind: str,
        layout: BatchLayout,
        seed: int,
        shuffle: bool,
        random_flip: bool,
    ):
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {x.shape[0]} rows of x.")
        self._x = x
        self._labels = None if labels is None else labels.astype(np.int32)
        num_classes = 0 if labels is None else int(labels.max()) + 1
        self.spec = DataSpec(shape=tuple(int(d) for d in x.shape[1:]), num_classes=num_classes, kind=kind)
        self.num_examples = int(x.shape[0])
        self._layout = layout
        self._random_flip = random_flip and kind == "images"
        self._order = ExampleOrder(self.num_examples, seed, shuffle)
        self._position = 0

    def _rows(self, indices: np.ndarray) -> np.ndarray:
        rows = self._x[indices]
        if rows.dtype == np.uint8:
            return uint8_to_float(rows)
        return rows.astype(np.float32, copy=False)

    def _labels_for(self, indices: np.ndarray) -> np.ndarray:
        if self._labels is None:
            return np.zeros(len(indices), dtype=np.int32)
        return self._labels[indices]

    def next_batch(self) -> dict[str, np.ndarray]:
        start = self._position + self._layout.offset
        indices, flips = self._order.lookup(start, self._layout.batch_size, self._random_flip)
        self._position += self._layout.global_batch_size
        x = self._rows(indices)
        if self._random_flip:
            flip_rows(x, flips)
        return {"x": x, "label": self._labels_for(indices)}

    def reference(self, n: int, seed: int) -> np.ndarray:
        return self._rows(draw_reference_indices(self.num_examples, n, seed))


def _load_file(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads x and optional labels, with the error messages of ``validate_data_config``."""
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            x_key = next((k for k in X_KEYS if k in archive), None)
            if x_key is None:
                raise ValueError(
                    f"{path} has arrays {keys} but none named {list(X_KEYS)}; save the data "
                    "array under the key 'x' (and labels under 'labels')."
                )
            label_key = next((k for k in LABEL_KEYS if k in archive), None)
            x = archive[x_key]
            labels = None if label_key is None else archive[label_key]
            return x, labels
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(
                f"{path} holds object (pickled) arrays; save plain numeric arrays "
                "(np.savez(path, x=..., labels=...)) with uint8 or float x and integer labels."
            ) from error
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"cannot read data.path={path!r} ({error}); point data.path at a valid .npy/.npz file."
        ) from error


def _check_arrays(path: str, x: np.ndarray, labels: np.ndarray | None) -> str:
    """Validates shapes and dtypes; returns the kind ('points' or 'images')."""
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(
            f"x in {path} has dtype {x.dtype}; store images as uint8 (0..255) or data as float (used as is)."
        )
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"x in {path} has shape {x.shape}; use [N, D] for points, [N, H, W] or [N, H, W, C] for images."
        )
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise ValueError(f"x in {path} has shape {x.shape}; it needs at least one non-empty row.")
    if x.ndim == 2 and x.dtype == np.uint8:
        raise ValueError(
            f"x in {path} is uint8 of shape {x.shape}, which reads as images but has no spatial "
            "axes; store points as float, or images as [N, H, W(, C)]."
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"x in {path} contains NaN or inf values; clean the data first.")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels in {path} have dtype {labels.dtype}; labels must be integers "
                "(e.g. labels.astype(np.int32)) or set data.use_labels=False."
            )
        if labels.shape != (x.shape[0],):
            raise ValueError(
                f"labels in {path} have shape {labels.shape} but x has {x.shape[0]} rows; "
                f"save one label per row (shape ({x.shape[0]},)) or set data.use_labels=False."
            )
        if labels.min() < 0 or labels.max() >= np.iinfo(np.int32).max:
            raise ValueError(
                f"labels in {path} range over [{labels.min()}, {labels.max()}]; they must be "
                "non-negative class indices 0..C-1."
            )
    return "points" if x.ndim == 2 else "images"


def prepare_arrays(config, name: str) -> dict[str, Any]:
    """Loads and checks the arrays once so ``build_arrays`` need not read the file again."""
    cfg.reject_image_size(config, name)
    cfg.reject_cache_decoded(config, name)
    path = cfg.get(config, "path")
    if not path:
        raise ValueError(
            "data.name='arrays' needs data.path set to a .npy (x only) or .npz (x and optional labels) file."
        )
    if not path.endswith((".npy", ".npz")):
        raise ValueError(f"data.path={path!r} must end in .npy or .npz for data.name='arrays'.")
    if not os.path.isfile(path):
        raise ValueError(f"data.path={path!r} does not exist; set data.path to a .npy/.npz file.")
    x, labels = _load_file(path)
    kind = _check_arrays(path, x, labels)
    if kind == "points":
        cfg.reject_random_flip(config, f"arrays file {path}")
    if x.ndim == 3:
        x = x[..., None]
    if not cfg.get(config, "use_labels"):
        labels = None
    return {"x": x, "labels": labels, "kind": kind}


def build_arrays(config, prepared: dict[str, Any], layout: BatchLayout, seed: int) -> ArraySource:
    return ArraySource(
        prepared["x"],
        prepared["labels"],
        kind=prepared["kind"],
        layout=layout,
        seed=seed,
        shuffle=cfg.get(config, "shuffle"),
        random_flip=cfg.get(config, "random_flip"),
    )


def prepare_digits(config, name: str) -> dict[str, Any]:
    cfg.reject_path(config, name)
    cfg.reject_image_size(config, name)
    cfg.reject_cache_decoded(config, name)
    try:
        from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes ~1 s
    except ImportError:
        raise ValueError(
            f"data.name={name!r} reads scikit-learn's digits: pip install -e '.[digits]' (or pip install scikit-learn)"
        ) from None

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(8.0) - np.float32(1.0))[..., None]
    labels = digits.target.astype(np.int32) if cfg.get(config, "use_labels") else None
    return {"x": x, "labels": labels, "kind": "images"}
