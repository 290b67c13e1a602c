"""What a checkpointer offers and reports, plus the pure logic behind it.

The CRIU-driving code lives in ``checkpoint/lxc.py``; this module holds the value types the
live-migration pipeline sees (features, problems, timings), the scratch directory for images
and the small parsers (``/proc`` task status, listening sockets, CRIU log tails) that are
tested without CRIU; and three workarounds for what CRIU 4.1.1 cannot do on this kernel
(below): the swap of a watched symlink on btrfs (``unpin``, ``pin_back``), the socket-option
shim (``sockopt_shim``) and TCP repair mode after a rollback (``repair_off``).

The CRIU options of a live migration (``dump_options``, ``restore_options``), found on these
machines (CRIU 4.1.1, LXC 6.0.4):

- ``tcp-established`` on both sides: established TCP connections are dumped through TCP
  repair mode and re-created on the target with their sequence numbers, so a peer sees a
  pause, not a reset. LXC's ``lxc-checkpoint`` already passes ``--tcp-established`` (and
  ``--skip-in-flight``: half-open connections are dropped, their clients retry) on every
  dump and restore; the config files say it too, so the choice does not rest on what one
  LXC version does. It needs the container to keep its address (it does: same IP and
  MAC) and its network locked from the dump on: criu's lock (an iptables ``CRIU`` chain in
  the container's network namespace dropping everything) stays in place, with
  ``leave-stopped``, until ``resume_source`` removes it or ``release_source`` ends the
  namespace, so a peer's retransmissions are dropped meanwhile instead of reset. criu
  unlocks the restored sockets on the target when it resumes them. Tested with a
  connection inside the container (``tests/workloads/tcpstream.c``): no gap, no reconnect,
  after a->b, b->a, stop-and-copy and post-copy.
- **No inet socket could be dumped at all here** until the shim below: since Linux 6.16
  (commit 7d8d93fdde50b) ``getsockopt(SO_PASSCRED / SO_PASSSEC)`` on a TCP or UDP socket
  fails with EOPNOTSUPP, and criu 4.1.1 asks every socket for both ("Can't get 1:16 opt:
  Operation not supported", the dump fails; a listening socket is enough, so any container
  running a server). Upstream criu answers "off" for those sockets (criu#2705, #2719,
  after 4.1.1). ``sockopt_shim`` builds a 20-line preload library that does the same for
  the criu a dump runs (``LD_PRELOAD``); restore needs nothing (it only sets options that
  were on).
- ``leave-stopped`` skips what criu does when it resumes its tasks itself: the dumped
  connections stay in repair mode, and a rollback that merely continued the tasks lost
  them (the next ``send`` fails, EINVAL; seen with tcpstream). ``repair_off`` takes every
  TCP socket of the stopped tasks out of repair mode (``pidfd_getfd``, then
  ``TCP_REPAIR`` off, which also sends a window probe) before they continue.
- A connection is carried only where its peer can reach the container's address on the
  target: a peer on the source host's container bridge loses it when the hosts' bridges
  are not one network (``live_tcp_note`` says so for the plan).
- ``enable-fs ramfs`` (dump): systemd's ``/run/credentials/*`` mounts.
- inotify watches: see below (systemd on btrfs).

inotify watches CRIU 4.1.1 cannot dump on btrfs, and the swap that makes them dumpable,
found on these machines (CRIU 4.1.1, kernel 6.18, Debian bookworm's systemd 252):

- CRIU records each inotify watch as a path. It opens the watch's file handle and reopens
  the path the kernel shows for it (``openat(..., O_PATH)``, which *follows* a final
  symlink); when the inode differs it falls back to irmap, a scan of a few directories that
  compares each entry's ``st_dev``/``st_ino`` with the watch's. LXC always passes
  ``--force-irmap``, so that fallback is always taken.
- systemd (PID 1) watches ``/etc/localtime`` itself (``IN_DONT_FOLLOW``), and on Debian it is
  a symlink: the reopened path is the zone file, the inode differs, irmap decides.
- On dir pools (ext4 here) and zfs-fuse pools irmap finds it (its ``/etc`` hint; on FUSE the
  handle opens too: the watch keeps the inode cached). On btrfs irmap can find *nothing*:
  the watch carries the superblock's device (mountinfo's ``0:68``), while ``stat`` on a btrfs
  subvolume, the top-level one included, reports the subvolume's own anonymous device
  (``0:88``, ``0:70``). So ``irmap-scan-path`` cannot help there ("Can't dump that handle",
  whatever paths are added; tried with ``/etc/localtime`` itself and all of ``/usr``).
- Directories and regular files are found by their handle (the inode matches), so on btrfs
  the only blocker in a systemd container is that one symlink (its other watches are on
  ``/``, ``/run`` and below: found by handle).

The remedy: before the dump of a container whose root is btrfs, ``unpin`` replaces a
watched ``/etc/localtime`` symlink by a regular file with the same bytes (atomic rename,
same owner): the zone does not change for anyone, and systemd, woken by the link count
change, watches the new file within milliseconds. The dump, the final sync and the restore
then carry a regular file; ``pin_back`` puts the symlink back where the container runs next
(the target after its restore, the source on a rollback or when a stopped copy is kept) and
systemd again watches the link. The swap is recorded (``SWAP_RECORD`` in the images, which
cross to the target, and a copy in the host's checkpoint directory) so that any of those can
undo it, even in another process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from migrator.core import proc
from migrator.core.errors import CheckpointError
from migrator.runtime.inroot import RootDir

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


@dataclass(frozen=True)
class CriuTls:
    """criu's TLS for the post-copy page stream (``pipelines/live.page_server_address``):
    this end's key and certificate and the peer's certificate as the only CA, in a private
    directory.

    The certificates are ephemeral and self-signed, and crossed inside the SSH channel: the
    peer's certificate is pinned, not a name (``tls-no-cn-verify``: criu would check the
    certificate's name against an address it does not have on a handed-in socket)."""

    directory: Path

    @classmethod
    def write(cls, directory: Path, key_pem: bytes, cert_der: bytes,
              peer_der: bytes | None = None) -> CriuTls:
        """This end's files (and the peer's certificate, or later with ``add_peer``)."""
        if any(c.isspace() for c in str(directory)):  # a config file splits on blanks
            raise CheckpointError(f"criu cannot be given TLS files under {directory}",
                                  "use a state root whose path has no blanks")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        tls = cls(directory)
        tls._put("key.pem", key_pem)
        tls._put("cert.pem", ssl.DER_cert_to_PEM_cert(cert_der).encode())
        if peer_der is not None:
            tls.add_peer(peer_der)
        return tls

    def add_peer(self, peer_der: bytes) -> None:
        if not (self.directory / "key.pem").is_file():
            raise CheckpointError("this host's page-stream key is missing",
                                  "the migration's earlier step did not run here: retry")
        self._put("peer.pem", ssl.DER_cert_to_PEM_cert(peer_der).encode())

    def _put(self, name: str, data: bytes) -> None:
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def options(self) -> list[str]:
        """For a CRIU config file (the dump, run by lxc-checkpoint)."""
        d = self.directory
        return ["tls", f"tls-cacert {d / 'peer.pem'}", f"tls-cert {d / 'cert.pem'}",
                f"tls-key {d / 'key.pem'}", "tls-no-cn-verify"]

    def argv(self) -> list[str]:
        """For criu's command line (the lazy-pages daemon)."""
        out: list[str] = []
        for option in self.options():
            name, _, value = option.partition(" ")
            out += [f"--{name}", *([value] if value else [])]
        return out

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def dump_options(lazy: bool = False, address: str | None = None, port: int | None = None,
                 ps_socket: int | None = None, status_fd: int | None = None) -> list[str]:
    # leave-stopped: after the dump CRIU leaves every task SIGSTOPped instead of killing it
    # (LXC's -s passes no --leave-running, so this config option decides the final state).
    # enable-fs ramfs: systemd mounts /run/credentials/* as ramfs, which CRIU dumps only
    # when told to (the files in it are dumped with the mount, so nothing is lost).
    opts = ["leave-stopped", "enable-fs ramfs", "tcp-established"]
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
    # tcp-established: the connections the dump took (see the module docstring).
    return ["mntns-compat-mode", "tcp-established", *(["lazy-pages"] if lazy else [])]


