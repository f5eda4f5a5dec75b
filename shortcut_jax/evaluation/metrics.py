"""Sample-quality metrics for evaluation at every budget, built from ``config.eval``.

A metric is built once per run by :func:`build_metric` (which checks its files before anything is
compiled), checked against the shape of the samples it will score with ``metric.check(data_shape=,
image_shape=)`` (before any sampling), and prepared once per evaluation against the data with
``metric.against(source, num_samples, seed, cache_dir=None)``, which returns a :class:`Scorer`:
``scorer(samples) -> float``, or batch by batch through ``scorer.accumulator()``, plus the
data-against-data floor where the metric has one. A new metric is a class with ``name``,
``display_name``, ``check``, ``against`` and ``describe``, and one line in :func:`build_metric`.

One metric per evaluation (``eval.metric``): samples are fixed by ``eval.seed``, so a second
evaluation with another metric scores the same samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Callable, Optional, Protocol

import numpy as np
from absl import logging

from shortcut_jax.evaluation import distances, fid
from shortcut_jax.evaluation import feature_distance as fd
from shortcut_jax.evaluation.pixels import grey_to_rgb, to_uint8

METRIC_CHOICES = ("auto", "none", "sliced_wasserstein", "cfd", "fid")


class Accumulator(Protocol):
    """Takes one budget's samples batch by batch; ``result()`` is the metric of all of them."""

    def add(self, samples: np.ndarray) -> None: ...

    def result(self) -> float: ...


class _WholeSet:
    """For metrics that need every sample at once: keeps the batches, scores their union."""

    def __init__(self, score: Callable[[np.ndarray], float]):
        self._score = score
        self._parts: list[np.ndarray] = []

    def add(self, samples) -> None:
        self._parts.append(np.asarray(samples))

    def result(self) -> float:
        return float(self._score(np.concatenate(self._parts)))


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One evaluation's scoring function against a fixed reference."""

    score: Callable[[np.ndarray], float]
    floor: Optional[float] = None  # the metric between two draws of the data
    reference: Optional[np.ndarray] = None  # data shown beside the samples (2-D scatter plots)
    # A fresh streaming accumulator, for metrics that reduce each batch as it comes (FID: feature
    # moments), so that a budget's samples never have to be held at once.
    accumulate: Optional[Callable[[], Accumulator]] = None

    def __call__(self, samples: np.ndarray) -> float:
        return float(self.score(samples))

    def accumulator(self) -> Accumulator:
        return self.accumulate() if self.accumulate is not None else _WholeSet(self.score)


class Metric(Protocol):
    name: str  # key in metrics.jsonl: eval/<name>_<n>step
    display_name: str  # in tables and plots

    def check(self, *, data_shape: tuple, image_shape: tuple) -> None:
        """Refuses samples of ``image_shape`` (after any decoding of ``data_shape``) before
        anything is sampled."""

    def against(self, source, num_samples: int, seed: int, *, cache_dir: Optional[str] = None) -> Scorer: ...

    def describe(self) -> dict:
        """What the scores depend on besides the samples (for evaluation.json)."""


