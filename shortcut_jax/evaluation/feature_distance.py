"""Classifier Frechet distance (CFD): the FID formula in the features of the project's own classifier.

The network is the CIFAR-10 classifier of ``evaluation.classifier`` (trained with
``python -m shortcut_jax.evaluation.train_classifier``), not Inception, so a CFD is not an FID:
always report it as "classifier Frechet distance" or "CFD", never as FID, and compare CFDs only
when they come from the same classifier weights (``FeatureExtractor.fingerprint``).

Usage::

    extractor = FeatureExtractor('classifier_ckpt')
    ref = reference_stats(extractor, test_images, cache_path='classifier_ckpt/test_stats.npz')
    cfd = classifier_frechet_distance(extractor, samples, ref)

    # as the evaluation metric eval.metric='cfd': evaluation.metrics.ClassifierFrechet

Samples are floats in [-1, 1] (or uint8). Before feature extraction they are clipped to [-1, 1]
and rounded to the 8-bit grid, as they would be when saved as images: the reference images are
8-bit, and differences below one grey level should not count.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from shortcut_jax.evaluation import classifier, distances
from shortcut_jax.evaluation.classifier import load_classifier
from shortcut_jax.evaluation.pixels import to_uint8
from shortcut_jax.infra import files

__all__ = [
    "METRIC_NAME",
    "FeatureExtractor",
    "classifier_frechet_distance",
    "load_classifier",
    "load_stats",
    "reference_stats",
    "stats_key",
    "to_uint8",
]

METRIC_NAME = "classifier Fréchet distance (CFD)"


class FeatureExtractor:
    """Penultimate features of the saved classifier: ``extractor(images) -> float32 [N, D]``.

    Runs in float32 with full-precision convolutions (no TF32/bf16), so features, and hence
    CFDs, do not depend on the accelerator's fast-math defaults. Images go through in chunks of
    ``batch_size`` (the last one padded, so there is one compilation).
    """

    def __init__(
        self, path: str | None = None, *, batch_size: int = 500, config: dict | None = None, variables: Any = None
    ):
        if (path is None) == (variables is None):
            raise ValueError("give either a saved classifier's path or config and variables")
        if path is not None:
            config, variables, meta = load_classifier(path)
            self.info = dict(meta.get("info", {}))
            self.fingerprint = meta.get("fingerprint") or classifier.variables_fingerprint(variables)
        else:
            config = classifier.normalize_config(config)
            self.info = {}
            self.fingerprint = classifier.variables_fingerprint(variables)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = path
        self.config = classifier.normalize_config(config)
        self.batch_size = int(batch_size)
        self.image_size = self.config["image_size"]
        self.dim = self.config["widths"][-1]
        self._variables = jax.device_put(variables)
        model = classifier.build_model(self.config, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        self._fn = jax.jit(lambda v, x: classifier.features(model, v, classifier.images_to_float(x)))

    @classmethod
    def from_variables(cls, config: dict, variables: Any, *, batch_size: int = 500) -> "FeatureExtractor":
        return cls(config=config, variables=variables, batch_size=batch_size)

    def __call__(self, images) -> np.ndarray:
        x = to_uint8(images, self.image_size)
        n = len(x)
        out = np.empty((n, self.dim), np.float32)
        b = self.batch_size
        for start in range(0, n, b):
            chunk = x[start : start + b]
            m = len(chunk)
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), np.uint8)])
            out[start : start + m] = np.asarray(self._fn(self._variables, chunk))[:m]
        return out


def stats_key(extractor: FeatureExtractor, images_u8: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{extractor.fingerprint}\0{images_u8.shape}\n".encode())
    digest.update(np.ascontiguousarray(images_u8).tobytes())
    return digest.hexdigest()


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a file written by :func:`reference_stats`."""
    with np.load(path) as f:
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def reference_stats(
    extractor: FeatureExtractor,
    images,
    cache_path: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of the features of ``images``.

    With ``cache_path`` the result is saved there (``.npz`` with ``mu``, ``sigma``, ``n`` and a
    key) and reused on later calls whose images and classifier weights are the same; a file
    with another key is recomputed and overwritten.
    """
    x = to_uint8(images, extractor.image_size)
    key = stats_key(extractor, x)
    if cache_path and os.path.isfile(cache_path):
        with np.load(cache_path) as f:
            if "key" in f.files and str(f["key"]) == key:
                return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        logging.info("%s holds statistics of other images or weights; recomputing", cache_path)
    mu, sigma = distances.gaussian_stats(extractor(x))
    if cache_path:
        files.atomic_savez(
            cache_path,
            mu=mu,
            sigma=sigma,
            n=np.asarray(len(x)),
            key=np.asarray(key),
            fingerprint=np.asarray(extractor.fingerprint),
        )
    return mu, sigma


def as_stats(stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, (str, os.PathLike)):
        return load_stats(os.fspath(stats))
    mu, sigma = stats
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def classifier_frechet_distance(extractor: FeatureExtractor, samples, reference_stats) -> float:
    """CFD between ``samples`` [N, H, W, 3] and reference statistics ``(mu, sigma)`` (or their file)."""
    mu_r, sigma_r = as_stats(reference_stats)
    if mu_r.shape != (extractor.dim,):
        raise ValueError(f"reference statistics have dimension {mu_r.shape}, the classifier's features {extractor.dim}")
    mu, sigma = distances.gaussian_stats(extractor(samples))
    return distances.frechet_distance(mu, sigma, mu_r, sigma_r)