def live_tcp_note(shared_network: bool) -> str:
    """What the live plan says about established TCP connections: carried (CRIU's
    ``tcp-established``, network locked from the dump until the target runs), but only for
    peers that reach the container's address on the target's network."""
    if shared_network:
        return ("established TCP connections are carried (tcp-established; the network "
                "stays locked from the dump until the target runs)")
    return ("established TCP connections are carried only for peers that reach the target's "
            "container network: the hosts' container bridges are not one network, so peers "
            "on this host's bridge lose theirs")


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


# inotify watches (see the module docstring) -------------------------------------------
LOCALTIME = "etc/localtime"
SWAP_RECORD = "migrator-swapped-links.json"  # in an images directory (CRIU ignores it)
REWATCH_WAIT = 2.0  # seconds for the watcher to move to the new file


def parse_inotify(fdinfo: str) -> set[tuple[int, int]]:
    """(device, inode) of every watch in a ``/proc/PID/fdinfo/FD`` text (none if it is not
    an inotify descriptor). The device is the kernel's encoding (major << 20 | minor)."""
    watches = set()
    for line in fdinfo.splitlines():
        if not line.startswith("inotify "):
            continue
        fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
        with contextlib.suppress(KeyError, ValueError):
            watches.add((int(fields["sdev"], 16), int(fields["ino"], 16)))
    return watches


