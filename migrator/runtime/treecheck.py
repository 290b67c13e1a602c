"""Inspecting a received tree before it becomes a container.

Native send streams (btrfs, zfs) from a backup or an export are replayed by the storage
driver itself, so no member check like ``migrator.targuard.TarGuard`` ever sees what they hold.
They are received into a scratch volume, and this module walks the result (the volume and
each snapshot) before anything is recorded. One walk, ``os.scandir`` without following
links, one ``lstat`` per entry (about 0.1 s for a Debian rootfs of 20k entries).

The policy, by the container's privilege (``TreePolicy``):

- **privileged**: nothing is refused. Its root is the host's root already; the setuid-root
  programs and device nodes a privileged system container holds are its own.
- **unprivileged**, whose files are owned on disk by the host ids ``base..base+size-1``:
  - a character or block device is refused, except the pseudo-devices LXC and systemd treat
    as safe in a container (``null zero full random urandom tty console ptmx``) at their
    own names and numbers directly under ``rootfs/dev``, where debootstrap leaves them and
    LXC mounts a tmpfs over them anyway;
  - a setuid file whose owner, or a setgid file whose group, is outside the container's
    ids is refused: a setuid-root program inside a container's rootfs is a way to host
    root for any local user who can reach the path, and one owned by another container's
    ids is that container's;
  - ``all_owners``: every owner under ``rootfs/`` must be inside the ids (an archive that
    says how its ids are shifted is held to it: a file outside would be shifted into
    someone else's range, or stay the host's).

A refusal is ``UnsafeArchive`` naming the first offending paths and what they are.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from migrator.backends import StorageBackend, VolumeRef
from migrator.core.errors import UnsafeArchive
from migrator.runtime import idmap

MAP_SIZE = idmap.MAP_SIZE
#: name under rootfs/dev -> (major, minor) of the character devices allowed there
SAFE_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                "urandom": (1, 9), "tty": (5, 0), "console": (5, 1), "ptmx": (5, 2)}
SHOWN = 3  # offending paths named in the message
HINT = ("the received data was removed and nothing was recorded; do not trust its source "
        "(a privileged container may hold device nodes and setuid-root files)")


@dataclass(frozen=True)
class TreePolicy:
    """What a received tree of one container may hold (see the module docstring)."""

    privileged: bool
    base: int = 0
    size: int = MAP_SIZE
    all_owners: bool = False

    def inside(self, ident: int) -> bool:
        return self.base <= ident < self.base + self.size


@dataclass
class TreeReport:
    entries: int = 0
    seconds: float = 0.0


def _problem(rel: str, st: os.stat_result, policy: TreePolicy) -> str | None:
    """Why entry ``rel`` (relative to the walked top) is refused, or None."""
    mode = st.st_mode
    owned = rel == "rootfs" or rel.startswith("rootfs/")  # beside it: the host's files
    if policy.all_owners and owned and not (policy.inside(st.st_uid)
                                            and policy.inside(st.st_gid)):
        return (f"is owned by {st.st_uid}:{st.st_gid}, outside the ids "
                f"{policy.base}..{policy.base + policy.size - 1} the archive says it uses")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "character" if stat.S_ISCHR(mode) else "block"
        numbers = (os.major(st.st_rdev), os.minor(st.st_rdev))
        parent, _, name = rel.rpartition("/")
        if stat.S_ISCHR(mode) and parent == "rootfs/dev" and SAFE_DEVICES.get(name) == numbers:
            return None
        return (f"is a {kind} device node ({numbers[0]}:{numbers[1]}); device nodes are "
                "refused unless the container is privileged")
    if mode & stat.S_ISUID and not policy.inside(st.st_uid):
        return (f"is setuid to uid {st.st_uid}, which is not one of the container's ids "
                f"({policy.base}..{policy.base + policy.size - 1})")
    if mode & stat.S_ISGID and not policy.inside(st.st_gid):
        return (f"is setgid to gid {st.st_gid}, which is not one of the container's ids "
                f"({policy.base}..{policy.base + policy.size - 1})")
    return None


def find_problems(top: Path, policy: TreePolicy, limit: int = SHOWN) -> tuple[list[str], int]:
    """(up to ``limit`` problems as "path: why", entries walked) for the tree at ``top``."""
    problems: list[str] = []
    count = 0
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(top / rel if rel else top) as it:
            for entry in it:
                count += 1
                sub = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    continue  # a link's own mode and owner give nothing
                if not policy.privileged:
                    why = _problem(sub, st, policy)
                    if why is not None:
                        problems.append(f"{sub} {why}")
                        if len(problems) >= limit:
                            return problems, count
                if stat.S_ISDIR(st.st_mode):
                    todo.append(sub)
    return problems, count


def inspect_tree(top: Path, policy: TreePolicy, what: str,
                 report: TreeReport | None = None) -> None:
    """Refuse the tree at ``top`` (a volume: ``rootfs/`` and what is beside it; ``what``
    names it in the message) if it holds anything ``policy`` forbids, ``top`` included."""
    t0 = time.monotonic()
    problems: list[str] = []
    if not policy.privileged:
        why = _problem("", os.lstat(top), policy)
        if why is not None:
            problems.append(f"its top directory {why}")
    more, count = find_problems(top, policy)
    problems += more
    if report is not None:
        report.entries += count + 1
        report.seconds += time.monotonic() - t0
    if problems:
        raise UnsafeArchive(f"{what}: " + "; ".join(problems[:SHOWN])
                            + (" (and maybe more)" if len(problems) >= SHOWN else ""), HINT)


def container_policy(privileged: bool) -> TreePolicy:
    """The policy for a container of this host: unprivileged ones own this host's ids."""
    if privileged:
        return TreePolicy(privileged=True)
    return TreePolicy(privileged=False, base=idmap.default_idmap().base)


def inspect_volume(backend: StorageBackend, vol: VolumeRef, policy: TreePolicy, what: str,
                   skip: tuple[str, ...] = ()) -> TreeReport:
    """``inspect_tree`` over a volume and each of its snapshots (but those named in
    ``skip``), each snapshot read where the driver shows it (``mount_snapshot``)."""
    report = TreeReport()
    if policy.privileged:
        return report  # nothing to refuse: no walk
    inspect_tree(backend.volume_path(vol), policy, what, report)
    for snap in backend.list_snapshots(vol):
        if snap.name not in skip:
            with backend.mount_snapshot(snap) as path:
                inspect_tree(path, policy, f"{what} (snapshot {snap.name})", report)
    return report