class SlicedWasserstein:
    """Sliced Wasserstein distance (512 random projections) against fresh data points, with the
    distance between two independent draws of the data as its floor."""

    name = "sliced_wasserstein"
    display_name = "sliced wasserstein"

    def check(self, *, data_shape: tuple, image_shape: tuple) -> None:
        del data_shape, image_shape  # points of any dimension

    def describe(self) -> dict:
        return {"projections": 512}

    def against(self, source, num_samples: int, seed: int, *, cache_dir: Optional[str] = None) -> Scorer:
        del cache_dir  # fresh points are cheap
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
            raise FileNotFoundError(
                f"no classifier saved at {path!r} (expected {fd.classifier.CONFIG_FILE} there): fix eval.classifier"
            )
        if isinstance(reference_stats, (str, os.PathLike)) and not os.path.isfile(reference_stats):
            raise FileNotFoundError(
                f"reference statistics file {os.fspath(reference_stats)!r} does not exist: fix eval.reference_stats"
            )
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
        ref = to_uint8(source.reference(num_samples, seed=seed + 1), self.extractor.image_size)
        key = fd.stats_key(self.extractor, ref)
        if key not in self._stats:
            self._stats = {key: distances.gaussian_stats(self.extractor(ref))}
        return self._stats[key]

    def check(self, *, data_shape: tuple, image_shape: tuple) -> None:
        del data_shape  # the classifier's input size is checked at its first use
        if len(image_shape) != 3 or image_shape[-1] != 3:
            raise ValueError(f"eval.metric='cfd' scores RGB images; the samples are {tuple(image_shape)}")

    def describe(self) -> dict:
        stats = self._stats_source
        return {
            "classifier": self.path,
            "reference_stats": os.fspath(stats)
            if isinstance(stats, (str, os.PathLike))
            else ("given as arrays" if stats is not None else "from the data"),
        }

    def score(self, samples, stats) -> float:
        if not np.all(np.isfinite(np.asarray(samples, np.float32))):
            logging.warning("samples contain non-finite values; %s is NaN", fd.METRIC_NAME)
            return float("nan")
        return fd.classifier_frechet_distance(self.extractor, samples, stats)

    def against(self, source, num_samples: int, seed: int, *, cache_dir: Optional[str] = None) -> Scorer:
        del cache_dir  # statistics are kept in memory, keyed by the reference images
        stats = self._reference_stats(source, num_samples, seed)
        return Scorer(lambda samples: self.score(samples, stats))


# Reference statistics computed from the data hold the reference images in host memory (float32,
# as the readers give them) while their features are computed; larger sets are refused with the
# streaming statistics command in the message.
MAX_DATA_REFERENCE_BYTES = 8 * 2**30


def inception_features(weights_path: str, batch_size: int):
    """The FID feature network (``inception.InceptionFeatures``); loaded at the first use."""
    from shortcut_jax.evaluation import inception

    return inception.InceptionFeatures(weights_path=weights_path, batch_size=batch_size)


def _stats_command(shape) -> str:
    size = f" --data.image_size={shape[0]}" if shape and shape[0] == shape[1] else ""
    return (
        f"python -m shortcut_jax.fid_stats --stats --data.name=... --data.path=...{size} --source=NAME --out=stats.npz"
    )


class _FeatureMomentsOfSamples:
    """FID accumulator: each batch goes through the network and into running float64 moments
    (``fid.FeatureMoments``), so only one batch of images and its features is held at a time.
    Batches still on the devices go in through :meth:`add_on_device`, and only their features
    come to the host (the moments stay float64 on the host: 2048-d covariances summed over
    50,000 samples lose digits in float32)."""

    def __init__(self, extractor, reference: fid.FIDStats):
        self.extractor = extractor
        self.reference = reference
        self.moments = fid.FeatureMoments(extractor.dim)
        self.finite = True

    def add(self, samples) -> None:
        x = grey_to_rgb(np.asarray(samples))
        if not self.finite:
            return
        if x.dtype != np.uint8 and not np.all(np.isfinite(x)):
            self.finite = False  # a diverged model scores NaN instead of stopping the run
            return
        self._check_resolution(x.shape)
        self.moments.add(self.extractor(to_uint8(x)))

    def add_on_device(self, samples, count: int, to_host: Callable = np.asarray) -> None:
        """The first ``count`` rows of a batch held on the devices (a sampler's or decoder's
        output, padding rows after them): quantised, checked and scored there when the extractor
        can (``chunked_features.ChunkedFeatures.on_device``), so only the features reach the
        host; otherwise brought to the host with ``to_host`` and scored as :meth:`add` does.

        In a job of several processes every process holds only its shard of the batch, so the
        host path is taken there (``to_host`` gathers the batch on every process, and every
        process accumulates the same moments). Scoring each process's shard and gathering the
        features would move less, but needs the padding rows located in every shard; a job
        of several processes is a multi-host job, where the decoded images are split over many
        devices already and the gather is the smaller part of the scoring.
        """
        if not self.finite:
            return
        import jax

        on_device = getattr(self.extractor, "on_device", None)
        if on_device is None or jax.process_count() > 1 or not isinstance(samples, jax.Array):
            self.add(np.asarray(to_host(samples))[:count])
            return
        self._check_resolution(samples.shape)
        features = on_device(samples, count)
        if features is None:
            self.finite = False  # a diverged model scores NaN instead of stopping the run
            return
        self.moments.add(features)

    def _check_resolution(self, shape) -> None:
        held = self.reference.resolution
        if held is not None and tuple(held) != tuple(shape[1:3]):
            raise fid.StatsMismatchError(
                f"{self.reference.path or 'the reference statistics'} are of {held[0]}x{held[1]} images, the samples"
                f" are {shape[1]}x{shape[2]}: set eval.fid_reference to statistics at the samples' resolution"
            )

    def result(self) -> float:
        if not self.finite:
            logging.warning("samples contain non-finite values; FID is NaN")
            return float("nan")
        mu, sigma = self.moments.mean_and_covariance()
        return distances.frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)


