"""Run a command inside a host's network namespace, in a private mount namespace whose /sys
and cgroup hierarchies match it.

Why not ``ip netns exec``: it remounts /sys but hides the cgroup hierarchies, and lxc-start
then fails with "Failed to setup cgroup limits"; ``nsenter --net`` alone leaves the old /sys,
so LXC cannot find the namespace's bridge. LXC's command sockets are abstract unix sockets,
which are per network namespace, so *every* lxc-* command for the host must run in it:
those that start or change a container run here; those that only talk to a container's
command socket (lxc-ls, lxc-info, lxc-wait) enter just the network namespace, from a thread
(``proc.run(..., mounts=False)``), which costs ~3 ms instead of this helper's ~15 ms.

Usage: python3 -S nsexec.py NETNS -- CMD [ARG...]   (standard library only; runs as a script)

``core/proc.py`` puts this program in front of every command for a host in a namespace
(``netns_prefix``). Its ``execvp`` is the one exec outside ``proc.py``: it runs as a script of
its own, before any of the package can be imported, and becomes the command it was given.
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"nsexec: {what}: {os.strerror(err)}\n")
        sys.exit(125)


def _mount(src: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None):
    _check(
        libc.mount(
            src.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or ''} on {target}",
    )


def enter(netns: str) -> None:
    path = f"/run/netns/{netns}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        sys.stderr.write(f"nsexec: network namespace {netns!r} not found ({e.strerror})\n")
        sys.exit(125)
    _check(libc.setns(fd, CLONE_NEWNET), f"setns {path}")
    os.close(fd)
    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    # slave, not private: pools mounted later on the host still appear here.
    _mount("none", "/", None, MS_REC | MS_SLAVE)
    _mount("sysfs", "/sys", "sysfs")
    _mount("tmpfs", "/sys/fs/cgroup", "tmpfs", 0, "mode=755")
    for ctrl in CGROUP_V1:
        d = f"/sys/fs/cgroup/{ctrl}"
        os.makedirs(d, exist_ok=True)
        _mount("cgroup", d, "cgroup", 0, ctrl)
    os.makedirs("/sys/fs/cgroup/systemd", exist_ok=True)
    _mount("cgroup", "/sys/fs/cgroup/systemd", "cgroup", 0, "none,name=systemd")
    os.makedirs("/sys/fs/cgroup/unified", exist_ok=True)
    _mount("cgroup2", "/sys/fs/cgroup/unified", "cgroup2")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: nsexec.py NETNS -- CMD [ARG...]\n")
        sys.exit(125)
    enter(argv[0])
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as e:
        sys.stderr.write(f"nsexec: cannot run {argv[2]!r}: {e.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
