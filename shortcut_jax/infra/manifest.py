"""The run manifest: how each launch was run (config, code version, packages, devices).

Every launch writes ``<workdir>/manifest-<UTC time>.json``, so the history of a resumed run is
kept, and replaces ``<workdir>/manifest.json`` with the latest one.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Any, Mapping

import jax
from etils import epath

from shortcut_jax.infra import files
from shortcut_jax.infra.jsonable import jsonable

__all__ = ["write_manifest"]


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
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
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
    # An interrupted write never leaves a truncated manifest behind.
    files.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    if jax.process_index() != 0:
        return path
    now = datetime.datetime.now(datetime.timezone.utc)
    manifest = {
        "time_utc": now.isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "host": socket.gethostname(),
        "git": _git_info(),
        "versions": {"python": platform.python_version(), **{n: _package_version(n) for n in _VERSIONED_PACKAGES}},
        "devices": _device_info(),
        "config": jsonable(config),
        "extra": jsonable(dict(extra or {})),
    }
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # os.makedirs locally; gs:// and others too
    # Microseconds keep names unique and in launch order when sorted.
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    dated = os.path.join(workdir, f"manifest-{stamp}.json")
    _write_json_atomic(manifest, dated)
    _write_json_atomic(manifest, path)
    return path
