"""The data section of the experiment config and the checks shared by every reader.

Error messages name the config key as ``data.<key>`` because the lead config embeds this
section under ``data``.
"""

from __future__ import annotations

import numbers
from typing import Any

import ml_collections

DEFAULTS: dict[str, Any] = {
    # One of the names in shortcut_jax.data.READERS.
    "name": "checkerboard",
    # File (.npy/.npz) for 'arrays', folder for 'image_folder'; unused otherwise.
    "path": "",
    # 0 keeps native sizes (image folders must then be uniform); N centre-crops and resizes to NxN.
    "image_size": 0,
    # Horizontal flip with probability 0.5 per example (images only).
    "random_flip": False,
    # False gives label 0 everywhere and num_classes 0.
    "use_labels": True,
    # Decoding workers. Image folders: threads (also used for the header scan in validation).
    # TFDS: worker processes (0 decodes in threads of the training process).
    "num_workers": 8,
    # False streams examples in their stored order (sorted file names for folders).
    "shuffle": True,
    # Image folders: decode every image once into host memory (uint8) when the reader is built,
    # then serve batches from it with no decoding threads running during training. For data
    # that fits in memory (CIFAR-10: 150 MiB); refused when it would take more than half of the
    # memory available.
    "cache_decoded": False,
    # TFDS (data.name='tfds'): the data set, e.g. 'cifar10', 'celeb_a_hq/256', 'imagenet2012',
    # 'mnist', 'lsun/bedroom', optionally with a version ('imagenet2012:5.1.0').
    "tfds_name": "",
    # TFDS split, with TFDS's slicing syntax ('train', 'validation', 'train[:90%]').
    "split": "train",
    # TFDS data folder (local or gs://); '' uses TFDS's default ($TFDS_DATA_DIR or
    # ~/tensorflow_datasets).
    "data_dir": "",
    # TFDS feature holding the image, and the one holding the class label (read only when
    # use_labels is True).
    "image_key": "image",
    "label_key": "label",
    # 'latents' only: the VAE the set must have been encoded with: its hub id or folder name (compared
    # by the last part: 'stabilityai/sd-vae-ft-mse' accepts a set encoded from /models/sd-vae-ft-mse),
    # or a prefix of 8+ hex digits of its weights' sha256; '' accepts any.
    # (data.image_size, when set, is the image size the set must have been encoded at.)
    "latent_vae": "",
    # 'latents' only: the scaling factor the set's VAE must have; 0.0 takes the set's own.
    "latent_scale": 0.0,
}

# Keys that only the TFDS reader reads: set for another reader, they point at a wrong data.name.
TFDS_ONLY_KEYS = ("tfds_name", "data_dir")


def default_data_config() -> ml_collections.ConfigDict:
    """A ConfigDict holding every data field with its default value."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def get(config, key: str) -> Any:
    """Reads ``key`` from a ConfigDict or plain dict, falling back to the default."""
    return config.get(key, DEFAULTS[key])


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_common_fields(config) -> None:
    """Type and range checks that do not depend on which reader is selected."""
    unknown = sorted(set(config.keys()) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown data config keys {unknown}; the known keys are {sorted(DEFAULTS)}. "
            "Fix the spelling or remove them."
        )
    name = get(config, "name")
    if not isinstance(name, str):
        raise ValueError(f"data.name must be a string, got {name!r}.")
    path = get(config, "path")
    if not isinstance(path, str):
        raise ValueError(f"data.path must be a string ('' when unused), got {path!r}.")
    image_size = get(config, "image_size")
    if not _is_int(image_size) or image_size < 0:
        raise ValueError(f"data.image_size must be an int >= 0 (0 keeps the native size), got {image_size!r}.")
    workers = get(config, "num_workers")
    # TFDS decodes in threads of the training process with 0 worker processes; image folders
    # always need at least one decoding thread.
    fewest_workers = 0 if name == "tfds" else 1
    if not _is_int(workers) or workers < fewest_workers:
        raise ValueError(f"data.num_workers must be an int >= {fewest_workers} (e.g. 8), got {workers!r}.")
    for key in ("random_flip", "use_labels", "shuffle", "cache_decoded"):
        value = get(config, key)
        if not isinstance(value, bool):
            raise ValueError(f"data.{key} must be True or False, got {value!r}.")
    for key in ("tfds_name", "split", "data_dir", "image_key", "label_key"):
        value = get(config, key)
        if not isinstance(value, str):
            raise ValueError(f"data.{key} must be a string, got {value!r}.")
    if name != "tfds":
        for key in TFDS_ONLY_KEYS:
            if get(config, key):
                raise ValueError(
                    f"data.{key}={get(config, key)!r} is set but data.name={name!r} does not "
                    f"read TFDS data sets; set data.name='tfds', or data.{key}=''."
                )
    latent_vae, latent_scale = get(config, "latent_vae"), get(config, "latent_scale")
    if not isinstance(latent_vae, str):
        raise ValueError(f"data.latent_vae must be a string ('' accepts any VAE), got {latent_vae!r}.")
    if not isinstance(latent_scale, numbers.Real) or isinstance(latent_scale, bool) or latent_scale < 0:
        raise ValueError(f"data.latent_scale must be a number >= 0 (0 takes the set's own), got {latent_scale!r}.")
    if name != "latents" and (latent_vae or latent_scale):
        raise ValueError(
            f"data.latent_vae / data.latent_scale describe pre-encoded latents (data.name='latents'), not "
            f"data.name={name!r}; set them to '' and 0.0."
        )


def reject_path(config, name: str) -> None:
    """For readers that do not read files: a set path almost always means a wrong name."""
    if get(config, "path"):
        raise ValueError(
            f"data.path={get(config, 'path')!r} is set but data.name={name!r} reads no files. "
            "Set data.name='arrays' (.npy/.npz) or 'image_folder', or set data.path=''."
        )


def reject_image_size(config, name: str) -> None:
    if get(config, "image_size"):
        raise ValueError(
            f"data.image_size={get(config, 'image_size')} is only supported for "
            f"data.name='image_folder' or 'tfds'; set data.image_size=0 for {name!r}."
        )


def reject_cache_decoded(config, name: str) -> None:
    if get(config, "cache_decoded"):
        raise ValueError(
            f"data.cache_decoded=True is only supported for data.name='image_folder' ({name!r} "
            "already holds its examples in memory); set data.cache_decoded=False."
        )


def reject_random_flip(config, name: str) -> None:
    if get(config, "random_flip"):
        raise ValueError(
            f"data.random_flip=True mirrors images, but {name!r} gives points, not images; set data.random_flip=False."
        )


def check_run_args(batch_size: int, seed: int, process_index: int, process_count: int) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size (per process) must be an int >= 1, got {batch_size!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    if not _is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}.")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}.")
