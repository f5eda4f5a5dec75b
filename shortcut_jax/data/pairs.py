"""Stored reflow pairs (``data.name='reflow_pairs'``, ``data.path=DIR``): a teacher's couplings of
noise and samples, written by ``python -m shortcut_jax.reflow_pairs`` (``generate_pairs`` below).

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
from typing import Any, Optional, Sequence

import jax
import numpy as np

from shortcut_jax.data import arrays
from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import BatchLayout, DataSpec
from shortcut_jax.data.image_folder import CACHE_MEMORY_SHARE, _available_memory
from shortcut_jax.infra import distributed, files

MANIFEST = "manifest.json"
# first word after the seed of each shard's random stream (distinct from the data readers' streams)
PAIR_STREAM = 7


# ------------------------------------------------------------------------------ stage one


def shard_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"pairs_{index:05d}.npz")


def shard_inputs(index: int, count: int, *, seed: int, shape: Sequence[int], num_classes: int):
    """Noise ``[count, *shape]`` and labels ``[count]`` of shard ``index`` (numpy, deterministic)."""
    rng = np.random.default_rng([seed, PAIR_STREAM, index])
    noise = rng.standard_normal((count, *shape)).astype(np.float32)
    if num_classes > 0:
        labels = rng.integers(0, num_classes, count).astype(np.int32)
    else:
        labels = np.full(count, 0, np.int32)  # unlabelled data: label 0, as the readers give it
    return noise, labels


def generate_pairs(
    sampler,
    params,
    *,
    out_dir: str,
    shape: Sequence[int],
    num_classes: int,
    num_pairs: int,
    num_steps: int,
    seed: int,
    shard_size: int = 10_000,
    batch_size: int = 1000,
    cfg_scale: float = 1.0,
    meta: Optional[dict] = None,
) -> dict:
    """Stage one: ``num_pairs`` (noise, sample) pairs from ``sampler(params, noise, labels, ...)``.

    ``sampler`` has the call of ``sampling.Sampler`` (any of the project's samplers). Shards
    already on disk are kept when ``out_dir``'s manifest records the same settings; different
    settings are refused before anything is generated. ``meta`` (e.g. the teacher's checkpoint
    and step) is stored in the manifest. Returns the manifest.

    In a job of several processes every process calls this alike: each takes its part in every
    sampler call (which must return the whole batch on every process, as ``Sampler.to_host``
    gives it), process 0 alone decides from what it finds on disk which shards are missing and
    writes the manifest and the shards, and no process returns before they are written.
    """
    if num_pairs < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"num_pairs={num_pairs}, shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    settings = {
        "num_pairs": int(num_pairs),
        "shard_size": int(shard_size),
        "seed": int(seed),
        "num_steps": int(num_steps),
        "cfg_scale": float(cfg_scale),
        "shape": [int(d) for d in shape],
        "num_classes": int(num_classes),
        "meta": meta or {},
    }
    num_shards = -(-num_pairs // shard_size)
    manifest_path = os.path.join(out_dir, MANIFEST)
    writer = jax.process_index() == 0
    # what is on disk, as process 0 sees it: [settings differ, shard 0 done, shard 1 done, ...]
    status = np.zeros(1 + num_shards, np.int32)
    differing = ["see process 0"]
    if writer:
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                saved = json.load(f)
            differing = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k])))
            status[0] = bool(differing)
        status[1:] = [os.path.exists(shard_path(out_dir, i)) for i in range(num_shards)]
    if jax.process_count() > 1:
        # every process takes part in every sampler call, so all skip the same shards and all
        # refuse together (another host may not even see the folder)
        from jax.experimental import multihost_utils

        status = np.asarray(multihost_utils.broadcast_one_to_all(status))
    if status[0]:
        raise ValueError(
            f"{out_dir} holds pairs generated with other settings ({', '.join(differing)}):"
            " use another output directory or the saved settings"
        )
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(manifest_path, "w") as f:
            json.dump(settings, f, indent=1)

    for index in range(num_shards):
        if status[1 + index]:
            continue
        count = min(shard_size, num_pairs - index * shard_size)
        noise, labels = shard_inputs(index, count, seed=seed, shape=shape, num_classes=num_classes)
        samples = np.empty_like(noise)
        chunk = min(batch_size, count)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            # pad the last chunk to the chunk size: one compilation for every call
            chunk_noise = np.zeros((chunk, *shape), np.float32)
            chunk_labels = np.full(chunk, num_classes, np.int32)
            chunk_noise[: stop - start] = noise[start:stop]
            chunk_labels[: stop - start] = labels[start:stop] if num_classes > 0 else num_classes
            out = sampler(params, chunk_noise, chunk_labels, num_steps=num_steps, cfg_scale=cfg_scale)
            samples[start:stop] = np.asarray(out)[: stop - start]
        if writer:
            # written whole, then renamed: a stopped run leaves no partial shard
            files.atomic_savez(shard_path(out_dir, index), noise=noise, x=samples, label=labels)
    # no process returns before process 0 has written every file
    distributed.sync(f"reflow pairs written to {out_dir}")
    return settings


def load_pairs(out_dir: str) -> dict[str, np.ndarray]:
    """Every shard of a finished stage one, concatenated in shard order: ``noise``, ``x``, ``label``."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: generate the pairs first (reflow.generate_pairs)")
    with open(manifest_path) as f:
        settings = json.load(f)
    num_shards = -(-settings["num_pairs"] // settings["shard_size"])
    missing = [shard_path(out_dir, i) for i in range(num_shards) if not os.path.exists(shard_path(out_dir, i))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {num_shards} shards are missing in {out_dir} (first:"
            f" {missing[0]}): run the generation again to complete them"
        )
    parts = []
    for i in range(num_shards):
        with np.load(shard_path(out_dir, i)) as z:
            parts.append({k: z[k] for k in ("noise", "x", "label")})
    return {k: np.concatenate([p[k] for p in parts]) for k in ("noise", "x", "label")}


# ------------------------------------------------------------------------------ stage two


NAME = "reflow_pairs"


class PairSource(arrays.ArraySource):
    """``ArraySource`` over the teacher's samples, with the aligned noise rows added to each batch."""

    def __init__(
        self,
        pairs: dict[str, np.ndarray],
        spec: DataSpec,
        *,
        layout: BatchLayout,
        seed: int,
        shuffle: bool,
        manifest: dict[str, Any],
    ):
        labels = pairs["label"] if spec.num_classes > 0 else None
        super().__init__(
            pairs["x"], labels, kind=spec.kind, layout=layout, seed=seed, shuffle=shuffle, random_flip=False
        )
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
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root) or not os.path.isfile(path):
        raise ValueError(
            f"data.path={root!r} has no {MANIFEST}: point it at the --out_dir of"
            " `python -m shortcut_jax.reflow_pairs` (stage one of reflow)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, OSError) as error:
        raise ValueError(f"cannot read {path} ({error}): generate the pairs again") from error
    missing = [k for k in ("num_pairs", "shard_size", "shape", "num_classes") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was not written by generate_pairs")
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
        raise ValueError(
            "data.random_flip=True would mirror the teacher's samples but not the noise they came"
            f" from, breaking the pairs of data.name={name!r}: set data.random_flip=False"
        )
    root = cfg.get(config, "path")
    if not root:
        raise ValueError(
            f"data.name={name!r} needs data.path set to the folder written by"
            " `python -m shortcut_jax.reflow_pairs --out_dir=DIR`"
        )
    manifest = read_manifest(root)
    shape = tuple(int(d) for d in manifest["shape"])
    need = 2 * int(manifest["num_pairs"]) * int(np.prod(shape)) * 4
    available = _available_memory()
    if available is not None and need > CACHE_MEMORY_SHARE * available:
        raise ValueError(
            f"the {manifest['num_pairs']} pairs in data.path={root!r} take {need / 2**30:.1f} GiB,"
            f" more than {CACHE_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory"
            " available: generate fewer pairs (--num_pairs) or train on a host with more memory"
        )
    try:
        pairs = load_pairs(root)
    except FileNotFoundError as error:
        raise ValueError(f"data.path={root!r}: {error}") from None
    count = int(manifest["num_pairs"])
    for key, want in (("x", (count, *shape)), ("noise", (count, *shape)), ("label", (count,))):
        if pairs[key].shape != want:
            raise ValueError(
                f"data.path={root!r}: the shards hold {key} of shape {pairs[key].shape}, the manifest"
                f" says {want}; generate the pairs again into an empty folder"
            )
        if key != "label" and not np.isfinite(pairs[key]).all():
            raise ValueError(
                f"data.path={root!r}: {key} holds NaN or inf values (a diverged teacher?); generate"
                " the pairs from a sound checkpoint"
            )
    num_classes = int(manifest["num_classes"]) if cfg.get(config, "use_labels") else 0
    spec = DataSpec(shape=shape, num_classes=num_classes, kind="points" if len(shape) == 1 else "images")
    return {"pairs": pairs, "spec": spec, "manifest": manifest}


def build_pairs(config, prepared: dict[str, Any], layout: BatchLayout, seed: int) -> PairSource:
    return PairSource(
        prepared["pairs"],
        prepared["spec"],
        layout=layout,
        seed=seed,
        shuffle=cfg.get(config, "shuffle"),
        manifest=prepared["manifest"],
    )
