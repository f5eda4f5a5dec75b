"""Sample-quality metrics for evaluation at every budget, built from ``config.eval``.

A metric is built once per run by :func:`build_metric` (which checks its files before anything is
compiled) and prepared once per evaluation against the data with ``metric.against(source,
num_samples, seed)``, which returns a :class:`Scorer`: ``scorer(samples) -> float`` plus the
data-against-data floor where the metric has one. A new metric is a class with ``name``,
``display_name`` and ``against``, and one line in :func:`build_metric`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Protocol

import numpy as np
from absl import logging

from shortcut_jax.evaluation import distances
from shortcut_jax.evaluation import feature_distance as fd

METRIC_CHOICES = ("auto", "none", "sliced_wasserstein", "cfd")


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One evaluation's scoring function against a fixed reference."""

    score: Callable[[np.ndarray], float]
    floor: Optional[float] = None  # the metric between two draws of the data
    reference: Optional[np.ndarray] = None  # data shown beside the samples (2-D scatter plots)

    def __call__(self, samples: np.ndarray) -> float:
        return float(self.score(samples))


class Metric(Protocol):
    name: str  # key in metrics.jsonl: eval/<name>_<n>step
    display_name: str  # in tables and plots

    def against(self, source, num_samples: int, seed: int) -> Scorer:
        ...


class SlicedWasserstein:
    """Sliced Wasserstein distance (512 random projections) against fresh data points, with the
    distance between two independent draws of the data as its floor."""

    name = "sliced_wasserstein"
    display_name = "sliced wasserstein"

    def against(self, source, num_samples: int, seed: int) -> Scorer:
        reference = source.reference(num_samples, seed=seed + 1)
        floor = distances.sliced_wasserstein(source.reference(num_samples, seed=seed + 2), reference)
        return Scorer(lambda samples: distances.sliced_wasserstein(samples, reference), floor, reference)


class ClassifierFrechet:
    """CFD as an evaluation metric (``eval.metric='cfd'``; see ``evaluation.metrics``).

    With ``reference_stats`` (``(mu, sigma)`` or a file from :func:`feature_distance.reference_stats`, e.g. the
    ``test_stats.npz`` that ``train_classifier`` writes) every score is against those fixed
    statistics and the data is not read. Without it the statistics of ``num_samples`` reference
    images of the data are computed, once per distinct reference set.

    The classifier's files are checked here and the network loaded at the first evaluation, so
    building the metric from a config costs nothing until it is used. Samples with non-finite
    values (a diverged model) score NaN instead of stopping the run.
    """

    name = "cfd"
    display_name = "cfd"

    def __init__(self, path: str, *, reference_stats=None, batch_size: int = 500):
        if not os.path.isfile(os.path.join(path, fd.classifier.CONFIG_FILE)):
            raise FileNotFoundError(f"no classifier saved at {path!r} (expected {fd.classifier.CONFIG_FILE} there):"
                                    " fix eval.classifier")
        if isinstance(reference_stats, (str, os.PathLike)) and not os.path.isfile(reference_stats):
            raise FileNotFoundError(f"reference statistics file {os.fspath(reference_stats)!r} does not exist:"
                                    " fix eval.reference_stats")
        self.path = path
        self.batch_size = batch_size
        self._stats_source = reference_stats
        self._extractor: fd.FeatureExtractor | None = None
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def extractor(self) -> fd.FeatureExtractor:
        if self._extractor is None:
            self._extractor = fd.FeatureExtractor(self.path, batch_size=self.batch_size)
        return self._extractor

    def _reference_stats(self, source, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self._stats_source is not None:
            if "fixed" not in self._stats:
                self._stats["fixed"] = fd.as_stats(self._stats_source)
            return self._stats["fixed"]
        ref = fd.to_uint8(source.reference(num_samples, seed=seed + 1), self.extractor.image_size)
        key = fd.stats_key(self.extractor, ref)
        if key not in self._stats:
            self._stats = {key: distances.gaussian_stats(self.extractor(ref))}
        return self._stats[key]

    def score(self, samples, stats) -> float:
        if not np.all(np.isfinite(np.asarray(samples, np.float32))):
            logging.warning("samples contain non-finite values; %s is NaN", fd.METRIC_NAME)
            return float("nan")
        return fd.classifier_frechet_distance(self.extractor, samples, stats)

    def against(self, source, num_samples: int, seed: int):
        stats = self._reference_stats(source, num_samples, seed)
        return Scorer(lambda samples: self.score(samples, stats))


def build_metric(eval_cfg, kind: str) -> Optional[Metric]:
    """The metric ``eval.metric`` names for data of ``kind`` ('points' or 'images'); None for
    'none' (and for images under 'auto'). Raises ValueError naming the key to change."""
    name = eval_cfg.metric
    if name == "auto":
        name = "sliced_wasserstein" if kind == "points" else "none"
    if name == "none":
        return None
    if name == "sliced_wasserstein":
        return SlicedWasserstein()
    if name == "cfd":
        if kind != "images":
            raise ValueError("eval.metric='cfd' scores images; set eval.metric='auto' for points")
        return ClassifierFrechet(
            eval_cfg.classifier, reference_stats=eval_cfg.reference_stats or None)
    raise ValueError(f"eval.metric={name!r} is unknown; use one of {list(METRIC_CHOICES)}")
