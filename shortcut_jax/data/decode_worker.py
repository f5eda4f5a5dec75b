"""Decodes image files in a separate interpreter, for the image-folder reader's decoded cache.

Reads ``{"paths": [...], "image_size": N, "shape": [H, W, 3]}`` as JSON on stdin and writes the
images as raw uint8 bytes (``len(paths) x H x W x 3``) to stdout; on a file it cannot decode it
writes the reason to stderr and exits with status ``DECODE_ERROR``. A plain interpreter started with
``python -m`` neither forks the caller (whose JAX runtime runs threads) nor re-imports the
caller's main script, as multiprocessing's start methods would.
"""

from __future__ import annotations

import json
import sys

from shortcut_jax.data.image_folder import DECODE_ERROR, decode_files


def main() -> int:
    job = json.load(sys.stdin)
    try:
        images = decode_files(job["paths"], job["image_size"], tuple(job["shape"]))
    except RuntimeError as error:
        sys.stderr.write(str(error))
        return DECODE_ERROR
    sys.stdout.buffer.write(images.tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
