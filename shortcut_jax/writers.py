"""Run logging: scalars and images to ``metrics.jsonl``, TensorBoard and optionally wandb.

Everything that touches the file system writes only from the primary process
(``jax.process_index() == 0``), so multi-host jobs can call these unconditionally on every process.

Files written under a workdir:

* ``metrics.jsonl``: one JSON object per :meth:`MetricWriter.write_scalars` call,
  ``{"step": s, name: value, ...}``. The file is opened in append mode, so a resumed run
  continues it; steps logged after the last checkpoint of a crashed run appear twice, and
  readers should keep the last line per step. NaN and infinities are written as Python's
  ``json`` does (``NaN``, ``Infinity``), which ``json.loads`` reads back.
* ``tensorboard/``: TensorBoard event files (a new file per launch).
* ``images/<name>_<step>.png``: images passed to ``write_images``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, Mapping

import jax
import numpy as np

from shortcut_jax.jsonable import jsonable
from shortcut_jax.plots import write_png

__all__ = ["MetricWriter", "primary_process", "quiet_library_logs", "read_metrics"]


def primary_process(enabled: bool = True) -> bool:
    """True on process 0 when ``enabled``: the one process that writes files."""
    return bool(enabled) and jax.process_index() == 0


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


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


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
        self.active = primary_process(is_primary)
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
                config=jsonable(config) if config is not None else None,
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
            write_png(image, os.path.join(self.workdir, "images", f"{_safe_name(name)}_{step:08d}.png"))
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
