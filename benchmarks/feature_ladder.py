"""Sanity ladder for the classifier Frechet distance (CFD): known degradations must score worse.

    python -m benchmarks.feature_ladder --classifier classifier_ckpt \
        --train_archive ../shared/data/cifar10-train.tar.gz \
        --test_archive ../shared/data/cifar10-test.tar.gz --out_dir ladder

Every row is the CFD between a set of training images and the statistics of the whole test
split:
- clean training images at each size in ``--sizes`` (default 5,000 and 10,000): the floor, i.e.
  what a generator that reproduces the data distribution would score at that sample size;
- the largest of those sets with Gaussian noise of standard deviation sigma added in the
  [-1, 1] pixel scale (sigma 0.05 is about 6 grey levels of 255), then clipped;
- the same set blurred with a Gaussian of standard deviation ``radius`` pixels.
Within the noise rows and within the blur rows (each starting from the clean row at the same
size) the CFD should rise monotonically; the table says whether it does. Written as
``feature_ladder.md`` and ``feature_ladder.json`` in ``--out_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from shortcut_jax.evaluation import feature_distance

NOISE_SIGMAS = (0.05, 0.1, 0.2, 0.4)
BLUR_RADII = (0.5, 1.0, 1.5, 2.0)
SIZES = (5000, 10000)


def _to_float(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return x.astype(np.float32)


def add_noise(images, sigma: float, seed: int = 0) -> np.ndarray:
    """``images`` (uint8 or [-1, 1] floats) plus N(0, sigma^2) per pixel, clipped to [-1, 1]."""
    x = _to_float(images)
    noise = np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32)
    return np.clip(x + np.float32(sigma) * noise, -1.0, 1.0)


def blur(images, radius: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``radius`` pixels over height and width."""
    from scipy import ndimage

    x = _to_float(images)
    return ndimage.gaussian_filter(x, sigma=(0.0, radius, radius, 0.0), mode="reflect").astype(np.float32)


def _is_increasing(values: Sequence[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def run_ladder(
    extractor: "feature_distance.FeatureExtractor",
    train_images,
    test_images,
    *,
    sizes: Sequence[int] = SIZES,
    noise_sigmas: Sequence[float] = NOISE_SIGMAS,
    blur_radii: Sequence[float] = BLUR_RADII,
    seed: int = 0,
    stats_cache: str | None = None,
    verbose: bool = False,
) -> dict:
    """CFD of clean, noisy and blurred training images against the test split's statistics.

    Returns ``{'metric', 'reference_size', 'rows': [{'condition', 'param', 'n', 'cfd'}],
    'monotone': {'noise': bool, 'blur': bool}, 'classifier': {...}}``. Training subsets are
    prefixes of one seeded permutation, so the smaller set is part of the larger one.
    """
    sizes = sorted(int(s) for s in sizes)
    if not sizes or sizes[0] < 2:
        raise ValueError(f"sizes must be at least 2 images each, got {sizes}")
    if sizes[-1] > len(train_images):
        raise ValueError(f"the largest size {sizes[-1]} exceeds the {len(train_images)} training images")
    ref = feature_distance.reference_stats(extractor, test_images, cache_path=stats_cache)
    order = np.random.default_rng(seed).permutation(len(train_images))
    rows = []

    def add(condition: str, param, images) -> float:
        value = feature_distance.classifier_frechet_distance(extractor, images, ref)
        rows.append({"condition": condition, "param": param, "n": int(len(images)), "cfd": value})
        if verbose:
            shown = "" if param is None else f" {param}"
            print(f"{condition}{shown} (n={len(images)}): CFD {value:.4f}", flush=True)
        return value

    for n in sizes:
        clean = add("clean", None, np.asarray(train_images)[order[:n]])
    base = np.asarray(train_images)[order[: sizes[-1]]]
    noise_values = [clean] + [
        add("noise", float(s), add_noise(base, s, seed=seed + 1 + i)) for i, s in enumerate(noise_sigmas)
    ]
    blur_values = [clean] + [add("blur", float(r), blur(base, r)) for r in blur_radii]
    return {
        "metric": feature_distance.METRIC_NAME,
        "reference_size": int(len(test_images)),
        "rows": rows,
        "monotone": {"noise": _is_increasing(noise_values), "blur": _is_increasing(blur_values)},
        "classifier": {
            "path": extractor.path,
            "fingerprint": extractor.fingerprint,
            "test_accuracy": extractor.info.get("test_accuracy"),
        },
    }


def format_markdown(result: dict) -> str:
    acc = result["classifier"].get("test_accuracy")
    acc_text = "unknown" if acc is None else f"{acc:.4f}"
    lines = [
        f"# {result['metric']} sanity ladder",
        "",
        f"Reference: test split ({result['reference_size']} images). Classifier test accuracy "
        f"{acc_text}, weights {result['classifier']['fingerprint']}. Noise sigma is in the [-1, 1] "
        "pixel scale; blur radius is the Gaussian's standard deviation in pixels.",
        "",
        "| condition | parameter | n | CFD |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in result["rows"]:
        param = "-" if row["param"] is None else f"{row['param']:g}"
        value = f"{row['cfd']:.4f}" if math.isfinite(row["cfd"]) else str(row["cfd"])
        lines.append(f"| {row['condition']} | {param} | {row['n']} | {value} |")
    mono = result["monotone"]
    lines += [
        "",
        f"Monotone in noise: {'yes' if mono['noise'] else 'NO'}; monotone in blur: {'yes' if mono['blur'] else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


def write_ladder(result: dict, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "feature_ladder.md")
    js = os.path.join(out_dir, "feature_ladder.json")
    with open(md, "w", encoding="utf-8") as f:
        f.write(format_markdown(result))
    with open(js, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return md, js


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True, help="directory written by train_classifier")
    parser.add_argument("--train_archive", required=True, help=".tar/.tar.gz (or extracted folder) of the train split")
    parser.add_argument("--test_archive", required=True, help=".tar/.tar.gz (or extracted folder) of the test split")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument(
        "--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax", "cifar10")
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--noise", type=float, nargs="+", default=list(NOISE_SIGMAS))
    parser.add_argument("--blur", type=float, nargs="+", default=list(BLUR_RADII))
    parser.add_argument("--limit", type=int, default=0, help="use a fixed random subset of N train and N test images")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from shortcut_jax.evaluation.train_classifier import load_split

    args = parse_args(argv)
    extractor = feature_distance.FeatureExtractor(args.classifier, batch_size=args.batch_size)
    train_x, _, _ = load_split(
        args.train_archive,
        args.cache_dir,
        limit=args.limit,
        workers=args.workers,
        image_size=extractor.image_size,
        seed=0,
    )
    test_x, _, _ = load_split(
        args.test_archive,
        args.cache_dir,
        limit=args.limit,
        workers=args.workers,
        image_size=extractor.image_size,
        seed=1,
    )
    sizes = args.sizes
    if args.limit:
        sizes = sorted({min(s, len(train_x)) for s in sizes})
    # The full test split's statistics are the ones train_classifier already saved.
    cache = os.path.join(args.classifier, "test_stats.npz") if not args.limit else None
    result = run_ladder(
        extractor,
        train_x,
        test_x,
        sizes=sizes,
        noise_sigmas=args.noise,
        blur_radii=args.blur,
        seed=args.seed,
        stats_cache=cache,
        verbose=True,
    )
    md, js = write_ladder(result, args.out_dir)
    print(format_markdown(result))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
