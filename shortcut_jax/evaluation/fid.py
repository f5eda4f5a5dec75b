"""FID statistics with their provenance, the reference files others publish, and the FID itself.

An FID is only meaningful against reference statistics of the same data, at the same
resolution, in the features of the same network. Statistics made here therefore carry, besides
the mean and covariance (float64) and the image count, where they come from:

* ``source``: the data set (a name the user gives, e.g. ``imagenet256-train``);
* ``resolution``: ``(H, W)`` of the images before the network's own resize to 299;
* ``resize``: how images reach 299x299 (:data:`RESIZE`, pytorch-fid's bilinear resize);
* ``extractor``: the network and a fingerprint of its weights (``InceptionFeatures.extractor_id``).

:func:`check_compatible` refuses statistics whose recorded resolution, source or extractor
differ from what the caller has, naming both values. Files from elsewhere are read too:

* ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma`` beside
  ``mu_s``/``sigma_s`` and the reference images ``arr_0``): the resolution is read from the
  ``arr_0`` header; they were made with TensorFlow's Inception graph (same weights, TF's
  legacy bilinear resize), which is recorded as their ``resize``;
* the official shortcut-models repository's ``*_fidstats_ours.npz`` (and pytorch-fid's
  ``--save-stats`` files): ``mu`` and ``sigma`` only, so source and resolution are unknown unless
  declared (``load_stats(path, source=..., resolution=...)``); unknown fields are reported as
  unverified rather than refused.

The distance itself is ``distances.frechet_distance``: float64, with the symmetric square root
of ``sqrt(S1) S2 sqrt(S1)`` through eigen-decompositions (never a complex ``sqrtm``).

Reference statistics for any data the readers give::

    python -m shortcut_jax.fid_stats --stats --data.name=image_folder \\
        --data.path=/data/celebahq256 --source=celebahq256 --out=celebahq256_fid_stats.npz

and the FID of an ADM sample file against them::

    python -m shortcut_jax.fid_stats --samples=samples.npz --reference=celebahq256_fid_stats.npz
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import numpy as np
from absl import logging

from shortcut_jax.evaluation import distances
from shortcut_jax.infra import files

__all__ = [
    "RESIZE",
    "FIDStats",
    "FeatureMoments",
    "StatsMismatchError",
    "check_compatible",
    "data_image_batches",
    "frechet_inception_distance",
    "image_stats",
    "load_stats",
    "run_command",
    "save_stats",
    "stats_from_features",
]

STATS_FORMAT = "shortcut_jax.fid_stats/1"
# What InceptionFeatures does to reach the network's input size.
RESIZE = "bilinear to 299x299 as torch F.interpolate(align_corners=False, antialias=False)"
# What the ADM evaluator's TensorFlow graph does (its ResizeBilinear, without half-pixel centres).
ADM_RESIZE = "bilinear to 299x299 in the TF Inception graph (ADM evaluator)"


class StatsMismatchError(ValueError):
    """Statistics of other data, another resolution or another network than the samples'."""


