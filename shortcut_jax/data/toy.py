"""2-D toy distributions, sampled on the fly.

Each distribution is scaled so that every coordinate has a standard deviation near 1, which
keeps toy experiments comparable with the unit-variance noise the models start from:

- ``checkerboard``: uniform on the 8 unit squares of a 4x4 board on [-2, 2]^2 whose integer
  corner (floor(x), floor(y)) has an even sum; per-coordinate std 1.15.
- ``gaussian_mixture``: 8 equal Gaussians with std 0.1, centred on the circle of radius sqrt(2)
  at angles k * pi / 4; per-coordinate std 1.0.
- ``two_moons``: two interleaved half circles of radius 1.2 (the classic two-moons shape, centred
  and scaled by 1.2), inside [-1.8, 1.8] x [-0.9, 0.9] before Gaussian noise of std 0.05;
  per-coordinate std 1.0 and 0.6.
- ``spiral``: one arm of 1.5 turns, radius growing linearly from 0 to 2 with the angle, with
  Gaussian noise of std 0.05; radius is 2 * sqrt(u), so E[r^2] = 2 and per-coordinate std is
  about 1 (0.9 to 1.0).

All are unlabelled (``num_classes`` 0). Batch ``i`` of the stream is drawn from
``np.random.default_rng([seed, 3, i])``: the whole global batch is drawn and each process keeps
its rows, so the state is only the batch counter and any process count sees the same samples.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import (
    REFERENCE_STREAM,
    TOY_STREAM,
    BatchLayout,
    DataSpec,
    Source,
    require_state_keys,
)

Sampler = Callable[[np.random.Generator, int], np.ndarray]

GAUSSIAN_MIXTURE_RADIUS = float(np.sqrt(2.0))
GAUSSIAN_MIXTURE_STD = 0.1
TWO_MOONS_SCALE = 1.2
TWO_MOONS_NOISE = 0.05
SPIRAL_TURNS = 1.5
SPIRAL_MAX_RADIUS = 2.0
SPIRAL_NOISE = 0.05


def sample_checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.uniform(-2.0, 2.0, size=n)
    column = np.floor(x).astype(np.int64) + 2  # 0..3
    # Of the four rows in a column, the two whose index has the column's parity are filled,
    # which makes floor(x) + floor(y) even.
    row = 2 * rng.integers(0, 2, size=n) + column % 2
    y = row - 2 + rng.uniform(0.0, 1.0, size=n)
    return np.stack([x, y], axis=1).astype(np.float32)


def sample_gaussian_mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.integers(0, 8, size=n) * (np.pi / 4)
    centres = GAUSSIAN_MIXTURE_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centres + GAUSSIAN_MIXTURE_STD * rng.standard_normal((n, 2))).astype(np.float32)


def sample_two_moons(rng: np.random.Generator, n: int) -> np.ndarray:
    t = rng.uniform(0.0, np.pi, size=n)
    lower = rng.integers(0, 2, size=n).astype(bool)
    x = np.where(lower, 1.0 - np.cos(t), np.cos(t))
    y = np.where(lower, 0.5 - np.sin(t), np.sin(t))
    points = TWO_MOONS_SCALE * (np.stack([x, y], axis=1) - np.array([0.5, 0.25]))
    return (points + TWO_MOONS_NOISE * rng.standard_normal((n, 2))).astype(np.float32)


def sample_spiral(rng: np.random.Generator, n: int) -> np.ndarray:
    # sqrt makes the density along the arm grow with the radius, so the outer turns, which are
    # longer, are not sparser than the centre.
    fraction = np.sqrt(rng.uniform(0.0, 1.0, size=n))
    angle = fraction * (2 * np.pi * SPIRAL_TURNS)
    radius = fraction * SPIRAL_MAX_RADIUS
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (points + SPIRAL_NOISE * rng.standard_normal((n, 2))).astype(np.float32)


SAMPLERS: dict[str, Sampler] = {
    "checkerboard": sample_checkerboard,
    "gaussian_mixture": sample_gaussian_mixture,
    "two_moons": sample_two_moons,
    "spiral": sample_spiral,
}


class ToySource(Source):
    """Infinite stream of samples from one of ``SAMPLERS``."""

    def __init__(self, name: str, layout: BatchLayout, seed: int):
        self.name = name
        self.spec = DataSpec(shape=(2,), num_classes=0, kind="points")
        self._sampler = SAMPLERS[name]
        self._layout = layout
        self._seed = seed
        self._step = 0

    def next_batch(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, TOY_STREAM, self._step])
        rows = self._sampler(rng, self._layout.global_batch_size)
        start = self._layout.offset
        self._step += 1
        return {
            "x": rows[start : start + self._layout.batch_size],
            "label": np.zeros(self._layout.batch_size, dtype=np.int32),
        }

    def get_state(self) -> dict[str, int]:
        return {"step": int(self._step)}

    def set_state(self, state: dict[str, Any]) -> None:
        require_state_keys(state, ("step",), f"ToySource({self.name!r})")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"state step must be >= 0, got {step}.")
        self._step = step

    def reference(self, n: int, seed: int) -> np.ndarray:
        if n < 0:
            raise ValueError(f"reference(n={n}): n must be >= 0.")
        return self._sampler(np.random.default_rng([seed, REFERENCE_STREAM]), n)


def prepare_toy(config, name: str) -> None:
    cfg.reject_path(config, name)
    cfg.reject_image_size(config, name)
    cfg.reject_cache_decoded(config, name)
    cfg.reject_random_flip(config, name)
