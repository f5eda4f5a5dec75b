"""Images/s of the TFDS reader on ImageNet-shaped JPEGs: decode, centre crop and resize to 256.

    python benchmarks/tfds_reader_speed.py --num_images=2000 --workers=0,1,2 --batch_size=64

Writes a synthetic data set itself, once, with TFDS in ArrayRecord (no TensorFlow needed):
``--num_images`` JPEGs of 400x350 (ImageNet's typical size) at quality 90, each a smooth random
field with pixel noise, so that the files are of ImageNet's size (about 50-110 kB) and decode
at its cost; 1000 classes. Then, for each worker count in ``--workers`` (0: threads in this
process; N: N grain worker processes), it builds the reader (``data.name='tfds'``,
``image_size`` 256, random flips), times the first batch (worker start-up included) apart,
and reports the images/s of the next ``--num_batches`` batches, which is the steady decode
rate: this loop does nothing between batches. Batches beyond the data set start the next epoch
(the files are then in the page cache, as for a data set read from local disk).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

HEIGHT, WIDTH = 350, 400
NAME = "synthetic_imagenet_jpeg"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=2000, help="JPEGs in the data set")
    parser.add_argument(
        "--workers", default="0,1,2", help="comma-separated data.num_workers values to time (0: threads)"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_batches", type=int, default=30, help="timed batches per setting")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument(
        "--data_dir",
        default=os.path.join(tempfile.gettempdir(), "tfds_reader_speed"),
        help="where the synthetic data set is written (reused when present)",
    )
    return parser.parse_args(argv)


def synthetic_image(i: int) -> np.ndarray:
    """A smooth random colour field (upsampled 8x8 noise) plus pixel noise, uint8 HxWx3."""
    from PIL import Image

    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0.0, 12.0, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_dataset(data_dir: str, num_images: int) -> None:
    """Prepares the synthetic data set with TFDS in ArrayRecord (skipped when already there)."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    class SyntheticImagenetJpeg(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version(f"1.0.{num_images}")  # one prepared copy per size

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(num_classes=1000),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num_images):
                encoded = io.BytesIO()
                Image.fromarray(synthetic_image(i)).save(encoded, format="JPEG", quality=90)
                # bytes are stored as they are: TFDS re-encodes only arrays (with TensorFlow)
                yield i, {"image": encoded.getvalue(), "label": i % 1000}

    builder = SyntheticImagenetJpeg(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return
    start = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    print(f"wrote {num_images} JPEGs in {time.perf_counter() - start:.1f} s -> {builder.data_dir}")


def dataset_bytes(data_dir: str) -> int:
    total = 0
    for folder, _, files in os.walk(os.path.join(data_dir, NAME)):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if "array_record" in f)
    return total


def time_reader(data_dir: str, num_images: int, workers: int, args) -> float:
    from shortcut_jax.data import default_data_config, make_dataset

    config = default_data_config()
    config.name = "tfds"
    config.tfds_name = f"{NAME}:1.0.{num_images}"
    config.data_dir = data_dir
    config.image_size = args.image_size
    config.random_flip = True
    config.num_workers = workers
    with make_dataset(config, batch_size=args.batch_size, seed=0) as source:
        start = time.perf_counter()
        batch = source.next_batch()
        first = time.perf_counter() - start
        assert batch["x"].shape == (args.batch_size, args.image_size, args.image_size, 3)
        start = time.perf_counter()
        for _ in range(args.num_batches):
            source.next_batch()
        elapsed = time.perf_counter() - start
    rate = args.num_batches * args.batch_size / elapsed
    print(
        f"workers {workers:2d}: {rate:8,.0f} images/s  ({args.num_batches} batches of "
        f"{args.batch_size} in {elapsed:.2f} s; first batch {first:.2f} s)",
        flush=True,
    )
    return rate


def main(argv=None) -> None:
    args = parse_args(argv)
    write_dataset(args.data_dir, args.num_images)
    size = dataset_bytes(args.data_dir)
    print(
        f"data set: {args.num_images} JPEGs {WIDTH}x{HEIGHT}, {size / args.num_images / 1e3:.0f} kB "
        f"each on average; {os.cpu_count()} CPUs; decode + crop + resize to {args.image_size}"
    )
    for workers in (int(w) for w in args.workers.split(",")):
        time_reader(args.data_dir, args.num_images, workers, args)


if __name__ == "__main__":  # grain's worker processes are spawned: they import this file again
    main()