@dataclasses.dataclass(frozen=True)
class FIDStats:
    """Gaussian fit of Inception features and where it comes from (None: not recorded)."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    count: int | None = None
    source: str | None = None
    resolution: tuple[int, int] | None = None
    resize: str | None = None
    extractor: str | None = None
    # The file format read: 'shortcut_jax', 'adm' (reference batch) or 'mu_sigma' (a bare
    # mu/sigma file, e.g. the official shortcut-models statistics); 'memory' if never saved.
    origin: str = "memory"
    path: str = ""

    def describe(self) -> dict[str, Any]:
        """The provenance as JSON-ready values (for results files)."""
        return {
            "count": self.count,
            "source": self.source,
            "resolution": list(self.resolution) if self.resolution else None,
            "resize": self.resize,
            "extractor": self.extractor,
            "origin": self.origin,
            "path": self.path,
        }


def _resolution(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    h, w = (int(v) for v in value)
    return (h, w)


class FeatureMoments:
    """Running mean and covariance of features in float64, for sets that need not fit in memory.

    Sums are taken around a shift (the first batch's mean), so that the covariance does not
    lose digits to the mean as the plain sum of outer products would.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or (self.dim is not None and f.shape[1] != self.dim):
            raise ValueError(f"features must have shape [N, {self.dim or 'D'}], got {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain non-finite values")
        if len(f) == 0:
            return
        if self._shift is None:
            self.dim = f.shape[1]
            self._shift = f.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        centred = f - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += len(f)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D], as ``distances.gaussian_stats`` gives them."""
        if self.count < 2:
            raise ValueError(f"need at least two samples for a covariance, have {self.count}")
        mean_centred = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return self._shift + mean_centred, 0.5 * (cov + cov.T)


def stats_from_features(
    features, *, source: str | None, resolution, extractor: str | None, resize: str | None = RESIZE
) -> FIDStats:
    """FIDStats of features ``[N, D]`` with the given provenance."""
    mu, sigma = distances.gaussian_stats(features)
    return FIDStats(
        mu,
        sigma,
        count=int(np.asarray(features).shape[0]),
        source=source,
        resolution=_resolution(resolution),
        resize=resize,
        extractor=extractor,
    )


def image_stats(extractor, batches: Iterable, *, source: str | None) -> FIDStats:
    """Statistics of the features of image batches (``[B, H, W, 3]``, uint8 or float in
    [-1, 1]) under ``extractor`` (``inception.InceptionFeatures``); all batches must share one
    resolution, which is recorded."""
    moments = FeatureMoments(extractor.dim)
    resolution = None
    for batch in batches:
        shape = tuple(np.shape(batch)[1:3])
        if resolution is None:
            resolution = shape
        elif shape != resolution:
            raise ValueError(f"images of resolution {shape} among images of {resolution}")
        moments.add(extractor(batch))
    mu, sigma = moments.mean_and_covariance()
    return FIDStats(
        mu,
        sigma,
        count=moments.count,
        source=source,
        resolution=resolution,
        resize=RESIZE,
        extractor=extractor.extractor_id,
    )


# ------------------------------------------------------------------------------------------ files


def save_stats(stats: FIDStats, path: str) -> str:
    """Writes ``.npz`` with ``mu``/``sigma`` (readable by pytorch-fid and the official shortcut
    code too) and the provenance; atomically."""
    fields = {
        "mu": np.asarray(stats.mu, np.float64),
        "sigma": np.asarray(stats.sigma, np.float64),
        "format": np.asarray(STATS_FORMAT),
        "count": np.asarray(-1 if stats.count is None else stats.count, np.int64),
        "source": np.asarray(stats.source or ""),
        "resolution": np.asarray(stats.resolution or (0, 0), np.int64),
        "resize": np.asarray(stats.resize or ""),
        "extractor": np.asarray(stats.extractor or ""),
    }
    files.atomic_savez(path, **fields)
    return path


def _optional_str(value) -> str | None:
    value = str(value)
    return value or None


def load_stats(path: str, *, source: str | None = None, resolution=None) -> FIDStats:
    """Statistics from a file of this project, an ADM reference batch or a bare mu/sigma file.

    ``source`` and ``resolution`` declare the provenance of files that do not record it (ADM,
    the official shortcut-models files); for files that do, a declaration that differs from the
    record is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
    with np.load(path) as f:
        files = set(f.files)
        if not {"mu", "sigma"} <= files:
            hint = (
                " It holds images (arr_0) but no statistics: compute them with "
                "python -m shortcut_jax.fid_stats --stats --adm_npz=" + path
                if "arr_0" in files
                else ""
            )
            raise ValueError(f"{path!r} has no 'mu' and 'sigma' (keys: {sorted(files)}).{hint}")
        mu = np.asarray(f["mu"], np.float64)
        sigma = np.asarray(f["sigma"], np.float64)
        if "format" in files and str(f["format"]) == STATS_FORMAT:
            count = int(f["count"])
            recorded = FIDStats(
                mu,
                sigma,
                count=None if count < 0 else count,
                source=_optional_str(f["source"]),
                resolution=tuple(int(v) for v in f["resolution"]) or None,
                resize=_optional_str(f["resize"]),
                extractor=_optional_str(f["extractor"]),
                origin="shortcut_jax",
                path=path,
            )
            if recorded.resolution == (0, 0):
                recorded = dataclasses.replace(recorded, resolution=None)
        elif "mu_s" in files or "arr_0" in files:
            from shortcut_jax.evaluation.adm_npz import adm_npz_image_shape

            shape = adm_npz_image_shape(path) if "arr_0" in files else None
            recorded = FIDStats(
                mu,
                sigma,
                count=shape[0] if shape else None,
                resolution=tuple(shape[1:3]) if shape else None,
                resize=ADM_RESIZE,
                origin="adm",
                path=path,
            )
        else:
            recorded = FIDStats(mu, sigma, origin="mu_sigma", path=path)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    declared = {"source": source, "resolution": _resolution(resolution)}
    for field, value in declared.items():
        if value is None:
            continue
        held = getattr(recorded, field)
        if held is not None and held != value:
            raise StatsMismatchError(f"{path!r} records {field}={held!r}; it cannot be declared {value!r}")
        recorded = dataclasses.replace(recorded, **{field: value})
    return recorded


