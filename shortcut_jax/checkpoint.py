"""Checkpointing of the train state, the data-iterator position and run metadata.

A thin wrapper around ``orbax.checkpoint.CheckpointManager``. Every checkpoint
step directory holds three items:

* ``state``: any pytree of ``jax.Array`` (possibly sharded over a ``Mesh``,
  possibly spanning several processes), written with ``StandardSave``;
* ``data``: a JSON dict with the data iterator position;
* ``meta``: a JSON dict describing the run (model config, objective name, ...),
  readable on its own with :meth:`Checkpointer.read_meta`, without touching the
  arrays, so that a resumed run can be checked with :func:`check_compatible`
  before any model is built.

One parameter tree of a saved state (the online parameters or the first EMA tree) can be read
alone, without the optimiser state or the other trees, with :meth:`Checkpointer.restore_params`
(a distillation run's frozen teacher comes from another run's checkpoint this way).

Crash safety. On a local or network file system orbax writes a step into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only once every
item is complete (on GCS it writes a ``commit_success.txt`` marker instead);
directories still carrying the temporary suffix are never listed as steps. Old
steps beyond ``keep`` are deleted only after the new step has been committed,
and not at all when the new save failed. A crash at any point during a save
therefore leaves the previous checkpoint intact. A stale temporary directory
left by a crash is replaced when the same step is saved again.

PRNG keys. Both raw ``uint32`` keys (``jax.random.PRNGKey``) and typed keys
(``jax.random.key``, any implementation) are supported. Typed keys are stored
as their raw ``uint32`` key data and re-wrapped on restore using the key dtype
of the abstract state, so the files do not depend on how a given orbax version
handles key dtypes, and a typed key comes back with the same implementation
and sharding it was requested with. As both forms are stored alike, a state
saved with one form can be restored as the other by asking for it in the
abstract state.

All methods must be called by every process of a multi-process job (orbax
synchronises the processes and lets only the primary one write the JSON
items, so ``data_state`` must describe a position that is valid for all
processes, e.g. a global step count or per-process positions keyed by process
index).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from shortcut_jax.jsonable import jsonable

__all__ = ["Checkpointer", "check_compatible", "differences"]

# Parameter trees of a saved train state that restore_params reads: name -> path in the state.
PARAM_TREES = {"params": ("params",), "ema": ("ema_params", 0)}


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_raw(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _restore_target(abstract_state: Any) -> Any:
    """The abstract tree orbax should restore: typed keys become their raw key data."""

    def leaf(x):
        if isinstance(x, jax.Array):
            # Concrete arrays are accepted as templates (e.g. a freshly
            # initialised state); only their shape, dtype and sharding matter.
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is None:
                # Without a sharding orbax would have to guess the device
                # placement; on a multi-device mesh that silently gives the
                # wrong layout, so refuse early with a useful message.
                raise ValueError(
                    "abstract_state leaves must carry a sharding, got "
                    f"{x}. Build it with e.g. jax.ShapeDtypeStruct(shape, dtype, "
                    "sharding=NamedSharding(mesh, spec))."
                )
            if _is_typed_key(x):
                raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
                # The key-data array has one extra trailing axis; a sharding that
                # is valid for the key array leaves that axis unsharded, so the
                # same sharding object applies.
                return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, abstract_state)


def _raw_to_keys(restored: Any, abstract_state: Any) -> Any:
    def leaf(abstract, value):
        if _is_typed_key(abstract):
            key = jax.random.wrap_key_data(value, dtype=abstract.dtype)
            sharding = getattr(abstract, "sharding", None)
            if sharding is not None and not key.sharding.is_equivalent_to(sharding, key.ndim):
                key = jax.device_put(key, sharding)
            return key
        return value

    return jax.tree.map(leaf, abstract_state, restored)


def _to_json(obj: Any, what: str) -> Any:
    """``obj`` in JSON types, so what is saved equals what is restored."""
    if obj is None:
        obj = {}
    if not isinstance(obj, dict) and not hasattr(obj, "to_dict"):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        return jsonable(obj, strict=True)
    except TypeError as e:
        raise TypeError(f"{what}: {e}") from e


class Checkpointer:
    """Saves and restores ``(state, data_state, meta)`` under one directory.

    Args:
      directory: where step directories go, normally ``<workdir>/checkpoints``;
        created if missing. Local paths are made absolute; ``gs://`` style
        URLs are passed through.
      keep: how many most recent steps to keep (``None`` keeps all).
      async_save: if True, :meth:`save` returns once the arrays are copied off
        the devices and the files are written by a background thread. Call
        :meth:`wait` (or :meth:`close`) before the process exits.
      save_interval_steps: :meth:`save` without ``force`` only writes steps
        that are a multiple of this (the first save of a run is always
        written).

    Step bookkeeping: the list of steps is read from disk when the object is
    created and then updated by this object's own saves; a step whose async
    save is still being committed already counts as saved (``latest_step``
    reports it, and saving it again is skipped). ``restore`` and
    ``read_meta`` wait for pending saves first, so they never read a
    half-written step.
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int | None = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
    ):
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options)
        self._closed = False

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        # The highest step rather than orbax's latest_step(), which is the most
        # recently saved one and differs after a forced save of an older step.
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, data_state: dict, meta: dict, force: bool = False) -> bool:
        """Saves one step; returns whether a checkpoint was written.

        ``data_state`` and ``meta`` go through JSON: numpy scalars become
        Python numbers, tuples come back as lists and dict keys as strings.

        Returns False without writing when ``step`` is already saved (an
        existing step is never overwritten, even with ``force``), when ``step``
        is not after the latest saved step, or when ``step`` is not a multiple
        of ``save_interval_steps``; ``force=True`` lifts the last two
        conditions only. With async saving, the return happens before the files
        are on disk, and a failure of the background write is raised by the
        next ``save``, ``wait``, ``restore`` or ``close``; the previous steps
        are then still on disk, but this object's step list may no longer show
        them, so restart (or make a new ``Checkpointer``) to resume from them.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        step = int(step)
        if step in self._manager.all_steps():
            logging.warning(
                "Checkpoint for step %d already exists in %s; not saving it again.", step, self.directory
            )
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_raw(state)),
            data=ocp.args.JsonSave(_to_json(data_state, "data_state")),
            meta=ocp.args.JsonSave(_to_json(meta, "meta")),
        )
        return bool(self._manager.save(step, args=args, force=force))

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
        if step is None:
            return steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; available steps: {steps}."
            )
        return step

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores ``(state, data_state, meta)`` from ``step`` (None: latest).

        ``abstract_state`` has the structure of the saved state, with
        ``jax.ShapeDtypeStruct`` leaves whose ``sharding`` says where each
        restored array goes (concrete ``jax.Array`` leaves are accepted too).
        Values are restored bit for bit; the dtype requested must be the saved
        one for that to hold.

        Raises:
          FileNotFoundError: nothing is saved, or ``step`` is not saved.
        """
        self._manager.wait_until_finished()
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_restore_target(abstract_state)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = _raw_to_keys(restored["state"], abstract_state)
        return state, dict(restored["data"] or {}), dict(restored["meta"] or {})

    def read_meta(self, step: int | None = None) -> dict | None:
        """Returns the ``meta`` item of ``step`` (None: latest), or None if nothing is saved.

        Raises:
          FileNotFoundError: ``step`` is given but not saved.
        """
        self._manager.wait_until_finished()
        if step is None and not self.all_steps():
            return None
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def _param_tree_metadata(self, step: int | None, which: str) -> tuple[int, Any, str]:
        """(step, the saved metadata tree of ``which``, the folder of the state item)."""
        if which not in PARAM_TREES:
            raise ValueError(f"which={which!r}: use one of {sorted(PARAM_TREES)}")
        self._manager.wait_until_finished()
        step = self._resolve_step(step)
        state_dir = os.path.join(self.directory, str(step), "state")
        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
        for part in PARAM_TREES[which]:
            if isinstance(part, int):
                present = isinstance(tree, (list, tuple)) and len(tree) > part
            else:
                present = isinstance(tree, dict) and part in tree
            if not present:
                raise KeyError(f"the state saved at step {step} in {self.directory} holds no"
                               f" {'.'.join(map(str, PARAM_TREES[which]))} tree")
            tree = tree[part]
        return step, tree, state_dir

    def param_shapes(self, step: int | None, which: str) -> dict[str, tuple]:
        """Shapes of the leaves of one saved parameter tree (``which``: ``'params'`` or
        ``'ema'``, the first EMA tree), keyed by ``jax.tree_util.keystr`` of their path, read
        from the checkpoint's metadata without reading any array."""
        _, tree, _ = self._param_tree_metadata(step, which)
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
        return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}

    def restore_params(self, step: int | None, which: str, abstract_params: Any) -> Any:
        """One parameter tree of the state saved at ``step`` (None: latest), read alone: the
        online parameters (``which='params'``) or the first EMA tree (``'ema'``).

        ``abstract_params`` has the tree's structure with sharded ``jax.ShapeDtypeStruct``
        leaves (as for :meth:`restore`); only those arrays are read, straight into their
        shardings, bit for bit. Compare :meth:`param_shapes` first for a readable error: a
        structure or shape that differs from the saved one fails here in orbax's words.

        Raises:
          FileNotFoundError: nothing is saved, or ``step`` is not saved.
          KeyError: the saved state has no such tree (``'ema'`` of a run without EMA).
        """
        _, _, state_dir = self._param_tree_metadata(step, which)
        target = _restore_target(abstract_params)
        # the tree sits at its path in the saved state: a partial restore of that path alone
        # (ema_params was saved as a tuple, which orbax's metadata gives back as a list)
        item = target
        for part in reversed(PARAM_TREES[which]):
            item = [item] if isinstance(part, int) else {part: item}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        for part in PARAM_TREES[which]:
            restored = restored[part]
        return restored

    def reached_preemption(self, step: int) -> bool:
        """True at the step at which every process of a ``jax.distributed`` job is to save and
        stop after a preemption notice (JAX's preemption service: SIGTERM on CPU and GPU, a
        maintenance event on Cloud TPU); call it after every step, on every process. Always
        False in a process outside such a job."""
        return bool(self._manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Blocks until pending async saves are committed; re-raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _diff(prefix: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(f"{prefix}.{k}", a.get(k, _MISSING), b.get(k, _MISSING), out)
    elif a != b:
        out.append(f"{prefix}: saved {a!r}, current {b!r}")


def differences(saved_meta: dict, meta: dict, keys: Sequence[str]) -> list[str]:
    """``'<key>: saved <value>, current <value>'`` for every field under ``keys`` where
    ``saved_meta`` and ``meta`` differ.

    ``keys`` are top-level keys or dotted paths into nested dicts (``"model"``,
    ``"model.width"``); nested values are compared leaf by leaf so the lines
    name the exact fields. Both sides are normalised through JSON first, so a
    tuple in the current config equals the list it was saved as. A key missing
    on one side only counts as a difference.
    """
    saved = _to_json(saved_meta, "saved_meta")
    current = _to_json(meta, "meta")
    diffs: list[str] = []
    for key in keys:
        _diff(key, _lookup(saved, key), _lookup(current, key), diffs)
    return diffs


def check_compatible(saved_meta: dict, meta: dict, keys: Sequence[str]) -> None:
    """Raises ValueError if ``saved_meta`` and ``meta`` differ under any of ``keys``
    (see :func:`differences`)."""
    diffs = differences(saved_meta, meta, keys)
    if diffs:
        raise ValueError(
            "The checkpoint in this workdir was written by a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nUse a fresh --workdir, or restore the configuration the checkpoint was saved with."
        )
