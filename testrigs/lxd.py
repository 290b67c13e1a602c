"""A real LXD 5.0.2 (Debian's ``lxd`` package) in a network namespace of its own, for the
compatibility fixtures and checks (``bench/lxd_fixtures.py``); the test suite never needs it.

Why a namespace: on its first start LXD looks up an outside host (images.linuxcontainers.org
for its instance types) and would update images from remotes. Started inside a namespace
holding only ``lo`` it can reach nothing, and its configuration also turns image updates off
(``images.auto_update_interval: 0``). No managed network is made, so no dnsmasq runs; the
instances have no NIC. Images come only from local files (``lxc image import``).

Layout under ``base`` (``/var/tmp/migrator-lxd``)::

    lxd/            LXD_DIR: database, unix.socket, containers, disks/bt.img (btrfs loop)
    client/         LXD_CONF of the ``lxc`` client (no remote is ever used)
    dirpool/        the ``dir`` pool's source
    lxd.log         the daemon's log; lxd.pid its PID

The daemon runs through ``migrator/core/nsexec.py`` (``proc.spawn(netns=...)``): setns into
the namespace, a private (slave) mount namespace with a fresh sysfs and cgroup hierarchies,
which LXD needs exactly as lxc-start does. Its mounts (pools, shmounts, devlxd) live in that
mount namespace only, so they go when the daemon and its containers are gone; ``down`` still
stops every instance (PIDs noted first), asks LXD to shut down, kills what is left by PID
(the daemon, any process still in the namespace, the containers' inits), detaches the btrfs
pool's loop device by its backing file, deletes the namespace and removes ``base``. It is
idempotent and also cleans what a killed run left.

Command line::

    python -m testrigs.lxd up      # install if needed, start, pools, images; prints env
    python -m testrigs.lxd down    # everything gone
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import yaml

from migrator.core import proc
from migrator.core.errors import MigratorError, MissingDependency

DEFAULT_BASE = Path("/var/tmp/migrator-lxd")
NETNS = "mlxd"
BTRFS_POOL_SIZE = "1GiB"
BUSYBOX_IMAGE = Path("/var/cache/migrator/images/busybox-v4-x86_64.tar.zst")
# the halt signals LXD and this project send (SIGPWR, SIGTERM, SIGINT, busybox's SIGUSR1,
# systemd's SIGRTMIN+3/+4); SIGCHLD is waited for to reap
_TINY_INIT_C = r"""
/* PID 1 of the LXD fixtures' containers: blocks the halt signals, reaps children, and
 * exits on the first halt signal. No libc: a few hundred bytes, so archives stay small. */
