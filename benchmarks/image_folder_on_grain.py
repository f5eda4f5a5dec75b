"""Should the image-folder reader move onto grain? Both pipelines on the same files, in images/s.

    python benchmarks/image_folder_on_grain.py --archive ../shared/data/cifar10-train.tar.gz \
        --threads=2,8 --processes=2 --batch_size=256 --num_batches=40

Extracts the archive once (``shortcut_jax.data.extract_archive``), then times, on the same
file list and with the same decoding function (``image_folder.load_image``) and random flips:

- ``image_folder``: the project's reader (a thread pool decoding one batch ahead), for each
  count in ``--threads``; and with ``cache_decoded`` (every image decoded once up front;
  the time to fill the cache is printed apart);
- ``grain threads``: a grain pipeline (index shuffle per epoch, ``random_map`` decode and flip,
  ``batch``, scaling to [-1, 1]) read with grain's thread prefetch, for each count in
  ``--threads``;
- ``grain processes``: the same pipeline through grain's worker processes (``mp_prefetch``), for
  each count in ``--processes``.

The first batch of each (start-up) is timed apart; the figure is the images/s of the next
``--num_batches`` batches, with no work between batches.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True, help=".tar/.tar.gz of an image folder")
    parser.add_argument("--extract_dir", default=os.path.join(tempfile.gettempdir(), "image_folder_on_grain"))
    parser.add_argument("--threads", default="2,8", help="thread counts to time")
    parser.add_argument("--processes", default="2", help="grain worker process counts to time")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--image_size", type=int, default=0, help="0 keeps the native size")
    parser.add_argument("--no_cache", action="store_true", help="skip the decoded-cache row")
    return parser.parse_args(argv)


class DecodeAndFlip:
    """(path, label) -> uint8 image (flipped by the position's coin) and label; picklable."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, example, rng):
        from shortcut_jax.data.image_folder import load_image

        path, label = example
        pixels = load_image(path, self.image_size)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return {"image": pixels, "label": np.int32(label)}


def scale_batch(batch):
    from shortcut_jax.data.core import uint8_to_float

    return {"x": uint8_to_float(np.asarray(batch["image"])), "label": np.asarray(batch["label"])}


def grain_batches(index, args, threads: int, processes: int):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    examples = grain.MapDataset.source(list(zip(index.files, index.labels.tolist())))
    stream = examples.shuffle(seed=0).repeat().random_map(DecodeAndFlip(args.image_size), seed=1)
    batches = stream.batch(args.batch_size).map(scale_batch)
    if processes:
        dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes, per_worker_buffer_size=1))
    else:
        dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    return iter(dataset)


def timed(label: str, next_batch, args, close=None) -> float:
    start = time.perf_counter()
    next_batch()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.num_batches):
        next_batch()
    elapsed = time.perf_counter() - start
    if close is not None:
        close()
    rate = args.num_batches * args.batch_size / elapsed
    print(f"{label:28s} {rate:8,.0f} images/s   (first batch {first:.2f} s)", flush=True)
    return rate


def main(argv=None) -> None:
    args = parse_args(argv)
    from shortcut_jax.data import default_data_config, extract_archive, make_dataset
    from shortcut_jax.data.image_folder import scan_image_folder

    root = extract_archive(args.archive, args.extract_dir)
    threads = [int(t) for t in args.threads.split(",") if t]
    processes = [int(p) for p in args.processes.split(",") if p]
    index = scan_image_folder(root, args.image_size, max(threads + [1]))
    print(f"{len(index.files)} images under {root}; batch {args.batch_size}, {os.cpu_count()} CPUs")

    def folder_config(workers: int, cache: bool):
        config = default_data_config()
        config.name, config.path, config.image_size = "image_folder", root, args.image_size
        config.random_flip, config.num_workers, config.cache_decoded = True, workers, cache
        return config

    for count in threads:
        with make_dataset(folder_config(count, False), batch_size=args.batch_size, seed=0) as source:
            timed(f"image_folder, {count} threads", source.next_batch, args)
    if not args.no_cache:
        start = time.perf_counter()
        with make_dataset(folder_config(max(threads), True), batch_size=args.batch_size, seed=0) as source:
            print(f"(decoded cache filled in {time.perf_counter() - start:.1f} s)")
            timed("image_folder, decoded cache", source.next_batch, args)
    for count in threads:
        iterator = grain_batches(index, args, count, 0)
        timed(f"grain, {count} threads", lambda: next(iterator), args, iterator.close)
    for count in processes:
        iterator = grain_batches(index, args, 0, count)
        timed(f"grain, {count} processes", lambda: next(iterator), args, iterator.close)


if __name__ == "__main__":  # grain's worker processes are spawned: they import this file again
    main()
