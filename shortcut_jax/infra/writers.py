"""Run logging: scalars and images to ``metrics.jsonl``, TensorBoard and optionally wandb.

Everything that touches the file system writes only from the primary process
(``jax.process_index() == 0``), so multi-host jobs can call these unconditionally on every process.

Files written under a workdir:

* ``metrics.jsonl``: one JSON object per :meth:`MetricWriter.write_scalars` call,
  ``{"step": s, name: value, ...}``. The file is opened in append mode, so a resumed run
  continues it; a resumed writer (``resume_step``) first drops the rows logged after the
  checkpoint it resumes from, so each step appears once. NaN and infinities are written as Python's
  ``json`` does (``NaN``, ``Infinity``), which ``json.loads`` reads back.
* ``tensorboard/``: TensorBoard event files (a new file per launch).

Remote workdirs (``gs://bucket/run``, any path ``etils.epath`` opens; ``is_remote``) are written
through ``etils.epath``. An object store cannot append to a file, so there ``metrics.jsonl`` is
kept in memory (continuing what the workdir already holds) and uploaded whole at most every
``REMOTE_UPLOAD_S`` seconds and at ``flush``/``close``: a crash loses at most that much of the log,
and the steps since the last checkpoint are logged again by the resumed run anyway. TensorBoard
writes ``gs://`` itself (tensorboardX, with ``google-cloud-storage`` installed); wandb keeps its
local files in its default folder.
"""

from __future__ import annotations

import json
import logging
import io
import os
import time
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from shortcut_jax.infra.jsonable import jsonable
from shortcut_jax.infra.files import atomic_write_text, is_remote

__all__ = ["MetricWriter", "is_remote", "metrics_by_step", "primary_process", "quiet_library_logs", "read_metrics"]

# A remote metrics.jsonl is rewritten whole; at most this often, and at every flush and close.
REMOTE_UPLOAD_S = 30.0


class _RemoteLines:
    """A text file on a store without appends: the lines in memory, the object rewritten whole."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._text = io.StringIO()
        if self._path.exists():
            existing = self._path.read_text()
            self._text.write(existing if not existing or existing.endswith("\n") else existing + "\n")
        self._last_upload = time.monotonic()
        self._dirty = False

    def write(self, line: str) -> None:
        self._text.write(line)
        self._dirty = True
        if time.monotonic() - self._last_upload >= REMOTE_UPLOAD_S:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            self._path.write_text(self._text.getvalue())
            self._dirty = False
        self._last_upload = time.monotonic()

    def close(self) -> None:
        self.flush()


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
      resume_step: the step a run continues from (its checkpoint's): rows of
        ``metrics.jsonl`` past it, logged before the run was stopped and about
        to be logged again, are dropped, so every step appears once.
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
        resume_step: int | None = None,
    ):
        self.workdir = os.fspath(workdir)
        self.remote = is_remote(self.workdir)
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
        jsonl = os.path.join(self.workdir, "metrics.jsonl")
        if resume_step is not None:
            _drop_rows_after(jsonl, resume_step)
        if self.remote:
            epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
            self._jsonl = _RemoteLines(jsonl)
        else:
            os.makedirs(self.workdir, exist_ok=True)
            # Line buffering puts every record on disk as it is written, so a crash
            # loses no logged step.
            self._jsonl = open(jsonl, "a", buffering=1, encoding="utf-8")
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second and host only, and
            # a writer opened in the same second as a previous one (a quick
            # restart) would truncate that file; a random suffix keeps both.
            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, "tensorboard"), filename_suffix=f".{uuid.uuid4().hex[:8]}"
            )
        if use_wandb:
            id_file = epath.Path(os.path.join(self.workdir, "wandb_run_id.txt"))
            if id_file.exists():
                run_id = id_file.read_text(encoding="utf-8").strip()
            else:
                run_id = wandb.util.generate_id()
                id_file.write_text(run_id, encoding="utf-8")
            self._wandb = wandb
            wandb.init(
                project=wandb_project,
                config=jsonable(config) if config is not None else None,
                dir=None if self.remote else self.workdir,  # wandb's own files stay local
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
        """Logs uint8 images of shape [H, W, C] (C 1, 3 or 4) or [H, W] at ``step`` to TensorBoard
        and wandb (the PNG files are the caller's: an evaluation's are in ``eval/<step>/``)."""
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


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites ``metrics.jsonl`` without its rows past ``step`` (and without a last line cut off
    by a killed run); nothing is written when no row goes."""
    file = epath.Path(path)
    if not file.exists():
        return
    lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or row.get("step", step) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines) and all(a == b for a, b in zip(kept, lines)):
        return
    atomic_write_text(path, "".join(kept))


def read_metrics(workdir: str) -> list[dict]:
    """The rows :meth:`MetricWriter.write_scalars` appended to ``<workdir>/metrics.jsonl``, in
    order ([] if there is none); a last line cut off by a killed run is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if is_remote(workdir):
        remote = epath.Path(path)
        lines = remote.read_text(encoding="utf-8").splitlines() if remote.exists() else []
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    else:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def metrics_by_step(workdir: str) -> dict[int, dict]:
    """``metrics.jsonl`` keyed by step, the rows of one step merged (the training row and the
    evaluation row the same step gets; a later value wins)."""
    merged: dict[int, dict] = {}
    for row in read_metrics(workdir):
        if "step" in row:
            merged.setdefault(int(row["step"]), {}).update(row)
    return merged


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
