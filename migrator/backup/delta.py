"""File-level deltas for generic incremental backups: manifests, diffs, safe deletion.

A *manifest* lists every entry under a volume snapshot (``rootfs/...`` and anything beside
it) with the metadata the change rule looks at. The next incremental backup scans the new
snapshot, compares it with the parent backup's manifest and stores only:

- a tar of the entries that are new or changed (``--no-recursion``, from a NUL-separated
  list), plus, for each of them, its parent directory (writing into a directory changes its
  mtime on the restore side; tar puts it back when the directory itself is a member), plus
  every other name of a hard-linked inode in the set (so tar can link them again);
- the list of paths that are gone, or changed type (removed first, then extracted again).

**Change rule:** an entry is changed when its type, mode, owner, group, mtime (ns), size,
link count, device number or symlink target differs (directories: type, mode, owner,
group, mtime). ctime is not used: a ``dir``-pool snapshot is a copy, so every ctime
differs, and so do inode numbers. **Blind spot:** a change that keeps size and mtime (a
same-length rewrite followed by ``touch -d`` to the old time) or that touches only xattrs
or ACLs (those change ctime alone) is not seen; the next full backup catches it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from migrator.backends.generic import tar_create_argv
from migrator.core.errors import CorruptBackup, InvalidInput, UnsafeArchive
from migrator.runtime.inroot import RootDir

MANIFEST_VERSION = 1
#: kind, mode, uid, gid, size, mtime_ns, nlink, rdev, symlink target
Entry = tuple[str, int, int, int, int, int, int, int, str]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "c" if stat.S_ISCHR(mode) else "b"
    if stat.S_ISFIFO(mode):
        return "p"
    return "s"


@dataclass
class Manifest:
    """Relative path -> entry metadata; ``inodes`` groups hard links (scan-time only)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    inodes: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        # json escapes surrogates, so non-UTF-8 names (surrogateescape) survive the trip
        return json.dumps({"version": MANIFEST_VERSION, "entries": self.entries},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            entries = {str(k): _entry(v) for k, v in doc["entries"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptBackup(f"{where}: manifest malformed: {e}") from e
        return cls(entries)


def _entry(v: list[object]) -> Entry:
    if not isinstance(v, list) or len(v) != 9 or not isinstance(v[0], str) or \
            not isinstance(v[8], str) or not all(isinstance(x, int) for x in v[1:8]):
        raise ValueError(f"bad entry {v!r}")
    return (v[0], *v[1:8], v[8])  # type: ignore[return-value]


def scan(root: Path, hidden: tuple[str, ...] = ()) -> Manifest:
    """Walk ``root`` without following symlinks or crossing mounts. The directories named
    in ``hidden`` are listed but not what is inside them (``rootfs/dev`` of an
    unprivileged container: see ``migrator.backup.create``)."""
    m = Manifest()
    root_dev = os.lstat(root).st_dev
    base = os.fsencode(root)

    def walk(rel: bytes, absdir: bytes) -> None:
        with os.scandir(absdir) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = os.path.join(absdir, name)
            st = os.lstat(path)
            r = os.path.join(rel, name) if rel else name
            key = os.fsdecode(r)
            kind = _kind(st.st_mode)
            link = os.fsdecode(os.readlink(path)) if kind == "l" else ""
            if kind == "d":
                m.entries[key] = (kind, st.st_mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns,
                                  0, 0, "")
                if st.st_dev == root_dev and key not in hidden:
                    walk(r, path)
                continue
            m.entries[key] = (kind, st.st_mode, st.st_uid, st.st_gid,
                              st.st_size if kind == "f" else 0, st.st_mtime_ns, st.st_nlink,
                              st.st_rdev if kind in "cb" else 0, link)
            if st.st_nlink > 1 and kind != "d":
                m.inodes.setdefault((st.st_dev, st.st_ino), []).append(key)

    walk(b"", base)
    return m


@dataclass
class Delta:
    """What an incremental point stores: members to tar (in order) and paths to remove."""

    members: list[str]
    deleted: list[str]
    bytes: int  # regular-file bytes in ``members`` (the progress total)


def diff(old: Manifest, new: Manifest) -> Delta:
    """The change rule of the module docstring, applied to two manifests."""
    changed: set[str] = set()
    deleted: list[str] = []
    for path, e in new.entries.items():
        o = old.entries.get(path)
        if o is None:
            changed.add(path)
        elif o[0] != e[0]:
            deleted.append(path)  # type changed: remove the old one, then extract
            changed.add(path)
        elif o != e:
            changed.add(path)
    deleted += [p for p in old.entries if p not in new.entries]
    for group in new.inodes.values():
        if any(p in changed for p in group):
            changed.update(group)
    for p in list(changed):
        parent = os.path.dirname(p)
        if parent:
            changed.add(parent)
    for p in deleted:
        parent = os.path.dirname(p)
        if parent and parent in new.entries:
            changed.add(parent)
    members = sorted(changed)  # parents sort before their children
    size = sum(new.entries[p][4] for p in members)
    return Delta(members, _outermost(deleted), size)


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths inside another listed path (removing the directory removes them)."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def encode_paths(paths: list[str]) -> bytes:
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


def decode_paths(data: bytes, where: str) -> list[str]:
    if data and not data.endswith(b"\0"):
        raise CorruptBackup(f"{where}: list of deleted paths is malformed")
    return [os.fsdecode(p) for p in data.split(b"\0")[:-1]]


def safe_relative(rel: str) -> list[str]:
    """The components of a relative path that stays inside its root, or UnsafeArchive."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchive(f"refusing to remove {rel!r}: not a plain relative path")
    return parts


def remove_paths(root: Path, paths: Iterable[str]) -> int:
    """Remove each relative path under ``root``; never follows a symlink on the way.

    Through ``migrator.runtime.inroot.RootDir`` with no links followed at all: a symlink among the
    parents (even one leading inside) is refused, the last component is removed itself (a
    link, not what it names), a directory with everything in it. Missing paths are fine.
    """
    removed = 0
    with RootDir(root, follow_links=False) as tree:
        for rel in paths:
            safe_relative(rel)
            try:
                removed += tree.remove(rel)
            except InvalidInput as e:
                raise UnsafeArchive(f"refusing to remove {rel!r}: {e.message}") from e
    return removed


def tar_members_argv(root: Path, list_file: Path, xattrs: bool = True) -> list[str]:
    """``tar`` creating an archive of exactly the listed members (no recursion)."""
    return tar_create_argv(root, ["--files-from", str(list_file)], xattrs,
                           ["--no-recursion", "--null", "--verbatim-files-from", "--no-unquote"])
