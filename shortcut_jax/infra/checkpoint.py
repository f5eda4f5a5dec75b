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

One parameter tree of a saved state (the online parameters or one EMA tree) can be read alone,
without the optimiser state or the other trees, with :meth:`Checkpointer.restore_params`, and
its shapes checked first from the metadata files with :meth:`Checkpointer.param_shapes`: a
frozen teacher, a warm start and reflow's stage one read another run's weights this way
(``shortcut_jax.training.runs`` finds that run's folder and metadata).

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
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from shortcut_jax.infra.jsonable import jsonable

__all__ = ["Checkpointer", "check_compatible", "differences", "shape_differences", "tree_shapes"]

# The parameter trees of a saved train state that restore_params reads alone: its online
# parameters, or one of its EMA trees.
WEIGHTS = ("ema", "params")
STATE_ITEM = "state"  # the train state's item in every step folder


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
            logging.warning("Checkpoint for step %d already exists in %s; not saving it again.", step, self.directory)
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
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
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

    def _state_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step) / STATE_ITEM

    def param_tree_metadata(self, step: int | None, weights: str = "ema", ema_index: int = 0) -> tuple[int, Any]:
        """``(step, tree)``: the saved array metadata (leaves with ``.shape`` and ``.dtype``) of one
        parameter tree of the state saved at ``step`` (None: latest), read from the step's
        metadata files alone: the online parameters (``weights='params'``) or EMA tree
        ``ema_index`` (``'ema'``).

        Raises:
          FileNotFoundError: nothing is saved, or ``step`` is not saved.
          KeyError: the saved state has no such tree (an EMA tree the run did not keep); the
            message says how many EMA trees it has.
        """
        step, tree, _ = self._param_tree(step, weights, ema_index)
        return step, tree

    def _param_tree(self, step: int | None, weights: str, ema_index: int) -> tuple[int, Any, int]:
        """:meth:`param_tree_metadata` and the number of saved EMA trees."""
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
        self._manager.wait_until_finished()
        step = self._resolve_step(step)
        metadata = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(self._state_dir(step))
        # orbax versions differ in how they wrap the tree (StepMetadata.item_metadata, .tree)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, dict) or "params" not in tree:
            raise KeyError(f"the state saved at step {step} in {self.directory} is not a train state (no params tree)")
        ema = tree.get("ema_params")
        # saved as a tuple; the metadata gives it back as a list, or as a dict keyed '0', '1', ...
        ema = [ema[k] for k in sorted(ema, key=int)] if isinstance(ema, dict) else list(ema or [])
        if weights == "params":
            return step, tree["params"], len(ema)
        if not 0 <= ema_index < len(ema):
            raise KeyError(
                f"the state saved at step {step} in {self.directory} holds {len(ema)} EMA tree(s), so"
                f" EMA tree {ema_index} does not exist: use the online parameters ('params')"
                f"{f' or an index below {len(ema)}' if ema else ''}"
            )
        return step, ema[ema_index], len(ema)

    def param_shapes(self, step: int | None, weights: str = "ema", ema_index: int = 0) -> dict[str, tuple]:
        """Shapes of the leaves of one saved parameter tree (as :meth:`param_tree_metadata`),
        keyed by ``jax.tree_util.keystr`` of their path; no array is read."""
        return tree_shapes(self.param_tree_metadata(step, weights, ema_index)[1])

    def restore_params(
        self, step: int | None, weights: str = "ema", abstract_params: Any = None, ema_index: int = 0
    ) -> Any:
        """One parameter tree of the state saved at ``step`` (None: latest), read alone, without
        the optimiser state or the other trees: the online parameters (``weights='params'``) or
        EMA tree ``ema_index`` (``'ema'``).

        ``abstract_params``: the tree expected (``jax.ShapeDtypeStruct`` leaves, or arrays).
        Leaves with a ``sharding`` are read straight into it, bit for bit when the dtype is the
        saved one (every process of a job calls this); leaves without one come back as host
        numpy arrays. ``None`` reads the saved tree as it is, as numpy arrays. Paths and shapes
        are compared with the checkpoint's metadata before any array is read.

        Raises:
          FileNotFoundError: nothing is saved, or ``step`` is not saved.
          KeyError: the saved state has no such tree.
          ValueError: the saved tree's paths or shapes differ from ``abstract_params``'; the
            message names the differences.
        """
        step, saved, num_ema = self._param_tree(step, weights, ema_index)
        if abstract_params is None:
            abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)
        shown = shape_differences(saved, abstract_params, limit=6)
        if shown:
            raise ValueError(
                f"the {weights} tree saved at step {step} in {self.directory} does not fit the model it"
                " is loaded into:\n  " + "\n  ".join(shown)
            )

        def restore_args(leaf):
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
            return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=getattr(leaf, "sharding", None)),
            abstract_params,
        )
        args = jax.tree.map(restore_args, abstract_params)
        # a partial restore of the tree's path in the saved state alone. The EMA trees are a list,
        # which orbax matches whole, so every EMA tree is read and tree ema_index kept.
        if weights == "ema":
            target, args = {"ema_params": [target] * num_ema}, {"ema_params": [args] * num_ema}
        else:
            target, args = {"params": target}, {"params": args}
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(
                self._state_dir(step), args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True)
            )
        return restored["ema_params"][ema_index] if weights == "ema" else restored["params"]

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


def tree_shapes(tree: Any) -> dict[str, tuple]:
    """``{keystr(path): shape}`` of a tree whose leaves have a ``.shape`` (arrays, abstract
    arrays, orbax's array metadata)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def shape_differences(saved: Any, current: Any, limit: int | None = None) -> list[str]:
    """One line per difference between two trees' leaf paths and shapes (trees whose leaves have
    a ``.shape``, or their :func:`tree_shapes`): a path missing from the saved tree, a saved path
    the current tree lacks, a shape that differs. With ``limit``, at most ``limit`` lines and a
    last one counting the rest. The one comparison of parameter trees (restores, warm starts,
    teachers, imported checkpoints)."""
    saved, current = (t if _is_shapes(t) else tree_shapes(t) for t in (saved, current))
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    shape = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    lines = (
        [f"missing {k}" for k in missing]
        + [f"unexpected {k}" for k in extra]
        + [f"{k}: saved {saved[k]}, current {current[k]}" for k in shape]
    )
    if limit is not None and len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more"]
    return lines


def _is_shapes(tree: Any) -> bool:
    """Whether ``tree`` is already a :func:`tree_shapes` result (``{keystr: shape tuple}``)."""
    return isinstance(tree, dict) and all(isinstance(v, tuple) for v in tree.values())
