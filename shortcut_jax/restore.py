"""Reading one parameter tree out of another run's checkpoint, without its optimiser state.

A warm start (``train.init_from``), a frozen teacher or a stage-one generation of reflow pairs
needs the parameters (online or an EMA tree) of a saved run, and its metadata to check that
they fit, but not the rest of its train state: the optimiser moments are twice the parameters'
size and their structure depends on the source's optimiser settings, which the reader should not
have to rebuild. ``open_run`` finds a run's checkpoint and reads its metadata (and the config its
manifest recorded); ``restore_weights`` reads one tree alone (orbax's partial restore), placed
with the shardings the caller asks for, after checking its shapes against what the caller
expects from the checkpoint's own array metadata, so a mismatch is reported before any array is
read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from shortcut_jax import checkpoint

WEIGHTS = ("ema", "params")
STATE_ITEM = "state"  # the train state's item in every checkpoint step (checkpoint.Checkpointer)


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One checkpoint step of a run: where it is, its metadata and the run's recorded config.

    ``config`` is the config of the run's last launch (``<workdir>/manifest.json``), or None when
    the run has no manifest (an imported checkpoint)."""

    workdir: str
    ckpt_dir: str
    step: int
    meta: dict
    config: Optional[dict]

    @property
    def state_dir(self) -> str:
        return os.path.join(self.ckpt_dir, str(self.step), STATE_ITEM)


def _is_step_folder(path: epath.Path) -> bool:
    return path.is_dir() and path.name.isdigit()


def checkpoint_dir(path: str, *, what: str = "the run") -> str:
    """The folder holding the step folders of ``path``: a run's workdir (``<workdir>/checkpoints``)
    or that checkpoints folder itself. Raises ``FileNotFoundError`` naming ``what`` when neither
    holds a checkpoint."""
    path = os.fspath(path).rstrip("/")
    for candidate in (os.path.join(path, "checkpoints"), path):
        folder = epath.Path(candidate)
        if folder.is_dir() and any(_is_step_folder(p) for p in folder.iterdir()):
            return candidate if "://" in candidate else os.path.abspath(candidate)
    raise FileNotFoundError(f"{what} {path!r} holds no checkpoint (neither it nor {path}/checkpoints has a step"
                            " folder): give a run's workdir or its checkpoints folder")


def _recorded_config(workdir: str) -> Optional[dict]:
    path = epath.Path(workdir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("config")


def open_run(path: str, *, step: int = -1, what: str = "the run") -> SavedRun:
    """The checkpoint ``step`` (-1: the latest) of the run at ``path`` (workdir or checkpoints
    folder), with its metadata; no array is read."""
    ckpt_dir = checkpoint_dir(path, what=what)
    with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
        steps = ckpt.all_steps()
        if step != -1 and step not in steps:
            raise FileNotFoundError(f"{what} {path!r} has no checkpoint of step {step}; its steps are {steps}")
        chosen = steps[-1] if step == -1 else int(step)
        meta = ckpt.read_meta(chosen) or {}
    workdir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir
    return SavedRun(workdir=workdir, ckpt_dir=ckpt_dir, step=chosen, meta=meta, config=_recorded_config(workdir))


def _saved_tree(saved: SavedRun) -> dict:
    """The state's tree of array metadata (``.shape``, ``.dtype`` leaves), read from the step's
    metadata files only."""
    metadata = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(saved.state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def describe_mismatch(have: Any, want: Any) -> str:
    """'' when the two trees have the same paths and shapes, else what differs (first few of each)."""
    have, want = _shapes(have), _shapes(want)
    parts = []
    for what, keys in (("missing", sorted(set(want) - set(have))), ("unexpected", sorted(set(have) - set(want))),
                       ("shape differs", [f"{k} {have[k]} vs {want[k]}" for k in sorted(set(have) & set(want))
                                          if have[k] != want[k]])):
        if keys:
            parts.append(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    return "; ".join(parts)


def restore_weights(saved: SavedRun, *, weights: str = "ema", ema_index: int = 0, abstract: Any = None) -> Any:
    """One parameter tree of ``saved``: its online parameters (``weights='params'``) or its EMA
    tree ``ema_index`` (``'ema'``; a run saved without EMA trees is refused).

    ``abstract``: the tree expected (``jax.ShapeDtypeStruct`` leaves, or arrays); leaves with a
    ``sharding`` are restored onto it (every process of a job calls this), others as host numpy
    arrays. Paths and shapes are checked against the checkpoint's metadata first: ``ValueError``
    names what differs. ``None`` restores the saved tree as it is, as numpy arrays.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    tree = _saved_tree(saved)
    if weights == "params":
        key, saved_params = "params", tree["params"]
    else:
        ema = tree.get("ema_params") or []
        ema = [ema[k] for k in sorted(ema, key=int)] if isinstance(ema, dict) else list(ema)
        if not 0 <= ema_index < len(ema):
            raise ValueError(f"{saved.ckpt_dir} step {saved.step} holds {len(ema)} EMA tree(s), so EMA tree"
                             f" {ema_index} does not exist: use weights='params' or an index below {len(ema)}")
        key, saved_params = "ema_params", ema[ema_index]
    if abstract is None:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved_params)
    mismatch = describe_mismatch(saved_params, abstract)
    if mismatch:
        raise ValueError(f"the {weights} of {saved.ckpt_dir} step {saved.step} do not fit the model they are"
                         f" loaded into ({mismatch})")

    def restore_args(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                                            sharding=getattr(leaf, "sharding", None)), abstract)
    args = jax.tree.map(restore_args, abstract)
    if key == "ema_params":
        # every EMA tree up to the one asked for (a list is restored by position); only it is kept
        count = ema_index + 1
        target, args = {key: [target] * count}, {key: [args] * count}
    else:
        target, args = {key: target}, {key: args}
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        saved.state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
    return restored[key][ema_index] if key == "ema_params" else restored[key]