class FrechetInception:
    """FID (``eval.metric='fid'``): the Frechet distance between Inception pool features of the
    samples and reference statistics, in pytorch-fid's network (``evaluation.inception``), so
    the numbers are the literature's.

    Reference statistics come from ``eval.fid_reference`` (this project's statistics file, an
    ADM reference batch, or a bare mu/sigma file; see ``evaluation.fid``), or, without one, from
    ``num_samples`` images of the run's data (drawn with ``eval.seed + 1``), computed once and
    cached in ``cache_dir`` under a key of the images' bytes and the network's weights.
    Greyscale samples are repeated to three channels, as the reference evaluators' image
    loaders do. Samples are quantised to 8 bits (``pixels.to_uint8``) before the network.

    Building checks that the weights exist (``eval.fid_weights``) and that the reference file
    loads; ``check`` refuses a reference of another resolution, source or network before
    anything is sampled; the network is compiled at the first batch.
    """

    name = "fid"
    display_name = "FID"

    def __init__(self, *, reference: str = "", weights: str = "", source: str = "", batch_size: int = 200):
        from shortcut_jax.evaluation import inception

        self.weights_path = inception.find_weights(weights or None)
        self.source = source or None
        self.batch_size = int(batch_size)
        self.reference: Optional[fid.FIDStats] = None
        if reference:
            if not os.path.isfile(reference):
                raise FileNotFoundError(
                    f"FID reference statistics {reference!r} do not exist: fix eval.fid_reference"
                    f" (or compute them: {_stats_command(None)})"
                )
            try:
                self.reference = fid.load_stats(reference, source=self.source)
            except fid.StatsMismatchError as err:
                raise fid.StatsMismatchError(
                    f"{err}: fix eval.fid_source (the data set the reference must record),"
                    " or set eval.fid_reference to statistics of that data set"
                ) from None
        self.unverified: list[str] = []
        self._extractor = None
        self._data_stats: dict[str, fid.FIDStats] = {}
        self._used: Optional[fid.FIDStats] = None
        self._cache_path: Optional[str] = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = inception_features(self.weights_path, self.batch_size)
        return self._extractor

    def check(self, *, data_shape: tuple, image_shape: tuple) -> None:
        image_shape, data_shape = tuple(image_shape), tuple(data_shape)
        if len(image_shape) != 3 or image_shape[-1] not in (1, 3):
            raise ValueError(
                f"eval.metric='fid' scores images [H, W, 3] (or greyscale); the samples are "
                f"{image_shape}: latent runs decode them first (the experiment's decode)"
            )
        if self.reference is None:
            if data_shape != image_shape:
                raise ValueError(
                    f"eval.metric='fid' without eval.fid_reference computes the reference statistics from the data,"
                    f" whose examples are {data_shape}, not images like the samples {image_shape}: compute statistics"
                    f" of the images once ({_stats_command(image_shape)}) and set eval.fid_reference"
                )
            return
        try:
            self.unverified = fid.check_compatible(self.reference, resolution=image_shape[:2], source=self.source)
            extractor = self.extractor
            self.unverified += fid.check_compatible(self.reference, extractor=extractor.extractor_id, dim=extractor.dim)
        except fid.StatsMismatchError as err:
            raise fid.StatsMismatchError(
                f"{err} (eval.fid_reference={self.reference.path!r}; statistics of other"
                f" data: {_stats_command(image_shape)})"
            ) from None

    def describe(self) -> dict:
        used = self._used or self.reference
        out: dict[str, Any] = {
            "weights": self.weights_path,
            "batch_size": self.batch_size,
            "reference": used.describe() if used is not None else None,
            "reference_from": "eval.fid_reference" if self.reference is not None else "data",
            "unverified": list(self.unverified),
        }
        if self._extractor is not None:
            out["extractor"] = self._extractor.extractor_id
        if self._cache_path:
            out["reference_cache"] = self._cache_path
        return out

    def _data_reference(self, source, num_samples: int, seed: int, cache_dir: Optional[str]) -> fid.FIDStats:
        shape = tuple(source.spec.shape)
        if source.spec.kind != "images" or shape[-1] not in (1, 3):
            raise ValueError(
                f"eval.metric='fid' without eval.fid_reference needs image data; the data gives"
                f" {shape}: set eval.fid_reference ({_stats_command(None)})"
            )
        held = num_samples * math.prod(shape) * 4
        if held > MAX_DATA_REFERENCE_BYTES:
            raise ValueError(
                f"reference statistics from {num_samples} data images of {shape} would hold {held / 2**30:.1f} GiB:"
                f" compute them once with the streaming command ({_stats_command(shape)}) and set eval.fid_reference"
            )
        images = to_uint8(grey_to_rgb(source.reference(num_samples, seed=seed + 1)))
        extractor = self.extractor
        digest = hashlib.blake2b(digest_size=12)
        digest.update(f"{extractor.extractor_id}\0{images.shape}\n".encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        key = digest.hexdigest()
        if key in self._data_stats:
            return self._data_stats[key]
        path = os.path.join(cache_dir, f"fid_stats_{key}.npz") if cache_dir else None
        if path and os.path.isfile(path):
            stats = fid.load_stats(path)
            logging.info("FID reference statistics of %d data images from %s", stats.count, path)
        else:
            batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
            stats = fid.image_stats(extractor, batches, source=self.source)
            if path:
                import jax

                if jax.process_index() == 0:
                    fid.save_stats(stats, path)
                    logging.info("FID reference statistics of %d data images cached in %s", stats.count, path)
        self._cache_path = path
        self._data_stats = {key: stats}
        return stats

    def against(self, source, num_samples: int, seed: int, *, cache_dir: Optional[str] = None) -> Scorer:
        reference = self.reference or self._data_reference(source, num_samples, seed, cache_dir)
        self._used = reference
        extractor = self.extractor

        def accumulate() -> Accumulator:
            return _FeatureMomentsOfSamples(extractor, reference)

        def score(samples) -> float:
            accumulator = accumulate()
            for start in range(0, len(samples), self.batch_size):
                accumulator.add(samples[start : start + self.batch_size])
            return accumulator.result()

        return Scorer(score, accumulate=accumulate)


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
    if name == "fid":
        if kind != "images":
            raise ValueError("eval.metric='fid' scores images; set eval.metric='auto' for points")
        return FrechetInception(
            reference=eval_cfg.fid_reference,
            weights=eval_cfg.fid_weights,
            source=eval_cfg.fid_source,
            batch_size=eval_cfg.fid_batch_size,
        )
    if name == "cfd":
        if kind != "images":
            raise ValueError("eval.metric='cfd' scores images; set eval.metric='auto' for points")
        return ClassifierFrechet(eval_cfg.classifier, reference_stats=eval_cfg.reference_stats or None)
    raise ValueError(f"eval.metric={name!r} is unknown; use one of {list(METRIC_CHOICES)}")
