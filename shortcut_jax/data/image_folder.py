"""Images read from a folder with Pillow, decoded by a thread pool one batch ahead.

Layouts
-------
- Class folders: ``root/<class>/.../<file>``; classes are the sorted sub-folder names and get
  labels 0..C-1. Images may sit in nested folders below a class folder.
- Flat: ``root/<file>``, unlabelled (``num_classes`` 0).

Image files are those ending in .jpg, .jpeg, .png, .bmp or .webp (any case). Names starting with
a dot are skipped: they are hidden files such as macOS ``._name.jpg`` resource forks, which carry
an image extension but no image. Within a class, files are sorted by path, so the file list (and
hence the stream) is the same on every machine.

Pixels
------
Every image is converted to RGB. With ``image_size`` 0 all images must share one size (checked
from the headers during validation). With ``image_size`` N the largest centred square is cropped
and resized to NxN with Pillow's bicubic filter, which antialiases when shrinking
(``preprocess.centre_crop_resize``, shared with the TFDS reader). Pixels are
mapped to [-1, 1] by ``x / 127.5 - 1``.

Threads and determinism
-----------------------
Which file goes in which row, and whether it is flipped, is computed in the caller's thread from
the stream position (see ``core``); the workers only decode into rows they are given, so timing
never changes a batch. After returning the batch at position P, the reader submits the decode of
the batch at P + G (G the global batch) and ``get_state`` still reports P + G, the position of
the next batch the caller will receive.

Decoded cache
-------------
With ``cache_decoded`` every image is decoded once when the reader is built (by up to
``num_workers`` worker processes for large folders) and kept as uint8 in host memory; batches
are then gathered from that array in the caller's thread and no decoding thread runs during
training. The stream is the same as without the cache, batch for batch. Worth it whenever the
data fits: many decoding threads contend with the training loop's own Python for the
interpreter lock, which can halve the steps a fast accelerator gets.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image

from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import (
    BatchLayout,
    DataSpec,
    ExampleOrder,
    FiniteStreamMixin,
    Source,
    draw_reference_indices,
    uint8_to_float,
)
from shortcut_jax.data.preprocess import centre_crop_resize

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# Enough to act on without flooding the terminal when a whole folder is bad.
MAX_LISTED = 10
# Files per header-scan task: large enough that task overhead is small, small enough that the
# pool stays balanced.
SCAN_CHUNK = 256
# Refuse a decoded cache larger than this share of the memory available when the reader is built.
CACHE_MEMORY_SHARE = 0.5
# The decoded cache is filled by worker processes, in tasks of CACHE_CHUNK files, from this many
# images on and where at least CACHE_MIN_PROCESSES can run (each starts a Python interpreter,
# about 0.2 s); otherwise in the calling thread. On two cores the calling thread was faster
# (CIFAR-10's 50,000 images: 5.2 s, against 6.7 s with two processes and about 10 s with 16
# threads, the interpreter lock shared).
CACHE_PROCESSES_FROM = 4096
CACHE_MIN_PROCESSES = 4
CACHE_CHUNK = 2048
# decode_worker's exit status for a file it cannot decode (its message is on stderr)
DECODE_ERROR = 3

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The validated contents of an image folder."""

    root: str
    files: tuple[str, ...]  # absolute paths, in stream order (index = example id)
    labels: np.ndarray  # int32 [len(files)], the class of each file (0 for a flat folder)
    class_names: tuple[str, ...]  # empty for a flat folder
    native_size: tuple[int, int] | None  # (height, width) shared by all images, else None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_name(f))
    return sorted(found)


def _other_files_below(folder: str, limit: int) -> tuple[int, list[str]]:
    count, examples = 0, []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            count += 1
            if len(examples) < limit:
                examples.append(os.path.relpath(os.path.join(dirpath, f), folder))
    return count, sorted(examples)


