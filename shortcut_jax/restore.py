"""Finding another run's checkpoint and reading one of its parameter trees.

A warm start (``train.init_from``), a frozen teacher (``objective.teacher_checkpoint``) and a
stage-one generation of reflow pairs (``reflow_pairs --workdir``) each name another run by a
folder: its workdir or its ``checkpoints`` folder. They need that run's metadata and recorded
config, to check that its parameters fit before anything is compiled, and then one parameter
tree (online or an EMA tree), but not the rest of its train state: the optimiser moments are
twice the parameters' size and their structure depends on the source's optimiser settings,
which the reader should not have to rebuild.

This module holds the run-folder side: ``checkpoint_dir`` resolves the folder, ``open_run``
picks a step and reads its metadata and the run's manifest into a ``SavedRun``, and
``restore_weights`` reads one tree of it. The checkpoint format itself (where a tree sits in
the saved state, orbax's partial restore, the shape check against the array metadata) is
``checkpoint.Checkpointer``'s, which owns that format; this module stays separate because a
run folder is more than its checkpoints (its ``manifest.json``), and the callers' questions
(which folder, which step, which flag to blame) are not the checkpoint writer's.

Errors are ``FileNotFoundError`` (folder, checkpoint or step missing), ``KeyError`` (a tree the
run did not keep) and ``ValueError`` (shapes that do not fit), each naming the setting given as
``what``/``step_what`` so that a caller can re-raise it as its own ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from etils import epath

from shortcut_jax import checkpoint

WEIGHTS = checkpoint.WEIGHTS


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One checkpoint step of a run: where it is, its metadata and the run's recorded config.

    ``config`` is the config of the run's last launch (``<workdir>/manifest.json``), or None when
    the run has no manifest (an imported checkpoint, or a bare checkpoints folder)."""

    workdir: str
    ckpt_dir: str
    step: int
    meta: dict
    config: Optional[dict]

    def param_shapes(self, weights: str = "ema", ema_index: int = 0) -> dict[str, tuple]:
        """``{keystr(path): shape}`` of one saved tree, from the metadata files alone."""
        with checkpoint.Checkpointer(self.ckpt_dir, keep=None, async_save=False) as ckpt:
            return ckpt.param_shapes(self.step, weights, ema_index)


def has_steps(folder) -> bool:
    """Whether ``folder`` (local or ``gs://``) holds at least one step folder of a checkpoint."""
    folder = epath.Path(folder)
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def checkpoint_dir(path: str, *, what: str = "workdir") -> str:
    """The folder holding the step folders of ``path``: a run's workdir (``<workdir>/checkpoints``)
    or that checkpoints folder itself. Raises ``FileNotFoundError`` naming ``what`` (the flag or
    config key that gave ``path``) when ``path`` is not a folder or neither holds a checkpoint."""
    path = os.fspath(path).rstrip("/")
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(f"{what}={path!r} is not a directory: give a trained run's workdir or its"
                                " checkpoints folder")
    for candidate in (os.path.join(path, "checkpoints"), path):
        if has_steps(candidate):
            return candidate if "://" in candidate else os.path.abspath(candidate)
    raise FileNotFoundError(f"{what}={path!r} holds no checkpoint (neither it nor {path}/checkpoints has a step"
                            " folder): give a trained run's workdir or its checkpoints folder")


def _recorded_config(workdir: str) -> Optional[dict]:
    path = epath.Path(workdir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("config")


def open_run(path: str, *, step: int = -1, what: str = "workdir", step_what: str = "step") -> SavedRun:
    """The checkpoint ``step`` (-1: the latest) of the run at ``path`` (workdir or checkpoints
    folder), with its metadata; no array is read. ``what`` and ``step_what`` name the settings
    that gave ``path`` and ``step`` in the errors."""
    ckpt_dir = checkpoint_dir(path, what=what)
    with checkpoint.Checkpointer(ckpt_dir, keep=None, async_save=False) as ckpt:
        steps = ckpt.all_steps()
        if step != -1 and step not in steps:
            raise FileNotFoundError(f"{what}={path!r} has no checkpoint of step {step}: {step_what}={step} is not"
                                    f" saved (saved steps: {steps}); pick one of them, or -1 for the latest")
        chosen = steps[-1] if step == -1 else int(step)
        meta = ckpt.read_meta(chosen) or {}
    workdir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir
    return SavedRun(workdir=workdir, ckpt_dir=ckpt_dir, step=chosen, meta=meta, config=_recorded_config(workdir))


def restore_weights(saved: SavedRun, *, weights: str = "ema", ema_index: int = 0, abstract: Any = None) -> Any:
    """One parameter tree of ``saved``: its online parameters (``weights='params'``) or its EMA
    tree ``ema_index`` (``'ema'``), read alone (``checkpoint.Checkpointer.restore_params``).

    ``abstract``: the tree expected (``jax.ShapeDtypeStruct`` leaves, or arrays); leaves with a
    ``sharding`` are restored onto it (every process of a job calls this), others as host numpy
    arrays; ``None`` restores the saved tree as it is, as numpy arrays. Paths and shapes are
    checked against the checkpoint's metadata first: ``ValueError`` names what differs, and
    ``KeyError`` a tree the run did not keep.
    """
    with checkpoint.Checkpointer(saved.ckpt_dir, keep=None, async_save=False) as ckpt:
        return ckpt.restore_params(saved.step, weights, abstract, ema_index=ema_index)
