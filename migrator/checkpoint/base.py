"""What a checkpointer offers and reports, plus the pure logic behind it.

The CRIU-driving code lives in ``checkpoint/lxc.py``; this module holds the value types the
live-migration pipeline sees (features, problems, timings), the scratch directory for images
and the small parsers (``/proc`` task status, listening sockets, CRIU log tails) that are
tested without CRIU.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

# Memory-backed, so images of a frozen container never touch a disk (tmpfs on Linux).
SHM_BASE = Path("/dev/shm/migrator-checkpoint")


@dataclass(frozen=True)
class Features:
    """What CRIU can do on this host (``criu check --feature ...`` and a probe or two)."""

    criu_version: str | None
    lazy_pages: bool  # post-copy: userfaultfd (uffd + uffd-noncoop)
    pre_dump: bool  # iterative pre-copy: soft-dirty tracking
    pre_dump_reason: str = ""  # why pre-copy is unavailable
    lazy_pages_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Problem:
    """Something in a running container that CRIU cannot dump (found before freezing)."""

    pid: int  # as seen from the host; 0 when it is about the container as a whole
    what: str
    hint: str


@dataclass
class DumpStats:
    seconds: float  # stop-and-copy: the whole dump; post-copy: dump start to last page served
    image_bytes: int  # post-copy: the non-memory images only
    mode: str  # "stop-and-copy" | "post-copy"
    serving_seconds: float | None = None  # post-copy: dump start until the page server listened


@dataclass
class RestoreStats:
    seconds: float


class Checkpointer(Protocol):
    """Checkpoint/restore of the containers of one host (``LxcCheckpointer`` drives CRIU
    through LXC). The live pipeline's rollback takes one of these: it only needs to put a
    dumped source back, whatever did the dump."""

    def check(self) -> Features: ...
    def preflight(self, name: str) -> list[Problem]: ...
    def dump(self, name: str, images: Path) -> DumpStats: ...
    def resume_source(self, name: str, images: Path) -> None: ...
    def release_source(self, name: str) -> None: ...
    def restore(self, name: str, images: Path, lazy: bool = False) -> RestoreStats: ...


# images directory ------------------------------------------------------------------------
def images_dir(host_root: Path, tag: str) -> Path:
    """The memory-backed directory (mode 0700) for one checkpoint's images, made if missing.

    Named after the host's state root and ``tag`` (the same pair always names the same
    directory, contents kept), so two test hosts on one machine never share one. The parent
    is 0711: a restore of an unprivileged container hands the directory to the container's
    root (``LxcCheckpointer.restore``), which must traverse it. Remove it with
    ``remove_images_dir``.
    """
    if not tag or "/" in tag or tag in (".", ".."):
        raise ValueError(f"invalid images tag {tag!r}")
    SHM_BASE.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(SHM_BASE, 0o711)
    host = hashlib.sha256(str(Path(host_root).resolve()).encode()).hexdigest()[:10]
    d = SHM_BASE / f"{host}-{tag}"
    d.mkdir(mode=0o700, exist_ok=True)  # idempotent: the same tag names the same directory
    os.chmod(d, 0o700)
    return d


def remove_images_dir(path: Path) -> None:
    """Delete an images directory made by ``images_dir`` (refuses any other path)."""
    p = Path(path)
    if p.parent != SHM_BASE:
        raise ValueError(f"{p} is not an images directory")
    shutil.rmtree(p, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    """Apparent bytes of the files under ``path`` (images written, a rootfs to send)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


# CRIU config files -----------------------------------------------------------------------
def criu_config(*options: str) -> str:
    """A CRIU config file (``CRIU_CONFIG_FILE``): one long option per line, no dashes.

    LXC builds criu's command line itself; this file is the only way to add options to it,
    and criu reads it before the command line, so LXC's own options win where both set one.
    """
    for o in options:
        if not o or o.startswith("-") or "\n" in o:
            raise ValueError(f"invalid CRIU config option {o!r}")
    return "".join(f"{o}\n" for o in options)