def _listing(root: str, shown: str):
    """Finds the image files and their classes; raises ValueError naming the fix."""
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise ValueError(
            f"data.path={shown!r} is an empty folder. Put images in it (one sub-folder per "
            "class, or all images directly in it) or point data.path at the right folder."
        )
    class_dirs = [e for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
    per_class = {d.name: _images_below(d.path) for d in class_dirs}
    if any(per_class.values()):
        if loose:
            raise ValueError(
                f"data.path={shown!r} has class sub-folders and also {len(loose)} images "
                f"directly inside it (e.g. {loose[:3]}); move those images into a class folder, "
                "or delete them, so that every image has a class."
            )
        empty = [name for name, files in per_class.items() if not files]
        if empty:
            raise ValueError(
                f"class folders {empty[:MAX_LISTED]} under data.path={shown!r} hold no images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)}); labels come from sorted folder "
                "names, so remove these folders or add their images."
            )
        names = tuple(per_class)
        files = [f for name in names for f in per_class[name]]
        labels = np.concatenate([np.full(len(per_class[name]), c, dtype=np.int32) for c, name in enumerate(names)])
        return files, labels, names
    if loose:
        files = [os.path.join(root, name) for name in loose]
        return files, np.zeros(len(files), dtype=np.int32), ()
    count, examples = _other_files_below(root, 5)
    raise ValueError(
        f"data.path={shown!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} in "
        f"any case; found {count} other files, e.g. {examples}). Convert the images to one of "
        "these formats or point data.path at the folder that holds them."
    )


def _read_headers(paths: Sequence[str]) -> list[tuple[str, Any]]:
    """(path, (width, height)) for readable files, (path, 'error text') for the others."""
    results = []
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size
                image.verify()
            results.append((path, size))
        # Pillow's format parsers signal corrupt input with many exception types (OSError,
        # SyntaxError, struct.error, ValueError, ...), and any of them means an unusable file.
        except Exception as error:  # noqa: BLE001
            results.append((path, f"{type(error).__name__}: {error}"))
    return results


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _fingerprint(files: Sequence[str]) -> str:
    """Changes whenever a file is added, removed, resized or rewritten (its mtime changes)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# make_dataset validates before building, and training scripts usually validate on their own
# first; remembering the last few scans lets the second pass cost one stat() per file instead
# of one open().
_HEADER_CACHE: collections.OrderedDict[str, tuple[str, list]] = collections.OrderedDict()
_HEADER_CACHE_SIZE = 4
_HEADER_CACHE_LOCK = threading.Lock()


def _cached_headers(root: str, files: Sequence[str], num_workers: int) -> list[tuple[str, Any]]:
    fingerprint = _fingerprint(files)
    with _HEADER_CACHE_LOCK:
        hit = _HEADER_CACHE.get(root)
        if hit is not None and hit[0] == fingerprint:
            return hit[1]
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        chunks = pool.map(_read_headers, _chunks(files, SCAN_CHUNK))
        headers = [result for chunk in chunks for result in chunk]
    with _HEADER_CACHE_LOCK:
        _HEADER_CACHE[root] = (fingerprint, headers)
        _HEADER_CACHE.move_to_end(root)
        while len(_HEADER_CACHE) > _HEADER_CACHE_SIZE:
            _HEADER_CACHE.popitem(last=False)
    return headers


def scan_image_folder(root: str, image_size: int, num_workers: int) -> FolderIndex:
    """Lists the folder and opens every file's header (Image.open + verify) in a thread pool.

    A folder whose files are unchanged since a recent scan (same paths, sizes and mtimes) reuses
    that scan's headers. Raises ValueError naming the broken files, or the mixed sizes when
    ``image_size`` is 0.
    """
    shown = root
    root = os.path.abspath(root)
    files, labels, class_names = _listing(root, shown)
    headers = _cached_headers(root, files, num_workers)
    broken = [(path, info) for path, info in headers if isinstance(info, str)]
    if broken:
        listed = "\n".join(f"  {os.path.relpath(p, root)}: {e}" for p, e in broken[:MAX_LISTED])
        more = f"\n  ... and {len(broken) - MAX_LISTED} more" if len(broken) > MAX_LISTED else ""
        raise ValueError(
            f"{len(broken)} of {len(files)} image files under data.path={shown!r} cannot be "
            f"read:\n{listed}{more}\nDelete or replace these files, then start again."
        )
    by_size: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for path, (width, height) in headers:
        by_size[(height, width)].append(path)
    native_size = next(iter(by_size)) if len(by_size) == 1 else None
    if image_size == 0 and native_size is None:
        common = sorted(by_size.items(), key=lambda kv: -len(kv[1]))
        listed = "\n".join(
            f"  {h}x{w} (HxW): {len(paths)} files, e.g. {os.path.relpath(paths[0], root)}"
            for (h, w), paths in common[:MAX_LISTED]
        )
        suggestion = min(min(size) for size in by_size)
        raise ValueError(
            f"images under data.path={shown!r} have {len(by_size)} different sizes:\n{listed}\n"
            "data.image_size=0 keeps native sizes, which must then all be equal. Set "
            f"data.image_size to a positive size (e.g. {suggestion}) to centre-crop and resize "
            "every image to a square of that size."
        )
    return FolderIndex(root, tuple(files), labels, class_names, native_size)


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable, which counts reclaimable page
    cache), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decodes one file to uint8 RGB [H, W, 3], centre-cropped and resized if ``image_size``."""
    with Image.open(path) as opened:
        opened.load()
        # convert() copies even when the mode already matches; skipping it is a measurable
        # share of the per-image cost for small images.
        image = opened if opened.mode == "RGB" else opened.convert("RGB")
    return centre_crop_resize(image, image_size)


def _decode_file(path: str, image_size: int, shape: tuple) -> np.ndarray:
    """``load_image`` with errors that name the file and say what to do."""
    try:
        image = load_image(path, image_size)
    except Exception as error:  # noqa: BLE001 - see _read_headers
        raise RuntimeError(
            f"cannot decode {path} ({type(error).__name__}: {error}); it passed the "
            "header check but its data is damaged. Delete or replace it and restart."
        ) from error
    if image.shape != tuple(shape):
        raise RuntimeError(
            f"{path} decoded to shape {image.shape}, expected {tuple(shape)}; "
            "set data.image_size > 0 to resize all images."
        )
    return image


def decode_files(paths: Sequence[str], image_size: int, shape: tuple) -> np.ndarray:
    """uint8 [len(paths), *shape]; runs in the caller or in ``decode_worker``."""
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for row, path in enumerate(paths):
        out[row] = _decode_file(path, image_size, shape)
    return out


def _flipped_float(pixels: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Mirrors the rows ``flips`` marks (in place) and scales uint8 to float32 in [-1, 1]."""
    pixels[flips] = pixels[flips, :, ::-1]
    return uint8_to_float(pixels)


def _decode_in_subprocess(paths: Sequence[str], image_size: int, shape: tuple) -> np.ndarray:
    """``decode_files`` in a fresh interpreter (``python -m shortcut_jax.data.decode_worker``)."""
    job = json.dumps({"paths": list(paths), "image_size": image_size, "shape": list(shape)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this process's imports
    done = subprocess.run(
        [sys.executable, "-m", "shortcut_jax.data.decode_worker"],
        input=job.encode(),
        capture_output=True,
        env=env,
        check=False,
    )
    message = done.stderr.decode(errors="replace").strip()
    if done.returncode == DECODE_ERROR:
        raise RuntimeError(message)
    if done.returncode != 0:
        raise RuntimeError(f"the image decoding process failed (exit status {done.returncode}): {message[-2000:]}")
    return np.frombuffer(done.stdout, dtype=np.uint8).reshape(len(paths), *shape)


class _PendingBatch:
    """A batch whose rows are being decoded by the pool."""

    def __init__(self, position: int, futures, x: np.ndarray, labels: np.ndarray):
        self.position = position
        self._futures = futures
        self._x = x
        self._labels = labels

    def result(self) -> dict[str, np.ndarray]:
        for future in self._futures:
            future.result()  # re-raises a decoding error in the caller's thread
        return {"x": self._x, "label": self._labels}

    def cancel(self) -> None:
        # Tasks already running finish into this batch's own buffer, which is then dropped.
        for future in self._futures:
            future.cancel()


class ImageFolderSource(FiniteStreamMixin, Source):
    """Streams the images of a scanned folder (see the module docstring)."""

    def __init__(
        self,
        index: FolderIndex,
        *,
        layout: BatchLayout,
        seed: int,
        shuffle: bool = True,
        random_flip: bool = False,
        image_size: int = 0,
        num_workers: int = 8,
        use_labels: bool = True,
        cache_decoded: bool = False,
    ):
        if image_size == 0 and index.native_size is None:
            raise ValueError("images differ in size; set image_size > 0.")
        self.root = index.root
        self.class_names = index.class_names if use_labels else ()
        self._files = index.files
        self._labels = index.labels if use_labels and index.class_names else np.zeros(len(index.files), dtype=np.int32)
        size = (image_size, image_size) if image_size else index.native_size
        self.spec = DataSpec(shape=(*size, 3), num_classes=len(self.class_names), kind="images")
        self.num_examples = len(index.files)
        self._image_size = image_size
        self._layout = layout
        self._random_flip = random_flip
        self._order = ExampleOrder(self.num_examples, seed, shuffle)
        self._num_workers = num_workers
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="image_folder")
        self._pending: _PendingBatch | None = None
        self._position = 0
        self._closed = False
        self._decoded: np.ndarray | None = None
        if cache_decoded:
            try:
                self._decoded = self._decode_all()
            except BaseException:
                self.close()
                raise

    def _decode_all(self) -> np.ndarray:
        """Every image as uint8 [N, H, W, 3] (see "Decoded cache")."""
        shape = (self.num_examples, *self.spec.shape)
        need = int(np.prod(shape))
        available = _available_memory()
        if available is not None and need > CACHE_MEMORY_SHARE * available:
            raise ValueError(
                f"data.cache_decoded=True would hold {need / 2**30:.1f} GiB of decoded images, more "
                f"than {CACHE_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory available; "
                "set data.cache_decoded=False (images are then decoded batch by batch) or a "
                "smaller data.image_size."
            )
        start = time.perf_counter()
        decoded = np.empty(shape, dtype=np.uint8)
        chunks = _chunks(np.arange(self.num_examples), CACHE_CHUNK)
        workers = min(self._num_workers, os.cpu_count() or 1, len(chunks))
        if self.num_examples < CACHE_PROCESSES_FROM or workers < CACHE_MIN_PROCESSES:
            for rows in chunks:
                decoded[rows] = decode_files([self._files[i] for i in rows], self._image_size, self.spec.shape)
        else:
            # Worker processes, not threads: for small images the per-file Python work, which holds
            # the interpreter lock, is most of the cost (see decode_worker). The threads here only
            # wait for them.
            def run(rows):
                decoded[rows] = _decode_in_subprocess([self._files[i] for i in rows], self._image_size, self.spec.shape)

            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(run, rows) for rows in chunks]
                try:
                    for future in futures:
                        future.result()  # re-raises a worker's error
                finally:
                    for future in futures:
                        future.cancel()
        log.info(
            "decoded %d images into memory (%.0f MiB) in %.1f s",
            self.num_examples,
            need / 2**20,
            time.perf_counter() - start,
        )
        return decoded

    def _decode_rows(self, indices: np.ndarray, flips: np.ndarray, out: np.ndarray) -> None:
        pixels = decode_files([self._files[i] for i in indices], self._image_size, self.spec.shape)
        out[:] = _flipped_float(pixels, flips)

    def _gather(self, indices: np.ndarray, flips: np.ndarray) -> np.ndarray:
        return _flipped_float(self._decoded[indices], flips)

    def _submit(self, indices: np.ndarray, flips: np.ndarray, out: np.ndarray, rows_per_task: int) -> list:
        return [
            self._pool.submit(
                self._decode_rows,
                indices[a : a + rows_per_task],
                flips[a : a + rows_per_task],
                out[a : a + rows_per_task],
            )
            for a in range(0, len(indices), rows_per_task)
        ]

    def _start_batch(self, position: int) -> _PendingBatch:
        batch = self._layout.batch_size
        indices, flips = self._order.lookup(position + self._layout.offset, batch, self._random_flip)
        if self._decoded is not None:
            return _PendingBatch(position, [], self._gather(indices, flips), self._labels[indices])
        x = np.empty((batch, *self.spec.shape), dtype=np.float32)
        # One task per worker: a batch is small enough that finer splitting only adds overhead.
        rows_per_task = -(-batch // self._num_workers)
        futures = self._submit(indices, flips, x, rows_per_task)
        return _PendingBatch(position, futures, x, self._labels[indices])

    def next_batch(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("next_batch() called after close().")
        # Invariant: a pending batch, if any, is the one at self._position (see _on_seek).
        if self._pending is None:
            self._pending = self._start_batch(self._position)
        current = self._pending
        following_position = self._position + self._layout.global_batch_size
        # Queued behind the current batch's tasks, so it never delays them.
        following = self._start_batch(following_position)
        try:
            batch = current.result()
        except BaseException:
            # Leave the position on the failed batch so that get_state stays truthful.
            following.cancel()
            self._pending = None
            raise
        self._position = following_position
        self._pending = following
        return batch

    def _on_seek(self, position: int) -> None:
        if self._pending is not None and self._pending.position != position:
            self._pending.cancel()
            self._pending = None

    def reference(self, n: int, seed: int) -> np.ndarray:
        if self._closed:
            raise RuntimeError("reference() called after close().")
        indices = draw_reference_indices(self.num_examples, n, seed)
        if self._decoded is not None:
            return self._gather(indices, np.zeros(len(indices), dtype=bool))
        x = np.empty((len(indices), *self.spec.shape), dtype=np.float32)
        # Many small tasks rather than one per worker, so that a large reference set is spread
        # evenly over the pool.
        futures = self._submit(indices, np.zeros(len(indices), dtype=bool), x, 64)
        for future in futures:
            future.result()
        return x

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def prepare_image_folder(config, name: str) -> FolderIndex:
    path = cfg.get(config, "path")
    if not path:
        raise ValueError(
            "data.name='image_folder' needs data.path set to a folder of images (one "
            "sub-folder per class, or images directly in it)."
        )
    if not os.path.exists(path):
        raise ValueError(f"data.path={path!r} does not exist; set data.path to an image folder.")
    if not os.path.isdir(path):
        hint = ""
        if path.endswith((".tar", ".tar.gz", ".tgz")):
            hint = (
                " It looks like an archive: unpack it with shortcut_jax.data.extract_archive"
                "(path, dest_dir) and set data.path to the folder it returns."
            )
        raise ValueError(f"data.path={path!r} is not a folder.{hint}")
    return scan_image_folder(path, cfg.get(config, "image_size"), cfg.get(config, "num_workers"))


def build_image_folder(config, index: FolderIndex, layout: BatchLayout, seed: int) -> ImageFolderSource:
    return ImageFolderSource(
        index,
        layout=layout,
        seed=seed,
        shuffle=cfg.get(config, "shuffle"),
        random_flip=cfg.get(config, "random_flip"),
        image_size=cfg.get(config, "image_size"),
        num_workers=cfg.get(config, "num_workers"),
        use_labels=cfg.get(config, "use_labels"),
        cache_decoded=cfg.get(config, "cache_decoded"),
    )
