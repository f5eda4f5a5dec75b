"""Images/s of FID Inception feature extraction (``InceptionFeatures``) on this machine's devices.

Speed does not depend on the weights' values, so the network runs with
``synthetic_torch_state_dict`` weights and random uint8 images; the time covers what a user's
call does (host -> device transfer, resize to 299, the network at full float32 precision,
features back to the host), measured after one warm-up call per input size::

    python -m benchmarks.fid_inception_speed --sizes=32,256,299 --batch_sizes=200,500 \\
        --num_images=10000 --out=results/

Writes ``OUT/fid_inception_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,256,299")
    parser.add_argument("--batch_sizes", default="200,500")
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax

    from shortcut_jax.evaluation import inception as inc

    variables = inc.torch_state_dict_to_variables(
        inc.synthetic_torch_state_dict(sorted(inc.expected_torch_shapes().items()), seed=0)
    )
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        extractor = inc.InceptionFeatures(variables, batch_size=batch_size)
        for size in (int(s) for s in args.sizes.split(",")):
            images = rng.integers(0, 256, (args.num_images, size, size, 3), dtype=np.uint8)
            extractor(images[:batch_size])  # compile
            start = time.perf_counter()
            extractor(images)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "input_size": size,
                    "batch_size": extractor.batch_size,
                    "images": args.num_images,
                    "seconds": seconds,
                    "images_per_second": args.num_images / seconds,
                }
            )
            print(rows[-1], flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "devices": [d.device_kind for d in jax.local_devices()],
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fid_inception_speed.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
