"""Stored reflow pairs (``data.name='reflow_pairs'``, ``data.path=DIR``): a teacher's couplings of
noise and samples, written by ``python -m shortcut_jax.reflow_pairs`` (``objectives.reflow.generate_pairs``).

Batches are ``{'x': float32 [B, *shape], 'noise': float32 [B, *shape], 'label': int32 [B]}``: row
``i`` of ``noise`` is the noise the teacher carried to row ``i`` of ``x``, so stage two of reflow
(``objectives.reflow.loss_fn``) trains on the teacher's couplings instead of independent noise
and data. The stream is the arrays reader's (``core.ExampleOrder``: deterministic shuffle,
per-process slices, a position saved with every checkpoint), and the noise rows are looked up
with the indices of the data rows, so they stay paired through any shuffle. Objectives other
than reflow read ``x`` and ``label`` and leave ``noise`` aside: the teacher's samples are then
ordinary training data.

The pairs are held in host memory (``noise`` and ``x`` in float32: 8 bytes per value of an
example, e.g. 32 KiB per 32x32x4 latent pair); the set is refused when it would take more than
half of the memory available. The DataSpec (shape, classes) is the manifest's, i.e. the
teacher's; ``reference`` draws from the teacher's samples, so a metric measures the distance to
the teacher's distribution. Pairs of a latent run are latents (no decoding happened).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from shortcut_jax.data import arrays
from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import BatchLayout, DataSpec
from shortcut_jax.data.image_folder import CACHE_MEMORY_SHARE, _available_memory
from shortcut_jax.objectives import reflow

NAME = "reflow_pairs"


class PairSource(arrays.ArraySource):
    """``ArraySource`` over the teacher's samples, with the aligned noise rows added to each batch."""

    def __init__(self, pairs: dict[str, np.ndarray], spec: DataSpec, *, layout: BatchLayout, seed: int,
                 shuffle: bool, manifest: dict[str, Any]):
        labels = pairs["label"] if spec.num_classes > 0 else None
        super().__init__(pairs["x"], labels, kind=spec.kind, layout=layout, seed=seed, shuffle=shuffle,
                         random_flip=False)
        # the manifest's class count, not the largest label seen (a class may be missing from the pairs)
        self.spec = spec
        self.manifest = manifest
        self._noise = pairs["noise"]

    def next_batch(self) -> dict[str, np.ndarray]:
        # the rows the parent is about to serve (the order's lookup is cached per epoch)
        indices, _ = self._order.lookup(self._position + self._layout.offset, self._layout.batch_size)
        batch = super().next_batch()
        batch["noise"] = self._noise[indices].astype(np.float32, copy=False)
        return batch


def read_manifest(root: str) -> dict[str, Any]:
    path = os.path.join(root, reflow.MANIFEST)
    if not os.path.isdir(root) or not os.path.isfile(path):
        raise ValueError(f"data.path={root!r} has no {reflow.MANIFEST}: point it at the --out_dir of"
                         " `python -m shortcut_jax.reflow_pairs` (stage one of reflow)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, OSError) as error:
        raise ValueError(f"cannot read {path} ({error}): generate the pairs again") from error
    missing = [k for k in ("num_pairs", "shard_size", "shape", "num_classes") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was not written by reflow.generate_pairs")
    return manifest


def vae_record(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The VAE record of the latent set a latent teacher was trained on (what decodes these
    pairs' samples and a run trained on them), as ``reflow_pairs`` stores it in the manifest's
    ``meta.data.vae``; None for the pairs of a pixel or point run."""
    return ((manifest.get("meta") or {}).get("data") or {}).get("vae")


def prepare_pairs(config, name: str) -> dict[str, Any]:
    """Reads and checks every shard once (what ``build_pairs`` serves)."""
    cfg.reject_image_size(config, name)
    cfg.reject_cache_decoded(config, name)
    if cfg.get(config, "random_flip"):
        raise ValueError("data.random_flip=True would mirror the teacher's samples but not the noise they came"
                         f" from, breaking the pairs of data.name={name!r}: set data.random_flip=False")
    root = cfg.get(config, "path")
    if not root:
        raise ValueError(f"data.name={name!r} needs data.path set to the folder written by"
                         " `python -m shortcut_jax.reflow_pairs --out_dir=DIR`")
    manifest = read_manifest(root)
    shape = tuple(int(d) for d in manifest["shape"])
    need = 2 * int(manifest["num_pairs"]) * int(np.prod(shape)) * 4
    available = _available_memory()
    if available is not None and need > CACHE_MEMORY_SHARE * available:
        raise ValueError(f"the {manifest['num_pairs']} pairs in data.path={root!r} take {need / 2**30:.1f} GiB,"
                         f" more than {CACHE_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory"
                         " available: generate fewer pairs (--num_pairs) or train on a host with more memory")
    try:
        pairs = reflow.load_pairs(root)
    except FileNotFoundError as error:
        raise ValueError(f"data.path={root!r}: {error}") from None
    count = int(manifest["num_pairs"])
    for key, want in (("x", (count, *shape)), ("noise", (count, *shape)), ("label", (count,))):
        if pairs[key].shape != want:
            raise ValueError(f"data.path={root!r}: the shards hold {key} of shape {pairs[key].shape}, the manifest"
                             f" says {want}; generate the pairs again into an empty folder")
        if key != "label" and not np.isfinite(pairs[key]).all():
            raise ValueError(f"data.path={root!r}: {key} holds NaN or inf values (a diverged teacher?); generate"
                             " the pairs from a sound checkpoint")
    num_classes = int(manifest["num_classes"]) if cfg.get(config, "use_labels") else 0
    spec = DataSpec(shape=shape, num_classes=num_classes, kind="points" if len(shape) == 1 else "images")
    return {"pairs": pairs, "spec": spec, "manifest": manifest}


def build_pairs(config, prepared: dict[str, Any], layout: BatchLayout, seed: int) -> PairSource:
    return PairSource(prepared["pairs"], prepared["spec"], layout=layout, seed=seed,
                      shuffle=cfg.get(config, "shuffle"), manifest=prepared["manifest"])
