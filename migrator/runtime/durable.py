"""Durable before destructive: put a new copy on disk before the old one is removed.

A move, a restore ``--force``, an ``import-lxc --delete`` or the release of a live
migration's source removes the only other copy of a container. Everything written to the
target so far may still sit in the page cache (or in a storage daemon's open transaction),
so a power cut right after the removal would lose both. ``sync_filesystem`` flushes the
whole filesystem that holds a path with ``syncfs(2)`` (one call covers every file a
transfer wrote, which fsyncing file by file cannot do cheaply); the record that points at
the new copy is then committed with ``StateStore.durable``; only then is the source removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from migrator.core.errors import StorageError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int


def sync_filesystem(path: Path | str) -> None:
    """Flush the filesystem that holds ``path`` (a directory) to stable storage.

    The directory is opened without following a final symlink, so a volume that was
    replaced by a link cannot make us sync (and report as safe) some other filesystem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"cannot open {path} to sync it: {e.strerror or e}",
                           "the target volume is missing; the source was kept") from e
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise StorageError(f"syncing the filesystem of {path} failed: {os.strerror(err)}",
                               "the target may not be on disk; the source was kept")
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so the names created or renamed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
