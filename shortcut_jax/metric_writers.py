"""Experiment logging: scalar/image writers, sample grids, a progress bar and a run manifest.

Everything that touches the file system writes only from the primary process
(``jax.process_index() == 0``), so multi-host jobs can call these functions
unconditionally on every process.

Files written under a workdir:

* ``metrics.jsonl``: one JSON object per :meth:`MetricWriter.write_scalars`
  call, ``{"step": s, name: value, ...}``. The file is opened in append mode,
  so a resumed run continues it; steps logged after the last checkpoint of a
  crashed run appear twice, and readers should keep the last line per step.
  NaN and infinities are written as Python's ``json`` does (``NaN``,
  ``Infinity``), which ``json.loads`` reads back.
* ``tensorboard/``: TensorBoard event files (a new file per launch).
* ``images/<name>_<step>.png``: images passed to ``write_images``.
* ``manifest.json`` and ``manifest-<UTC time>.json``: see :func:`write_manifest`.
"""

from __future__ import annotations

import datetime
import logging
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from PIL import Image

__all__ = ["MetricWriter", "ProgressBar", "save_image_grid", "save_scatter", "write_manifest"]


def _is_primary(is_primary: bool = True) -> bool:
    return bool(is_primary) and jax.process_index() == 0


def _to_python_scalar(name: str, value: Any) -> float | int:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"Scalar {name!r} has shape {arr.shape}; write_scalars takes single numbers.")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    return float(item)