static long sc(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return r;
}
#define BIT(s) (1UL << ((s) - 1))
void _start(void) {
    unsigned long set = BIT(2) | BIT(10) | BIT(15) | BIT(17) | BIT(30) | BIT(37) | BIT(38);
    sc(14, 0, (long)&set, 0, 8);                    /* rt_sigprocmask(SIG_BLOCK) */
    for (;;) {
        long s = sc(128, (long)&set, 0, 0, 8);      /* rt_sigtimedwait */
        if (s == 17) {                              /* SIGCHLD: reap (wait4 WNOHANG) */
            while (sc(61, -1, 0, 1, 0) > 0) {}
            continue;
        }
        if (s > 0) sc(231, 0, 0, 0, 0);             /* exit_group(0) */
    }
}
"""


class LxdError(MigratorError):
    """The LXD rig could not be brought up or torn down."""

    exit_code = 1
    hint = "see the daemon's log under /var/tmp/migrator-lxd/lxd.log"


class LxdRig:
    """One LXD daemon in namespace ``netns`` with its state under ``base``: a ``dir`` pool
    and a ``bt`` btrfs pool (a loop file LXD makes), images imported from local files."""

    def __init__(self, base: Path = DEFAULT_BASE, netns: str = NETNS) -> None:
        self.base = base
        self.netns = netns
        self.lxd_dir = base / "lxd"
        self.env = {"LXD_DIR": str(self.lxd_dir), "LXD_CONF": str(base / "client")}
        self._child: proc.Child | None = None

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LxdRig:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        install()
        if self.running():
            return
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)
        for sub in ("lxd", "client", "dirpool"):
            (self.base / sub).mkdir(exist_ok=True)
        if not Path("/run/netns", self.netns).exists():
            proc.run(["ip", "netns", "add", self.netns])
        proc.run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        child = proc.spawn(["lxd", "--group", "", "--logfile", str(self.base / "lxd.log")],
                           netns=self.netns, env=self.env, output=self.base / "lxd.out")
        self._child = child  # reaped by down()
        (self.base / "lxd.pid").write_text(f"{child.pid}\n")
        try:
            proc.run(["lxd", "waitready", "--timeout", "60"], env=self.env, timeout=70)
        except MigratorError as e:
            raise LxdError(f"LXD did not come up: {e}") from e
        preseed = {
            "config": {"images.auto_update_interval": "0",
                       "images.remote_cache_expiry": "0"},
            "storage_pools": [
                {"name": "dir", "driver": "dir",
                 "config": {"source": str(self.base / "dirpool")}},
                {"name": "bt", "driver": "btrfs", "config": {"size": BTRFS_POOL_SIZE}},
            ],
            "profiles": [{"name": "default", "devices": {
                "root": {"type": "disk", "path": "/", "pool": "dir"}}}],
        }
        proc.run(["lxd", "init", "--preseed"], input=yaml.safe_dump(preseed), env=self.env)

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.base / "lxd.pid").read_text())
        return None

    def lxc(self, *args: str, timeout: float = 300, check: bool = True) -> proc.Completed:
        """The ``lxc`` client against this daemon (its unix socket; no remote)."""
        return proc.run(["lxc", *args], env=self.env, timeout=timeout, check=check)

    def version(self) -> str:
        return proc.run(["lxd", "--version"]).stdout.strip()

    def instances(self) -> list[dict[str, object]]:
        if not (self.lxd_dir / "unix.socket").exists() or not self.running():
            return []
        r = self.lxc("list", "--format", "json", check=False, timeout=30)
        with contextlib.suppress(ValueError):
            return list(json.loads(r.stdout or "[]"))
        return []

    def init_pid(self, name: str) -> int:
        """The host PID of a running instance's init."""
        state = json.loads(self.lxc("query", f"/1.0/instances/{name}/state").stdout)
        return int(state["pid"])

    def down(self) -> list[str]:
        """Everything the rig made gone (idempotent); returns what could not be undone."""
        problems: list[str] = []
        inits: list[int] = []
        for inst in self.instances():
            state = inst.get("state")
            if isinstance(state, dict) and isinstance(state.get("pid"), int) and state["pid"]:
                inits.append(state["pid"])
            with contextlib.suppress(MigratorError):
                self.lxc("stop", "--force", str(inst["name"]), check=False, timeout=60)
        if self.running():
            with contextlib.suppress(MigratorError):
                proc.run(["lxd", "shutdown", "--timeout", "30"], env=self.env, timeout=40,
                         check=False)
        pids = [p for p in (self.pid(), *inits) if p]
        pids += _netns_pids(self.netns)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._child is not None:  # started by this process: reaped, not left a zombie
            with contextlib.suppress(Exception):
                self._child.wait(timeout=10)
            self._child = None
        problems += [f"process {p} is still alive" for p in pids if _alive(p)]
        for img in sorted(self.lxd_dir.glob("disks/*.img")) if self.lxd_dir.exists() else []:
            for dev in _loops_of(img):
                with contextlib.suppress(MigratorError):
                    proc.run(["umount", "--all-targets", dev], check=False)
                    proc.run(["losetup", "-d", dev], check=False)
            problems += [f"loop device {d} still holds {img}" for d in _loops_of(img)]
        if Path("/run/netns", self.netns).exists():
            proc.run(["ip", "netns", "del", self.netns], check=False)
        if self.base.exists():
            for m in reversed(_mounts_under(self.base)):
                proc.run(["umount", "-l", m], check=False)
            proc.run(["rm", "-rf", "--one-file-system", str(self.base)], check=False,
                     timeout=None)
            if self.base.exists():
                problems.append(f"{self.base} could not be removed")
        return problems

    # ----------------------------------------------------------------- images
    def import_image(self, tarball: Path, alias: str) -> None:
        """A unified tarball (``metadata.yaml`` + ``rootfs/``) from a local file."""
        if alias not in {a.get("name") for i in self.images() for a in i.get("aliases", [])}:
            self.lxc("image", "import", str(tarball), "--alias", alias)

    def images(self) -> list[dict[str, list[dict[str, str]]]]:
        return list(json.loads(self.lxc("image", "list", "--format", "json").stdout))


