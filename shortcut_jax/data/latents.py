"""Pre-encoded VAE latents (``data.name='latents'``, ``data.path=DIR``), read from memory-mapped shards.

The set on disk
---------------
``python -m shortcut_jax.encode`` writes, in ``DIR``:

- ``manifest.json``: the source, image size, crop, the VAE (name, weights' sha256, config),
  its scaling and shift factors, the latent shape, storage dtype, example count, the shards and
  ``complete: true`` once every shard is written and counted;
- ``shard_00000.moments.npy`` ... : ``[n, 2, 2, h, w, c]``, axis 1 the image as stored (0) and
  its horizontal mirror (1), axis 2 the posterior mean (0) and standard deviation (1), in the
  unscaled latent space;
- ``shard_00000.labels.npy`` ... : int32 ``[n]``.

Moments rather than one sample: the training stream draws a fresh posterior sample every time
it visits an example (as the published code does), which one stored sample could not give.

The stream
----------
Positions map to (example, flip bit) as for every finite reader (``core.ExampleOrder``). The
example's moments for that flip are read from the memory-mapped shard, and the batch row is
``(mean + std * eps - shift) * scale``, where ``eps`` for stream position ``q`` comes from a
Philox generator keyed by ``(seed, LATENT_NOISE_STREAM)`` with counter ``(0, q, 0, 0)``: a pure
function of the seed and the position, so a resumed stream is bit-identical and the draws do not
depend on batch size or process count. A flipped latent is the latent of the flipped image, not
a mirrored latent (the two differ).

Memory: the shards are mapped, never read whole; labels (4 bytes an example) are held in memory.
Pages read through the mapping count towards the process's resident size, so the reader drops
them again (``madvise(MADV_DONTNEED)``; the kernel's page cache keeps them) whenever that size
has grown by ``RELEASE_BYTES``: resident memory stays bounded, whatever the set's size.
"""

from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
from typing import Any

import numpy as np

from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import (
    BatchLayout,
    DataSpec,
    ExampleOrder,
    FiniteStreamMixin,
    Source,
    draw_reference_indices,
)

FORMAT = "shortcut_jax.latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Random streams of this module; distinct from core's PERMUTATION/FLIP/REFERENCE/TOY streams (0-3).
LATENT_NOISE_STREAM = 4
LATENT_REFERENCE_STREAM = 5
# Drop the mapped pages from this process once its file-backed resident memory has grown by
# this much since the last drop. Measured (Linux's /proc/self/statm), not estimated from the bytes
# read: a fault maps the pages around it too, and with large page-cache folios whole folios, so
# the mapped size can be many times what was read.
RELEASE_BYTES = 256 << 20
STORAGE_DTYPES = ("float32", "float16")
MOMENTS_LAYOUT = "[n, 2 (image, mirrored image), 2 (mean, std), h, w, c], unscaled"


class LatentSetError(ValueError):
    """A latent folder that cannot be read as asked, with what to do about it."""


def shard_paths(root: str, shard: int) -> tuple[str, str]:
    """(moments file, labels file) of shard ``shard`` in ``root``."""
    stem = os.path.join(root, f"shard_{shard:05d}")
    return stem + ".moments.npy", stem + ".labels.npy"