def _json_safe(obj: Any) -> Any:
    """Best-effort conversion to JSON types; unknown objects become their repr."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_json_safe(v) for v in obj), key=repr)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_png(image: np.ndarray, path: str) -> None:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")


class MetricWriter:
    """Writes scalars and images to TensorBoard, ``metrics.jsonl`` and optionally wandb.

    Args:
      workdir: run directory; created if missing.
      use_tensorboard: write TensorBoard event files to ``<workdir>/tensorboard``.
      use_wandb: also log to Weights & Biases. The run id is stored in
        ``<workdir>/wandb_run_id.txt`` so that a resumed run continues the
        same wandb run.
      wandb_project: wandb project name.
      config: run configuration (dict or ``ConfigDict``) given to wandb.
      is_primary: set False to silence this writer; even when True, only
        process 0 of a multi-process job writes.
    """

    def __init__(
        self,
        workdir: str,
        *,
        use_tensorboard: bool = True,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        config: Any = None,
        is_primary: bool = True,
    ):
        self.workdir = os.fspath(workdir)
        self.active = _is_primary(is_primary)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        if use_wandb:
            try:
                import wandb  # Optional dependency, only needed when asked for.
            except ImportError as e:
                raise ImportError(
                    "wandb logging is enabled (use_wandb=True) but wandb is not installed. "
                    "Run `pip install wandb`, or turn wandb logging off in the config."
                ) from e
        os.makedirs(self.workdir, exist_ok=True)
        # Line buffering puts every record on disk as it is written, so a crash
        # loses no logged step.
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8")
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second and host only, and
            # a writer opened in the same second as a previous one (a quick
            # restart) would truncate that file; a random suffix keeps both.
            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, "tensorboard"), filename_suffix=f".{uuid.uuid4().hex[:8]}"
            )
        if use_wandb:
            id_file = os.path.join(self.workdir, "wandb_run_id.txt")
            if os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as f:
                    run_id = f.read().strip()
            else:
                run_id = wandb.util.generate_id()
                with open(id_file, "w", encoding="utf-8") as f:
                    f.write(run_id)
            self._wandb = wandb
            wandb.init(
                project=wandb_project,
                config=_json_safe(config) if config is not None else None,
                dir=self.workdir,
                id=run_id,
                resume="allow",
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs single-number values (Python, numpy or jax scalars) at ``step``."""
        if not self.active:
            return
        step = int(step)
        values = {str(k): _to_python_scalar(k, v) for k, v in scalars.items()}
        if "step" in values:
            raise ValueError("'step' is reserved in metrics.jsonl; rename the scalar.")
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Logs uint8 images of shape [H, W, C] (C 1, 3 or 4) or [H, W] at ``step``.

        Each image also goes to ``<workdir>/images/<name>_<step>.png``.
        """
        if not self.active:
            return
        step = int(step)
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise ValueError(f"Image {name!r} must be uint8, got {image.dtype}; see save_image_grid.")
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                raise ValueError(f"Image {name!r} must be [H, W, C] with C in (1, 3, 4), got {image.shape}.")
            _write_png(image, os.path.join(self.workdir, "images", f"{_safe_name(name)}_{step:08d}.png"))
            if self._tb is not None:
                self._tb.add_image(name, image, global_step=step, dataformats="HWC")
            if self._wandb is not None:
                self._wandb.log({name: self._wandb.Image(image)}, step=step)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self.active = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows :meth:`MetricWriter.write_scalars` appended to ``<workdir>/metrics.jsonl``, in
    order ([] if there is none); a last line cut off by a killed run is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


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
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    scaled = np.nan_to_num((images - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    pixels = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    ncol = nrow or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncol))
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = pixels[i]
    if path is not None and _is_primary():
        _write_png(grid, path)
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
        axes; default: fit the data.
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
    size = max(0.5, min(8.0, 2000.0 / max(len(points), 1)))
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float32)
        if reference.ndim != 2 or reference.shape[1] != 2:
            raise ValueError(f"reference must be [M, 2], got {reference.shape}")
        ax.scatter(reference[:, 0], reference[:, 1], s=size, c="tab:orange", alpha=0.5, label="data", linewidths=0)
    ax.scatter(points[:, 0], points[:, 1], s=size, c="tab:blue", alpha=0.5, label="generated", linewidths=0)
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
    if path is not None and _is_primary():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, format="png")
    return image


class ProgressBar:
    """A tqdm bar over training steps showing steps/s, images/s, ETA and the loss.

    Args:
      total_steps: last step of the run.
      initial_step: step the run starts from (non-zero when resuming), so the
        ETA covers only the remaining steps.
      batch_size: global batch size, to turn steps/s into images/s.
      is_primary: set False to hide the bar; only process 0 ever shows it.

    When stderr is not a terminal (batch jobs writing to a log file) the bar
    refreshes at most every 30 s so that the log does not fill with updates.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, batch_size: int = 1, *, is_primary: bool = True):
        from tqdm import tqdm

        self.batch_size = int(batch_size)
        interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self._bar = tqdm(
            total=int(total_steps),
            initial=int(initial_step),
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if interactive else 30.0,
            smoothing=0.1,
            disable=not _is_primary(is_primary),
        )
        self._postfix: dict[str, str] = {}

    @property
    def step(self) -> int:
        return int(self._bar.n)

    def steps_per_second(self) -> float | None:
        """Smoothed steps/s, None before the first timed update or when hidden."""
        if self._bar.disable:
            return None
        d = self._bar.format_dict
        rate = d.get("rate")
        if rate is None:
            done = d["n"] - (self._bar.initial or 0)
            rate = done / d["elapsed"] if d.get("elapsed") and done > 0 else None
        return rate

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to ``step``; ``metrics['loss']``, if given, goes into the postfix.

        Converting a jax value to float waits for the device, so pass metrics
        only on steps where they are fetched anyway.
        """
        if self._bar.disable:
            return
        if metrics and "loss" in metrics:
            self._postfix["loss"] = f"{float(np.asarray(metrics['loss'])):.4g}"
        rate = self.steps_per_second()
        if rate:
            self._postfix["img/s"] = f"{rate * self.batch_size:.1f}"
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=False)
        delta = int(step) - self._bar.n
        if delta > 0:
            self._bar.update(delta)

    def write(self, message: str) -> None:
        """Prints a line without breaking the bar."""
        if not self._bar.disable:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_VERSIONED_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml-collections",
    "tensorflow",
    "tensorflow-datasets",
    "shortcut_jax",
)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_info() -> dict:
    src = os.path.dirname(os.path.abspath(__file__))
    commit = _git(["rev-parse", "HEAD"], src)
    status = _git(["status", "--porcelain"], src)
    dirty_files = [line[3:] for line in status.splitlines()] if status is not None else None
    return {
        "commit": commit.strip() if commit else "unknown",
        "dirty": bool(dirty_files) if dirty_files is not None else None,
        # Bounded so a checkout full of untracked outputs cannot bloat the manifest.
        "dirty_files": dirty_files[:200] if dirty_files is not None else None,
        "source_dir": src,
    }


def _device_info() -> dict:
    devices = jax.devices()
    return {
        "platform": devices[0].platform if devices else None,
        "device_kind": devices[0].device_kind if devices else None,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def _write_json_atomic(obj: Any, path: str) -> None:
    # Written to a temporary file and renamed, so an interrupted write never
    # leaves a truncated manifest behind.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_manifest(workdir: str, config: Any, *, extra: Mapping[str, Any] | None = None) -> str:
    """Records how this launch was run; returns the path of ``<workdir>/manifest.json``.

    The manifest holds the config, the git commit and dirty state of the
    package source, package versions, the devices, host name, command line and
    UTC time. Every launch writes ``manifest-<UTC time>.json``, so the history
    of a resumed run is kept, and ``manifest.json`` is replaced with the
    latest one. Only the primary process writes; other processes just return
    the path.
    """
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, "manifest.json")
    if not _is_primary():
        return path
    now = datetime.datetime.now(datetime.timezone.utc)
    manifest = {
        "time_utc": now.isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "host": socket.gethostname(),
        "git": _git_info(),
        "versions": {"python": platform.python_version(), **{n: _package_version(n) for n in _VERSIONED_PACKAGES}},
        "devices": _device_info(),
        "config": _json_safe(config),
        "extra": _json_safe(dict(extra or {})),
    }
    os.makedirs(workdir, exist_ok=True)
    # Microseconds keep names unique and in launch order when sorted.
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    dated = os.path.join(workdir, f"manifest-{stamp}.json")
    _write_json_atomic(manifest, dated)
    _write_json_atomic(manifest, path)
    return path


class _BelowWarningFrom(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING or not any(f in record.pathname for f in self.fragments)


def quiet_library_logs(fragments=("orbax", "tensorstore", "etils")) -> None:
    """Drop INFO lines of chatty libraries (orbax logs every file of every save) from the log."""
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_BelowWarningFrom(fragments))
    try:
        from absl import logging as absl_logging

        absl_logging.get_absl_handler().addFilter(_BelowWarningFrom(fragments))
    except ImportError:
        pass
