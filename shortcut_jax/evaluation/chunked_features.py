"""Features of images by a jitted network, chunk by chunk over this process's devices.

The FID network (``inception.InceptionFeatures``) is one of these; tests build others around a
small stand-in network, so that everything but the network itself is exercised on a CPU.

Two ways in, one set of programs:

* ``extractor(images)``: host images (uint8, or float in [-1, 1] quantised by
  ``pixels.to_uint8``) are sent to the devices chunk by chunk;
* ``extractor.on_device(images, count)``: images that are already on the devices (a sampler's or
  decoder's output, float or uint8, RGB or greyscale) are checked for non-finite values and
  quantised there (``pixels.to_uint8_on_device``, the same bytes as the host rule), and only
  the features ``[count, dim]`` come back to the host. For 256x256 images this moves 8 KiB per
  image instead of 768 KiB, and no host pass over the pixels is made.

Both put every chunk of ``batch_size`` rows (rounded up to a multiple of the devices, the last
chunk zero-padded) over ``devices`` and keep one chunk in flight ahead of the copy of the
previous chunk's features.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.evaluation.pixels import grey_to_rgb_on_device, to_uint8, to_uint8_on_device

__all__ = ["ChunkedFeatures"]


@functools.partial(jax.jit, static_argnames=("chunk", "num_chunks"))
def _quantised_chunks(images, count, *, chunk: int, num_chunks: int):
    """Device images ``[B, H, W, C]`` -> (``num_chunks`` uint8 arrays ``[chunk, H, W, 3]`` of the
    first ``num_chunks * chunk`` rows, rows from ``count`` on zeroed; whether the first ``count``
    rows are all finite)."""
    x = grey_to_rgb_on_device(images)
    rows = jnp.arange(x.shape[0]) < count  # [B]: the samples; the rest pads the sampler's batch
    if jnp.issubdtype(x.dtype, jnp.floating):
        finite = jnp.all(jnp.isfinite(x) | ~rows[:, None, None, None])
        x = jnp.where(rows[:, None, None, None], x, 0.0)  # padding rows may hold anything
    else:
        finite = jnp.bool_(True)
        x = jnp.where(rows[:, None, None, None], x, jnp.zeros((), x.dtype))
    pixels = to_uint8_on_device(x)
    wanted = num_chunks * chunk
    if wanted > pixels.shape[0]:
        pixels = jnp.pad(pixels, ((0, wanted - pixels.shape[0]), (0, 0), (0, 0), (0, 0)))
    return tuple(pixels[i * chunk : (i + 1) * chunk] for i in range(num_chunks)), finite


class ChunkedFeatures:
    """``extractor(images) -> float32 [N, dim]`` on the host, or ``extractor.on_device(images,
    count)`` for device images (see the module docstring).

    ``network_input``: uint8 ``[b, H, W, 3]`` -> the network's input (compiled per image size);
    ``network(variables, inputs) -> [b, dim]`` (compiled once). ``variables`` are replicated over
    ``devices`` (default: this process's devices).
    """

    def __init__(
        self,
        network_input: Callable,
        network: Callable,
        variables,
        *,
        dim: int,
        batch_size: int,
        devices: Optional[Sequence[Any]] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dim = int(dim)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.batch_size = -(-int(batch_size) // len(self.devices)) * len(self.devices)
        mesh = jax.sharding.Mesh(np.asarray(self.devices), ("batch",))
        self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._variables = jax.device_put(
            jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), variables), replicated
        )
        # Two programs: the input step depends on the image size, the network does not.
        self._prepare = jax.jit(network_input, out_shardings=self._batch_sharding)
        self._network = jax.jit(network, out_shardings=self._batch_sharding)

    def __call__(self, images) -> np.ndarray:
        x = to_uint8(images)
        b = self.batch_size
        chunks = []
        for start in range(0, len(x), b):
            chunk = x[start : start + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), np.uint8)])
            chunks.append(chunk)
        return self._features(chunks, len(x))

    def on_device(self, images: jax.Array, count: Optional[int] = None) -> Optional[np.ndarray]:
        """Features ``float32 [count, dim]`` (host) of the first ``count`` rows (default: all) of
        device images ``[B, H, W, 1 or 3]`` (float in [-1, 1] or uint8); None when any of those
        rows holds a non-finite value (there is no image it stands for).

        ``images`` may be sharded over any devices of this process (a sampler's mesh): each chunk
        is moved to ``devices`` on the devices. Arrays spanning several processes are refused:
        each process would need the rows of the others.
        """
        count = len(images) if count is None else int(count)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have shape [N, H, W, 3] (or [N, H, W, 1]), got {images.shape}")
        if not 0 <= count <= images.shape[0]:
            raise ValueError(f"count={count} is not between 0 and the {images.shape[0]} rows of the images")
        if not getattr(images, "is_fully_addressable", True):
            raise ValueError("on_device scores images held by this process; these span several processes")
        if count == 0:
            return np.zeros((0, self.dim), np.float32)
        num_chunks = -(-count // self.batch_size)
        chunks, finite = _quantised_chunks(images, count, chunk=self.batch_size, num_chunks=num_chunks)
        # the network is dispatched before the finiteness is read, so the two overlap; features
        # of a batch that is not finite are discarded
        features = self._features(chunks, count)
        return features if bool(finite) else None

    def _features(self, chunks, count: int) -> np.ndarray:
        """Features of ``chunks`` (host or device uint8 ``[batch_size, H, W, 3]`` each) -> host
        ``[count, dim]`` (the rows past ``count`` are padding)."""
        b = self.batch_size
        out = np.empty((count, self.dim), np.float32)
        pending = []  # (start, rows, features on device): one chunk in flight ahead
        with jax.default_matmul_precision("float32"):
            for i, chunk in enumerate(chunks):
                start = i * b
                # Dispatch is asynchronous: the next chunk's transfer and the network overlap
                # with copying the previous chunk's features back. A device chunk moves between
                # devices only where its sharding differs from the network's.
                chunk = jax.device_put(chunk, self._batch_sharding)
                pending.append((start, min(b, count - start), self._network(self._variables, self._prepare(chunk))))
                if len(pending) > 1:
                    self._collect(out, *pending.pop(0))
            for item in pending:
                self._collect(out, *item)
        return out

    @staticmethod
    def _collect(out, start, count, features) -> None:
        out[start : start + count] = np.asarray(features)[:count]
