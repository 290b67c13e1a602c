"""Unprivileged containers: the id map and on-disk uid shifting.

Why shift on disk rather than use an idmapped mount: an idmapped rootfs is not idmapped again
after a CRIU restore, so a container that may be live-migrated must own its files for real.
Shifting keeps setuid/setgid bits (chown clears them) and shifts POSIX ACL entries.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from migrator.core.errors import InvalidInput, MissingDependency

MAP_SIZE = 65536
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
ACL_USER, ACL_GROUP = 0x02, 0x08


@dataclass(frozen=True)
class IdMap:
    """The same range for uids and gids: container 0..size-1 -> host base..base+size-1."""

    base: int
    size: int = MAP_SIZE

    def lxc_lines(self) -> list[str]:
        return [
            f"lxc.idmap = u 0 {self.base} {self.size}",
            f"lxc.idmap = g 0 {self.base} {self.size}",
        ]


def parse_subid(text: str, user: str = "root") -> tuple[int, int] | None:
    """First ``user:start:count`` range of an /etc/subuid-style file."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == user:
            try:
                return int(parts[1]), int(parts[2])
            except ValueError:
                continue
    return None


def default_idmap(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> IdMap:
    ranges = []
    for f in (subuid, subgid):
        try:
            r = parse_subid(f.read_text())
        except FileNotFoundError:
            r = None
        if r is None or r[1] < MAP_SIZE:
            raise MissingDependency(
                f"no subordinate id range of {MAP_SIZE} for root in {f}",
                "add 'root:100000:1000000000' to /etc/subuid and /etc/subgid (make setup does)",
            )
        ranges.append(r)
    if ranges[0][0] != ranges[1][0]:
        raise InvalidInput("root's subuid and subgid ranges start at different ids")
    return IdMap(ranges[0][0])


def _shift_acl(value: bytes, delta: int) -> bytes:
    # posix_acl xattr: u32 version, then (u16 tag, u16 perm, u32 id) entries
    out = bytearray(value[:4])
    for off in range(4, len(value), 8):
        tag, perm, ident = struct.unpack_from("<HHI", value, off)
        if tag in (ACL_USER, ACL_GROUP):
            ident += delta
            if not 0 <= ident < 2**32 - 1:
                raise InvalidInput(f"ACL entry id {ident - delta} cannot be shifted by {delta}")
        out += struct.pack("<HHI", tag, perm, ident)
    return bytes(out)


def _shift_one(path: str, st: os.stat_result, delta: int, limit: int) -> None:
    uid, gid = st.st_uid + delta, st.st_gid + delta
    if not (0 <= uid < limit and 0 <= gid < limit):
        raise InvalidInput(f"{path}: owner {st.st_uid}:{st.st_gid} cannot be shifted by {delta}")
    acls: dict[str, bytes] = {}
    if not stat.S_ISLNK(st.st_mode):
        for name in ACL_XATTRS:  # computed first: a bad ACL id refuses before any change
            try:
                acls[name] = _shift_acl(os.getxattr(path, name, follow_symlinks=False), delta)
            except OSError:
                continue
    os.lchown(path, uid, gid)
    if stat.S_ISLNK(st.st_mode):
        return
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown dropped them
    for name, value in acls.items():
        os.setxattr(path, name, value, follow_symlinks=False)


def shift_tree(root: Path, delta: int) -> int:
    """Add ``delta`` to every uid/gid under ``root`` (negative to unshift). Returns a count."""
    if delta == 0:
        return 0
    limit = 2**32 - 1
    n = 0
    st = os.lstat(root)
    _shift_one(str(root), st, delta, limit)
    n += 1
    dev = st.st_dev
    linked: set[int] = set()  # inodes with several names: shift each inode once
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            if s.st_dev != dev:  # never cross into a mount inside the rootfs
                continue
            if s.st_nlink > 1 and not stat.S_ISDIR(s.st_mode):
                if s.st_ino in linked:
                    continue
                linked.add(s.st_ino)
            _shift_one(p, s, delta, limit)
            n += 1
    return n
