"""Throughput of the image-folder reader on an extracted archive (e.g. CIFAR-10 JPEGs).

    python -m benchmarks.reader_speed \
        --archive ../shared/data/cifar10-train.tar.gz --batch_size 256 --num_batches 50 --workers 8

Prints the extraction time (0 when already extracted), the validation scan time (listing plus
every file's header), and the images/s of ``next_batch`` after one warm-up batch. Work done
by the caller between batches would overlap with the one-batch-ahead prefetch; this loop does
none, so the figure is the decode rate itself.
"""

from __future__ import annotations

import argparse
import os
import time

from shortcut_jax.data import default_data_config, extract_archive, make_dataset
from shortcut_jax.data import validate_data_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True, help=".tar/.tar.gz of an image folder")
    parser.add_argument(
        "--cache_dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax", "cifar10"),
        help="where the archive is extracted (once)",
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_batches", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8, help="decoding threads")
    parser.add_argument("--image_size", type=int, default=0, help="0 keeps the native size")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    root = extract_archive(args.archive, args.cache_dir)
    print(f"extract: {time.perf_counter() - start:.2f} s -> {root}")

    config = default_data_config()
    config.name = "image_folder"
    config.path = root
    config.image_size = args.image_size
    config.random_flip = args.random_flip
    config.num_workers = args.workers

    start = time.perf_counter()
    validate_data_config(config)
    print(f"validation scan: {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    source = make_dataset(config, batch_size=args.batch_size, seed=args.seed)
    print(
        f"make_dataset (re-lists; headers reused from the scan): {time.perf_counter() - start:.2f} s; "
        f"{source.num_examples} images, spec {source.spec}"
    )
    try:
        start = time.perf_counter()
        source.next_batch()
        print(f"first batch: {time.perf_counter() - start:.3f} s")
        start = time.perf_counter()
        for _ in range(args.num_batches):
            source.next_batch()
        elapsed = time.perf_counter() - start
    finally:
        source.close()
    images = args.num_batches * args.batch_size
    print(
        f"read {images} images in {elapsed:.2f} s: {images / elapsed:,.0f} images/s "
        f"({args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