def root_mount(mountinfo: str) -> tuple[str, int] | None:
    """(filesystem type, kernel device) of the mount at ``/`` in a ``/proc/PID/mountinfo``
    (the last one: it is the one on top)."""
    found = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        parts = left.split()
        if not sep or len(parts) < 5 or parts[4] != "/":
            continue
        major, _, minor = parts[2].partition(":")
        with contextlib.suppress(ValueError):
            found = (right.split()[0], int(major) << 20 | int(minor))
    return found


def watches_of(pids: Iterable[int]) -> set[tuple[int, int]]:
    """Every inotify watch held by the given processes (host pids)."""
    found: set[tuple[int, int]] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                text = _proc_text(f"/proc/{pid}/fdinfo/{fd}")
                if "inotify " in text:
                    found |= parse_inotify(text)
    return found


def unpin(rootfs: Path, init_pid: int, pids: list[int], records: list[Path]) -> list[str]:
    """Make the container's watches dumpable (see the module docstring); returns the paths
    swapped (none but on btrfs). Each swap is written to every file of ``records`` first.

    Raises CheckpointError when a watcher does not move to the new file in time (the link is
    put back first: nothing changed)."""
    mount = root_mount(_proc_text(f"/proc/{init_pid}/mountinfo"))
    if mount is None or mount[0] != "btrfs":
        return []
    with RootDir(rootfs) as root:
        st = root.lstat(LOCALTIME)
        target = root.readlink(LOCALTIME)
        if st is None or target is None or not stat.S_ISLNK(st.st_mode):
            return []
        if (mount[1], st.st_ino) not in watches_of(pids):
            return []
        data = root.read_bytes(LOCALTIME)
        if data is None:  # a dangling link: nothing a watcher could read either
            return []
        record = json.dumps({LOCALTIME: {"target": target, "uid": st.st_uid,
                                         "gid": st.st_gid}})
        for r in records:
            r.write_text(record)
        root.write_bytes(LOCALTIME, data, 0o644, owner=(st.st_uid, st.st_gid))
    deadline = time.monotonic() + REWATCH_WAIT
    while (mount[1], st.st_ino) in watches_of(pids):
        if time.monotonic() > deadline:
            for r in records:
                pin_back(rootfs, r)
            raise CheckpointError(
                f"a process of the container still watches the old /{LOCALTIME} after "
                f"{REWATCH_WAIT:.0f}s", "CRIU cannot dump a watched symlink on btrfs: move "
                "the container to a dir pool first (`migrate move NAME --pool dir`)")
        time.sleep(0.005)
    return [LOCALTIME]


