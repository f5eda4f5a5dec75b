"""Name -> reader table, and the two entry points ``validate_data_config`` and ``make_dataset``.

Each reader is a pair of functions:

- ``prepare(config, name)`` checks everything about the config and the data that can be checked
  up front, raising ``ValueError`` with the fix, and returns whatever ``build`` needs (loaded
  arrays, a scanned file list), so the data is read only once.
- ``build(config, prepared, layout, seed)`` returns the ``Source``.

A new reader is added by writing these two functions and adding an
entry to ``READERS``; the config keys it needs go in ``config.DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from shortcut_jax.data import arrays, image_folder, latents, pairs, tfds, toy
from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import BatchLayout, Source


@dataclasses.dataclass(frozen=True)
class Reader:
    prepare: Callable[[Any, str], Any]
    build: Callable[[Any, Any, BatchLayout, int], Source]


def _toy_reader(name: str) -> Reader:
    return Reader(
        prepare=toy.prepare_toy,
        build=lambda config, prepared, layout, seed: toy.ToySource(name, layout, seed),
    )


READERS: dict[str, Reader] = {
    **{name: _toy_reader(name) for name in toy.SAMPLERS},
    "digits": Reader(prepare=arrays.prepare_digits, build=arrays.build_arrays),
    "arrays": Reader(prepare=arrays.prepare_arrays, build=arrays.build_arrays),
    "image_folder": Reader(prepare=image_folder.prepare_image_folder, build=image_folder.build_image_folder),
    "tfds": Reader(prepare=tfds.prepare_tfds, build=tfds.build_tfds),
    "latents": Reader(prepare=latents.prepare_latents, build=latents.build_latents),
    pairs.NAME: Reader(prepare=pairs.prepare_pairs, build=pairs.build_pairs),
}


def _prepare(data_config) -> tuple[Reader, Any]:
    cfg.check_common_fields(data_config)
    name = cfg.get(data_config, "name")
    if name not in READERS:
        raise ValueError(f"unknown data.name={name!r}; set data.name to one of {sorted(READERS)}.")
    reader = READERS[name]
    return reader, reader.prepare(data_config, name)


def validate_data_config(data_config) -> None:
    """Raises ValueError, naming the config key to change, if the data cannot be read.

    For image folders this lists the folder and opens every file's header in a thread pool,
    so a broken file is reported now rather than hours into training.
    """
    _prepare(data_config)


def make_dataset(data_config, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1) -> Source:
    """Validates ``data_config`` and returns the stream for this process.

    ``batch_size`` is per process: each global batch holds ``batch_size * process_count``
    examples and process ``p`` gets rows ``[p * batch_size, (p + 1) * batch_size)`` of it.
    """
    cfg.check_run_args(batch_size, seed, process_index, process_count)
    reader, prepared = _prepare(data_config)
    layout = BatchLayout(batch_size, process_index, process_count)
    return reader.build(data_config, prepared, layout, seed)