def dump_options(lazy: bool = False, address: str | None = None, port: int | None = None,
                 ps_socket: int | None = None, status_fd: int | None = None) -> list[str]:
    # leave-stopped: after the dump CRIU leaves every task SIGSTOPped instead of killing it
    # (LXC's -s passes no --leave-running, so this config option decides the final state).
    # enable-fs ramfs: systemd mounts /run/credentials/* as ramfs, which CRIU dumps only
    # when told to (the files in it are dumped with the mount, so nothing is lost).
    opts = ["leave-stopped", "enable-fs ramfs"]
    if lazy and ps_socket is not None:
        # the page server talks over a socket it is handed, connected already: it listens
        # nowhere, so no other local user can reach the container's memory
        opts += ["lazy-pages", f"ps-socket {int(ps_socket)}"]
        if status_fd is not None:  # criu writes a NUL there once it serves pages
            opts.append(f"status-fd {int(status_fd)}")
    elif lazy:
        if not address or not port:
            raise ValueError("a post-copy dump needs the page server's address and port")
        opts += ["lazy-pages", f"address {address}", f"port {int(port)}"]
    return opts


def restore_options(lazy: bool = False) -> list[str]:
    # mntns-compat-mode: CRIU 4's new mount engine fails on LXC's mount tree here.
    return ["mntns-compat-mode", *(["lazy-pages"] if lazy else [])]


# /proc parsing ---------------------------------------------------------------------------
def listening_ports(proc_net_tcp: str) -> set[int]:
    """TCP ports in LISTEN state in a ``/proc/PID/net/tcp`` (or tcp6) table."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A":
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass(frozen=True)
class Task:
    """One process of a container, from ``/proc/PID/status`` and its namespace links."""

    pid: int
    name: str
    state: str  # first letter of the State: line
    uids: tuple[int, ...]  # real, effective, saved, fs
    nssid: int | None  # session id in the innermost pid namespace (0: leader outside)
    nspgid: int | None
    uts_ns: str
    user_ns: str


def parse_status(pid: int, text: str, uts_ns: str = "", user_ns: str = "") -> Task:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()

    def last(key: str) -> int | None:
        v = fields.get(key, "").split()
        return int(v[-1]) if v else None

    return Task(
        pid=pid,
        name=fields.get("Name", "?"),
        state=fields.get("State", "?")[:1],
        uids=tuple(int(x) for x in fields.get("Uid", "").split()),
        nssid=last("NSsid"),
        nspgid=last("NSpgid"),
        uts_ns=uts_ns,
        user_ns=user_ns,
    )


def find_problems(tasks: Iterable[Task], init: Task, root_uid: int) -> list[Problem]:
    """What CRIU cannot dump among ``tasks`` of a container whose init is ``init``.

    ``root_uid`` is the container's root as the host sees it (0 privileged, the idmap base
    unprivileged).
    """
    problems = []
    for t in tasks:
        label = f"process {t.pid} ({t.name})"
        if any(u != root_uid for u in t.uids):
            problems.append(Problem(
                t.pid, f"{label} runs as a non-root user (uids {' '.join(map(str, t.uids))})",
                "CRIU cannot dump it here: these machines lack CAP_SYS_RESOURCE, so CRIU "
                "fails with \"Can't get rlimit 0\"; stop or mask that service (e.g. "
                "`systemctl mask dbus`) or run it as root"))
        if t.uts_ns != init.uts_ns:
            problems.append(Problem(
                t.pid, f"{label} has its own UTS (hostname) namespace",
                "CRIU cannot dump nested UTS namespaces; for systemd services add a "
                "`ProtectHostname=no` drop-in and restart the service"))
        if t.user_ns != init.user_ns:
            problems.append(Problem(
                t.pid, f"{label} runs in a nested user namespace",
                "CRIU cannot dump nested user namespaces; stop that process"))
        if t.pid != init.pid and (t.nssid == 0 or t.nspgid == 0):
            problems.append(Problem(
                t.pid, f"{label} belongs to a session or process group whose leader is "
                "outside the container",
                "CRIU refuses such a task (\"session leader is outside of its pid "
                "namespace\"); it was likely started by `migrate exec`/lxc-attach: start it "
                "with `setsid`, or from the container's init or service manager"))
        if t.state == "T" or t.state == "t":
            problems.append(Problem(
                t.pid, f"{label} is stopped (state {t.state})",
                "a rollback would let it run: continue it (`kill -CONT`) or stop it for good "
                "before migrating"))
    return problems


def log_tail(text: str, lines: int = 8) -> list[str]:
    """The lines of a CRIU/LXC log worth quoting: its errors, else its last lines."""
    all_lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    # "rlimit: Can't setup RLIMIT_NOFILE for self" is logged on every run here and harmless
    errors = [ln for ln in all_lines if ("Error" in ln or "ERROR" in ln) and "RLIMIT_NOFILE"
              not in ln]
    return (errors or all_lines)[-lines:]