def pin_back(rootfs: Path, record: Path) -> list[str]:
    """Undo what ``record`` says ``unpin`` swapped in ``rootfs`` (its symlinks back, owner
    kept), then remove ``record``. Nothing happens when it is missing, and an entry that is
    no longer the regular file the swap made (the container replaced it) is left alone."""
    try:
        swapped = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    done = []
    with RootDir(rootfs) as root:
        for rel, how in swapped.items():
            st = root.lstat(rel)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            root.replace_with_symlink(rel, str(how["target"]),
                                      (int(how["uid"]), int(how["gid"])))
            done.append(rel)
    record.unlink(missing_ok=True)
    return done


def _proc_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# TCP sockets left in repair mode (see the module docstring) ------------------------------
SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64 (the generic table)
TCP_REPAIR = 19
TCP_REPAIR_OFF = 0


def repair_off(pids: Iterable[int]) -> int:
    """Take every TCP socket the given (stopped) processes hold out of repair mode; returns
    how many were switched. criu puts a dumped connection in repair mode and, with
    ``leave-stopped``, never takes it out: resumed as it is, the task's next send fails
    (EINVAL) and the connection is lost. Switching it off sends a window probe, so the peer
    learns at once that the connection lives. A listening socket refuses (EPERM) and needs
    nothing; a socket several tasks share is switched once."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    seen: set[str] = set()
    switched = 0
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if not link.startswith("socket:[") or link in seen:
                        continue
                    mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                    if mine < 0:
                        continue
                    sock = socket.socket(fileno=mine)
                    try:
                        if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                                sock.type == socket.SOCK_STREAM:
                            seen.add(link)
                            with contextlib.suppress(OSError):
                                sock.setsockopt(socket.SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                                switched += 1
                    finally:
                        sock.close()  # our duplicate only: the task keeps its socket
        finally:
            os.close(pidfd)
    return switched


# inet sockets on Linux >= 6.16 (see the module docstring) --------------------------------
SOCKOPT_SHIM_C = r"""
/* criu 4.1.1 asks every socket for SO_PASSCRED and SO_PASSSEC; since Linux 6.16 an inet
 * socket answers EOPNOTSUPP and the dump fails. Answer "off" instead, as criu >= 4.2 does
 * (criu#2719): only those two options, only when the kernel refused them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    static int (*real)(int, int, int, void *, socklen_t *);
    if (!real)
        real = (int (*)(int, int, int, void *, socklen_t *))dlsym(RTLD_NEXT, "getsockopt");
    int r = real(fd, level, name, val, len);
    if (r < 0 && errno == EOPNOTSUPP && level == SOL_SOCKET &&
        (name == SO_PASSCRED || name == SO_PASSSEC) && val && len && *len >= sizeof(int)) {
        memset(val, 0, sizeof(int));
        *len = sizeof(int);
        return 0;
    }
    return r;
}
"""


def sockopt_shim(workdir: Path) -> Path | None:
    """The shared object a dump preloads into criu (``LD_PRELOAD``) so that it can dump inet
    sockets on this kernel (see the module docstring), built once into ``workdir`` (named
    by its source's hash: a changed source builds anew). None without a C compiler: then a
    container holding a TCP or UDP socket cannot be dumped."""
    digest = hashlib.sha256(SOCKOPT_SHIM_C.encode()).hexdigest()[:12]
    so = workdir / f"criu-sockopt-{digest}.so"
    if so.exists():
        return so
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = workdir / f"criu-sockopt-{digest}.c"
    src.write_text(SOCKOPT_SHIM_C)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    try:
        r = proc.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
                     check=False, timeout=60)
        if r.returncode != 0:
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, so)
    finally:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
    return so


def socket_inodes(proc_net_table: str) -> set[int]:
    """The inode of every socket in a ``/proc/PID/net/{tcp,tcp6,udp,udp6}`` table."""
    inodes = set()
    for line in proc_net_table.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 9 and parts[9].isdigit() and parts[9] != "0":
            inodes.add(int(parts[9]))
    return inodes


def inet_sockets(pids: list[int]) -> int:
    """How many TCP and UDP sockets the given processes (one container's) hold: what the
    dump cannot take without ``sockopt_shim``."""
    if not pids:
        return 0
    inet: set[int] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        inet |= socket_inodes(_proc_text(f"/proc/{pids[0]}/net/{table}"))
    held: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        held.add(int(link[8:-1]))
    return len(held & inet)
