"""Pictures of samples: image grids, 2-D scatter plots (PNG files through ``images.write_png``).

Only the primary process (``jax.process_index() == 0``) writes files; every process gets the
rendered image back.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from shortcut_jax.infra.images import to_uint8, write_png

__all__ = ["save_grid", "save_image_grid", "save_scatter", "scatter_limits", "write_png"]


def _primary() -> bool:
    return jax.process_index() == 0


def save_image_grid(
    images: np.ndarray,
    path: str | None,
    *,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
) -> np.ndarray:
    """Tiles images into one uint8 grid, writes it as PNG (unless ``path`` is None) and returns it.

    Args:
      images: [N, H, W, C] with C 1 or 3 (or [N, H, W]), floats in
        ``value_range``; values outside it are clipped and NaNs become the
        low end.
      path: PNG file to write; parent directories are created. Only the
        primary process writes.
      nrow: images per row; default ``ceil(sqrt(N))``.
      value_range: (low, high) mapped to (0, 255).
      padding: black pixels between images and around the border.

    Returns:
      The grid, uint8 of shape [rows * (H + p) + p, nrow * (W + p) + p, C].
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, C] with N >= 1 and C in (1, 3), got {images.shape}")
    n, h, w, c = images.shape
    pixels = to_uint8(images, value_range)
    ncol = nrow or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncol))
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = pixels[i]
    if path is not None and _primary():
        write_png(grid, path)
    return grid


def save_scatter(
    points: np.ndarray,
    path: str | None,
    *,
    reference: np.ndarray | None = None,
    lim: float | tuple[float, float] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """Scatter plot of 2-D samples (blue), optionally over reference samples (orange).

    Args:
      points: [N, 2] generated points.
      path: PNG file to write (None: only return the image). Only the primary
        process writes.
      reference: optional [M, 2] points from the data distribution.
      lim: axis limits, ``L`` for (-L, L) or ``(low, high)``, used for both
        axes; default: the reference's (``scatter_limits``), so plots of one
        reference at several budgets share their axes; without a reference, fit
        the points.
      title: optional plot title.

    Returns:
      The rendered plot as a uint8 [H, W, 3] array (for ``write_images``).
    """
    # Figure + the Agg canvas directly, instead of pyplot, so the process-wide
    # matplotlib backend and pyplot's figure registry are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be [N, 2], got {points.shape}")
    fig = Figure(figsize=(5, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # points large and opaque enough to read at 10,000 samples
    size = max(2.0, min(12.0, 20000.0 / max(len(points), 1)))
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float32)
        if reference.ndim != 2 or reference.shape[1] != 2:
            raise ValueError(f"reference must be [M, 2], got {reference.shape}")
        ax.scatter(reference[:, 0], reference[:, 1], s=size, c="tab:orange", alpha=0.4, label="data", linewidths=0)
        if lim is None:
            lim = scatter_limits(reference)
    ax.scatter(points[:, 0], points[:, 1], s=size, c="tab:blue", alpha=0.8, label="generated", linewidths=0)
    if lim is not None:
        low, high = (-lim, lim) if np.isscalar(lim) else lim
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
    ax.set_aspect("equal")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=max(1.0, 4.0 / size))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None and _primary():
        write_png(image, path)
    return image


def scatter_limits(reference: np.ndarray, margin: float = 0.15) -> tuple[float, float]:
    """Axis limits (both axes) that frame ``reference`` [M, 2] with a margin: fixed by the data,
    not by the samples drawn over it."""
    reference = np.asarray(reference, dtype=np.float64)
    low, high = float(reference.min()), float(reference.max())
    pad = margin * max(high - low, 1e-6)
    return low - pad, high + pad


def save_grid(samples: np.ndarray, path: str) -> np.ndarray:
    """Grid of RGB/grey images; other channel counts (undecoded latents) show their first three
    channels over a unit-variance range."""
    if samples.shape[-1] in (1, 3):
        return save_image_grid(samples, path)
    return save_image_grid(samples[..., :3], path, value_range=(-2.5, 2.5))
