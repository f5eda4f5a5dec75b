"""Data input for shortcut_jax: 2-D toy distributions, digits, user arrays, image folders, TFDS.

Every reader returns a ``Source`` whose batches are ``{'x': float32 [B, *shape],
'label': int32 [B]}``, deterministic given the seed and resumable through
``get_state``/``set_state``. See ``core`` for how positions map to examples and processes.
States are small JSON dicts of ints: ``{'position', 'num_examples'}`` for finite data (arrays,
digits, image folders, TFDS; ``position`` counts examples consumed by all processes together, so
it survives a change of process count; the TFDS state also carries ``tfds_name``, ``split``,
``shuffle`` and ``seed``, checked at resume) and ``{'step'}`` for the toy distributions.

Usage::

    config = default_data_config()
    config.name, config.path = 'image_folder', '/data/cifar10/train'
    validate_data_config(config)  # cheap; raises ValueError naming the key to fix
    source = make_dataset(config, batch_size=128, seed=0,
                          process_index=jax.process_index(), process_count=jax.process_count())
    batch = source.next_batch()
"""

from shortcut_jax.data.archive import extract_archive
from shortcut_jax.data.config import default_data_config
from shortcut_jax.data.core import BatchLayout, DataSpec, Source
from shortcut_jax.data.pairs import NAME as PAIRS_DATA
from shortcut_jax.data.registry import READERS, Reader, make_dataset, validate_data_config

__all__ = [
    "PAIRS_DATA",
    "READERS",
    "BatchLayout",
    "DataSpec",
    "Reader",
    "Source",
    "default_data_config",
    "extract_archive",
    "make_dataset",
    "validate_data_config",
]
