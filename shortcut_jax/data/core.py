"""Building blocks shared by every reader: the example spec, the `Source` protocol, batch layout
across processes, and the deterministic mapping from stream positions to examples.

Stream model for finite data sets (arrays, digits, image folders)
-----------------------------------------------------------------
All epochs are laid end to end into one infinite stream of positions. Position ``q`` belongs to
epoch ``q // N`` and is example ``perm(epoch)[q % N]``, where ``perm(epoch)`` is drawn from
``np.random.default_rng([seed, 0, epoch])`` (the identity when shuffling is off). Global batch
``g`` covers positions ``[P, P + G)`` with ``G = batch_size * process_count``; process ``p`` takes
``[P + p * batch_size, P + (p + 1) * batch_size)``. Batches may therefore span an epoch boundary:
no example is ever dropped and every epoch is seen exactly once. The whole stream position is the
single integer ``P``, which is what ``get_state`` returns.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

# Distinct first words after the seed keep the random streams of one seed independent of each
# other (the permutation of epoch 3 must not correlate with the flips of epoch 3, and so on).
PERMUTATION_STREAM = 0
FLIP_STREAM = 1
REFERENCE_STREAM = 2
TOY_STREAM = 3


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What one example looks like.

    Attributes:
      shape: shape of one example, e.g. ``(2,)`` for points or ``(H, W, C)`` for images.
      num_classes: number of labels; 0 means unlabelled (every label is 0).
      kind: ``'points'`` or ``'images'``.
    """

    shape: tuple[int, ...]
    num_classes: int
    kind: str


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split between processes."""

    batch_size: int  # per process
    process_index: int = 0
    process_count: int = 1

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    @property
    def offset(self) -> int:
        """First row of this process's slice within the global batch."""
        return self.process_index * self.batch_size


class Source(abc.ABC):
    """An endless, resumable stream of batches.

    ``next_batch`` returns ``{'x': float32 [B, *spec.shape], 'label': int32 [B]}``. After
    ``set_state(s)`` the following batches are bit-identical to those that followed when ``s``
    was taken with ``get_state``.
    """

    spec: DataSpec
    # Size of the underlying data set, or None for distributions sampled on the fly.
    num_examples: int | None = None

    @abc.abstractmethod
    def next_batch(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def get_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def set_state(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def reference(self, n: int, seed: int) -> np.ndarray: ...

    def close(self) -> None:
        """Releases worker threads; readers without threads have nothing to do."""

    def __iter__(self):
        while True:
            yield self.next_batch()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def uint8_to_float(x: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [-1, 1].

    Every reader goes through this one function so that the same pixels give bit-identical
    floats whichever reader loaded them.
    """
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def flip_rows(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Mirrors the images ``x[i]`` ([B, H, W, C]) for which ``flips[i]`` is set, in place."""
    if flips.any():
        x[flips] = x[flips][:, :, ::-1]
    return x


def require_state_keys(state: dict[str, Any], keys: tuple[str, ...], reader: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(
            f"{reader} state is missing {missing}; pass a dict returned by this reader's "
            f"get_state() (got keys {sorted(state)})."
        )


class ExampleOrder:
    """Deterministic map from stream positions to (example index, flip bit).

    Flip bits belong to positions, not examples, so an example is flipped independently each
    time it is seen. Only the last two epochs are cached: a batch touches at most the current
    and next epoch unless it is larger than the data set, in which case recomputing is cheap
    relative to the batch itself.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool):
        if num_examples <= 0:
            raise ValueError("ExampleOrder needs at least one example.")
        self.num_examples = num_examples
        self._seed = seed
        self._shuffle = shuffle
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def _cached(self, what: str, epoch: int) -> np.ndarray:
        key = (what, epoch)
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._compute(what, epoch)
        return self._cache[key]

    def _compute(self, what: str, epoch: int) -> np.ndarray:
        n = self.num_examples
        if what == "perm":
            if not self._shuffle:
                return np.arange(n, dtype=np.int64)
            return np.random.default_rng([self._seed, PERMUTATION_STREAM, epoch]).permutation(n)
        return np.random.default_rng([self._seed, FLIP_STREAM, epoch]).random(n) < 0.5

    def lookup(self, start: int, count: int, with_flips: bool = False):
        """Example indices (int64 [count]) and flip bits (bool [count]) for positions
        ``[start, start + count)``; flips are all False unless ``with_flips``."""
        indices = np.empty(count, dtype=np.int64)
        flips = np.zeros(count, dtype=bool)
        filled = 0
        while filled < count:
            epoch, within = divmod(start + filled, self.num_examples)
            take = min(count - filled, self.num_examples - within)
            indices[filled : filled + take] = self._cached("perm", epoch)[within : within + take]
            if with_flips:
                flips[filled : filled + take] = self._cached("flip", epoch)[within : within + take]
            filled += take
        return indices, flips


def draw_reference_indices(num_examples: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct indices (all of them if ``n >= num_examples``) chosen by ``seed``."""
    if n < 0:
        raise ValueError(f"reference(n={n}): n must be >= 0.")
    if n >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.default_rng([seed, REFERENCE_STREAM])
    return rng.choice(num_examples, size=n, replace=False)


class FiniteStreamMixin:
    """``get_state``/``set_state`` for readers whose position is one integer on the stream
    described in the module docstring. Subclasses set ``_position`` and ``num_examples``."""

    _position: int
    num_examples: int

    def get_state(self) -> dict[str, int]:
        return {"position": int(self._position), "num_examples": int(self.num_examples)}

    def set_state(self, state: dict[str, Any]) -> None:
        require_state_keys(state, ("position",), type(self).__name__)
        saved_n = state.get("num_examples", self.num_examples)
        if int(saved_n) != self.num_examples:
            raise ValueError(
                f"state was taken on a data set of {saved_n} examples but this one has "
                f"{self.num_examples}; resume with the same data (data.path) as the run that "
                "saved it."
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"state position must be >= 0, got {position}.")
        self._on_seek(position)
        self._position = position

    def _on_seek(self, position: int) -> None:
        """Hook for readers that must drop work done ahead of the old position."""
