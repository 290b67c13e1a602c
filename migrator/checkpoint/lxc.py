"""Checkpoint and restore LXC containers with CRIU, through ``lxc-checkpoint``.

The one decision a reader needs: **the source is never killed by the dump.** Every dump runs
``lxc-checkpoint -s`` with a CRIU config file (``CRIU_CONFIG_FILE``, the only way to add
options to the criu that LXC runs) holding ``leave-stopped``. LXC's ``-s`` passes no
``--leave-running``, so criu's final state comes from that file: after a successful dump,
criu leaves every task of the container SIGSTOPped (memory, sockets, cgroup all still there)
instead of SIGKILLing it. From there:

- ``resume_source`` (rollback) removes the network lock criu left in the container's network
  namespace (a ``CRIU`` iptables/ip6tables chain dropping all traffic, normally removed by
  criu only when the tasks are resumed), sends SIGCONT to every task and thaws the cgroup if
  somebody froze it. If the tasks are gone (the container is STOPPED) it restores them from
  the same images instead.
- ``release_source`` (point of no return) SIGKILLs the stopped tasks; the container is then
  STOPPED on this host, its record and rootfs untouched.

Post-copy and the hazard. With ``lazy-pages`` the dump keeps serving memory pages to the
target's ``criu lazy-pages`` daemon after the tasks have been captured; when the page stream
is cut mid-transfer criu's dump side still exits 0 (and without ``leave-stopped`` would kill
the source) while the restored target dies waiting for pages. Here the source tasks stay
stopped whatever happens to the stream, so a cut stream loses nothing: the caller sees the
target's ``LazyPages.wait`` fail (non-zero exit code of the daemon, the only reliable
witness) and calls ``resume_source``. ``LazyDump.finish`` also refuses a dump whose log shows
a failed transfer, but its success alone proves nothing: release the source only once the
target's lazy-pages daemon exited 0.

Why tasks are left SIGSTOPped rather than cgroup-frozen: freezing the container (lxc-freeze)
*before* the dump makes criu record the freezer state FROZEN, and the restored container
then comes up frozen with its tasks stuck in ptrace stops (``lxc-unfreeze`` did not thaw it
here); letting criu freeze and seize the tasks itself records THAWED. LXC therefore reports
the source as RUNNING while its tasks are in state T.

Found on these machines (CRIU 4.1.1, LXC 5.0.2, kernel 6.18):

- An unprivileged container's veth cannot be re-created by criu 4.1.1: the kernel checks
  CAP_NET_ADMIN in the peer's network namespace when a veth pair is created (commit
  7b735ef81286, "rtnetlink: add missing netlink_ns_capable() check for peer netns"), and
  criu creates the pair from inside the container's user namespace ("Can't restore link:
  -1", EPERM; fixed upstream after 4.2 by routing it through usernsd, PR #3006). So the host
  makes the pair itself (``network.restore_nic``) and the restore's LXC config names the
  container's end as a ``phys`` NIC: LXC then passes ``--external netdev[eth0]:DEV`` and
  criu's usernsd moves the device in, where the images give it back its MAC, addresses and
  routes. The config is rendered normally again right after, so the next start makes its
  own veth as usual.
- Post-copy into an unprivileged container needs userfaultfd from inside its user
  namespace, which the kernel allows only with ``vm.unprivileged_userfaultfd = 1`` ("uffd:
  Unable to open an userfaultfd descriptor: Operation not permitted" otherwise). That
  sysctl is the host operator's choice (it widens what unprivileged code may do), so the
  target's hello reports it and a live migration falls back to stop-and-copy without it.
- CRIU cannot dump tasks running as a non-root user ("Can't get rlimit 0": no
  CAP_SYS_RESOURCE here), nested UTS namespaces, or tasks whose session leader is outside
  the container's pid namespace (anything started by ``lxc-attach`` without ``setsid``):
  ``preflight`` names them before anything is frozen.
- Restoring an unprivileged container's images needs the images directory readable by the
  container's root (criu opens some images from inside the user namespace: "Unable to open
  tty-info.img: Permission denied"), so ``restore`` hands the directory to that uid.
- Rolling back after ``leave-stopped`` leaves what criu would have cleaned on resume:
  "link remap" files of open-but-deleted files (none in the containers tested here) and
  the dumped TCP connections in repair mode, where the next send fails and the connection
  is lost: ``resume_source`` takes them out of it (``base.repair_off``) before the tasks
  continue, and the connections live on (tested with ``tests/workloads/tcpstream.c``).
- criu 4.1.1 cannot dump an inet socket on this kernel (SO_PASSCRED/SO_PASSSEC, see
  ``checkpoint/base.py``): every dump preloads ``base.sockopt_shim`` into it.
- systemd's watched ``/etc/localtime`` symlink cannot be dumped on btrfs (irmap never
  matches a btrfs subvolume's device; ``checkpoint/base.py``): every dump first swaps it
  for a copy (``base.unpin``, recorded in the images and in this host's checkpoint
  directory) and whoever runs the container next puts the link back (``pin_back``: the
  target after its restore, the source on a rollback or for a kept stopped copy).
- Pre-copy (``criu pre-dump``) needs soft-dirty tracking, which this kernel lacks.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from migrator.checkpoint import base
from migrator.checkpoint.base import (
    DumpStats,
    Features,
    Problem,
    RestoreStats,
    Task,
    criu_config,
    dump_options,
    find_problems,
    listening_ports,
    log_tail,
    parse_status,
    restore_options,
    tree_bytes,
)
from migrator.core import proc
from migrator.core.errors import CheckpointError, CommandTimeout, InvalidState, MigratorError
from migrator.runtime import network
from migrator.runtime.containers import Containers
from migrator.runtime.freezer import is_frozen
from migrator.runtime.lxc import LxcDriver
from migrator.runtime.operations import process_start
from migrator.runtime.state import ContainerRecord

# criu's network lock (iptables-restore format): what criu itself runs on resume.
NETWORK_UNLOCK = "*filter\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-F CRIU\n-X CRIU\nCOMMIT\n"


def criu_binary() -> str | None:
    """Where criu is (root's PATH may lack /usr/sbin under ``sudo`` or SSH), or None."""
    return shutil.which("criu") or (
        "/usr/sbin/criu" if os.access("/usr/sbin/criu", os.X_OK) else None
    )


def criu_version() -> str | None:
    """criu's version (the first line of ``criu --version``), None when it is not installed."""
    criu = criu_binary()
    if criu is None:
        return None
    first = proc.run([criu, "--version"], check=False, timeout=10).stdout.strip().splitlines()
    return first[0].removeprefix("Version: ").strip() if first else None


def criu_supports(feature: str) -> bool:
    """Whether ``criu check --feature FEATURE`` passes on this kernel (False without criu)."""
    criu = criu_binary()
    return criu is not None and proc.run([criu, "check", "--feature", feature], check=False,
                                         timeout=30).returncode == 0


def criu_supports_all(features: Iterable[str]) -> dict[str, bool]:
    """``criu_supports`` of each feature, the checks run side by side: each is a criu
    start and a kernel probe (~40 ms), and a live migration's plan asks for three on each
    host before it can choose a mode."""
    wanted = list(dict.fromkeys(features))
    if not wanted:
        return {}
    with ThreadPoolExecutor(len(wanted), thread_name_prefix="criu-check") as pool:
        return dict(zip(wanted, pool.map(criu_supports, wanted), strict=True))


def unprivileged_uffd() -> bool:
    """May a process without CAP_SYS_PTRACE over the host open a userfaultfd? Post-copy into
    an unprivileged container needs it (see the module docstring)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/vm/unprivileged_userfaultfd").read_text()) == 1
    return False


def _read(path: Path | str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _ns(pid: int, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return ""


def container_tasks(init_pid: int) -> list[Task]:
    """Every process in the pid namespace of ``init_pid`` (host pids, init first)."""
    pidns = _ns(init_pid, "pid")
    if not pidns:
        return []
    tasks = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if _ns(pid, "pid") != pidns:
            continue
        status = _read(f"/proc/{pid}/status")
        if status:
            tasks.append(parse_status(pid, status, _ns(pid, "uts"), _ns(pid, "user")))
    tasks.sort(key=lambda t: (t.pid != init_pid, t.pid))
    return tasks


def seized_by_criu(pid: int) -> bool:
    """True when ``pid`` is ptrace-stopped by a criu process (a dump has seized it)."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("TracerPid:"):
            tracer = line.split()[1]
            return tracer != "0" and _read(f"/proc/{tracer}/comm").strip() == "criu"
    return False


def wait_frozen(init_pid: int, state_file: Path | None, timeout: float,
                stop: Callable[[], bool]) -> bool:
    """True once the dump holds the container still: from then on its rootfs does not
    change, so the final sync may run beside the dump. criu freezes the cgroup, seizes
    every task with ptrace (init first), then thaws the cgroup while the tasks stay
    stopped: the freezer says FROZEN only for that short while, so init's tracer being
    criu counts too. False when ``stop()`` says to give up (the dump ended or failed) or
    ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while not stop() and time.monotonic() < deadline:
        with contextlib.suppress(OSError, IndexError):
            if (state_file is not None and is_frozen(state_file)) or seized_by_criu(init_pid):
                return True
        time.sleep(0.002)
    return False


def _failure(what: str, images: Path, output: Path, extra: str = "") -> CheckpointError:
    logname = {"dump": "dump.log", "restore": "restore.log"}.get(what.split()[0], "dump.log")
    log = images / logname
    detail = log_tail(_read(log)) + log_tail(_read(output), 4)
    return CheckpointError(
        f"{what} failed" + (f" ({extra})" if extra else "") + ":\n  " + "\n  ".join(detail),
        f"CRIU log: {log}; lxc-checkpoint output: {output}",
    )


# helper processes -------------------------------------------------------------------------
# A checkpoint's helpers (lxc-checkpoint, the criu it runs, criu lazy-pages) are started in
# sessions of their own, so they outlive a migrating process that is killed: `migrate
# recover` must end them, or the source stays frozen and LXC's monitor, waiting on a criu
# restore, stops answering lxc-info. They are named two ways, both proof against a reused
# pid: the journal records each one's pid with its start time (``helper_record``), and every
# criu and lxc-checkpoint of one checkpoint names its images directory (unique per
# operation) on its command line.
HELPER_PROGRAMS = ("criu", "lxc-checkpoint")
KILL_WAIT = 5.0  # seconds for killed helpers to be gone


def lazy_pages_complete(log: str) -> bool:
    """Whether a lazy-pages daemon's log (``LxcCheckpointer.lazy_pages_log``, criu's info
    level) shows it done and nothing failing: what its exit status would have said, for
    when the process that started it is gone and cannot be told. criu logs "Disconnect
    from the page server" once it leaves its request loop, which it does when every task
    has all its pages; any failure on the way is logged as an "Error" first."""
    return "page-xfer: Disconnect from the page server" in log and "Error" not in log


def helper_record(pid: int, what: str) -> dict[str, Any]:
    """What the journal keeps of a helper process: its pid, start time and role."""
    return {"pid": int(pid), "start": process_start(int(pid)), "what": what}


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    return _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def find_helpers(recorded: Iterable[dict[str, Any]], images: Path | None,
                 programs: tuple[str, ...] = HELPER_PROGRAMS) -> list[int]:
    """Live helper processes of one checkpoint: each recorded one whose pid still has its
    recorded start time, the members of its process group that run one of ``programs``,
    and any of ``programs`` whose command line names ``images``."""
    groups: set[int] = set()
    found: set[int] = set()
    for r in recorded:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            pid, start = int(r["pid"]), r.get("start")
            if start is not None and process_start(pid) == start:
                # the same pid and start time: the same process, whatever it runs now (a
                # helper may still be the netns helper about to exec lxc-checkpoint)
                groups.add(pid)  # spawned as session (and group) leaders
                found.add(pid)
    for pid in _pids():
        if pid == os.getpid():
            continue
        argv = _argv(pid)
        if not argv or os.path.basename(argv[0]) not in programs:
            continue
        stat = _proc_stat(pid)
        if len(stat) < 3 or stat[0] == "Z":
            continue
        in_group = stat[2].isdigit() and int(stat[2]) in groups
        if in_group or (images is not None and any(str(images) in a for a in argv)):
            found.add(pid)
    return sorted(found)


def kill_helpers(recorded: Iterable[dict[str, Any]], images: Path | None,
                 programs: tuple[str, ...] = HELPER_PROGRAMS,
                 wait: float = KILL_WAIT) -> list[int]:
    """SIGKILL what ``find_helpers`` names and wait until it is gone (dead or a zombie);
    returns the pids killed. A criu killed mid-dump leaves the source's tasks stopped or
    frozen, which ``resume_source`` handles; a criu restore killed makes LXC's monitor
    give the restore up, so lxc-* commands answer again."""
    recorded = list(recorded)
    victims = find_helpers(recorded, images, programs)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while True:
        alive = [p for p in victims if (_proc_stat(p) or ["Z"])[0] != "Z"]
        if not alive:
            return victims
        if time.monotonic() > deadline:
            raise CheckpointError(f"helper processes {alive} did not die within {wait:.0f}s "
                                  "of SIGKILL", "look at them with `ps -o pid,stat,wchan -p "
                                  f"{','.join(map(str, alive))}`")
        time.sleep(0.02)


class BoundedLxc(LxcDriver):
    """An ``LxcDriver`` whose every lxc-* command ends within ``seconds``: recovery asks LXC
    about containers whose monitor may be stuck (a restore waiting for pages that will
    never come), and must end with an error that says so, not hang."""

    def __init__(self, inner: LxcDriver, seconds: float) -> None:
        super().__init__(inner.lxcpath, inner.netns)
        self.seconds = seconds

    def _run(self, argv: list[str], **kw: Any) -> proc.Completed:
        asked = kw.get("timeout", proc.DEFAULT_TIMEOUT)
        kw["timeout"] = self.seconds if asked is None else min(float(asked), self.seconds)
        try:
            return super()._run(argv, **kw)
        except CommandTimeout as e:
            raise CommandTimeout(
                f"{argv[0]} did not answer within {kw['timeout']:.0f}s ({' '.join(argv[1:])})",
                "LXC's monitor of that container is stuck, probably behind a criu that still "
                "runs: find it with `ps -eo pid,args | grep criu`, kill it, and retry") from e


@contextlib.contextmanager
def bounded_lxc(cts: Containers, seconds: float) -> Iterator[Containers]:
    """``cts`` with every lxc-* command bounded to ``seconds`` (``BoundedLxc``) for the
    block; checkpointers made inside it inherit the bound."""
    old = cts.lxc
    cts.lxc = BoundedLxc(old, seconds)
    try:
        yield cts
    finally:
        cts.lxc = old


def _wait_helper(p: proc.Child, images: Path, timeout: float | None) -> int:
    """Wait for an lxc-checkpoint; on any interruption kill every criu working on
    ``images`` first (criu outlives an lxc-checkpoint killed alone), give lxc-checkpoint a
    moment to clean up after it (a restore's monitor then stops the half-restored
    container), and only then kill it with its group."""
    try:
        return p.wait(timeout=timeout)
    except BaseException:
        with contextlib.suppress(MigratorError):
            kill_helpers([], images, ("criu",))
        with contextlib.suppress(proc.TimeoutExpired):
            p.wait(timeout=KILL_WAIT)
        _kill_group(p)
        raise


class LazyDump:
    """A post-copy dump running in the background: captures the tasks, then serves pages."""

    def __init__(self, ck: LxcCheckpointer, name: str, images: Path, port: int,
                 popen: proc.Child, output: Path, status_fd: int | None = None
                 ) -> None:
        self.ck, self.name, self.images, self.port = ck, name, images, port
        self.status_fd = status_fd  # read end of criu's --status-fd (with --ps-socket)
        self.popen = popen
        self.output = output
        self.started = time.monotonic()
        self.serving_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _listening(self) -> bool:
        if self.status_fd is not None:  # handed a socket: criu says when it serves on it
            if not select.select([self.status_fd], [], [], 0)[0]:
                return False
            return os.read(self.status_fd, 1) == b"\0"
        # The lxc-checkpoint process sits in the host's network namespace; its /proc net
        # tables show that namespace's sockets. Never probe by connecting: the page server
        # accepts exactly one connection.
        tables = _read(f"/proc/{self.popen.pid}/net/tcp") + _read(
            f"/proc/{self.popen.pid}/net/tcp6")
        return self.port in listening_ports(tables)

    def wait_serving(self, timeout: float = 60) -> float:
        """Return (seconds since the start) once the non-memory images are written and the
        page server listens; the tasks are stopped from then on."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise _failure(f"post-copy dump of {self.name!r}", self.images, self.output,
                               f"lxc-checkpoint exited with {self.popen.returncode} before "
                               "serving pages")
            if self._listening():
                self.serving_seconds = time.monotonic() - self.started
                return self.serving_seconds
            if time.monotonic() > deadline:
                self.abort()
                raise CheckpointError(
                    f"post-copy dump of {self.name!r} did not serve pages within "
                    f"{timeout:.0f}s", "the dump was aborted; resume_source() rolls back")
            time.sleep(0.005)

    def finish(self, timeout: float | None = 300) -> DumpStats:
        """Wait until the page server has exited (all pages served, or the stream ended).

        Raises CheckpointError when lxc-checkpoint failed or criu's log shows a failed
        transfer. Success here does NOT prove the target got every page (a cut stream can
        still end with exit code 0): trust the target's ``LazyPages.wait``.
        """
        try:
            rc = self.popen.wait(timeout=timeout)
        except proc.TimeoutExpired:
            self.abort()
            raise CheckpointError(
                f"post-copy dump of {self.name!r} still serving pages after {timeout:.0f}s",
                "aborted; the source tasks stay stopped: resume_source() rolls back") from None
        self._release()
        seconds = time.monotonic() - self.started
        log = _read(self.images / "dump.log")
        if rc != 0 or "Lazy pages transfer FAILED" in log:
            raise _failure(f"post-copy dump of {self.name!r}", self.images, self.output,
                           f"exit code {rc}")
        return DumpStats(seconds, self.ck.non_memory_bytes(self.images), "post-copy",
                         self.serving_seconds)

    def abort(self) -> None:
        """Kill the dump (lxc-checkpoint and its criu). The tasks stay as criu left them
        (stopped, or running again if criu was killed mid-seize): resume_source() fixes
        either."""
        _kill_group(self.popen)
        self._release()

    def _release(self) -> None:
        if self.status_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.status_fd)
            self.status_fd = None


