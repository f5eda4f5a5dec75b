"""Files that appear whole or not at all: written under a temporary name, then renamed.

Every file the package writes for a later run to read (manifests, statistics, weights, sample
files, data shards, markers) goes through :class:`AtomicFile`, so that a run killed mid-write
never leaves a truncated file under the final name for a later load to take as complete.

Paths go through ``etils.epath``: a local path is written to a hidden ``.<name>.tmp`` beside
the target and renamed onto it; a remote one (``gs://bucket/...``, any path ``etils.epath``
opens) is written to a local temporary file and uploaded once complete, an object store
replacing an object whole.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from etils import epath

__all__ = ["AtomicFile", "atomic_savez", "atomic_write_bytes", "atomic_write_text", "is_remote", "partial_name"]


def is_remote(path) -> bool:
    """Whether ``path`` names an object store or other non-local file system (``gs://...``)."""
    return "://" in os.fspath(path)


def partial_name(name: str) -> str:
    """The temporary name a file called ``name`` is written under before it is renamed."""
    return f".{name}.tmp"


class AtomicFile:
    """``path`` written under a temporary local name (:attr:`partial`), moved onto ``path`` by
    :meth:`commit` or removed by :meth:`discard`.

    As a context manager it yields the temporary name, commits when the block ends normally
    and discards on an exception::

        with AtomicFile("stats.npz") as partial:
            np.save(partial, x)   # any writer that takes a file name: np.savez, open_memmap, zipfile

    The parent folder is created. Writers that add an extension to a file name (``np.save``,
    ``np.savez``) are given the open file instead (``open(partial, "wb")``).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        target = epath.Path(self.path)
        if is_remote(self.path):
            self._local_dir = tempfile.mkdtemp(prefix="atomic-")
            self.partial = os.path.join(self._local_dir, target.name)
        else:
            self._local_dir = None
            target.parent.mkdir(parents=True, exist_ok=True)
            self.partial = os.fspath(target.parent / partial_name(target.name))
        self._done = False

    def commit(self) -> str:
        """Moves the written file onto ``path`` (flushed to disk first) and returns ``path``."""
        if self._done:
            return self.path
        self._done = True
        try:
            if self._local_dir is not None:
                target = epath.Path(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(epath.Path(self.partial).read_bytes())
            else:
                with open(self.partial, "rb") as f:
                    os.fsync(f.fileno())
                epath.Path(self.partial).replace(self.path)
        finally:
            self._cleanup()
        return self.path

    def discard(self) -> None:
        """Removes the temporary file; ``path`` is left as it was."""
        if not self._done:
            self._done = True
            self._cleanup()

    def _cleanup(self) -> None:
        if os.path.exists(self.partial):
            os.remove(self.partial)
        if self._local_dir is not None:
            os.rmdir(self._local_dir)

    def __enter__(self) -> str:
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_bytes(path, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically; returns ``path``."""
    file = AtomicFile(path)
    with file as partial, open(partial, "wb") as f:
        f.write(data)
    return file.path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> str:
    """Writes ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_savez(path, **arrays) -> str:
    """``np.savez(path, **arrays)`` atomically (uncompressed; ``path`` is used as given)."""
    file = AtomicFile(path)
    with file as partial, open(partial, "wb") as f:
        np.savez(f, **arrays)
    return file.path
