"""Verifying a copied volume before the source is let go.

Two checks, both read-only: ``rsync --dry-run --itemize-changes`` over the two live trees
must report no difference (names, types, sizes, modes, owners, mtimes, links, and xattrs
and ACLs where both pools keep them), and a sample of files is compared by SHA-256 (every
file with ``full``, through rsync's ``--checksum``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from migrator.backends import StorageBackend, VolumeRef
from migrator.backends.generic import rsync_exact
from migrator.core import proc
from migrator.core.errors import StorageError

SAMPLE = 32


def _diff(src: Path, dst: Path, xattrs: bool, checksum: bool, exact_times: bool) -> list[str]:
    argv = ["rsync", *rsync_exact(xattrs=xattrs, exact_times=exact_times, checksum=checksum),
            "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/"]
    r = proc.run(argv, timeout=None)
    return [line for line in r.stdout.splitlines() if line.strip()]


def _files(root: Path) -> list[tuple[int, str]]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((st.st_size, os.path.relpath(p, root)))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample(files: list[tuple[int, str]], n: int = SAMPLE) -> list[str]:
    """The biggest files (where damage would be) plus an evenly spread selection."""
    by_size = sorted(files, reverse=True)
    chosen = [p for _s, p in by_size[: n // 2]]
    rest = sorted(p for _s, p in by_size[n // 2:])
    step = max(len(rest) // max(n - len(chosen), 1), 1)
    chosen += rest[::step][: n - len(chosen)]
    return chosen


def verify_trees(src: Path, dst: Path, xattrs: bool, full: bool = False,
                 exact_times: bool = True) -> str:
    """Raise ``StorageError`` unless ``dst`` matches ``src``; return what was checked.

    ``exact_times=False`` compares mtimes to the second (a pool that keeps no more).
    """
    diff = _diff(src, dst, xattrs, checksum=full, exact_times=exact_times)
    if diff:
        raise StorageError(
            f"verification failed: {len(diff)} difference(s) between {src} and {dst}, "
            f"first: {diff[0]}",
            "the source was kept; nothing was switched over",
        )
    files = _files(src)
    if full:
        return f"all {len(files)} files match (full checksum)"
    picked = sample(files)
    for rel in picked:
        if _sha256(src / rel) != _sha256(dst / rel):
            raise StorageError(f"verification failed: {rel} differs after the copy",
                               "the source was kept; nothing was switched over")
    return f"{len(files)} files match; {len(picked)} checksummed"


def verify_volume(src: StorageBackend, dst: StorageBackend, vol: VolumeRef,
                  full: bool = False, dst_vol: VolumeRef | None = None) -> str:
    xattrs = src.supports_xattrs and dst.supports_xattrs
    exact = src.subsecond_mtimes and dst.subsecond_mtimes
    return verify_trees(src.volume_path(vol), dst.volume_path(dst_vol or vol), xattrs, full,
                        exact)