def install() -> None:
    """Debian's ``lxd`` (bookworm: 5.0.2), without starting its service: on these machines
    PID 1 is not an init system and ``policy-rc.d`` refuses starts; LXD is only ever started
    by this rig, inside its namespace."""
    if shutil.which("lxd") and shutil.which("lxc"):
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    proc.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "lxd"],
             env=env, timeout=900, hint="scripts/setup-host.sh installs lxd")
    if not shutil.which("lxd"):
        raise MissingDependency("lxd is not installed", "apt-get install lxd")


def build_tiny_init(out: Path) -> Path:
    """Compile the fixtures' init (needs gcc; x86_64)."""
    src = out.with_suffix(".c")
    src.write_text(_TINY_INIT_C)
    proc.run(["gcc", "-Os", "-static", "-nostdlib", "-fno-stack-protector", "-no-pie",
              "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-s", "-o",
              str(out), str(src)])
    src.unlink()
    return out


def tiny_image(path: Path, work: Path) -> Path:
    """A unified tarball of a rootfs of a few kB: the tiny init, /etc files, a user's home
    owned 1000:1000, a symlink and a hard link; ``init: unknown`` (no busybox, no systemd)."""
    work.mkdir(parents=True, exist_ok=True)
    init = build_tiny_init(work / "init")
    meta = {"architecture": "x86_64", "creation_date": 1767225600,
            "properties": {"os": "tiny", "release": "1", "architecture": "x86_64",
                           "description": "tiny init for LXD fixtures", "init": "unknown"},
            "templates": {}}

    def add(t: tarfile.TarFile, name: str, kind: bytes, mode: int, uid: int = 0,
            gid: int = 0, data: bytes = b"", link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.mtime, info.linkname, info.size = 1767225600, link, len(data)
        t.addfile(info, io.BytesIO(data) if data else None)

    D, F, S, L = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as t:
        add(t, "metadata.yaml", F, 0o644, data=yaml.safe_dump(meta).encode())
        add(t, "templates", D, 0o755)
        add(t, "rootfs", D, 0o755)
        for d in ("bin", "dev", "proc", "sys", "run", "etc", "var", "var/log", "home", "mnt"):
            add(t, f"rootfs/{d}", D, 0o755)
        add(t, "rootfs/root", D, 0o700)
        add(t, "rootfs/tmp", D, 0o1777)
        add(t, "rootfs/sbin", D, 0o755)
        add(t, "rootfs/sbin/init", F, 0o755, data=init.read_bytes())
        add(t, "rootfs/sbin/halt", L, 0o755, link="rootfs/sbin/init")
        add(t, "rootfs/bin/init", S, 0o777, link="../sbin/init")
        add(t, "rootfs/etc/hostname", F, 0o644, data=b"tiny\n")
        add(t, "rootfs/etc/passwd", F, 0o644,
            data=b"root:x:0:0:root:/root:/sbin/init\nuser:x:1000:1000::/home/user:/bin/init\n")
        add(t, "rootfs/etc/group", F, 0o644, data=b"root:x:0:\nuser:x:1000:\n")
        add(t, "rootfs/etc/shadow", F, 0o640, 0, 42, data=b"root:*:1::::::\nuser:*:1::::::\n")
        add(t, "rootfs/home/user", D, 0o750, 1000, 1000)
        add(t, "rootfs/home/user/notes.txt", F, 0o600, 1000, 1000, data=b"owned by user\n")
    init.unlink()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _netns_pids(netns: str) -> list[int]:
    if not Path("/run/netns", netns).exists():
        return []
    r = proc.run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _loops_of(image: Path) -> list[str]:
    r = proc.run(["losetup", "-j", str(image)], check=False)
    return [line.split(":", 1)[0] for line in r.stdout.splitlines() if line.strip()]


def _mounts_under(base: Path) -> list[str]:
    """Mount points under ``base`` in this mount namespace (none, unless a run leaked)."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4].encode().decode("unicode_escape")
            if target == str(base) or target.startswith(f"{base}/"):
                out.append(target)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testrigs.lxd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("--base", type=Path, default=DEFAULT_BASE)
    args = ap.parse_args(argv)
    rig = LxdRig(args.base)
    if args.action == "up":
        rig.up()
        if BUSYBOX_IMAGE.exists():
            rig.import_image(BUSYBOX_IMAGE, "busybox")
        print(" ".join(f"{k}={v}" for k, v in rig.env.items()))
        return 0
    problems = rig.down()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