# ------------------------------------------------------------------------------------ comparison


def check_compatible(
    reference: FIDStats,
    *,
    resolution=None,
    source: str | None = None,
    extractor: str | None = None,
    dim: int | None = None,
) -> list[str]:
    """Refuses ``reference`` for samples of ``resolution``/``source``/``extractor`` when a
    recorded value differs (:class:`StatsMismatchError`, naming both values and what to change).

    Returns the fields that could not be checked because the reference does not record them
    (to be reported beside the FID); a different ``resize`` is logged, not refused (ADM's
    reference batches were resized by TensorFlow, which moves FIDs only slightly).
    """
    name = reference.path or "the reference statistics"
    if dim is not None and reference.mu.shape != (dim,):
        raise StatsMismatchError(
            f"{name} has {reference.mu.shape[0]}-d features; the samples' "
            f"are {dim}-d. Use statistics of the same network."
        )
    unverified = []
    checks = [
        (
            "resolution",
            reference.resolution,
            _resolution(resolution),
            "use reference statistics of images at the samples' resolution, or sample at the reference's",
        ),
        ("source", reference.source, source, "use reference statistics of the data the model was trained on"),
        (
            "extractor",
            reference.extractor,
            extractor,
            "recompute the reference statistics with the same Inception weights",
        ),
    ]
    for field, held, wanted, fix in checks:
        if wanted is None:
            continue
        if held is None:
            unverified.append(field)
        elif held != wanted:
            raise StatsMismatchError(
                f"{name} was computed with {field}={held!r} but the samples have {field}={wanted!r}: {fix}."
            )
    if reference.resize is not None and reference.resize != RESIZE:
        logging.warning("%s resized images differently (%s) from this evaluation (%s)", name, reference.resize, RESIZE)
    if unverified:
        logging.warning("%s does not record %s; not verified", name, ", ".join(unverified))
    return unverified


def frechet_inception_distance(samples: FIDStats, reference: FIDStats) -> float:
    """FID between two sets of statistics, after :func:`check_compatible` of the reference
    against everything the sample statistics record."""
    check_compatible(
        reference,
        resolution=samples.resolution,
        source=samples.source,
        extractor=samples.extractor,
        dim=samples.mu.shape[0],
    )
    return distances.frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)