class LazyPages:
    """The target side's ``criu lazy-pages`` daemon: fetches pages for a lazy restore."""

    def __init__(self, popen: proc.Child, images: Path, log: Path) -> None:
        self.popen, self.images, self.log = popen, images, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float | None = 300) -> None:
        """Wait for the daemon to exit; it exits 0 only once every page has arrived."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except proc.TimeoutExpired:
            self.abort()
            raise CheckpointError(f"lazy-pages daemon still running after {timeout:.0f}s",
                                  f"killed it; log: {self.log}") from None
        if rc != 0:
            raise CheckpointError(
                f"lazy-pages daemon failed with exit code {rc}: the page stream broke and "
                "the restored container is missing memory:\n  "
                + "\n  ".join(log_tail(_read(self.log))),
                "stop the target container and roll back: resume_source() on the source; "
                f"log: {self.log}")

    def abort(self) -> None:
        _kill_group(self.popen)


def _kill_group(p: proc.Child) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    with contextlib.suppress(proc.TimeoutExpired):
        p.wait(timeout=10)


class LxcCheckpointer:
    """CRIU checkpoint/restore of one host's LXC containers (any state root / namespace)."""

    def __init__(self, containers: Containers) -> None:
        self.cts = containers
        self.lxc = containers.lxc  # lxc-checkpoint and init pids: the checkpointer's own job
        self.netns = containers.host.netns
        self.work = containers.host.root / "checkpoint"

    def _workdir(self) -> Path:
        self.work.mkdir(mode=0o700, exist_ok=True)
        return self.work

    def page_tls_dir(self, tag: str) -> Path:
        """Where one migration's page-stream TLS files live on this host (root only: the
        images directory may belong to an unprivileged container's root, who must never
        read the key)."""
        if not tag or "/" in tag or tag.startswith("."):
            raise ValueError(f"invalid tag {tag!r}")
        return self._workdir() / f"pagelink-{tag}"

    def _config(self, name: str, kind: str, options: list[str]) -> Path:
        p = self._workdir() / f"{name}.{kind}.criu.conf"
        p.write_text(criu_config(*options))
        return p

    def _dump_env(self, name: str, init: int, images: Path, conf: Path) -> dict[str, str]:
        """Before a dump: watches CRIU cannot dump made dumpable (``base.unpin``: the swap
        recorded in the images, for the target, and in this host's checkpoint directory),
        and criu's environment (its config file; the socket-option shim, ``sockopt_shim``)."""
        base.unpin(self.cts.rootfs(self.cts.get(name)), init,
                   [t.pid for t in container_tasks(init)],
                   [images / base.SWAP_RECORD, self._swap_record(name)])
        env = {"CRIU_CONFIG_FILE": str(conf)}
        shim = base.sockopt_shim(self._workdir())
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        return env

    def _swap_record(self, name: str) -> Path:
        return self._workdir() / f"{name}.{base.SWAP_RECORD}"

    def pin_back(self, name: str, record: Path | None = None) -> None:
        """Undo ``base.unpin`` in ``name``'s rootfs here (after a restore, a rollback, or
        for the stopped copy a kept source leaves)."""
        base.pin_back(self.cts.rootfs(self.cts.get(name)), record or self._swap_record(name))

    @staticmethod
    def non_memory_bytes(images: Path) -> int:
        return sum(f.stat().st_size for f in images.iterdir()
                   if f.is_file() and not f.name.startswith("pages-") and f.suffix == ".img")

    # features ----------------------------------------------------------------------------
    def check(self) -> Features:
        if criu_binary() is None:
            return Features(None, False, False, "criu is not installed",
                            "criu is not installed")
        version = criu_version()
        has = criu_supports_all(("uffd", "uffd-noncoop", "mem_dirty_track"))
        lazy = has["uffd"] and has["uffd-noncoop"]
        pre = has["mem_dirty_track"]
        return Features(
            criu_version=version, lazy_pages=lazy, pre_dump=pre,
            pre_dump_reason="" if pre else "kernel has no soft-dirty tracking (criu check "
            "--feature mem_dirty_track failed)",
            lazy_pages_reason="" if lazy else "no userfaultfd support (criu check --feature "
            "uffd/uffd-noncoop failed)")

    # before the freeze -------------------------------------------------------------------
    def preflight(self, name: str) -> list[Problem]:
        """What would make a dump or restore of the running container ``name`` fail."""
        rec = self.cts.get(name)
        init = self.lxc.init_pid(rec.name)
        if init is None:
            return [Problem(0, f"container {rec.name!r} is not running",
                            f"start it: `migrate start {rec.name}`")]
        spec = self.cts.spec(rec)
        root_uid = 0 if spec.idmap is None else spec.idmap.base
        tasks = container_tasks(init)
        init_task = next((t for t in tasks if t.pid == init), None)
        if init_task is None:
            return [Problem(init, f"container {rec.name!r} init vanished", "retry")]
        problems = find_problems(tasks, init_task, root_uid)
        sockets = base.inet_sockets([t.pid for t in tasks])
        if sockets and base.sockopt_shim(self._workdir()) is None:
            problems.append(Problem(
                0, f"container {rec.name!r} holds {sockets} TCP/UDP sockets, which criu "
                "4.1.1 cannot dump on Linux >= 6.16 without the socket-option shim, and no C "
                "compiler is here to build it", "install gcc (`apt-get install gcc`), or "
                "stop the container's servers and connections"))
        return problems

    # dump / rollback / release -----------------------------------------------------------
    def _require_running(self, name: str) -> int:
        pid = self.lxc.init_pid(name)
        st = self.cts.run_state(name)
        if pid is None or st != "RUNNING":
            raise InvalidState(f"container {name!r} is {st.lower()}, not running",
                               f"start it: `migrate start {name}`")
        return pid

    def dump(self, name: str, images: Path,
             on_start: Callable[[int], None] | None = None) -> DumpStats:
        """Stop-and-copy: every task captured into ``images`` and left stopped (not killed).

        On failure criu resumes the tasks itself: the container keeps running.
        ``on_start`` gets lxc-checkpoint's pid as soon as it runs (the journal names it).
        """
        rec = self.cts.get(name)
        init = self._require_running(rec.name)
        conf = self._config(rec.name, "dump", dump_options())
        out = self._workdir() / f"{rec.name}.dump.out"
        out.unlink(missing_ok=True)
        env = self._dump_env(rec.name, init, images, conf)
        t0 = time.monotonic()
        p = self.lxc.spawn_checkpoint(rec.name, images, env, out)
        if on_start is not None:
            on_start(p.pid)
        rc = _wait_helper(p, images, 300)
        seconds = time.monotonic() - t0
        if rc != 0:
            self.pin_back(rec.name)
            raise _failure(f"dump of {rec.name!r}", images, out, f"exit code {rc}; the "
                           "container keeps running")
        return DumpStats(seconds, tree_bytes(images), "stop-and-copy")

    def _unlock_network(self, init_pid: int) -> None:
        for tool in ("iptables", "ip6tables"):
            if shutil.which(f"{tool}-save") is None:
                continue
            saved = proc.run(["nsenter", "-t", str(init_pid), "-n", f"{tool}-save", "-t",
                              "filter"], check=False, timeout=30)
            if ":CRIU " not in saved.stdout:
                continue
            proc.run(["nsenter", "-t", str(init_pid), "-n", f"{tool}-restore", "--noflush"],
                     input=NETWORK_UNLOCK, timeout=30,
                     hint="the container's network stays locked by CRIU's CRIU chain")

    def resume_source(self, name: str, images: Path) -> None:
        """Rollback: the container runs again on this host with its memory state.

        Stopped tasks (left by ``dump``/post-copy) are continued; if they are gone (the
        container is STOPPED) the container is restored from ``images``.
        """
        rec = self.cts.get(name)
        init = self.lxc.init_pid(rec.name)
        if init is None:
            self.restore(rec.name, images)
            self.pin_back(rec.name)
            return
        self._unlock_network(init)
        base.repair_off(t.pid for t in container_tasks(init))  # its connections live on
        self.pin_back(rec.name)  # queued to the stopped watcher: it re-watches on SIGCONT
        for t in container_tasks(init):
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.pid, signal.SIGCONT)
        self.cts.thaw_if_frozen(rec.name)
        # the SIGCONTs are processed at once; make sure nothing stayed stopped or frozen
        deadline = time.monotonic() + 5
        while True:
            stopped = [t for t in container_tasks(init) if t.state in ("T", "t")]
            if not stopped and self.cts.run_state(rec.name) == "RUNNING":
                return
            self.cts.thaw_if_frozen(rec.name)
            if time.monotonic() > deadline:
                what = f"processes {[t.pid for t in stopped]} stay stopped" if stopped \
                    else "it stays frozen"
                raise CheckpointError(f"container {rec.name!r}: {what} after the rollback",
                                      f"`migrate unfreeze {rec.name}`, or SIGCONT by hand")
            time.sleep(0.02)

    def release_source(self, name: str) -> None:
        """Point of no return: kill the stopped source tasks (container STOPPED here; its
        record and rootfs are left for the caller)."""
        rec = self.cts.get(name)
        init = self.lxc.init_pid(rec.name)
        if init is None:
            return
        tasks = container_tasks(init)
        # SIGKILL first, thaw after: a frozen or stopped task dies on wake-up without
        # running another instruction, so no source task runs once the target has taken over
        for t in tasks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.pid, signal.SIGKILL)
        with contextlib.suppress(MigratorError):
            self.cts.thaw_if_frozen(rec.name)
        if not self.cts.wait_state(rec.name, "STOPPED", 30):
            with contextlib.suppress(MigratorError):
                self.cts.stop_now(rec.name, force=True)
        if self.cts.run_state(rec.name) != "STOPPED":
            raise CheckpointError(f"container {rec.name!r} did not stop after its tasks were "
                                  "killed", f"`migrate stop --force {rec.name}`")
        self.pin_back(rec.name)  # a stopped copy kept here gets its link back

    # restore -----------------------------------------------------------------------------
    def restore(self, name: str, images: Path, lazy: bool = False) -> RestoreStats:
        """Restore ``name`` (record and rootfs present, STOPPED) from ``images``.

        ``lazy``: memory comes from a running ``start_lazy_pages`` daemon on ``images``.
        """
        rec = self.cts.get(name)
        st = self.cts.run_state(rec.name)
        if st != "STOPPED":
            raise InvalidState(f"cannot restore {rec.name!r}: it is {st.lower()}",
                               "stop it first (or release_source() after a dump)")
        return self.restore_stopped(rec, images, lazy)

    def restore_stopped(self, rec: ContainerRecord, images: Path, lazy: bool = False,
                        on_start: Callable[[int], None] | None = None) -> RestoreStats:
        """``restore`` of a container its caller has just found STOPPED (a live migration's
        target checks before it starts anything): its LXC config written, then CRIU.
        ``on_start`` gets lxc-checkpoint's pid as soon as it runs. Interrupted (the agent's
        channel closed), the restore is killed with its criu: a restore left waiting would
        hold LXC's monitor, and lxc-info with it."""
        spec = self.cts.render_lxc_config(rec.name)
        host_end = None
        if spec.idmap is not None:
            # criu opens some images from inside the container's user namespace (tty-info,
            # timens, ...): the directory and every image in it belong to the container's
            # root, as it is the container's own state. Group root, readable by it: criu's
            # root task opens timens-0.img before its parent has written the namespace's
            # uid map (criu/cr-restore.c: prepare_timens comes before "Wait
            # prepare_userns"), still host uid 0 but with no capability over files owned by
            # another; on a loaded host it gets there first and was refused (EACCES)
            for path in (images, *images.iterdir()):
                os.lchown(path, spec.idmap.base, 0)
            os.chmod(images, 0o750)
            if spec.ipv4:  # the NIC is moved in, not re-created (see the module docstring)
                nic, host_end = network.restore_nic(spec.network)
                self.lxc.write_config(replace(spec, nic_device=nic))
        conf = self._config(rec.name, "restore", restore_options(lazy))
        out = self._workdir() / f"{rec.name}.restore.out"
        out.unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            p = self.lxc.spawn_checkpoint(rec.name, images, {"CRIU_CONFIG_FILE": str(conf)},
                                          out, restore=True)
            if on_start is not None:
                on_start(p.pid)
            rc = _wait_helper(p, images, 300)
        finally:
            if host_end is not None:
                self.lxc.write_config(spec)  # what the next start reads: its own veth
        seconds = time.monotonic() - t0
        if rc == 0:  # the container runs: a swapped link goes back (its watcher follows)
            self.pin_back(rec.name, images / base.SWAP_RECORD)
        if rc != 0:
            if host_end is not None:
                network.delete_link(spec.network, host_end)
            err = _failure(f"restore of {rec.name!r}", images, out, f"exit code {rc}")
            if self.cts.run_state(rec.name) != "STOPPED":
                with contextlib.suppress(MigratorError):
                    self.cts.stop_now(rec.name, force=True)
            raise err
        return RestoreStats(seconds)

    # post-copy ---------------------------------------------------------------------------
    def start_lazy_dump(self, name: str, images: Path, address: str | None = None,
                        port: int | None = None, ps_socket: int | None = None,
                        tls: base.CriuTls | None = None) -> LazyDump:
        """Start a post-copy dump; its page server serves on ``ps_socket`` (a connected
        socket, passed down to criu: nothing listens), or listens on ``address:port`` in
        this host's network namespace; in TLS with ``tls`` (``base.CriuTls``).
        The tasks stay stopped after it, whatever the stream does."""
        rec = self.cts.get(name)
        init = self._require_running(rec.name)
        ready_r, ready_w = os.pipe() if ps_socket is not None else (None, None)
        try:
            conf = self._config(rec.name, "lazy-dump",
                                [*dump_options(True, address, port, ps_socket, ready_w),
                                 *(tls.options() if tls is not None else [])])
            out = self._workdir() / f"{rec.name}.lazy-dump.out"
            out.unlink(missing_ok=True)
            fds = () if ps_socket is None or ready_w is None else (ps_socket, ready_w)
            env = self._dump_env(rec.name, init, images, conf)
            p = self.lxc.spawn_checkpoint(rec.name, images, env, out, pass_fds=fds)
        except BaseException:
            if ready_r is not None:
                os.close(ready_r)
            self.pin_back(rec.name)
            raise
        finally:
            if ready_w is not None:
                os.close(ready_w)
        return LazyDump(self, rec.name, images, 0 if ps_socket is not None else int(port or 0),
                        p, out, ready_r)

    def lazy_pages_log(self, images: Path) -> Path:
        """The log of the lazy-pages daemon serving ``images``: at criu's info level (-v3,
        not -v4's lines per page fault, which slowed the pages by a fifth), so it says when
        the daemon has finished (``lazy_pages_complete``)."""
        return self._workdir() / f"lazy-pages-{images.name}.log"

    def start_lazy_pages(self, images: Path, address: str | None = None, port: int | None = None,
                         timeout: float = 30, ps_socket: int | None = None,
                         tls: base.CriuTls | None = None) -> LazyPages:
        """Start the target's lazy-pages daemon against the source's page server (through
        ``ps_socket``, a connected socket passed down, or by connecting to ``address:port``;
        in TLS with ``tls``) and wait until it is ready for a lazy restore
        (``images/lazy-pages.socket``)."""
        criu = criu_binary()
        if criu is None:
            raise CheckpointError("criu is not installed", "run `make setup`")
        log = self.lazy_pages_log(images)
        log.unlink(missing_ok=True)
        (images / "lazy-pages.socket").unlink(missing_ok=True)
        server = ["--ps-socket", str(int(ps_socket))] if ps_socket is not None else \
            ["--address", str(address), "--port", str(int(port or 0))]
        p = proc.spawn([criu, "lazy-pages", "--page-server", *server, "--images-dir",
                        str(images), "-o", str(log), "-v3",
                        *(tls.argv() if tls is not None else [])], netns=self.netns,
                       pass_fds=() if ps_socket is None else (ps_socket,))
        lp = LazyPages(p, images, log)
        deadline = time.monotonic() + timeout
        while not (images / "lazy-pages.socket").exists():
            if p.poll() is not None:
                raise CheckpointError(
                    f"lazy-pages daemon exited with {p.returncode} before it was ready:\n  "
                    + "\n  ".join(log_tail(_read(log))), f"log: {log}")
            if time.monotonic() > deadline:
                lp.abort()
                raise CheckpointError(f"lazy-pages daemon not ready within {timeout:.0f}s",
                                      f"log: {log}")
            time.sleep(0.005)
        return lp
