"""The samples an evaluation scores: fixed noise and class labels, drawn batch by batch.

A sample set is defined by ``(seed, number of samples, label mode)`` alone: sample ``i`` starts
from the ``i``-th noise draw of ``np.random.default_rng(seed)`` (one stream, read in order, so
the samples do not depend on the batch size or on the number of devices) and gets the ``i``-th
entry of :func:`class_labels`. Every budget starts from the same noise and labels, so a table
of budgets compares the same samples taken in fewer or more steps.

Batches go through ``sampling.Sampler``, which splits each batch over the mesh's devices: every
device draws its own rows and no device repeats another's (``tests/test_sampling.py``). The
last batch is padded to the batch size, so every batch has one shape and the sampler compiles
once for every budget.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np

__all__ = ["LABEL_STREAM", "class_labels", "device_batches", "draw_samples", "sample_batches"]

# The labels' generator is np.random.default_rng([seed, LABEL_STREAM]): independent of the
# noise stream of the same seed.
LABEL_STREAM = 1


def class_labels(num_samples: int, num_classes: int, *, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """int32 ``[num_samples]`` class labels (zeros for an unconditional model).

    ``'balanced'``: every class ``num_samples // num_classes`` times, the remaining
    ``num_samples % num_classes`` labels given to distinct classes chosen by the seed, in an order
    shuffled by the seed (50,000 samples of ImageNet: exactly 50 per class, the protocol of the
    reference FID-50k evaluations). ``'random'``: uniform draws, as most sampling scripts do.
    """
    if num_classes <= 0:
        return np.zeros(num_samples, np.int32)
    rng = np.random.default_rng([seed, LABEL_STREAM])
    if mode == "random":
        return rng.integers(0, num_classes, num_samples).astype(np.int32)
    if mode != "balanced":
        raise ValueError(f"label mode {mode!r}: use 'balanced' or 'random' (eval.label_mode)")
    per_class, remainder = divmod(num_samples, num_classes)
    counts = np.full(num_classes, per_class)
    counts[rng.choice(num_classes, remainder, replace=False)] += 1
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), counts)
    rng.shuffle(labels)
    return labels


def sample_batches(
    sampler,
    params,
    *,
    shape,
    num_classes: int,
    num_samples: int,
    batch_size: int,
    num_steps: int,
    seed: int,
    cfg_scale: float = 1.0,
    guidance_interval=None,
    label_mode: str = "balanced",
    labels: Optional[np.ndarray] = None,
    decode: Optional[Callable] = None,
    timings: Optional[dict] = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(samples, labels)`` of the sample set, in order, ``batch_size`` at a time.

    ``samples``: host float32 ``[b, *shape]``, or with ``decode`` (latents ``[N, h, w, c]`` ->
    images ``[N, H, W, 3]`` in [-1, 1], applied on the devices) the decoded images. ``labels``
    overrides the label mode (one per sample). ``guidance_interval``: where ``cfg_scale``
    applies, for a sampler whose network reads it (None: the sampler's default). ``timings``:
    when given, ``sample_s`` and ``decode_s`` are added to it (waiting for the devices after each
    phase, which costs a little overlap). :func:`device_batches` gives the same batches left on the devices.
    """
    for x, count, chunk_labels in device_batches(
        sampler,
        params,
        shape=shape,
        num_classes=num_classes,
        num_samples=num_samples,
        batch_size=batch_size,
        num_steps=num_steps,
        seed=seed,
        cfg_scale=cfg_scale,
        guidance_interval=guidance_interval,
        label_mode=label_mode,
        labels=labels,
        decode=decode,
        timings=timings,
    ):
        yield np.asarray(sampler.to_host(x))[:count], chunk_labels


def device_batches(
    sampler,
    params,
    *,
    shape,
    num_classes: int,
    num_samples: int,
    batch_size: int,
    num_steps: int,
    seed: int,
    cfg_scale: float = 1.0,
    guidance_interval=None,
    label_mode: str = "balanced",
    labels: Optional[np.ndarray] = None,
    decode: Optional[Callable] = None,
    timings: Optional[dict] = None,
) -> Iterator[tuple[object, int, np.ndarray]]:
    """:func:`sample_batches` without the copy to the host: yields ``(samples, count, labels)``
    with ``samples`` the sampler's (or ``decode``'s) output as it is, a global array of
    ``batch_size`` rows sharded over the sampler's mesh (a host array where ``decode`` works on
    the host), of which the first ``count`` are samples and the rest padding; ``labels`` are
    the ``count`` samples' labels. ``sampler.to_host`` brings a batch to the host.
    """
    if labels is None:
        labels = class_labels(num_samples, num_classes, mode=label_mode, seed=seed)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}")
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        noise = np.zeros((batch_size, *shape), np.float32)
        # float64 draws cast to float32: the same noise whatever the batch size
        noise[:n] = rng.standard_normal((n, *shape))
        chunk_labels = np.full(batch_size, num_classes, np.int32)  # padding rows: the null class
        if num_classes > 0:
            chunk_labels[:n] = labels[start : start + n]
        began = time.perf_counter()
        x = sampler(
            params, noise, chunk_labels, num_steps=num_steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval
        )
        if timings is not None:
            jax.block_until_ready(x)
            sampled = time.perf_counter()
            timings["sample_s"] = timings.get("sample_s", 0.0) + sampled - began
        if decode is not None:
            x = decode(x)
            if timings is not None:
                jax.block_until_ready(x)
                timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - sampled
        yield x, n, labels[start : start + n]


def draw_samples(
    sampler,
    params,
    *,
    shape,
    num_classes: int,
    num_samples: int,
    batch_size: int,
    num_steps: int,
    seed: int,
    cfg_scale: float = 1.0,
    guidance_interval=None,
    label_mode: str = "balanced",
    labels: Optional[np.ndarray] = None,
    decode: Optional[Callable] = None,
) -> np.ndarray:
    """All ``num_samples`` samples of :func:`sample_batches` as one host array."""
    return np.concatenate(
        [
            x
            for x, _ in sample_batches(
                sampler,
                params,
                shape=shape,
                num_classes=num_classes,
                num_samples=num_samples,
                batch_size=batch_size,
                num_steps=num_steps,
                seed=seed,
                cfg_scale=cfg_scale,
                guidance_interval=guidance_interval,
                label_mode=label_mode,
                labels=labels,
                decode=decode,
            )
        ]
    )