# ----------------------------------------------------------------------------------- command line


def data_image_batches(data_config, *, batch_size: int, num_images: int = 0):
    """uint8 batches ``[B, H, W, 3]`` of the first ``num_images`` examples (0: all) of the data
    a ``data`` config section describes, in stored order, each example exactly once."""
    from shortcut_jax.data import make_dataset
    from shortcut_jax.evaluation.pixels import to_uint8

    config = dict(data_config)
    config["shuffle"] = False  # stored order: the first N examples, none twice
    config["random_flip"] = False
    source = make_dataset(config, batch_size=batch_size, seed=0)
    if source.spec.kind != "images" or source.spec.shape[-1] != 3 or source.num_examples is None:
        source.close()
        raise ValueError(
            f"data.name={config.get('name')!r} gives {source.spec.kind} of shape "
            f"{source.spec.shape}; FID statistics need RGB images "
            "(data.name='image_folder', or 'arrays' holding uint8 [N, H, W, 3])."
        )
    total = num_images or source.num_examples
    if total > source.num_examples:
        source.close()
        raise ValueError(
            f"num_images={num_images} but the data holds {source.num_examples} "
            "images; use at most that many (0 for all)."
        )

    def batches():
        with source:
            done = 0
            while done < total:
                x = source.next_batch()["x"][: total - done]
                done += len(x)
                if done // 5000 != (done - len(x)) // 5000 or done == total:
                    logging.info("%d of %d images", done, total)
                yield to_uint8(x)

    return batches()


def array_batches(images: np.ndarray, batch_size: int):
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def run_command(options, data_config, extractor=None) -> str:
    """The command line's work (``options``: the flags below as attributes); returns the line it
    prints. ``extractor`` defaults to ``InceptionFeatures`` with ``options.weights``."""
    from shortcut_jax.evaluation.adm_npz import read_adm_npz
    from shortcut_jax.evaluation.inception import InceptionFeatures

    o = options
    if o.stats == bool(o.samples):
        raise ValueError("give either --stats (reference statistics) or --samples=FILE.npz (an FID)")
    if o.stats and not o.out:
        raise ValueError("--stats needs --out=FILE.npz")
    if o.samples and not o.reference:
        raise ValueError("--samples needs --reference=STATS.npz")
    # Everything that can be refused is checked before the network is loaded and compiled.
    if o.samples:
        reference = load_stats(o.reference, source=o.reference_source or None)
        sample_images = read_adm_npz(o.samples)[0]
        check_compatible(reference, resolution=sample_images.shape[1:3])
    elif o.adm_npz:
        images = read_adm_npz(o.adm_npz)[0][: o.num_images or None]
        batches = array_batches(images, o.batch_size)
        source = o.source or f"adm_npz:{os.path.abspath(o.adm_npz)}"
    else:
        batches = data_image_batches(data_config, batch_size=o.batch_size, num_images=o.num_images)
        source = o.source or f"{data_config['name']}:{os.path.abspath(data_config['path'])}"
    if extractor is None:
        extractor = InceptionFeatures(weights_path=o.weights or None, batch_size=o.batch_size)
    if o.stats:
        stats = image_stats(extractor, batches, source=source)
        save_stats(stats, o.out)
        return (
            f"wrote {o.out}: {stats.count} images, source {stats.source!r}, resolution "
            f"{stats.resolution}, extractor {stats.extractor}"
        )
    unverified = check_compatible(
        reference, resolution=sample_images.shape[1:3], extractor=extractor.extractor_id, dim=extractor.dim
    )
    samples = image_stats(extractor, array_batches(sample_images, o.batch_size), source=None)
    fid = distances.frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    return (
        f"FID {fid:.4f} ({samples.count} samples at {samples.resolution[0]}x"
        f"{samples.resolution[1]} against {reference.path}; not verified: "
        f"{', '.join(unverified) or 'nothing'})"
    )