def npy_layout(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header; raises ValueError on a damaged header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError("stored in Fortran order")
        return tuple(shape), np.dtype(dtype), f.tell()


def shard_problem(path: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why the .npy file at ``path`` is not an array of ``shape`` and ``dtype``, or None."""
    if not os.path.isfile(path):
        return "missing"
    try:
        found_shape, found_dtype, offset = npy_layout(path)
    except (ValueError, OSError, EOFError) as error:
        return f"unreadable header ({error})"
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        return f"holds {found_dtype} {found_shape}, expected {np.dtype(dtype)} {tuple(shape)}"
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != expected:
        return (
            f"{size} bytes, expected {expected} (truncated)"
            if size < expected
            else f"{size} bytes, expected {expected}"
        )
    return None


def read_manifest(root: str) -> dict[str, Any]:
    path = os.path.join(root, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise LatentSetError(
            f"{path} is not a latent set manifest (format {manifest.get('format')!r}, expected {FORMAT!r})"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise LatentSetError(
            f"{path} has format version {manifest.get('version')}; this reader reads "
            f"version {FORMAT_VERSION}: encode the images again"
        )
    return manifest


def moments_shape(manifest: dict[str, Any], count: int) -> tuple[int, ...]:
    return (count, 2, 2, *manifest["latent_shape"])


def resident_file_bytes() -> int | None:
    """This process's resident file-backed (shared) memory in bytes, or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return None


class _MappedShard:
    """One shard's moments, mapped read-only, as an ndarray view."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype):
        _, _, offset = npy_layout(path)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)  # rows are read in shuffled order: no read-ahead
        self.array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


class LatentSet:
    """An encoded folder opened for reading: manifest, mapped moment shards, labels in memory."""

    def __init__(self, root: str, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.latent_shape = tuple(int(d) for d in manifest["latent_shape"])
        self.scale = np.float32(manifest["scaling_factor"])
        self.shift = np.float32(manifest["shift_factor"])
        counts = [int(s["count"]) for s in manifest["shards"]]
        self.num_examples = int(sum(counts))
        self.num_classes = int(manifest["num_classes"])
        # shard s holds examples [starts[s], starts[s + 1])
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        problems = []
        for s, count in enumerate(counts):
            for path, shape, dtype in zip(
                shard_paths(root, s), (moments_shape(manifest, count), (count,)), (self.dtype, np.dtype(np.int32))
            ):
                problem = shard_problem(path, shape, dtype)
                if problem:
                    problems.append(f"{os.path.basename(path)}: {problem}")
        if problems:
            raise LatentSetError(
                f"{len(problems)} shard file(s) in data.path={root!r} are truncated or corrupt: "
                + "; ".join(problems[:10])
                + ". Delete them and run the encode command again with the same "
                "--out: it rewrites the missing shards only."
            )
        self.labels = (
            np.concatenate([np.load(shard_paths(root, s)[1]) for s in range(len(counts))])
            if counts
            else np.zeros(0, np.int32)
        )
        if len(self.labels) and (self.labels.min() < 0 or (self.num_classes and self.labels.max() >= self.num_classes)):
            raise LatentSetError(
                f"labels in data.path={root!r} range over [{self.labels.min()}, "
                f"{self.labels.max()}], outside 0..{self.num_classes - 1}: a labels shard is "
                "corrupt; encode again"
            )
        self._shards = [
            _MappedShard(shard_paths(root, s)[0], moments_shape(manifest, c), self.dtype) for s, c in enumerate(counts)
        ]
        self._read_since_release = 0
        self._resident_after_release = resident_file_bytes()

    def _release_if_grown(self, bytes_read: int) -> None:
        resident = resident_file_bytes()
        if resident is None:  # no measurement: count what was read, four times over
            self._read_since_release += 4 * bytes_read
            grown = self._read_since_release
        else:
            grown = resident - self._resident_after_release
        if grown >= RELEASE_BYTES:
            for shard in self._shards:
                shard.release()
            self._read_since_release = 0
            self._resident_after_release = resident_file_bytes()

    def moments(self, indices: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean and std [len(indices), h, w, c] of the examples, mirrored where ``flips``."""
        out = np.empty((len(indices), 2, *self.latent_shape), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        flip_axis = flips.astype(np.int64)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = indices[rows] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets within the file
            rows, local = rows[order], local[order]
            out[rows] = self._shards[s].array[local, flip_axis[rows]]  # [k, 2 (mean, std), h, w, c]
        self._release_if_grown(out.size * self.dtype.itemsize)
        return out[:, 0], out[:, 1]


def posterior_noise(seed: int, stream: int, positions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 [len(positions), *shape]; row i depends only on (seed, stream,
    positions[i]) (Philox counter (0, position, 0, 0): rows never share a counter)."""
    out = np.empty((len(positions), *shape), dtype=np.float32)
    for row, position in enumerate(positions):
        bits = np.random.Philox(key=[seed, stream], counter=[0, int(position), 0, 0])
        out[row] = np.random.Generator(bits).standard_normal(shape, dtype=np.float32)
    return out


class LatentSource(FiniteStreamMixin, Source):
    """Scaled posterior samples of an encoded set (see the module docstring).

    A worker thread prepares the batch that follows the one just returned (the noise draws
    and the copies out of the mapped files release the interpreter lock), so a training loop
    that dispatches its step before asking for the next batch finds it ready. Which rows and
    which noise a batch holds depends only on its position, never on the thread's timing;
    ``get_state`` reports the position of the next batch to be returned.
    """

    def __init__(
        self,
        latent_set: LatentSet,
        *,
        layout: BatchLayout,
        seed: int,
        shuffle: bool = True,
        random_flip: bool = False,
        use_labels: bool = True,
    ):
        self.latent_set = latent_set
        self.manifest = latent_set.manifest
        self._use_labels = use_labels and latent_set.num_classes > 0
        self.spec = DataSpec(
            shape=latent_set.latent_shape, num_classes=latent_set.num_classes if self._use_labels else 0, kind="images"
        )
        self.num_examples = latent_set.num_examples
        self._layout = layout
        self._seed = seed
        self._random_flip = random_flip
        self._order = ExampleOrder(self.num_examples, seed, shuffle)
        self._position = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="latents")
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._closed = False

    def _scaled(self, mean: np.ndarray, std: np.ndarray, eps: np.ndarray) -> np.ndarray:
        s = self.latent_set
        return (mean + std * eps - s.shift) * s.scale

    def _labels_for(self, indices: np.ndarray) -> np.ndarray:
        if not self._use_labels:
            return np.zeros(len(indices), dtype=np.int32)
        return self.latent_set.labels[indices].astype(np.int32)

    def _batch_at(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch that starts at stream position ``position``."""
        start = position + self._layout.offset
        count = self._layout.batch_size
        indices, flips = self._order.lookup(start, count, self._random_flip)
        mean, std = self.latent_set.moments(indices, flips)
        eps = posterior_noise(self._seed, LATENT_NOISE_STREAM, np.arange(start, start + count), self.spec.shape)
        return {"x": self._scaled(mean, std, eps), "label": self._labels_for(indices)}

    def next_batch(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("next_batch() called after close().")
        if self._pending is None:
            self._pending = (self._position, self._pool.submit(self._batch_at, self._position))
        _, future = self._pending
        try:
            batch = future.result()
        except BaseException:
            self._pending = None  # the position stays on the failed batch
            raise
        self._position += self._layout.global_batch_size
        self._pending = (self._position, self._pool.submit(self._batch_at, self._position))
        return batch

    def _on_seek(self, position: int) -> None:
        if self._pending is not None and self._pending[0] != position:
            self._pending[1].cancel()  # one already running finishes and is dropped
            self._pending = None

    def reference(self, n: int, seed: int) -> np.ndarray:
        """Scaled posterior samples of ``n`` distinct examples (not mirrored), chosen by ``seed``."""
        indices = draw_reference_indices(self.num_examples, n, seed)
        mean, std = self.latent_set.moments(indices, np.zeros(len(indices), dtype=bool))
        eps = posterior_noise(seed, LATENT_REFERENCE_STREAM, np.arange(len(indices)), self.spec.shape)
        return self._scaled(mean, std, eps)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def _describe_vae(manifest: dict[str, Any]) -> str:
    vae = manifest["vae"]
    return f"{vae['name']!r} (weights sha256 {vae['weights_sha256'][:12]}...)"


def _same_vae_name(expected: str, recorded: str) -> bool:
    """Hub ids and folder names name the same VAE by their last part: a set encoded from
    ``/models/sd-vae-ft-mse`` (a ``huggingface-cli download --local-dir``) is accepted for
    ``stabilityai/sd-vae-ft-mse``."""
    last = lambda name: name.rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    return expected == recorded or last(expected) == last(recorded)


def check_expectations(config, manifest: dict[str, Any], root: str) -> None:
    """Refuses a set made with another VAE, image size or scale than the config asks for."""
    image_size = cfg.get(config, "image_size")
    if image_size and image_size != manifest["image_size"]:
        raise LatentSetError(
            f"data.path={root!r} holds latents of {manifest['image_size']}x{manifest['image_size']} images but "
            f"data.image_size={image_size}; encode the images at {image_size} or set data.image_size="
            f"{manifest['image_size']} (0 accepts any size)."
        )
    vae = cfg.get(config, "latent_vae")
    if vae:
        known = manifest["vae"]
        matches = _same_vae_name(vae, known["name"]) or (
            len(vae) >= 8 and known["weights_sha256"].startswith(vae.lower())
        )
        if not matches:
            raise LatentSetError(
                f"data.path={root!r} was encoded with the VAE {_describe_vae(manifest)} but data.latent_vae="
                f"{vae!r}; encode the images with that VAE, or set data.latent_vae to {known['name']!r} "
                "('' accepts any VAE)."
            )
    scale = cfg.get(config, "latent_scale")
    if scale and not np.isclose(scale, manifest["scaling_factor"], rtol=1e-6, atol=0.0):
        raise LatentSetError(
            f"data.path={root!r} holds latents of a VAE with scaling factor {manifest['scaling_factor']} but "
            f"data.latent_scale={scale}; set data.latent_scale={manifest['scaling_factor']} (0 takes the "
            "set's own) or encode with a VAE of that scale."
        )


def open_latent_set(root: str, config=None) -> LatentSet:
    """Opens a complete encoded folder; LatentSetError says what is wrong and what to do.

    With a data ``config``, its expectations (image size, VAE, scale) are checked against the
    manifest before any shard is opened.
    """
    if not os.path.isdir(root):
        hint = " For a single .npz/.npy of latents use data.name='arrays'." if root.endswith((".npz", ".npy")) else ""
        raise LatentSetError(
            f"data.path={root!r} is not a folder; point it at the --out folder of "
            f"`python -m shortcut_jax.encode`.{hint}"
        )
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        raise LatentSetError(
            f"data.path={root!r} has no {MANIFEST}; it is not a folder written by "
            "`python -m shortcut_jax.encode` (or its first shard never finished: run it again)."
        )
    try:
        manifest = read_manifest(root)
    except (json.JSONDecodeError, OSError) as error:
        raise LatentSetError(f"cannot read {os.path.join(root, MANIFEST)} ({error}); encode again") from error
    if not manifest.get("complete"):
        raise LatentSetError(
            f"the latent set in data.path={root!r} is incomplete (its encode was stopped before the last of "
            f"its {manifest.get('num_shards')} shards was written and counted); run the encode command again "
            "with the same --out to finish it."
        )
    if config is not None:
        check_expectations(config, manifest, root)
    latent_set = LatentSet(root, manifest)
    if latent_set.num_examples != manifest["count"]:
        raise LatentSetError(
            f"the shards in data.path={root!r} hold {latent_set.num_examples} examples but the "
            f"manifest says {manifest['count']}; encode again"
        )
    return latent_set


def prepare_latents(config, name: str) -> LatentSet:
    cfg.reject_cache_decoded(config, name)
    root = cfg.get(config, "path")
    if not root:
        raise LatentSetError(
            "data.name='latents' needs data.path set to the folder written by "
            "`python -m shortcut_jax.encode --out=DIR`."
        )
    return open_latent_set(root, config)


def build_latents(config, latent_set: LatentSet, layout: BatchLayout, seed: int) -> LatentSource:
    return LatentSource(
        latent_set,
        layout=layout,
        seed=seed,
        shuffle=cfg.get(config, "shuffle"),
        random_flip=cfg.get(config, "random_flip"),
        use_labels=cfg.get(config, "use_labels"),
    )
