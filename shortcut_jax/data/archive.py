"""One-time extraction of .tar / .tar.gz data archives into a local folder."""

from __future__ import annotations

import json
import os
import posixpath
import tarfile

from shortcut_jax.infra import files

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _marker_path(archive_path: str, dest_dir: str) -> str:
    return os.path.join(dest_dir, f".{os.path.basename(archive_path)}.extracted.json")


def _safe_members(members: list[tarfile.TarInfo], dest_dir: str) -> None:
    """Refuses, before anything is written, members that could write outside ``dest_dir`` or
    create links or special files: tarfile's ``data`` extraction filter on every member, and the
    two things it lets through, absolute names (it would strip the ``/``) and links inside
    ``dest_dir`` (data archives have no need for links; a link followed by a member written
    through it is the classic way out of the destination folder).
    """
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("extracting archives needs tarfile's data filter: Python >= 3.10.12, 3.11.4 or 3.12")
    for member in members:
        name = member.name
        if name.startswith(("/", "\\")) or os.path.isabs(name):
            raise ValueError(
                f"archive member {name!r} points outside the destination; refusing to extract this archive."
            )
        if not (member.isfile() or member.isdir()):
            raise ValueError(
                f"archive member {name!r} is a link or special file; only regular files and folders are extracted."
            )
        try:
            tarfile.data_filter(member, dest_dir)
        except tarfile.FilterError as error:
            raise ValueError(f"{error}; refusing to extract this archive.") from None


def _content_root(members: list[tarfile.TarInfo]) -> str:
    """The deepest folder (relative, '' for the top) that contains every file of the archive."""
    folders = [posixpath.dirname(posixpath.normpath(m.name)) for m in members if m.isfile()]
    if not folders:
        raise ValueError("the archive holds no files.")
    return posixpath.commonpath(folders)


def extract_archive(archive_path: str, dest_dir: str) -> str:
    """Extracts a .tar/.tar.gz into ``dest_dir`` once and returns the extracted root.

    The root is the deepest folder that contains every file of the archive, so
    ``cifar10-train.tar.gz`` (``cifar10/train/<class>/NNNN.jpg``) gives
    ``<dest_dir>/cifar10/train``, ready to use as an image folder's ``data.path``. (An archive
    with a single class folder would therefore give that class folder itself.)

    A marker file in ``dest_dir`` records a finished extraction; later calls with an archive of
    the same size return at once. An interrupted extraction leaves no marker and is redone.
    Several archives may share one ``dest_dir``. Members that are absolute, resolve outside it,
    are links or special files are refused before anything is written.
    """
    if not os.path.isfile(archive_path):
        raise ValueError(f"archive {archive_path!r} does not exist.")
    if not archive_path.endswith(ARCHIVE_SUFFIXES):
        raise ValueError(f"{archive_path!r} is not a {'/'.join(ARCHIVE_SUFFIXES)} archive.")
    archive_size = os.path.getsize(archive_path)
    marker = _marker_path(archive_path, dest_dir)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        root = os.path.join(dest_dir, done["root"])
        if done.get("archive_size") == archive_size and os.path.isdir(root):
            return os.path.normpath(root)

    os.makedirs(dest_dir, exist_ok=True)
    with tarfile.open(archive_path, "r:*") as tar:
        members = tar.getmembers()
        _safe_members(members, dest_dir)
        root = _content_root(members)
        # the same filter again as it writes; it also drops permission bits such as setuid
        tar.extractall(dest_dir, members=members, filter="data")

    # Written atomically so that a crash never leaves a half-written marker.
    record = {"archive": os.path.abspath(archive_path), "archive_size": archive_size, "root": root}
    files.atomic_write_text(marker, json.dumps(record))
    return os.path.normpath(os.path.join(dest_dir, root))
